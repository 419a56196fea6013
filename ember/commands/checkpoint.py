"""`ember checkpoint ...` verbs: convert, verify, push, ls, rm. Thin shells over ember.loader."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1) from e


@app.command("convert")
def convert(
    src: Path = typer.Argument(..., help="Hugging Face directory with .safetensors (single or sharded)."),
    dst: Path = typer.Argument(..., help="New directory for the Ember checkpoint."),
    chunk_mib: int = typer.Option(16, "--chunk-mib", min=1, help="Read/checksum chunk size in MiB."),
    partition_gib: float = typer.Option(2.0, "--partition-gib", help="Largest partition file in GiB."),
) -> None:
    """Convert a Hugging Face safetensors checkpoint into Ember's format, bit-exactly."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from ember.errors import EmberError
    from ember.loader.convert import convert_checkpoint, find_safetensors

    try:
        total = sum(p.stat().st_size for p in find_safetensors(src))
        with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar:
            task = bar.add_task(f"convert {src.name}", total=total)
            manifest = convert_checkpoint(
                src, dst, chunk_bytes=chunk_mib << 20, partition_bytes=int(partition_gib * (1 << 30)),
                progress=lambda n: bar.update(task, advance=n),
            )
    except EmberError as e:
        _fail(e)
    typer.echo(json.dumps({"path": str(dst), "tensors": len(manifest.tensors), "tensor_bytes": manifest.tensor_nbytes}))


@app.command("verify")
def verify(dst: Path = typer.Argument(..., help="An Ember checkpoint directory.")) -> None:
    """Check sizes, sha256 and chunk hashes of every partition and model file."""
    from ember.errors import EmberError
    from ember.loader.convert import verify_checkpoint

    try:
        report = verify_checkpoint(dst)
    except EmberError as e:
        _fail(e)
    typer.echo(json.dumps(report))


@app.command("push")
def push(
    src: Path = typer.Argument(..., help="HF directory (converted on the way) or an Ember checkpoint."),
    name: str = typer.Argument(..., help="Checkpoint name in the store."),
    store: str | None = typer.Option(None, "--store", help="file:///abs/dir or s3://bucket/prefix (default EMBER_STORE_URL)."),
) -> None:
    """Upload a checkpoint to the store."""
    from ember.errors import EmberError
    from ember.loader.store import open_store

    try:
        info = open_store(store).push(src, name, progress=True)
    except EmberError as e:
        _fail(e)
    typer.echo(json.dumps({"name": info.name, "nbytes": info.nbytes}))


@app.command("ls")
def ls(store: str | None = typer.Option(None, "--store", help="Store URI (default EMBER_STORE_URL).")) -> None:
    """List the checkpoints in the store."""
    from ember.errors import EmberError
    from ember.loader.store import open_store

    try:
        infos = open_store(store).list()
    except EmberError as e:
        _fail(e)
    typer.echo(json.dumps([{"name": i.name, "nbytes": i.nbytes} for i in infos]))


@app.command("rm")
def rm(
    name: str = typer.Argument(..., help="Checkpoint name."),
    store: str | None = typer.Option(None, "--store", help="Store URI (default EMBER_STORE_URL)."),
) -> None:
    """Remove a checkpoint from the store."""
    from ember.errors import EmberError
    from ember.loader.store import open_store

    try:
        open_store(store).remove(name)
    except EmberError as e:
        _fail(e)
    typer.echo(json.dumps({"removed": name}))
