"""`ember energy ...` verbs: status, watch and budget set/show/clear (HTTP clients of the gateway,
EMBER_URL and EMBER_API_KEY), sim (the controller comparison on simulated GPUs), and `ember bench
energy`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from ember.commands.gateway_client import check, gateway_client, name_arg

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

    projected = data.get("projected_kwh_today")
    head = Text(f"budget: {'; '.join(_budget_lines(data.get('budget') or {}))}; projected today "
                f"{_fmt(projected, 3)}{' kWh' if projected is not None else ''}")
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


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    """The budget in words: what is set, and what is not."""
    cluster, kwh = budget.get("cluster_watts"), budget.get("energy_kwh_per_day")
    lines = [f"cluster {_fmt(cluster)} W" if cluster is not None else "no cluster budget"]
    lines += [f"node {node} {_fmt(w)} W" for node, w in sorted((budget.get("node_watts") or {}).items())]
    lines.append(f"{_fmt(kwh, 3)} kWh/day" if kwh is not None else "no daily energy budget")
    return lines


@budget_app.command("set")
def budget_set(
    cluster_watts: float = typer.Option(None, "--cluster-watts", help="Watts for the whole cluster."),
    kwh_per_day: float = typer.Option(None, "--kwh-per-day", help="Energy per day (kWh)."),
    node_watts: list[str] = typer.Option(None, "--node-watts", help="NODE=WATTS, one node's budget (repeatable; "
                                                                    "other nodes' budgets stay)."),
) -> None:
    """Set the cluster power budget, nodes' budgets and the daily energy budget; prints the budget."""
    body: dict[str, Any] = {}
    if cluster_watts is not None:
        body["cluster_watts"] = cluster_watts
    if kwh_per_day is not None:
        body["energy_kwh_per_day"] = kwh_per_day
    if node_watts:
        given = dict(_node_watts(item) for item in node_watts)
        # the API replaces node_watts as one field: the map as it is now, with these changed
        body["node_watts"] = {**((_request("GET", "/v1/energy").get("budget") or {}).get("node_watts") or {}), **given}
    if not body:
        raise typer.BadParameter("give --cluster-watts, --node-watts and/or --kwh-per-day")
    typer.echo(json.dumps(_request("PUT", "/v1/energy/budget", body)))


@budget_app.command("show")
def budget_show(as_json: bool = typer.Option(False, "--json", help="Print the raw JSON.")) -> None:
    """The operator budget: cluster watts, each node's watts, kWh per day."""
    budget = _request("GET", "/v1/energy").get("budget") or {}
    typer.echo(json.dumps(budget) if as_json else "\n".join(_budget_lines(budget)))


@budget_app.command("clear")
def budget_clear(
    cluster_watts: bool = typer.Option(False, "--cluster-watts", help="Clear the cluster budget."),
    kwh_per_day: bool = typer.Option(False, "--kwh-per-day", help="Clear the daily energy budget."),
    node: list[str] = typer.Option(None, "--node", help="Clear this node's budget (repeatable)."),
) -> None:
    """Clear budgets: those named, or all of them when none is; prints the budget."""
    every = not (cluster_watts or kwh_per_day or node)
    body: dict[str, Any] = {}
    if every or cluster_watts:
        body["cluster_watts"] = None
    if every or kwh_per_day:
        body["energy_kwh_per_day"] = None
    if every:
        body["node_watts"] = None
    elif node:
        current = (_request("GET", "/v1/energy").get("budget") or {}).get("node_watts") or {}
        body["node_watts"] = {n: w for n, w in current.items() if n not in node}
    typer.echo(json.dumps(_request("PUT", "/v1/energy/budget", body)))


def _node_watts(item: str) -> tuple[str, float]:
    """NODE=WATTS (a finite number)."""
    import math

    node, _, watts = item.rpartition("=")
    try:
        value = float(watts)
    except ValueError:
        value = math.nan
    if not node or not math.isfinite(value):
        raise typer.BadParameter(f"{item!r} is not NODE=WATTS", param_hint="'--node-watts'")
    return name_arg("node id")(node), value


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
    for name, c in result["controllers"].items():  # type: ignore[attr-defined]
        typer.echo(
            f"{name:12s} energy {c['energy_j'] / 3.6e6:8.3f} kWh  SLO attainment {c['slo_attainment']:.5f}  "
            f"p99 TTFT {c['p99_ttft_s']:.3f} s  p99 TPOT {c['p99_tpot_s'] * 1000:.1f} ms"
        )
    savings = result.get("savings_vs_max_power", {})
    typer.echo("savings vs max_power: " + ", ".join(f"{k} {v:.1%}" for k, v in savings.items()))  # type: ignore[attr-defined]


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
    """One call to the gateway, read as every client verb reads one (`error <status>: <message>`)."""
    with gateway_client() as c:
        return check(c.request(method, path, json=body, timeout=30)) or {}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
