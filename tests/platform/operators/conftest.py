"""One small platform for the operator-facing tests (console, traces, dashboards): a real Redis,
one real worker process with a simulated GPU, and a real gateway served by uvicorn inside the
test process, so its traces go to an in-memory OpenTelemetry exporter the tests can read."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.platform.redis_server import RedisServerProcess, free_port
from tests.platform.conftest import ADMIN_KEY, CLUSTER_TOKEN, Proc, admin_headers, base_env, start_worker


@dataclass
class OpsPlatform:
    url: str
    redis_url: str
    worker: Proc
    spans: Any  # InMemorySpanExporter
    keys: dict[str, str]  # role -> API key

    def headers(self, role: str = "admin") -> dict[str, str]:
        return admin_headers() if role == "admin" else {"Authorization": f"Bearer {self.keys[role]}"}

    def deploy(self, name: str) -> None:
        r = httpx.put(f"{self.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                      json={"checkpoint": "tiny", "scaling": {"keep_alive_s": 600}})
        assert r.status_code in (200, 201), r.text

    def chat(self, model: str, **kw: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kw}
        return httpx.post(f"{self.url}/v1/chat/completions", headers=admin_headers(), json=body, timeout=120)


class _Server(threading.Thread):
    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        super().__init__(name="gateway", daemon=True)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def run(self) -> None:
        self.server.run()


@pytest.fixture(scope="session")
def ops(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[OpsPlatform]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from ember.config import Settings
    from ember.loader import open_store
    from ember.platform.gateway.app import create_app

    tmp = tmp_path_factory.mktemp("ops")
    store_url = f"file://{tmp / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    redis = RedisServerProcess(tmp / "redis", persistent=False).start()
    env = base_env(redis.url, store_url, EMBER_SLO_TIMEOUT_S="30", EMBER_SIMULATED_GPUS="1", EMBER_CPU_SLOTS="1")
    worker = start_worker(tmp, env, "ops-node")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(redis_url=redis.url, admin_key=ADMIN_KEY, cluster_token=CLUSTER_TOKEN, store_url=store_url,
                        autoscaler_interval_s=0.3, slo_timeout_s=30, heartbeat_ttl_s=2)
    port = free_port()
    server = _Server(create_app(settings, tracer_provider=provider), port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).json().get("workers") == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the gateway did not see the worker:\n{worker.output()}")
        keys = {}
        for role in ("operator", "developer", "invoker"):
            r = httpx.post(f"{url}/v1/keys", headers=admin_headers(), json={"role": role, "name": f"{role}-ops"})
            keys[role] = r.json()["key"]
        yield OpsPlatform(url, redis.url, worker, exporter, keys)
    finally:
        server.server.should_exit = True
        server.join(10)
        worker.stop()
        redis.stop()
