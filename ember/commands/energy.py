"""`ember energy ...` verbs: status and budget (HTTP clients of the gateway, EMBER_URL and
EMBER_API_KEY), and sim (the controller comparison on simulated GPUs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True)
budget_app = typer.Typer(no_args_is_help=True, help="Operator power and energy budgets.")
app.add_typer(budget_app, name="budget")


@app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="Print the raw JSON.")) -> None:
    """Budget, projected kWh today and every GPU's power, limit, clock, J/token and last decision."""
    data = _request("GET", "/v1/energy")
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    budget = data.get("budget", {})
    console = Console()
    console.print(
        f"budget: cluster {budget.get('cluster_watts')} W, nodes {budget.get('node_watts') or {}}, "
        f"{budget.get('energy_kwh_per_day')} kWh/day; projected today {data.get('projected_kwh_today')} kWh"
    )
    table = Table(
        "node", "device", "power W", "limit W", "cap W", "SM MHz", "J/token", "SLO", "mode", "last decision"
    )
    for d in data.get("devices", []):
        last = d.get("last_decision") or {}
        table.add_row(
            str(d.get("node")),
            str(d.get("device")),
            _fmt(d.get("power_w")),
            _fmt(d.get("limit_w")),
            _fmt(d.get("cap_w")),
            _fmt(d.get("sm_clock_mhz")),
            _fmt(d.get("j_per_token"), 3),
            _fmt(d.get("slo_attainment"), 4),
            str(d.get("mode")),
            str(last.get("reason", ""))[:80],
        )
    console.print(table)
    for miss in (data.get("allocation") or {}).get("misses", []):
        console.print(
            f"[yellow]miss[/yellow] {miss['function']} on {miss['node']}/{miss['device']}: {miss['reason']}"
        )


@budget_app.command("set")
def budget_set(
    cluster_watts: float = typer.Option(None, "--cluster-watts", help="Watts for the whole cluster."),
    kwh_per_day: float = typer.Option(None, "--kwh-per-day", help="Energy per day (kWh)."),
) -> None:
    """Set the cluster power budget (and optionally the daily energy budget)."""
    body: dict[str, Any] = {}
    if cluster_watts is not None:
        body["cluster_watts"] = cluster_watts
    if kwh_per_day is not None:
        body["energy_kwh_per_day"] = kwh_per_day
    if not body:
        raise typer.BadParameter("give --cluster-watts and/or --kwh-per-day")
    typer.echo(json.dumps(_request("PUT", "/v1/energy/budget", body)))


@app.command("sim")
def sim(
    json_out: Path = typer.Option(..., "--json", help="Write the comparison here."),
    plot: Path = typer.Option(None, "--plot", help="PNG of power and SLO attainment over time."),
    hours: float = typer.Option(24.0, "--hours", help="Simulated hours (from midnight)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the load."),
) -> None:
    """Compare max_power, zeus_static and ember on simulated H100s under a diurnal, bursty load."""
    from rich.progress import Progress

    from ember.energy.sim import CONTROLLERS, SimConfig, plot_energy_sim, run_energy_sim

    with Progress(transient=True) as progress:
        tasks = {name: progress.add_task(name, total=1.0) for name in CONTROLLERS}

        def report(name: str, fraction: float) -> None:
            progress.update(tasks[name], completed=fraction)

        result = run_energy_sim(SimConfig(hours=hours, seed=seed), progress=report)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_energy_sim(result, str(plot))
    for name, c in result["controllers"].items():  # type: ignore[union-attr]
        typer.echo(
            f"{name:12s} energy {c['energy_j'] / 3.6e6:8.3f} kWh  SLO attainment {c['slo_attainment']:.5f}  "
            f"p99 TTFT {c['p99_ttft_s']:.3f} s  p99 TPOT {c['p99_tpot_s'] * 1000:.1f} ms"
        )
    savings = result.get("savings_vs_max_power", {})
    typer.echo("savings vs max_power: " + ", ".join(f"{k} {v:.1%}" for k, v in savings.items()))  # type: ignore[union-attr]


def _request(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    url = os.environ.get("EMBER_URL", "http://127.0.0.1:8000").rstrip("/")
    key = os.environ.get("EMBER_API_KEY", "")
    try:
        resp = httpx.request(
            method, url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
    except httpx.HTTPError as e:
        typer.echo(f"cannot reach {url}: {e}", err=True)
        raise typer.Exit(1) from e
    if resp.status_code >= 400:
        typer.echo(f"{method} {path}: HTTP {resp.status_code}: {resp.text}", err=True)
        raise typer.Exit(1)
    return resp.json()


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
