"""`ember bench tracing`: what OpenTelemetry tracing adds to a warm request's latency.

One Redis, one worker and two gateways on this machine, both routing to the same warm instance:
one with tracing off (the default), one with OTEL_TRACES_EXPORTER=otlp exporting every span over
OTLP/HTTP to a local sink in this process (so serialisation and export are paid as in production).
Requests alternate between the two gateways round by round (the order flips every round), so
drift of the shared machine hits both arms alike.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ADMIN = "bench-tracing-admin-key"
TOKEN = "bench-tracing-cluster-token"


class _OtlpSink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and counts them."""

    exports = 0
    bytes = 0

    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        type(self).exports += 1
        type(self).bytes += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def run_tracing_bench(out_json: Path, *, requests: int = 200, max_tokens: int = 8,
                      progress: Any = None) -> dict[str, Any]:
    from ember.loader import open_store
    from ember.platform.redis_server import RedisServerProcess, free_port
    from ember.tinymodel import make_tiny_model

    sink = ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    threading.Thread(target=sink.serve_forever, name="otlp-sink", daemon=True).start()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-tracing-") as tmp:
        root = Path(tmp)
        store_url = f"file://{root / 'store'}"
        open_store(store_url).push(make_tiny_model(root / "model"), "tiny")
        redis = RedisServerProcess(root / "redis", persistent=False).start()
        env = {**os.environ, "EMBER_REDIS_URL": redis.url, "EMBER_ADMIN_KEY": ADMIN, "EMBER_CLUSTER_TOKEN": TOKEN,
               "EMBER_STORE_URL": store_url, "PYTHONUNBUFFERED": "1"}
        for k in [k for k in env if k.startswith("OTEL_")]:
            env.pop(k)
        traced = {**env, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{sink.server_port}/v1/traces"}
        try:
            wport, off_port, on_port = free_port(), free_port(), free_port()
            procs.append(_spawn(["worker", "--data-dir", str(root / "node"), "--node-id", "bench-node",
                                 "--port", str(wport)], env, root / "worker.log"))
            procs.append(_spawn(["gateway", "--port", str(off_port)], env, root / "gw-off.log"))
            procs.append(_spawn(["gateway", "--port", str(on_port)], traced, root / "gw-on.log"))
            urls = {"off": f"http://127.0.0.1:{off_port}", "on": f"http://127.0.0.1:{on_port}"}
            for url in urls.values():
                _wait_ready(url, procs)
            h = {"Authorization": f"Bearer {ADMIN}"}
            httpx.put(f"{urls['off']}/v1/functions/tiny", headers=h, timeout=60,
                      json={"checkpoint": "tiny", "scaling": {"min_instances": 0, "keep_alive_s": 3600}}
                      ).raise_for_status()
            clients = {arm: httpx.Client(base_url=url, headers=h, timeout=60) for arm, url in urls.items()}
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
                    "temperature": 0}
            for arm in ("off", "on", "off", "on"):  # the cold start, then warm-up of both gateways
                clients[arm].post("/v1/chat/completions", json=body).raise_for_status()
            lat: dict[str, list[float]] = {"off": [], "on": []}
            trace_ids = 0
            for i in range(requests):
                for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    t0 = time.perf_counter()
                    r = clients[arm].post("/v1/chat/completions", json=body)
                    lat[arm].append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                    assert r.headers["x-ember-cold-start"] == "false"
                    trace_ids += arm == "on" and "x-ember-trace-id" in r.headers
                if progress:
                    progress(i + 1, requests)
            time.sleep(6)  # the batch processor exports every 5 s
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            redis.stop()
    arms = {arm: _stats(v) for arm, v in lat.items()}
    cost = span_cost_us(f"http://127.0.0.1:{sink.server_port}/v1/traces")
    paired = [on - off for on, off in zip(lat["on"], lat["off"], strict=True)]
    summary = {
        "requests_per_arm": requests, "max_tokens": max_tokens,
        "arms_ms": arms,
        "overhead_pct_median": 100 * (arms["on"]["median"] / arms["off"]["median"] - 1),
        "overhead_pct_mean": 100 * (arms["on"]["mean"] / arms["off"]["mean"] - 1),
        "paired_diff_ms_median": statistics.median(paired),
        "traced_responses_with_trace_id": trace_ids,
        "span_cost_us": cost,
        "request_path_pct_of_fastest_warm_request": 100 * cost["request_path_us"] / 1000 / arms["off"]["min"],
        "cpu_with_export_pct_of_fastest_warm_request": 100 * cost["cpu_with_export_us"] / 1000 / arms["off"]["min"],
        "otlp_exports": _OtlpSink.exports, "otlp_bytes": _OtlpSink.bytes,
        "counted": "client-side latency of a warm, non-streamed chat completion through each gateway (same worker "
                   "instance); 'on' exports every span over OTLP/HTTP to a local sink.",
        "raw_ms": lat,
    }
    sink.shutdown()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2))
    return summary


def span_cost_us(endpoint: str, n: int = 400, repeats: int = 5) -> dict[str, float]:
    """The gateway's tracing work for one warm invocation, in this process (best of `repeats` runs
    of `n`, as microbenchmarks on a shared machine are read): `request_path_us`, making the
    invocation span and its queue/prefill/decode children and handing them to the batch processor
    (what a request waits for), and `cpu_with_export_us`, the same plus the export thread's OTLP
    serialisation and HTTP sends (CPU time, off the request path). `n` stays under the batch queue
    (2048 spans), so no span is dropped."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from ember.platform.gateway.invoke import InvocationTarget
    from ember.platform.gateway.tracing import InvocationTracer

    target = InvocationTarget("inst-1", "node-0", "http://127.0.0.1:1", False, "warm", 0.0, "tiny")
    done = {"finish_reason": "length", "prompt_tokens": 12, "completion_tokens": 8, "ttft_s": 0.004,
            "tpot_s": 0.002, "energy_j": 1.5}
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None}
    headers = {"host": "127.0.0.1", "authorization": "Bearer x", "content-type": "application/json"}

    def run(tracer: InvocationTracer) -> tuple[float, float]:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(n):
            trace = tracer.start("tiny", "chat", headers, params)
            with trace.active():
                pass
            trace.acquired(target)
            trace.first_token()
            trace.done(done, f"chatcmpl-{i}")
            trace.end()
        wall = time.perf_counter() - wall0
        if tracer.provider is not None:
            tracer.provider.force_flush()
        return 1e6 * wall / n, 1e6 * (time.process_time() - cpu0) / n

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    tracer = InvocationTracer(provider)
    run(tracer)  # warm-up (imports, first connection)
    on = [run(tracer) for _ in range(repeats)]
    provider.shutdown()
    off = [run(InvocationTracer(None)) for _ in range(repeats)]
    return {"invocations_per_run": n, "runs": repeats, "request_path_us": min(w for w, _ in on),
            "cpu_with_export_us": min(c for _, c in on), "off_us": min(w for w, _ in off)}


def _stats(v: list[float]) -> dict[str, float]:
    s = sorted(v)
    return {"median": statistics.median(s), "mean": statistics.fmean(s), "p90": s[int(0.9 * (len(s) - 1))],
            "min": s[0]}


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen([sys.executable, "-m", "ember", *args, "--host", "127.0.0.1", "--log-level",
                                 "warning"], env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a benchmark process exited early")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).json().get("workers") == 1:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready within {timeout_s}s")
