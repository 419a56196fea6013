"""The whole platform over `rediss://` with a private CA, the shape of the AWS deployment (ElastiCache
with transit encryption and an AUTH token): a gateway and a worker started separately reach a
TLS-only Redis through every client they hold (the gateway's redis-py client, its multiplexed hot
path client, its pub/sub listener for waiting requests; the worker's client), and a cold start,
warm requests, a stream and requests that wait for a slot all succeed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.platform.conftest import admin_headers, base_env, start_gateway, start_worker, wait_healthy
from tests.platform.tls_redis import PASSWORD, tls_redis

pytestmark = pytest.mark.slow


def test_gateway_and_worker_over_tls_redis_with_a_private_ca(tmp_path: Path, tiny_model_dir: Path) -> None:
    from ember.loader import open_store

    store_url = f"file://{tmp_path / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    with tls_redis(tmp_path) as (port, ca):
        env = base_env(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}", store_url,
                       EMBER_SLO_TIMEOUT_S="30")
        procs = []
        try:
            procs.append(start_worker(tmp_path, env, "w0", wait=False))  # both boot side by side
            gateway = start_gateway(tmp_path, env, wait=False)
            procs.append(gateway)
            for p in procs:
                wait_healthy(p)
            url = gateway.url
            deadline = time.monotonic() + 20
            while httpx.get(f"{url}/readyz").json().get("workers") != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert httpx.get(f"{url}/readyz").json().get("workers") == 1, gateway.output()

            r = httpx.put(f"{url}/v1/functions/f", headers=admin_headers(), timeout=60,
                          json={"checkpoint": "tiny",
                                "scaling": {"keep_alive_s": 300, "max_instances": 1, "target_concurrency": 1}})
            assert r.status_code in (200, 201), r.text
            body = {"model": "f", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
            first = httpx.post(f"{url}/v1/chat/completions", headers=admin_headers(), json=body, timeout=120)
            assert first.status_code == 200, first.text + gateway.output()
            assert first.headers["x-ember-cold-start"] == "true"

            with httpx.stream("POST", f"{url}/v1/completions", headers=admin_headers(), timeout=60,
                              json={"model": "f", "prompt": "Once", "max_tokens": 4, "stream": True,
                                    "stream_options": {"include_usage": True}}) as resp:
                assert resp.status_code == 200
                assert resp.headers["x-ember-cold-start"] == "false"
                events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["usage"]["completion_tokens"] >= 1

            # One slot: of four requests at once, three wait, and each release must wake the next
            # through the gateway's pub/sub listener (over TLS too), not a timeout.
            results: list[httpx.Response] = []
            lock = threading.Lock()

            def call() -> None:
                resp = httpx.post(f"{url}/v1/chat/completions", headers=admin_headers(), timeout=60,
                                  json={**body, "max_tokens": 8})
                with lock:
                    results.append(resp)

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]

            stats = httpx.get(f"{url}/v1/stats/functions", headers=admin_headers(), timeout=10).json()
            f = next(s for s in stats["functions"] if s["name"] == "f")
            assert f["outstanding"] == 0  # every slot came back
            nodes = httpx.get(f"{url}/v1/nodes", headers=admin_headers(), timeout=10).json()["nodes"]
            assert [n["node"] for n in nodes] == ["w0"] and nodes[0]["up"]
            assert "Traceback" not in gateway.output()
        finally:
            for p in procs:
                p.stop()
