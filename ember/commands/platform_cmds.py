"""Platform verbs: up, gateway, worker, and the HTTP client verbs (deploy, invoke, ls, rm, keys)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from ember.commands.gateway_client import check as _check
from ember.commands.gateway_client import gateway_client as _client
from ember.commands.gateway_client import name_arg

keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (admin).")


def register(app: typer.Typer) -> None:
    """Add the platform verbs to the top-level app."""
    app.command("up", help="Run Redis, the gateway and N workers on this machine.")(up)
    app.command("gateway", help="Run one gateway (OpenAI-compatible API, admin, autoscaler).")(gateway)
    app.command("worker", help="Run one worker node (loads checkpoints, runs instances).")(worker)
    app.command("deploy", help="Deploy (create or update) a function.")(deploy)
    app.command("invoke", help="Invoke a function with a chat message.")(invoke)
    app.command("ls", help="List functions.")(ls)
    app.command("rm", help="Delete a function.")(rm)
    app.add_typer(keys_app, name="keys")


def _settings(**overrides: Any) -> Any:
    from ember.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Options that have a setting default to None: left unset, the EMBER_* setting (or its default)
# applies; given, they win. tests/test_cli_settings.py walks every command to keep it so.
def up(
    host: str = typer.Option(None, help="gateway bind address [EMBER_HOST, 127.0.0.1]"),
    port: int = typer.Option(None, help="gateway port [EMBER_PORT, 8000]"),
    workers: int = typer.Option(2, help="number of local worker processes (nodes)"),
    data_dir: Path = typer.Option(None, help="Redis AOF, checkpoint store, tiers, logs, keys [EMBER_DATA_DIR, data]"),
    demo: bool = typer.Option(True, help="deploy the demo function 'tiny' on first start"),
    simulated_gpus: int = typer.Option(None, help="emulated GPUs per worker, driven by the work they run "
                                                  "[EMBER_SIMULATED_GPUS, 0]"),
    energy_mode: str = typer.Option(None, help="observe | recommend | actuate, for every worker "
                                               "[EMBER_ENERGY_MODE, recommend]"),
    simulated_params_b: float = typer.Option(None, help="emulated GPUs charge every step as if the model had this "
                                                        "many billion bf16 parameters [EMBER_SIMULATED_PARAMS_B, "
                                                        "0: the model's own size]"),
    node_backend: str = typer.Option(None, help="none | local: the gateway's node scaler starts and stops "
                                                "worker processes (from --workers up to --max-workers) "
                                                "[EMBER_NODE_BACKEND, none]"),
    max_workers: int = typer.Option(0, help="with --node-backend local: the most worker processes"),
    gateway_processes: int = typer.Option(None, help="gateway processes sharing the port "
                                                     "[EMBER_GATEWAY_PROCESSES, 1]"),
) -> None:
    from ember.platform.supervisor import UpOptions, run_up

    node_backend = node_backend or _settings().node_backend
    if node_backend not in ("none", "local"):
        raise typer.BadParameter("--node-backend must be none or local (aws runs on the gateways terraform deploys)")
    _logging("warning")
    _check_mode(energy_mode)
    settings = _settings(host=host, port=port, data_dir=data_dir, simulated_gpus=simulated_gpus,
                         energy_mode=energy_mode, simulated_params_b=simulated_params_b,
                         gateway_processes=gateway_processes)
    from ember.platform.gateway.processes import refusal

    if (why := refusal(settings.gateway_processes, node_backend)) is not None:
        raise typer.BadParameter(why)
    extra_env = {**worker_energy_env(settings), "EMBER_GATEWAY_PROCESSES": str(settings.gateway_processes)}
    code = run_up(UpOptions(host=settings.host, port=settings.port, workers=workers, data_dir=settings.data_dir,
                            demo=demo, extra_env=extra_env, node_backend=node_backend,
                            max_workers=max_workers), settings,
                  echo=lambda s: typer.echo(s))
    raise typer.Exit(code)


def worker_energy_env(settings: Any) -> dict[str, str]:
    """The energy settings `ember up` hands its workers (explicitly, so options given to `up` win)."""
    return {"EMBER_SIMULATED_GPUS": str(settings.simulated_gpus), "EMBER_ENERGY_MODE": settings.energy_mode,
            "EMBER_SIMULATED_PARAMS_B": str(settings.simulated_params_b)}


def _check_mode(energy_mode: str | None) -> None:
    if energy_mode is not None and energy_mode not in ("observe", "recommend", "actuate"):
        raise typer.BadParameter("--energy-mode must be observe, recommend or actuate")


def gateway(
    redis_url: str = typer.Option(None, help="redis:// or rediss:// URL [EMBER_REDIS_URL]"),
    host: str = typer.Option(None, help="bind address [EMBER_HOST, 127.0.0.1]"),
    port: int = typer.Option(None, help="port [EMBER_PORT, 8000]"),
    initial_budget_json: str = typer.Option(None, help='power budget written to Redis if none is there, '
                                                        'e.g. \'{"cluster_watts": 3000}\''),
    log_level: str = typer.Option("info"),
) -> None:
    from ember.platform.gateway import processes

    _logging(log_level)
    settings = _settings(redis_url=redis_url, host=host, port=port)
    child = processes.is_child()
    if initial_budget_json and not child:
        _seed_budget(settings.redis_url, initial_budget_json)
    if settings.gateway_processes > 1 and not child:
        if (why := processes.refusal(settings.gateway_processes, settings.node_backend)) is not None:
            raise typer.BadParameter(why)
        raise SystemExit(processes.run_processes(settings.gateway_processes, settings.host, settings.port,
                                                  settings.drain_grace_s))
    from ember.platform.gateway.app import create_app
    from ember.platform.http_common import serve

    serve(create_app(settings), settings.host, settings.port, log_level=log_level, grace_s=settings.drain_grace_s,
          reuse_port=child, access_log=settings.access_log)


def _seed_budget(redis_url: str | None, raw: str) -> None:
    import redis

    try:
        budget = json.loads(raw)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--initial-budget-json is not JSON: {e}") from e
    from ember.energy.budget import EnergyBudget
    from ember.platform.energy_state import seed_budget

    client = redis.Redis.from_url(redis_url or "", decode_responses=True)
    if seed_budget(client, EnergyBudget.from_dict(budget)):
        typer.echo(f"seeded the energy budget: {budget}")


def worker(
    redis_url: str = typer.Option(None, help="redis:// or rediss:// URL [EMBER_REDIS_URL]"),
    store_url: str = typer.Option(None, help="checkpoint store: file://DIR or s3://B/P [EMBER_STORE_URL]"),
    data_dir: Path = typer.Option(None, help="this node's tiers and state [EMBER_DATA_DIR, data]"),
    host: str = typer.Option(None, help="bind address, loopback unless told otherwise [EMBER_HOST, 127.0.0.1]"),
    port: int = typer.Option(0, help="port (0: a free one; EMBER_PORT is the gateway's)"),
    advertise_url: str = typer.Option(None, help="URL gateways use to reach this worker"),
    node_id: str = typer.Option(None, help="node id [EMBER_NODE_ID; default: remembered in the data dir]"),
    energy_mode: str = typer.Option(None, help="observe | recommend | actuate [EMBER_ENERGY_MODE, recommend]"),
    cpu_slots: int = typer.Option(None, help="instance slots on a node without GPUs [EMBER_CPU_SLOTS, 2]"),
    dram_capacity_bytes: int = typer.Option(None, help="DRAM tier size [EMBER_DRAM_CAPACITY_BYTES, 1 GiB]"),
    simulated_gpus: int = typer.Option(None, help="emulated GPUs driven by the work they run "
                                                  "[EMBER_SIMULATED_GPUS, 0]"),
    simulated_params_b: float = typer.Option(None, help="emulated GPUs charge steps as if the model had this many "
                                                        "billion parameters [EMBER_SIMULATED_PARAMS_B, 0: its own]"),
    log_level: str = typer.Option("info"),
) -> None:
    # Before torch loads OpenMP: its threads wait for work by sleeping, not spinning. Spinning
    # threads take the CPUs this worker's own event loop, and a gateway or Redis beside it, need:
    # on 2 cores at 160 req/s the worker spent 7.9 ms of CPU per warm request spinning, 2.7 ms
    # without (README "Gateway overhead"). An OMP_WAIT_POLICY given in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ember.platform.http_common import serve
    from ember.platform.redis_server import free_port
    from ember.platform.worker.app import create_worker_app

    _check_mode(energy_mode)
    _logging(log_level)
    settings = _settings(redis_url=redis_url, store_url=store_url, data_dir=data_dir, node_id=node_id, host=host,
                         energy_mode=energy_mode, cpu_slots=cpu_slots, dram_capacity_bytes=dram_capacity_bytes,
                         simulated_gpus=simulated_gpus, simulated_params_b=simulated_params_b)
    port = port or free_port(settings.host)
    os.environ["EMBER_DATA_DIR"] = str(Path(settings.data_dir).resolve())  # other processes of this node find its tiers
    url = advertise_url or f"http://{settings.host}:{port}"
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = create_worker_app(settings, url)
    serve(app, settings.host, port, log_level=log_level, grace_s=settings.drain_grace_s, access_log=False,
          on_sigterm=lambda: app.state.node.begin_shutdown() if hasattr(app.state, "node") else None)


# --- HTTP client verbs (ember/commands/gateway_client.py: the client, answers, names) --------------
def deploy(
    name: str = typer.Argument(..., callback=name_arg("function name")),
    checkpoint: str = typer.Option(..., help="checkpoint name in the store, or a URI"),
    ttft_ms: float = typer.Option(1000.0), tpot_ms: float = typer.Option(200.0),
    min_instances: int = typer.Option(0), max_instances: int = typer.Option(4),
    keep_alive_s: float = typer.Option(60.0), target_concurrency: int = typer.Option(4),
    eta: float = typer.Option(0.5, help="energy/time trade-off (Zeus eta)"),
    policy: str = typer.Option(None, help="placement policy for this function"),
) -> None:
    body: dict[str, Any] = {"checkpoint": checkpoint, "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
                            "scaling": {"min_instances": min_instances, "max_instances": max_instances,
                                        "keep_alive_s": keep_alive_s, "target_concurrency": target_concurrency},
                            "energy": {"eta": eta}}
    if policy:
        body["placement_policy"] = policy
    with _client() as c:
        typer.echo(json.dumps(_check(c.put(f"/v1/functions/{name}", json=body)), indent=2))


def invoke(
    name: str = typer.Argument(..., callback=name_arg("function name")),
    prompt: str = typer.Argument(...),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they arrive"),
    max_tokens: int = typer.Option(64), temperature: float = typer.Option(0.0), seed: int = typer.Option(None),
) -> None:
    body: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": temperature, "stream": stream}
    if seed is not None:
        body["seed"] = seed
    with _client() as c:
        if not stream:
            resp = c.post("/v1/chat/completions", json=body)
            data = _check(resp)
            typer.echo(data["choices"][0]["message"]["content"])
            _headers(resp)
            return
        with c.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            done = False
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:  # the stream failed after it began (a worker died, ...)
                        typer.echo("", err=False)
                        err = event["error"] or {}
                        typer.echo(f"error: {err.get('message', err)} ({err.get('code', 'error')})", err=True)
                        raise typer.Exit(1)
                    for ch in event.get("choices", []):
                        sys.stdout.write(ch.get("delta", {}).get("content") or "")
                        sys.stdout.flush()
            typer.echo("")
            if not done:
                typer.echo("error: the stream ended before its end ([DONE] never came)", err=True)
                raise typer.Exit(1)
            _headers(resp)


def _headers(resp: Any) -> None:
    info = {k: v for k, v in resp.headers.items() if k.startswith("x-ember-")}
    typer.echo(" ".join(f"{k}={v}" for k, v in sorted(info.items())), err=True)


def ls() -> None:
    with _client() as c:
        data = _check(c.get("/v1/functions"))
    for f in data["functions"]:
        typer.echo(f"{f['name']}\t{f['checkpoint']}\tmin={f['scaling']['min_instances']} "
                   f"max={f['scaling']['max_instances']} keep_alive_s={f['scaling']['keep_alive_s']}")


def rm(name: str = typer.Argument(..., callback=name_arg("function name"))) -> None:
    with _client() as c:
        _check(c.delete(f"/v1/functions/{name}"))
    typer.echo(f"deleted {name}")


@keys_app.command("create")
def keys_create(role: str = typer.Option(..., help="admin | operator | developer | invoker"),
                name: str = typer.Option("", help="a label for the key"),
                rpm: int | None = typer.Option(None, "--rpm", min=0, help="requests per minute (0: unlimited)"),
                tpm: int | None = typer.Option(None, "--tpm", min=0, help="tokens per minute (0: unlimited)")) -> None:
    body: dict[str, Any] = {"role": role, "name": name, "rpm": rpm, "tpm": tpm}
    with _client() as c:
        typer.echo(json.dumps(_check(c.post("/v1/keys", json=body)), indent=2))


@keys_app.command("limits")
def keys_limits(key_id: str = typer.Argument(..., callback=name_arg("key id")),
                rpm: int | None = typer.Option(None, "--rpm", min=0, help="requests per minute (0: unlimited)"),
                tpm: int | None = typer.Option(None, "--tpm", min=0, help="tokens per minute (0: unlimited)")) -> None:
    """Change a key's per-minute limits."""
    with _client() as c:
        typer.echo(json.dumps(_check(c.patch(f"/v1/keys/{key_id}", json={"rpm": rpm, "tpm": tpm})), indent=2))


@keys_app.command("ls")
def keys_ls() -> None:
    """Every key: id, role, name and its per-minute limits (0: unlimited)."""
    with _client() as c:
        for k in _check(c.get("/v1/keys"))["keys"]:
            typer.echo(f"{k['id']}\t{k['role']}\t{k['name']}\trpm={_limit(k.get('rpm'))}\ttpm={_limit(k.get('tpm'))}")


def _limit(value: int | None) -> str:
    return "unlimited" if not value else str(value)


@keys_app.command("rm")
def keys_rm(key_id: str = typer.Argument(..., callback=name_arg("key id"))) -> None:
    with _client() as c:
        _check(c.delete(f"/v1/keys/{key_id}"))
    typer.echo(f"revoked {key_id}")


def bench_coldstart(
    json_out: Path = typer.Option(..., "--json", help="where to write the results"),
    plot: Path = typer.Option(None, help="PNG bar chart"),
    hidden: int = typer.Option(256), layers: int = typer.Option(4), rounds: int = typer.Option(3),
) -> None:
    """Cold starts (remote, DRAM) and warm calls through a real local platform."""
    from rich.progress import Progress

    from ember.platform.bench import run_coldstart_bench

    with Progress() as bar:
        task = bar.add_task("cold-start rounds", total=rounds)
        summary = run_coldstart_bench(json_out, hidden=hidden, layers=layers, rounds=rounds, plot=plot,
                                      progress=lambda done, total: bar.update(task, completed=done))
    for tier, r in summary["results"].items():
        typer.echo(f"{tier:7s} startup {r['startup_ms']:8.1f} ms  ttft {r['ttft_ms']:8.1f} ms  {r['tiers_seen']}")
    typer.echo(f"from_pretrained {summary['baseline']['from_pretrained_ms']:.1f} ms (load only)")


def bench_tracing(
    json_out: Path = typer.Option(..., "--json", help="where to write the results"),
    requests: int = typer.Option(200, help="warm requests per arm (tracing off / on), interleaved"),
    max_tokens: int = typer.Option(8),
) -> None:
    """Warm-request latency through a gateway with tracing off and one exporting every span (OTLP)."""
    from rich.progress import Progress

    from ember.platform.bench_tracing import run_tracing_bench

    with Progress() as bar:
        task = bar.add_task("interleaved rounds", total=requests)
        s = run_tracing_bench(json_out, requests=requests, max_tokens=max_tokens,
                              progress=lambda done, total: bar.update(task, completed=done))
    for arm, st in s["arms_ms"].items():
        typer.echo(f"tracing {arm:3s}: median {st['median']:.2f} ms  mean {st['mean']:.2f} ms  p90 {st['p90']:.2f} ms")
    typer.echo(f"overhead: {s['overhead_pct_median']:+.2f}% (median), {s['overhead_pct_mean']:+.2f}% (mean); "
               f"{s['otlp_exports']} OTLP exports")
    c = s["span_cost_us"]
    typer.echo(f"tracing work per invocation: {c['request_path_us']:.0f} us on the request path "
               f"({s['request_path_pct_of_fastest_warm_request']:.2f}% of the fastest warm request), "
               f"{c['cpu_with_export_us']:.0f} us CPU with the OTLP export")


def bench_gateway(
    json_out: Path = typer.Option(..., "--json", help="where to write the results"),
    url: str = typer.Option(None, help="a running gateway (its worker is found through EMBER_REDIS_URL); "
                                       "default: a private `ember up`"),
    rates: str = typer.Option("20,40,80,160", help="offered request rates per step (req/s), comma-separated"),
    step_s: float = typer.Option(4.0, help="seconds per step (each run through the gateway and direct)"),
    clients: int = typer.Option(32, help="clients of the closed-loop step"),
    gateway_processes: int = typer.Option(None, help="gateway processes of the private `ember up` "
                                                     "[EMBER_GATEWAY_PROCESSES, 1]"),
) -> None:
    """Warm-request overhead of the gateway against the worker called directly, at increasing rates."""
    from ember.platform.bench_gateway import run_gateway_bench

    processes = _settings(gateway_processes=gateway_processes).gateway_processes
    summary = run_gateway_bench(json_out, url=url, rates=tuple(float(r) for r in rates.split(",") if r),
                                step_s=step_s, clients=clients, gateway_processes=processes)
    for s in summary["steps"]:
        typer.echo(f"{s['rate_rps']:6.0f} req/s offered: {s['rps']:6.1f} achieved, {s['errors']} errors, "
                   f"overhead p50 {s['p50_overhead_ms']:7.2f} ms  p99 {s['p99_overhead_ms']:7.2f} ms")
    typer.echo(f"highest rate sustained (0 errors, achieved >= 90% of offered): {summary['highest_sustained_rps']:.0f} "
               f"req/s; p99 overhead under 5 ms at every rate up to {summary['p99_overhead_under_5ms_up_to_rps']:.0f} req/s")
    c = summary["closed_loop"]
    typer.echo(f"{c['clients']} clients: gateway p99 {c['gateway']['p99_ms']:.1f} ms, direct p99 "
               f"{c['direct']['p99_ms']:.1f} ms (x{c['p99_ratio']})")
    if c["gateway"].get("cpu_ms_per_request"):
        typer.echo("  CPU ms per request through the gateway: " + ", ".join(
            f"{k} {v:.3f}" for k, v in c["gateway"]["cpu_ms_per_request"].items()))
    one = summary["serial"]
    typer.echo(f"one request at a time: gateway p50 {one['gateway_p50_ms']:.2f} ms, direct p50 "
               f"{one['direct_p50_ms']:.2f} ms (overhead {one['p50_overhead_ms']:.2f} ms)")
