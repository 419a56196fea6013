"""Bodies a worker's instance cannot generate from, against a real gateway and worker: a clear
4xx in the OpenAI shape from the worker (and the same status at the gateway), never a 500/502."""

from __future__ import annotations

import time

import httpx

from tests.platform.conftest import CLUSTER_TOKEN, TierCluster, admin_headers

WORKER = {"x-ember-cluster-token": CLUSTER_TOKEN}


def _deploy(cluster: TierCluster, name: str, checkpoint: str) -> str:
    """Deploy `name`, serve one request through the gateway (a cold start), and return the id of
    the instance the worker holds for it."""
    u = cluster.gateway.url
    r = httpx.put(f"{u}/v1/functions/{name}", headers=admin_headers(), json={"checkpoint": checkpoint})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{u}/v1/completions", headers=admin_headers(), timeout=120,
                   json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = httpx.get(f"{cluster.worker.url}/internal/healthz", headers=WORKER, timeout=10).json()["instances"]
        ids = [i for i, v in held.items() if v["function"] == name]
        if ids:
            return ids[0]
        time.sleep(0.1)
    raise AssertionError(f"no instance of {name} on the worker")


def _worker_generate(cluster: TierCluster, iid: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{cluster.worker.url}/internal/instances/{iid}/generate", content=body, timeout=60,
                      headers={**WORKER, "content-type": "application/json"})


def test_out_of_range_sampling_bodies_get_422_from_the_worker(tier_cluster: TierCluster) -> None:
    """max_tokens 0 used to generate a token and -5 shrank the request's KV need below its prompt;
    the worker's wire now has the gateway's bounds, and an in-range body still serves."""
    iid = _deploy(tier_cluster, "wbad", "rlck")
    for body in ('{"prompt": "hi", "max_tokens": 0}', '{"prompt": "hi", "max_tokens": -5}',
                 '{"prompt": "hi", "max_tokens": 2, "temperature": 2.5}', '{"prompt": "hi", "top_p": 0}',
                 '{"prompt": "hi", "top_p": 1.5}', '{"messages": [], "max_tokens": 3}',
                 '{"prompt": "hi", "seed": 18446744073709551616}', '{"prompt": "hi", "eta": 2}'):
        r = _worker_generate(tier_cluster, iid, body.encode())
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error", body
    ok = _worker_generate(tier_cluster, iid, b'{"prompt": "hi", "max_tokens": 1, "temperature": 0}')
    assert ok.status_code == 200 and '"done"' in ok.text, ok.text
