"""`ember loadtest SCENARIO`: a thin shell over ember.platform.loadtest.run_loadtest."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def loadtest(
    scenario: str = typer.Argument(..., help="steady | cold | burst | tenants"),
    out: Path = typer.Option(..., "--out", help="directory for locust's CSV/HTML/JSON, summary.json, ttft.png"),
    url: str = typer.Option(None, help="gateway to test (default: start a private `ember up` on a free port)"),
    api_key: str = typer.Option(None, envvar="EMBER_API_KEY", help="with --url: an admin key"),
    users: int = typer.Option(8, help="concurrent users (1-256)"),
    spawn_rate: float = typer.Option(None, help="users started per second (default: all at once for burst)"),
    duration: str = typer.Option("60s", help="how long locust runs: 60s, 2m (at most 10m)"),
    max_requests: int = typer.Option(10000, help="stop after this many requests"),
    max_tokens: int = typer.Option(16, help="max_tokens of each request"),
    rate: float = typer.Option(1.0, help="steady, tenants: requests/s of each steady user"),
    workers: int = typer.Option(2, help="private platform: worker nodes"),
    hidden: int = typer.Option(None, help="private platform: model hidden size (ember model tiny)"),
    layers: int = typer.Option(None, help="private platform: model layers (ember model tiny)"),
    checkpoints: int = typer.Option(6, help="cold: distinct checkpoints pushed (private platform)"),
    functions_per_checkpoint: int = typer.Option(2, help="cold: functions deployed over each checkpoint"),
    keep_alive_s: float = typer.Option(0.5, help="cold, burst: the functions' keep_alive_s"),
    burst_period_s: float = typer.Option(8.0, help="burst: seconds between waves"),
    burst_functions: int = typer.Option(4, help="burst: functions the users spread over"),
    flood_rpm: int = typer.Option(600, help="tenants: requests/minute limit of the flooding tenant's key (0: none)"),
    checkpoint: str = typer.Option("tiny", help="with --url: the checkpoint the functions use"),
    baseline: bool = typer.Option(False, help="private platform: also time from_pretrained + the same prompt"),
) -> None:
    """Run a locust scenario headless (its own process), bounded in users, time and requests."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ember.errors import EmberError
    from ember.platform.loadtest import LoadTestOptions, parse_duration_s, run_loadtest

    try:
        opts = LoadTestOptions(
            scenario=scenario, out_dir=out, url=url, api_key=api_key, users=users, spawn_rate=spawn_rate,
            duration_s=parse_duration_s(duration), max_requests=max_requests, max_tokens=max_tokens,
            rate_per_user=rate, workers=workers, hidden=hidden, layers=layers, checkpoints=checkpoints,
            functions_per_checkpoint=functions_per_checkpoint, keep_alive_s=keep_alive_s,
            burst_period_s=burst_period_s, burst_functions=burst_functions, flood_rpm=flood_rpm,
            checkpoint=checkpoint, baseline=baseline)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task(f"{scenario}: starting", total=opts.duration_s)
            last_line = [-10.0]

            def progress(elapsed_s: float, requests: int, failures: int) -> None:
                text = f"{scenario}: {requests} requests, {failures} failures"
                bar.update(task, completed=min(elapsed_s, opts.duration_s), description=text)
                if not bar.console.is_terminal and elapsed_s - last_line[0] >= 10:  # a log, not a live bar
                    last_line[0] = elapsed_s
                    typer.echo(f"{elapsed_s:5.0f} s / {opts.duration_s:.0f} s  {text}")

            echo = bar.console.print if bar.console.is_terminal else typer.echo
            result = run_loadtest(opts, echo=echo, progress=progress)
    except EmberError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from e
    typer.echo(json.dumps(result.summary, indent=2))
    baseline_json = out / "baseline.json"
    if baseline_json.exists():
        b = json.loads(baseline_json.read_text())
        typer.echo(f"from_pretrained + page-in + first token (the usual way): p50 {b['ttft_p50_s'] * 1000:.0f} ms "
                   f"page cache warm, {b['cold']['ttft_s_p50'] * 1000:.0f} ms cold")
        for tier, entry in result.summary["cold"].items():
            if entry["p50_s"]:
                typer.echo(f"cold start from {tier}: TTFT p50 {entry['p50_s'] * 1000:.0f} ms, "
                           f"{b['ttft_p50_s'] / entry['p50_s']:.1f}x faster than the usual way (page cache warm)")
    typer.echo(f"reports in {out}: summary.json, ttft.png, locust.html, locust_stats.csv")
