"""`ember bench loader`."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def bench_loader(
    size_gb: float = typer.Option(1.0, "--size-gb", help="Size of the synthetic checkpoint in GB."),
    json_out: Path = typer.Option(..., "--json", help="Write the results here (JSON)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a bar chart (PNG)."),
    cold: bool = typer.Option(False, "--cold", help="Drop the page cache before every measurement (root)."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds; methods are interleaved within each."),
    workdir: Path | None = typer.Option(None, "--workdir", help="Where checkpoints are written (default: beside --json)."),
    threads: int | None = typer.Option(None, "--threads", help="Reader threads (default EMBER_LOADER_THREADS or 8)."),
) -> None:
    """Checkpoint loading: Ember's tiers against safetensors and torch.load, one interleaved run."""
    from rich.console import Console

    from ember.loader.bench import plot_results, run_loader_bench

    console = Console(stderr=True)
    work = workdir or json_out.parent / f".{json_out.stem}-work"
    with console.status("benchmarking") as status:
        doc = run_loader_bench(size_gb, work, cold=cold, rounds=rounds, threads=threads, log=lambda s: (status.update(s), console.print(s)))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(doc, indent=2))
    if plot is not None:
        plot_results(doc, plot)
    for name, r in doc["results"].items():
        console.print(f"{name:18s} {r['seconds']:8.3f} s {r['gbps']:7.2f} GB/s")
    console.print(json.dumps(doc["ratios"], indent=1))
