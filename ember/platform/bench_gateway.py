"""`ember bench gateway`: what the gateway adds to a warm request, on loopback.

Warm, non-streaming requests (`max_tokens` 1) are sent open-loop at increasing rates, through the
gateway and straight to the worker's instance (its internal API) in alternating quarter-second
windows at the same rate (both see the same machine); per step
the achieved rate, errors and latency percentiles of both, and the overhead (gateway minus direct)
at p50 and p99. A closed-loop step with 32 clients compares the two p99s. Without `--url` the
bench starts its own `ember up` (one worker) in a temporary directory, and then also reports each
process's CPU time per request (`cpu_ms_per_request`: gateway processes, worker, Redis and this
load generator, from /proc), the number that decides how far the gateway's overhead goes on a
machine whose CPUs everyone shares.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from ember.config import Settings
from ember.platform import heap
from ember.platform.wire import CLUSTER_TOKEN_HEADER

FUNCTION = "bench-gateway"


def run_gateway_bench(out_json: Path, *, url: str | None = None, rates: tuple[float, ...] = (20, 40, 80, 160),
                      step_s: float = 4.0, clients: int = 32, progress: Any = None,
                      gateway_processes: int = 1) -> dict[str, Any]:
    """Run the bench (against `url`, or a private `ember up` with `gateway_processes` gateway
    processes) and write the JSON summary."""
    if url:
        settings = Settings()
        return _bench(url, settings.resolved_admin_key(), settings.resolved_cluster_token(), settings.redis_url,
                      out_json, rates, step_s, clients, progress, None)
    from ember.platform.redis_server import free_port
    from ember.platform.supervisor import Platform, UpOptions

    with tempfile.TemporaryDirectory(prefix="ember-bench-gw-") as tmp:
        data_dir = Path(tmp) / "data"
        admin, token = "bench-admin-key-0123456789", "bench-cluster-token-0123456789"
        saved = {k: os.environ.pop(k, None) for k in ("EMBER_REDIS_URL", "EMBER_STORE_URL")}
        platform = Platform(UpOptions(port=free_port(), workers=1, data_dir=data_dir,
                                      extra_env={"EMBER_DRAM_CAPACITY_BYTES": str(256 << 20),
                                                 "EMBER_GATEWAY_PROCESSES": str(gateway_processes)}),
                            Settings(admin_key=admin, cluster_token=token, data_dir=data_dir))
        try:
            platform.start(echo=lambda s: None)
            redis_url = platform.redis.url if platform.redis else None
            pids = {("worker" if name.startswith("node-") else name): proc.pid for name, proc in platform.children}
            if platform.redis is not None and platform.redis.proc is not None:
                pids["redis"] = platform.redis.proc.pid
            pids["client"] = os.getpid()
            return _bench(platform.url, admin, token, redis_url, out_json, rates, step_s, clients, progress,
                          gateway_processes, _CpuMeter(pids))
        finally:
            platform.stop()
            for k, v in saved.items():
                if v is not None:
                    os.environ[k] = v


def _bench(url: str, admin: str, token: str, redis_url: str | None, out_json: Path, rates: tuple[float, ...],
           step_s: float, clients: int, progress: Any, gateway_processes: int | None,
           cpu: _CpuMeter | None = None) -> dict[str, Any]:
    cpu = cpu or _CpuMeter({})
    headers = {"Authorization": f"Bearer {admin}"}
    r = httpx.put(f"{url}/v1/functions/{FUNCTION}", headers=headers, timeout=60, json={
        "checkpoint": Settings().demo_function,
        "scaling": {"max_instances": 1, "target_concurrency": 256, "keep_alive_s": 3600}})
    r.raise_for_status()
    body = {"model": FUNCTION, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    first = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=180)
    first.raise_for_status()
    inst = httpx.get(f"{url}/v1/functions/{FUNCTION}", headers=headers, timeout=10).json()["instances"][0]
    worker_url = _worker_url(redis_url, inst["node"])
    direct = {"url": f"{worker_url}/internal/instances/{inst['id']}/generate", "headers": {CLUSTER_TOKEN_HEADER: token},
              "json": {"messages": body["messages"], "max_tokens": 1, "temperature": 0}}
    via = {"url": f"{url}/v1/chat/completions", "headers": headers, "json": body}
    steps = []
    for i, rate in enumerate(rates):
        heap.settle()  # the load generator's own full collections (12-25 ms) would count as latency
        before = cpu.read()
        g, d = asyncio.run(_alternating_open_loop(via, direct, rate, step_s))
        steps.append(_step(rate, g, d))
        # only the gateway's requests use the gateway and Redis: their CPU per gateway request
        steps[-1]["cpu_ms_per_request"] = cpu.per_request(before, len(g[0]), only=("gateway", "redis"))
        if progress:
            progress(i + 1, len(rates) + 1)
    heap.settle()
    serial = asyncio.run(_serial(via, direct, 200))
    before = cpu.read()
    g32 = asyncio.run(_closed_loop(via, clients, step_s))
    g_cpu = cpu.per_request(before, len(g32[0]))
    before = cpu.read()
    d32 = asyncio.run(_closed_loop(direct, clients, step_s))
    d_cpu = cpu.per_request(before, len(d32[0]))
    gs, ds = _stats(g32), _stats(d32)
    closed = {"clients": clients, "gateway": {**gs, "cpu_ms_per_request": g_cpu},
              "direct": {**ds, "cpu_ms_per_request": d_cpu},
              "p99_ratio": round(gs["p99_ms"] / max(ds["p99_ms"], 1e-9), 3)}
    if progress:
        progress(len(rates) + 1, len(rates) + 1)
    sustained = [s for s in steps if s["errors"] == 0 and s["rps"] >= 0.9 * s["rate_rps"]]
    summary = {"bench": "gateway", "url": url, "worker": inst["node"], "gateway_processes": gateway_processes,
               "step_s": step_s, "steps": steps,
               "closed_loop": closed, "serial": serial,
               "highest_sustained_rps": max((s["rate_rps"] for s in sustained), default=0.0),
               "p99_overhead_under_5ms_up_to_rps": _p99_overhead_holds_up_to(steps, 5.0),
               "note": "overhead = gateway percentile - direct percentile at the same offered rate; "
                       "client, gateway and worker share this machine's CPUs"}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2))
    httpx.delete(f"{url}/v1/functions/{FUNCTION}", headers=headers, timeout=30)
    return summary


class _CpuMeter:
    """CPU time (user + system) of named processes and their descendants, from /proc; "client" (this
    process, the parent of the private `ember up`'s processes) without its descendants."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read(self) -> dict[str, float]:
        if not self.pids:
            return {}
        stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick)
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in stats.items():
            children.setdefault(parent, []).append(pid)
        out = {}
        for name, root in self.pids.items():
            total, todo = 0.0, [root]
            while todo:
                pid = todo.pop()
                if pid in stats:
                    total += stats[pid][1]
                    if name != "client":
                        todo += children.get(pid, [])
            out[name] = total
        return out

    def per_request(self, before: dict[str, float], requests: int,
                    only: tuple[str, ...] | None = None) -> dict[str, float] | None:
        """ms of CPU per request of each process since `before` (None without process ids)."""
        if not before or not requests:
            return None
        now = self.read()
        return {k: round((now[k] - before[k]) * 1000 / requests, 3) for k in before if only is None or k in only}


def _worker_url(redis_url: str | None, node: str) -> str:
    import redis

    from ember.platform.state import Keys

    if not redis_url:
        raise SystemExit("the worker's URL comes from Redis: set EMBER_REDIS_URL (and EMBER_CLUSTER_TOKEN)")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        found = client.hget(Keys.node(node), "url")
    finally:
        client.close()
    if not found:
        raise SystemExit(f"node {node} is not registered in Redis")
    return str(found)


async def _call(client: aiohttp.ClientSession, target: dict[str, Any], out: list[tuple[float, bool]]) -> None:
    t0 = time.perf_counter()
    try:
        async with client.post(target["url"], headers=target["headers"], json=target["json"]) as r:
            body = await r.read()
        ok = r.status == 200 and b'"error"' not in body
    except (aiohttp.ClientError, asyncio.TimeoutError):
        ok = False
    out.append((time.perf_counter() - t0, ok))


def _client(connections: int) -> aiohttp.ClientSession:
    """The load generator's client: aiohttp (a third of httpx's CPU per request, and the client
    shares this machine's CPUs with the gateway and the worker)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=60.0))


async def _alternating_open_loop(via: dict[str, Any], direct: dict[str, Any], rate: float, seconds: float,
                                 window_s: float = 0.25) -> tuple[Any, Any]:
    """`seconds` of each target at `rate`, in alternating windows of `window_s` (gateway, direct,
    gateway, ...): both see the same drift of the machine (other processes, the worker's engine
    state), where two back-to-back runs gave overheads of either sign at p99."""
    outs: tuple[list[tuple[float, bool]], list[tuple[float, bool]]] = ([], [])
    async with _client(1024) as client:
        tasks = []
        t0 = time.perf_counter()
        n = int(2 * rate * seconds)
        for i in range(n):
            at = i / rate  # a sent-request clock at `rate`; windows alternate along it
            which = int(at / window_s) % 2
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_call(client, (via, direct)[which], outs[which])))
        await asyncio.gather(*tasks)
        half = (time.perf_counter() - t0) / 2  # each target had half of the run
    return (outs[0], half), (outs[1], half)


async def _serial(via: dict[str, Any], direct: dict[str, Any], n: int) -> dict[str, Any]:
    """One request at a time, alternating gateway and direct: what the gateway adds to a request
    with no other load (its own work, not queueing)."""
    g: list[tuple[float, bool]] = []
    d: list[tuple[float, bool]] = []
    async with _client(4) as client:
        for _ in range(n):
            await _call(client, via, g)
            await _call(client, direct, d)
    gs, ds = _stats((g, 1.0)), _stats((d, 1.0))
    return {"requests": n, "gateway_p50_ms": gs["p50_ms"], "direct_p50_ms": ds["p50_ms"],
            "p50_overhead_ms": round(gs["p50_ms"] - ds["p50_ms"], 2), "errors": gs["errors"] + ds["errors"]}


async def _closed_loop(target: dict[str, Any], clients: int, seconds: float) -> tuple[list[tuple[float, bool]], float]:
    out: list[tuple[float, bool]] = []
    async with _client(clients * 2) as client:
        t0 = time.perf_counter()

        async def loop() -> None:
            while time.perf_counter() - t0 < seconds:
                await _call(client, target, out)

        await asyncio.gather(*(loop() for _ in range(clients)))
        return out, time.perf_counter() - t0


def _p99_overhead_holds_up_to(steps: list[dict[str, Any]], bound_ms: float) -> float:
    """The highest offered rate at which that step and every lower one had no error and a p99
    overhead under `bound_ms` (0: not even the first)."""
    best = 0.0
    for s in sorted(steps, key=lambda s: s["rate_rps"]):
        if s["errors"] or s["p99_overhead_ms"] >= bound_ms:
            break
        best = s["rate_rps"]
    return best


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _stats(run: tuple[list[tuple[float, bool]], float]) -> dict[str, Any]:
    calls, elapsed = run
    ok = [t for t, good in calls if good]
    return {"requests": len(calls), "errors": len(calls) - len(ok), "rps": round(len(calls) / max(elapsed, 1e-9), 1),
            "p50_ms": round(_pct(ok, 0.5) * 1000, 2), "p99_ms": round(_pct(ok, 0.99) * 1000, 2),
            "mean_ms": round(statistics.fmean(ok) * 1000, 2) if ok else 0.0}


def _step(rate: float, g: Any, d: Any) -> dict[str, Any]:
    gs, ds = _stats(g), _stats(d)
    return {"rate_rps": rate, "rps": gs["rps"], "requests": gs["requests"], "errors": gs["errors"],
            "p50_ms": gs["p50_ms"], "p99_ms": gs["p99_ms"],
            "p50_overhead_ms": round(gs["p50_ms"] - ds["p50_ms"], 2),
            "p99_overhead_ms": round(gs["p99_ms"] - ds["p99_ms"], 2), "direct": ds}
