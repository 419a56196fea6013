"""A real gateway and one real worker (on Redis) whose worker advertises a recording proxy, so a
test reads each load's answer exactly as the gateway got it: the tier, the bytes and the transfer
seconds the worker measured. Used where a test checks what one load taught the cluster view."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis

from ember.platform.cluster import RedisCluster
from ember.platform.redis_server import free_port
from tests.platform.conftest import CLUSTER_TOKEN, Proc, admin_headers, base_env, start_gateway, start_process

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class RecordingProxy:
    """Forwards every request to the worker (buffered) and keeps its answers to load requests."""

    upstream: str = ""
    loads: list[dict[str, Any]] = field(default_factory=list)

    def serve(self, port: int) -> ThreadingHTTPServer:
        proxy = self
        client = httpx.Client(timeout=120)

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                resp = client.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                if self.command == "POST" and self.path == "/internal/instances" and resp.status_code == 200:
                    proxy.loads.append(resp.json())
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="recording-proxy", daemon=True).start()
        return server


@dataclass
class RecordedPlatform:
    gateway: Proc
    cluster: RedisCluster
    proxy: RecordingProxy
    node_id: str = "w0"

    def bandwidths(self) -> dict[str, float]:
        """The worker node's learned tier bandwidths as the placement estimator reads them."""
        (node,) = [n for n in self.cluster.all_nodes() if n.node_id == self.node_id]
        return dict(node.bandwidth_bps)

    def cold_start(self, function: str, checkpoint: str) -> dict[str, Any]:
        """Deploy `function` and invoke it once (a cold start); the worker's answer to that load."""
        r = httpx.put(f"{self.gateway.url}/v1/functions/{function}", headers=admin_headers(), timeout=60,
                      json={"checkpoint": checkpoint, "scaling": {"keep_alive_s": 600}})
        assert r.status_code == 201, r.text
        loads = len(self.proxy.loads)
        r = httpx.post(f"{self.gateway.url}/v1/chat/completions", headers=admin_headers(), timeout=120,
                       json={"model": function, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.headers["x-ember-cold-start"] == "true"
        (load,) = self.proxy.loads[loads:]
        assert r.headers["x-ember-load-tier"] == load["tier"]
        return load


@contextmanager
def recorded_platform(redis_url: str, tmp: Path, model_dir: Path, checkpoint: str = "ck") -> Iterator[RecordedPlatform]:
    """`model_dir` pushed to a file store as `checkpoint`; a worker (one CPU slot) behind the proxy and a gateway."""
    from ember.loader import open_store

    store_url = f"file://{tmp / 'store'}"
    open_store(store_url).push(model_dir, checkpoint)
    env = base_env(redis_url, store_url, EMBER_SLO_TIMEOUT_S="30", EMBER_CPU_SLOTS="1")
    proxy = RecordingProxy()
    proxy_port, worker_port = free_port(), free_port()
    server = proxy.serve(proxy_port)
    proxy.upstream = f"http://127.0.0.1:{worker_port}"
    procs: list[Proc] = []
    try:
        procs.append(start_process(
            ["worker", "--data-dir", str(tmp / "w0"), "--node-id", "w0", "--host", "127.0.0.1",
             "--port", str(worker_port), "--advertise-url", f"http://127.0.0.1:{proxy_port}"],
            env, tmp / "w0.log", f"http://127.0.0.1:{worker_port}/internal/healthz",
            headers={"x-ember-cluster-token": CLUSTER_TOKEN}, timeout_s=120))
        procs.append(start_gateway(tmp, env))
        yield RecordedPlatform(procs[1], RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True)), proxy)
    finally:
        for p in reversed(procs):
            p.stop()
        server.shutdown()
        server.server_close()
