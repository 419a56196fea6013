"""`ember sim` and `ember bench scheduler`."""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from ember.errors import ConfigError
from ember.scheduler.nodescaler import DEFAULTS as _NODE  # the live defaults


def sim(
    json_out: Path = typer.Option(..., "--json", help="Write the results here (JSON)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write the startup-latency CDF per policy (PNG)."),
    trace: Path | None = typer.Option(None, "--trace", help="Azure Functions 2019 invocation CSV or Azure LLM inference trace CSV (default: synthetic)."),
    nodes: int = typer.Option(16, "--nodes", help="Nodes in the cluster."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node (80 GB each)."),
    functions: int = typer.Option(1000, "--functions", help="Functions in the synthetic trace."),
    duration_s: float = typer.Option(600.0, "--duration-s", help="Simulated seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the trace, the cluster and random policies."),
    policies: str = typer.Option("all", "--policies", help="Comma-separated policy names, or 'all'."),
    rate_per_function_s: float = typer.Option(
        0.03, "--rate-per-function-s", help="Mean invocations/s per function (synthetic trace)."),
    keep_alive_s: float = typer.Option(60.0, "--keep-alive-s", help="Idle time before an instance is unloaded."),
    energy: bool = typer.Option(False, "--energy", help="Cluster-wide energy: placement, autoscaling, batching and "
                                "the GPU governor together (ember vs serverlessllm+max_power, keepalive+max_power)."),
    fleet: bool = typer.Option(False, "--fleet", help="Run the ember policy on a fleet fixed at --nodes and on one "
                                                      "under the node scaler (up to --nodes); writes {\"fleet\": ...}."),
    boot_s: float = typer.Option(_NODE.boot_s, "--boot-s", help="--fleet: seconds from scale-out to a placeable node."),
    grace_s: float = typer.Option(_NODE.grace_s, "--grace-s", help="--fleet: idle beyond keep-alive before a node drains."),
    fleet_bound: str = typer.Option("", "--fleet-bound", help="Comma-separated fixed fleet sizes (the largest is the "
                                     "reference): the most node-hours any node scaler could save within 0.005 SLO "
                                     "attainment, from SLO misses per time bin; writes {\"fleet_bound\": ...}."),
    bin_s: float = typer.Option(600.0, "--bin-s", help="--fleet-bound: seconds per time bin."),
) -> None:
    """Trace-driven cluster simulation comparing placement policies (same policy objects as live)."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        doc = run_sim_command(json_out, plot=plot, trace=trace, nodes=nodes, gpus_per_node=gpus_per_node,
                              functions=functions, duration_s=duration_s, seed=seed, policies=policies,
                              rate_per_function_s=rate_per_function_s, keep_alive_s=keep_alive_s,
                              console=console, energy=energy, fleet=fleet, boot_s=boot_s, grace_s=grace_s,
                              fleet_bound=fleet_bound, bin_s=bin_s)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e.message}")
        raise typer.Exit(2) from e
    if fleet or fleet_bound:
        console.print(json.dumps(doc.get("fleet") or doc["fleet_bound"], indent=2))
        return
    _print_table(console, doc)


def run_sim_command(json_out: Path, *, plot: Path | None = None, trace: Path | None = None, nodes: int = 16,
                    gpus_per_node: int = 8, functions: int = 1000, duration_s: float = 600.0, seed: int = 0,
                    policies: str = "all", rate_per_function_s: float = 0.03, keep_alive_s: float = 60.0,
                    console=None, energy: bool = False, fleet: bool = False, boot_s: float = _NODE.boot_s,
                    grace_s: float = _NODE.grace_s, fleet_bound: str = "", bin_s: float = 600.0) -> dict:
    """What `ember sim` does: simulate, write JSON (and the PNG); returns the JSON document."""
    from ember.scheduler.energy_sim import ENERGY_ENTRIES, run_energy_simulation
    from ember.scheduler.policies import POLICY_NAMES, get_policy
    from ember.scheduler.sim import SimConfig, build_trace, run_simulation

    trace_name = str(trace) if trace else "synthetic"

    def setup(n: int) -> tuple[SimConfig, Any]:
        """The configuration of a cluster of `n` nodes, and the trace it runs."""
        cfg = SimConfig(nodes=n, gpus_per_node=gpus_per_node, functions=functions, duration_s=duration_s, seed=seed,
                        rate_per_function_s=rate_per_function_s, keep_alive_s=keep_alive_s).check()
        return cfg, build_trace(cfg, str(trace) if trace else None)

    def written(doc: dict) -> dict:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=2))
        return doc

    if fleet_bound:
        from ember.scheduler.fleetbound import fleet_bound as run_bound

        try:
            sizes = [int(x) for x in fleet_bound.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"--fleet-bound takes comma-separated node counts, got {fleet_bound!r}") from e
        cfg, tr = setup(max(sizes, default=nodes))
        doc = _with_progress(console, lambda progress: run_bound(cfg, tr, sizes, bin_s=bin_s, progress=progress),
                             [f"fixed {n}" for n in sorted(set(sizes))])
        doc["config"] = {"gpus_per_node": gpus_per_node, "functions": functions, "duration_s": duration_s,
                         "seed": seed, "rate_per_function_s": rate_per_function_s, "keep_alive_s": keep_alive_s,
                         "ssd_bytes_of_reference_node": cfg.ssd_bytes, "policy": "ember",
                         "trace": trace_name}
        return written(doc)

    if fleet:
        from ember.scheduler.fleet import FleetConfig, run_fleet

        cfg, tr = setup(nodes)
        doc = _with_progress(console, lambda progress: run_fleet(cfg, FleetConfig(boot_s=boot_s, grace_s=grace_s),
                                                                 trace=tr, progress=progress), ["fixed", "scaled"])
        doc.pop("_results")
        doc["config"]["trace"] = trace_name
        return written(doc)

    known = list(ENERGY_ENTRIES) if energy else list(POLICY_NAMES)
    names = known if policies.strip() in ("", "all") else [p.strip() for p in policies.split(",") if p.strip()]
    for name in names:
        if energy and name not in ENERGY_ENTRIES:
            raise ConfigError(f"unknown --energy entry {name!r}; known: {', '.join(ENERGY_ENTRIES)}")
        if not energy:
            get_policy(name)
    cfg, tr = setup(nodes)
    if console is not None:
        console.print(f"trace: {len(tr):,} invocations of {len(tr.functions):,} functions over {tr.duration_s:.0f} s; "
                      f"cluster: {nodes * gpus_per_node:,} GPUs on {nodes} nodes")
    if energy:
        doc = _with_progress(console, lambda progress: run_energy_simulation(cfg, trace=tr, entries=names,
                                                                             progress=progress), names)
    else:
        doc = _with_progress(console, lambda progress: run_simulation(cfg, names, trace=tr, progress=progress), names)
    results = doc.pop("_results")
    doc["config"]["trace"] = trace_name
    written(doc)
    if plot is not None:
        from ember.scheduler.plot import plot_startup_cdf

        plot_startup_cdf(results, plot, title=f"{len(tr):,} invocations, {nodes * gpus_per_node:,} GPUs")
    return doc


def bench_scheduler(
    json_out: Path = typer.Option(..., "--json", help="Write the results here (JSON)."),
    redis_url: str | None = typer.Option(None, "--redis-url", help="Use this Redis (default: start a private one)."),
    workers: int = typer.Option(100, "--workers", help="Registered workers (8 GPUs each)."),
    decisions: int = typer.Option(1000, "--decisions", help="Placement decisions to time."),
    policy: str = typer.Option("ember", "--policy", help="Placement policy."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Live placement decisions against Redis: policy read + atomic claim, timed per decision."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        doc = run_bench_scheduler(redis_url=redis_url, workers=workers, decisions=decisions, policy=policy, seed=seed)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e.message}")
        raise typer.Exit(2) from e
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(doc, indent=2))
    console.print(json.dumps(doc))


def run_bench_scheduler(*, redis_url: str | None = None, workers: int = 100, decisions: int = 1000,
                        policy: str = "ember", seed: int = 0, checkpoints: int = 500) -> dict:
    """Register `workers` fake workers (8 x 80 GB GPUs, checkpoints spread over their DRAM/SSD
    tiers), then time `decisions` calls of `RedisCluster.place` (each placed instance is removed
    again, untimed). Starts a private non-persistent Redis unless `redis_url` is given; its own
    nodes are deregistered at the end either way."""
    import numpy as np
    import redis

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.platform.redis_server import RedisServerProcess
    from ember.scheduler.policies import get_policy
    from ember.scheduler.view import PlacementRequest

    if workers < 1 or decisions < 1:
        raise ConfigError("workers and decisions must be >= 1")
    pol = get_policy(policy, seed=seed)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="ember-bench-redis-") as tmp:
        server = None if redis_url else RedisServerProcess(Path(tmp), persistent=False).start()
        url = redis_url or server.url  # type: ignore[union-attr]
        client = redis.Redis.from_url(url, decode_responses=True)
        cluster = RedisCluster(client, heartbeat_ttl_s=300.0)
        node_ids = [f"bench-node-{i:04d}" for i in range(workers)]
        try:
            for n in node_ids:
                cluster.register_node(n, f"http://127.0.0.1:1/{n}",
                                      [DeviceSpec(f"cuda:{g}", 80 * 10**9) for g in range(8)],
                                      {"gpu": 200e9, "dram": 25e9 * rng.uniform(0.8, 1.2),
                                       "ssd": 8e9 * rng.uniform(0.8, 1.2), "remote": 1.25e9})
                held = rng.sample(range(checkpoints), min(checkpoints, 20))
                cluster.heartbeat(n, {f"bench-ck-{c}": ("dram" if k < 5 else "ssd") for k, c in enumerate(held)})
            # Some resident instances so devices differ in free memory and awake state.
            for _ in range(workers * 2):
                c = rng.randrange(checkpoints)
                cluster.place(PlacementRequest(f"bench-fn-{c}", f"bench-ck-{c}", rng.randint(1, 70) * 10**9), pol)
            lat_ms = []
            for _ in range(decisions):
                c = rng.randrange(checkpoints)
                req = PlacementRequest(f"bench-fn-{c}", f"bench-ck-{c}", rng.randint(1, 70) * 10**9)
                t0 = time.perf_counter()
                placed = cluster.place(req, pol)
                lat_ms.append((time.perf_counter() - t0) * 1000.0)
                if placed is not None:
                    cluster.remove_instance(placed.instance_id)
        finally:
            for n in node_ids:
                cluster.deregister_node(n)
            client.close()
            if server is not None:
                server.stop()
    arr = np.array(lat_ms)
    return {
        "workers": workers,
        "decisions": decisions,
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "mean_ms": round(float(arr.mean()), 3),
        "policy": policy,
        "redis": "external" if redis_url else "private",
    }


def _with_progress(console, work, names: list[str]):
    if console is None:
        return work(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:14s}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        tasks = {n: bar.add_task(n, total=1.0) for n in names}
        return work(lambda name, frac: bar.update(tasks[name], completed=frac))


def _print_table(console, doc: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{doc['invocations']:,} invocations (startup in seconds; loads = cold starts, "
                        "waited = invocations that waited on a load)")
    cols = {"mean_startup_s": "mean", "p50_startup_s": "p50", "p99_startup_s": "p99",
            "p99_cold_startup_s": "p99 cold", "slo_attainment": "SLO", "cold_starts": "loads",
            "invocations_waiting_on_load": "waited",
            "gpu_energy_kwh": "kWh", "decisions_per_s": "dec/s"}
    if any("joules_per_token" in r for r in doc["policies"].values()):
        cols = {**{k: v for k, v in cols.items() if k != "decisions_per_s"}, "joules_per_token": "J/token"}
    table.add_column("policy", no_wrap=True, min_width=13)
    for label in cols.values():
        table.add_column(label, justify="right", no_wrap=True)
    for name, r in doc["policies"].items():
        table.add_row(name, *(_cell(r[c]) for c in cols))
    from rich.console import Console

    Console(stderr=True, width=max(console.width, 110)).print(table)  # all columns, even when piped


def _cell(v: float | int) -> str:
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"
