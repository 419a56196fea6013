"""`ember model ...` verbs."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("tiny")
def tiny(
    out_dir: Path = typer.Argument(..., help="directory to write the model into"),
    seed: int = typer.Option(0, help="random seed of the weights"),
    layers: int = typer.Option(2, help="number of decoder layers"),
    hidden: int = typer.Option(64, help="hidden size"),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16"),
) -> None:
    """Write a small Llama-architecture model in Hugging Face format, built offline."""
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    heads = max(1, hidden // 64) if hidden >= 256 else 4
    spec = TinyModelSpec(seed=seed, layers=layers, hidden=hidden, heads=heads, kv_heads=heads if hidden >= 256 else 2,
                         dtype=dtype)
    out = make_tiny_model(out_dir, spec)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    typer.echo(f"wrote {out} ({size / 1e6:.1f} MB of weights)")
