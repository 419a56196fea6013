"""`ember energy ...` verbs: status, watch and budget (HTTP clients of the gateway, EMBER_URL and
EMBER_API_KEY), sim (the controller comparison on simulated GPUs), and `ember bench energy`."""

from __future__ import annotations

import json
import os
import time
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
    _console().print(_render(data))


@app.command("watch")
def watch(
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between refreshes."),
    iterations: int = typer.Option(0, "--iterations", min=0, help="Stop after N refreshes (0: until Ctrl-C)."),
) -> None:
    """A live view of every GPU: power against limit and cap, J/token, SLO attainment, the last decision."""
    from rich.live import Live

    console = _console()
    done = 0
    with Live(console=console, refresh_per_second=4, auto_refresh=console.is_terminal) as live:
        try:
            while True:
                live.update(_render(_request("GET", "/v1/energy")), refresh=True)
                done += 1
                if iterations and done >= iterations:
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


def _console() -> Any:
    """A console; piped or captured output gets room for every column instead of ellipses."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 220))


def _render(data: dict[str, Any]) -> Any:
    """The status view: a budget line, one row per device, the budget's misses."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    budget = data.get("budget", {})
    head = Text(
        f"budget: cluster {budget.get('cluster_watts')} W, nodes {budget.get('node_watts') or {}}, "
        f"{budget.get('energy_kwh_per_day')} kWh/day; projected today {data.get('projected_kwh_today')} kWh"
    )
    table = Table("node", "device", "power W", "limit W", "cap W", "power / limit", "SM MHz", "energy J",
                  "J/token", "SLO", "mode", "last decision")
    for d in data.get("devices", []):
        last = d.get("last_decision") or {}
        decision = ""
        if last:
            decision = ("applied: " if last.get("applied") else "not applied: ") + str(last.get("reason", ""))
        table.add_row(
            str(d.get("node")), str(d.get("device")), _fmt(d.get("power_w")), _fmt(d.get("limit_w")),
            _fmt(d.get("cap_w")), _bar(d.get("power_w"), d.get("limit_w"), d.get("cap_w")),
            _fmt(d.get("sm_clock_mhz")), _fmt(d.get("energy_j"), 0), _fmt(d.get("j_per_token"), 3),
            _fmt(d.get("slo_attainment"), 4), str(d.get("mode")), Text(decision[:100]),
        )
    misses = [Text(f"miss {m['function']} on {m['node']}/{m['device']}: {m['reason']}", style="yellow")
              for m in (data.get("allocation") or {}).get("misses", [])]
    return Group(head, table, *misses)


def _bar(power: Any, limit: Any, cap: Any, width: int = 12) -> str:
    """Power as a share of the limit (| marks the cap when it is below the limit)."""
    if not power or not limit:
        return ""
    filled = min(width, int(round(width * float(power) / float(limit))))
    cells = ["#"] * filled + ["."] * (width - filled)
    if cap and float(cap) < float(limit):
        cells[min(width - 1, int(width * float(cap) / float(limit)))] = "|"
    return "".join(cells)


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
    from ember.errors import ConfigError

    try:
        config = SimConfig(hours=hours, seed=seed)
    except ConfigError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[red]error:[/red] {e.message}")
        raise typer.Exit(2) from e
    with Progress(transient=True) as progress:
        tasks = {name: progress.add_task(name, total=1.0) for name in CONTROLLERS}

        def report(name: str, fraction: float) -> None:
            progress.update(tasks[name], completed=fraction)

        result = run_energy_sim(config, progress=report)
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


def bench_energy(
    json_out: Path = typer.Option(..., "--json", help="Write the results here (JSON)."),
    plot: Path = typer.Option(None, "--plot", help="PNG of power and SM clock over time, both runs."),
    url: str = typer.Option(None, "--url", help="Run against this gateway (EMBER_API_KEY) instead of a "
                                                "private `ember up`; its workers' mode is whatever they run."),
    requests: int = typer.Option(480, "--requests", min=1, help="Requests per run."),
    rate: float = typer.Option(4.0, "--rate", min=0.1, help="Arrivals per second (a fixed schedule)."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1, help="Tokens per request."),
    simulated_gpus: int = typer.Option(None, "--simulated-gpus", min=1,
                                       help="Emulated GPUs of the private worker [EMBER_SIMULATED_GPUS, else 1]."),
    simulated_params_b: float = typer.Option(None, "--simulated-params-b", min=0.0,
                                             help="Emulated model size, billions of bf16 parameters "
                                                  "[EMBER_SIMULATED_PARAMS_B, else 7]."),
    ttft_ms: float = typer.Option(3000.0, "--ttft-ms"), tpot_ms: float = typer.Option(200.0, "--tpot-ms"),
    eta: float = typer.Option(0.5, "--eta", help="The function's energy/time knob (Zeus eta)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The same bounded load in observe mode (max power) and in actuate mode, on the live platform."""
    from rich.console import Console

    from ember.config import Settings
    from ember.platform.energy_bench import EnergyBenchConfig, plot_energy_bench, run_energy_bench

    console = Console(stderr=True)
    settings = Settings()
    cfg = EnergyBenchConfig(requests=requests, rate_rps=rate, max_tokens=max_tokens,
                            simulated_gpus=simulated_gpus or settings.simulated_gpus or 1,
                            params_b=simulated_params_b or settings.simulated_params_b or 7.0,
                            ttft_ms=ttft_ms, tpot_ms=tpot_ms, eta=eta, seed=seed)
    doc = run_energy_bench(cfg, url=url, api_key=os.environ.get("EMBER_API_KEY"), log=console.print)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(doc, indent=2))
    if plot is not None:
        plot_energy_bench(doc, plot)
    for d in doc["runs"]["actuate"]["decisions"]:
        console.print(f"applied {d['device']} @{d['at_s']:.1f}s: {d['limit_w']} W / {d['sm_clock_mhz']} MHz "
                      f"(prefill {d['prefill_sm_clock_mhz']}): {d['reason']}")
    if doc["savings_j_per_token"] is not None:
        console.print(f"actuate vs max_power: {doc['savings_j_per_token']:.1%} less energy per token")


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
