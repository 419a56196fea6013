"""`ember bench engine`."""

from __future__ import annotations

from pathlib import Path

import typer


def bench_engine(
    json_out: Path = typer.Option(..., "--json", help="where to write the results"),
    plot: Path = typer.Option(None, help="PNG: tokens/s and TPOT p99 against concurrency"),
    model: Path = typer.Option(None, help="a Hugging Face model directory (else a random Llama-shaped model)"),
    hidden: int = typer.Option(512, help="hidden size of the random model"),
    layers: int = typer.Option(4, help="layers of the random model"),
    device: str = typer.Option(None, help="cuda:N or cpu (default: cuda:0 when present)"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    concurrency: str = typer.Option("1,4,16,64", help="comma-separated concurrency levels"),
    rounds: int = typer.Option(2, help="requests per client, back to back"),
    prompt_tokens: int = typer.Option(64), max_tokens: int = typer.Option(32),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default); 1 on an oversubscribed CPU"),
) -> None:
    """Aggregate tokens/s, TTFT and TPOT p50/p99: batching engine against the request-at-a-time loop."""
    from ember.platform.runtime.bench import run_engine_bench

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    run_engine_bench(json_out, model_dir=model, hidden=hidden, layers=layers, device=device, dtype=dtype,
                     concurrency=levels, rounds=rounds, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                     plot=plot, log=typer.echo)
    typer.echo(f"wrote {json_out}")
