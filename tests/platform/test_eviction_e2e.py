"""A worker with room for one instance: a cold start of another function evicts the idle one
(least recently used first), never one held by min_instances. Real Redis, worker and gateway."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.platform.redis_server import RedisServerProcess
from tests.platform.conftest import Proc, admin_headers, base_env, start_gateway, start_worker, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[tuple[Proc, Proc]]:
    from ember.loader import open_store
    from ember.loader.convert import convert_checkpoint, read_manifest
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", TinyModelSpec(layers=4, hidden=256, heads=4, kv_heads=2))
    convert_checkpoint(hf, tmp_path / "conv")
    nbytes = read_manifest(tmp_path / "conv").total_bytes
    store_url = f"file://{tmp_path / 'store'}"
    open_store(store_url).push(tmp_path / "conv", "m")
    # one CPU slot with room for one instance (the DRAM tier, sized the same, holds the checkpoint)
    capacity = (nbytes * 3 // 2 // (2 << 20) + 1) * (2 << 20)
    assert nbytes < capacity < 2 * nbytes
    redis = RedisServerProcess(tmp_path / "redis").start()
    # each instance also claims its KV budget; a second instance of the same checkpoint on the
    # device claims only that (weights once per device): 0.4x the weights, so two do not fit
    kv_tokens = int(0.4 * nbytes) // (4 * 2 * 64 * 2 * 4)  # layers x KV heads x head dim x K,V x fp32
    env = base_env(redis.url, store_url, EMBER_SLO_TIMEOUT_S="3", EMBER_CPU_SLOTS="1",
                   EMBER_DRAM_CAPACITY_BYTES=str(capacity), EMBER_KV_BUDGET_TOKENS=str(kv_tokens))
    procs: list[Proc] = []
    try:
        procs.append(start_worker(tmp_path, env, "w0", wait=False))  # both boot side by side
        procs.append(start_gateway(tmp_path, env, wait=False))
        for p in procs:
            wait_healthy(p)
        yield procs[1], procs[0]
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def _deploy(url: str, name: str, **scaling: object) -> None:
    r = httpx.put(f"{url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "m", "scaling": {"keep_alive_s": 300, **scaling}})
    assert r.status_code in (200, 201), r.text


def _chat(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=admin_headers(), timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def _instances(url: str, name: str) -> list[dict]:
    return httpx.get(f"{url}/v1/functions/{name}", headers=admin_headers(), timeout=10).json()["instances"]


def test_idle_instances_make_room_but_min_instances_stay(one_slot: tuple[Proc, Proc]) -> None:
    gateway, _worker = one_slot
    url = gateway.url
    _deploy(url, "f")
    _deploy(url, "g")
    assert _chat(url, "f").headers["x-ember-cold-start"] == "true"
    assert len(_instances(url, "f")) == 1
    r = _chat(url, "g")  # the only slot holds f's idle instance: it is evicted for g
    assert r.status_code == 200, r.text
    assert r.headers["x-ember-cold-start"] == "true" and r.headers["x-ember-load-tier"] == "dram"
    assert _instances(url, "f") == [] and len(_instances(url, "g")) == 1
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'ember_evictions_total{function="f"} 1.0' in metrics

    # h keeps one instance at all times: the autoscaler evicts g's idle one to place it
    _deploy(url, "h", min_instances=1)
    deadline = time.monotonic() + 20
    while not any(i["state"] == "ready" for i in _instances(url, "h")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [i["state"] for i in _instances(url, "h")] == ["ready"]
    assert _instances(url, "g") == []
    # and nobody may evict h below its minimum: g waits out the SLO timeout and gets a 503
    t = time.monotonic()
    r = _chat(url, "g")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_capacity", r.text
    assert 2.5 <= time.monotonic() - t < 15  # the SLO timeout (3 s), not a spin until the client gives up
    assert [i["state"] for i in _instances(url, "h")] == ["ready"]
