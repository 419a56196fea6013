"""The live autoscaler's prefetch against a real Redis: a function whose pinned checkpoint sits
only on a node's SSD, too slow for its SLO, is prefetched into that node's DRAM, and the prefetch
is published as the SSD tier's queue (what placement estimates read, as the simulator charges it)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis

from ember.config import Settings
from ember.platform.cluster import DeviceSpec, RedisCluster
from ember.platform.gateway.autoscaling import AutoscalerLoop
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionSpec
from ember.platform.state import Keys
from ember.scheduler.demand import DemandMeter
from ember.scheduler.estimator import prefetch_expiry_s
from ember.scheduler.policies import get_policy
from tests.platform.conftest import admin_headers, base_env, feed_fifo, start_gateway, start_worker, until


def test_prefetch_of_a_pinned_checkpoint_is_sent_and_charged_to_its_source_tier(redis_url: str) -> None:
    cluster = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=60)
    ident, nbytes, ssd_bps = "file:///store/hot#0123abcd", 8 << 30, 1e9
    cluster.register_node("p0", "http://p0.invalid", [DeviceSpec("cuda:0", 80 << 30)], {"ssd": ssd_bps})
    cluster.heartbeat("p0", {ident: "ssd"})
    spec = FunctionSpec(name="hot", checkpoint="hot", checkpoint_id=ident, nbytes=nbytes)
    cluster.r.hset(Keys.functions, "hot", spec.model_dump_json())
    sent: list[httpx.Request] = []

    def worker(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(202, json={"status": "prefetching"})

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(worker)) as http:
            app = SimpleNamespace(state=SimpleNamespace(settings=Settings(), cluster=cluster, redis=cluster.r,
                                                        metrics=GatewayMetrics(), demand=DemandMeter(), http=http,
                                                        policy_for=lambda spec: get_policy("ember")))
            await AutoscalerLoop(app, "gw-test")._act(cluster, {"hot": 1.0})

    before = time.time()
    asyncio.run(main())
    assert [(r.url.path, json.loads(r.read())) for r in sent] == [
        ("/internal/prefetch", {"checkpoint": ident, "tier": "dram", "dram_keep": 1})]  # kept first: 8.6 s > 1 s SLO
    busy_until = float(cluster.r.hget(Keys.node("p0"), "tq:ssd") or 0)
    assert busy_until >= before + 0.9 * nbytes / ssd_bps  # 8 GiB at 1 GB/s: the SSD is busy ~8.6 s


def test_a_popular_function_under_a_baseline_without_prefetches_gets_none(redis_url: str) -> None:
    """The live autoscaler step (real Redis, the gateway's policy mapping) on a popular function
    placed by `serverlessllm`, whose published system has no proactive DRAM copies: nothing is sent
    and its SSD's queue is untouched (the simulator gives it none either)."""
    from ember.scheduler.policies import PolicyChooser

    cluster = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=60)
    ident = "file:///store/hot#0123abcd"
    cluster.register_node("p0", "http://p0.invalid", [DeviceSpec("cuda:0", 80 << 30)], {"ssd": 1e9})
    cluster.heartbeat("p0", {ident: "ssd"})
    spec = FunctionSpec(name="hot", checkpoint="hot", checkpoint_id=ident, nbytes=8 << 30,
                        placement_policy="serverlessllm")
    cluster.r.hset(Keys.functions, "hot", spec.model_dump_json())
    sent: list[httpx.Request] = []
    policies = PolicyChooser("ember")

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(202))) \
                as http:
            app = SimpleNamespace(state=SimpleNamespace(
                settings=Settings(), cluster=cluster, redis=cluster.r, metrics=GatewayMetrics(), demand=DemandMeter(),
                http=http, policy_for=lambda f: policies.get(f.placement_policy or "ember")))
            await AutoscalerLoop(app, "gw-test")._act(cluster, {"hot": 1.0})

    asyncio.run(main())
    assert sent == [] and cluster.r.hget(Keys.node("p0"), "tq:ssd") in (None, "0", "0.0")


def _hot_cluster(redis_url: str) -> tuple[RedisCluster, str, int]:
    """Node p0 with `hot`'s checkpoint on its SSD (1 GB/s: 8 GiB miss a 1 s SLO), `hot` deployed."""
    cluster = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=60)
    ident, nbytes = "file:///store/hot#0123abcd", 8 << 30
    cluster.register_node("p0", "http://p0.invalid", [DeviceSpec("cuda:0", 80 << 30)], {"ssd": 1e9})
    cluster.heartbeat("p0", {ident: "ssd"})
    spec = FunctionSpec(name="hot", checkpoint="hot", checkpoint_id=ident, nbytes=nbytes)
    cluster.r.hset(Keys.functions, "hot", spec.model_dump_json())
    return cluster, ident, nbytes


def _steps(cluster: RedisCluster, worker, n: int) -> None:
    """`n` autoscaler steps of a gateway whose HTTP client reaches `worker`, `hot` popular."""
    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(worker)) as http:
            app = SimpleNamespace(state=SimpleNamespace(settings=Settings(), cluster=cluster, redis=cluster.r,
                                                        metrics=GatewayMetrics(), demand=DemandMeter(), http=http,
                                                        policy_for=lambda spec: None))
            loop = AutoscalerLoop(app, "gw-test")
            for _ in range(n):
                await loop._act(cluster, {"hot": 1.0})

    asyncio.run(main())


def test_a_prefetch_in_flight_is_published_and_not_sent_again(redis_url: str) -> None:
    """Sent once, the prefetch is in flight to p0 (`prefetching`) until its expiry: later steps
    neither send it again nor push the SSD's queue again (before: every step did both)."""
    cluster, ident, nbytes = _hot_cluster(redis_url)
    sent: list[httpx.Request] = []

    def worker(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(202, json={"status": "started"})

    _steps(cluster, worker, 1)
    busy_until = cluster.r.hget(Keys.node("p0"), "tq:ssd")
    assert len(sent) == 1 and cluster.prefetching(ident) == {"p0"}
    _steps(cluster, worker, 3)
    assert len(sent) == 1
    assert cluster.r.hget(Keys.node("p0"), "tq:ssd") == busy_until
    expiry = cluster.r.zscore(Keys.prefetching(ident), "p0")
    end = float(busy_until or 0)  # sent with the SSD idle: the queue ends where the copy is estimated to
    assert expiry == pytest.approx(prefetch_expiry_s(end - nbytes / 1e9, end), abs=1e-3)
    assert 0 < cluster.r.pttl(Keys.prefetching(ident)) / 1000 <= expiry - time.time() + 1  # the key goes with it
    cluster.r.delete(Keys.node_alive("p0"))
    assert cluster.prefetching(ident) == set()  # a dead node fetches nothing


@pytest.mark.parametrize("answer", ["error", "refused"])
def test_a_prefetch_the_worker_did_not_take_is_not_recorded(redis_url: str, answer: str) -> None:
    """A worker error or an unreachable worker: the prefetch is not in flight and its source tier
    is not held for it, so the next step sends it again."""
    cluster, ident, _ = _hot_cluster(redis_url)
    calls: list[httpx.Request] = []

    def failing(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if answer == "refused":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(500, json={"error": {"message": "boom"}})

    before = time.time()
    _steps(cluster, failing, 1)
    assert len(calls) == 1
    assert cluster.prefetching(ident) == set()
    assert float(cluster.r.hget(Keys.node("p0"), "tq:ssd") or 0) <= time.time() + 0.5  # not busy for ~8.6 s
    assert float(cluster.r.hget(Keys.node("p0"), "tq:ssd") or 0) >= before
    _steps(cluster, failing, 1)
    assert len(calls) == 2  # tried again


def test_a_popular_functions_prefetch_is_sent_once_while_it_is_in_flight(
        redis_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A real gateway (autoscaler every 0.2 s), worker and Redis. `hot` is popular (requests
    counted) and its checkpoint's every load blocks (a model file of the store is a FIFO), so the
    prefetch the autoscaler sends stays in flight: the worker is asked once, and the node's
    published remote-tier queue is pushed once. Before, every step sent it again (the worker logged
    'already running' ~15 times in 3 s) and pushed the queue by another transfer each time."""
    from ember.loader import open_store

    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_model_dir, "hotck")
    fifo = Path(store.uri.removeprefix("file://")) / "hotck" / "files" / "tokenizer_config.json"
    data = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    env = base_env(redis_url, store.uri, EMBER_AUTOSCALER_INTERVAL_S="0.2")
    procs = [start_worker(tmp_path, env, "w0")]
    client: list[threading.Thread] = []
    try:
        procs.append(start_gateway(tmp_path, env))
        worker, gw = procs
        r = httpx.put(f"{gw.url}/v1/functions/hot", headers=admin_headers(), timeout=60,
                      json={"checkpoint": "hotck", "slo": {"ttft_ms": 1},
                            "scaling": {"max_instances": 1, "keep_alive_s": 600}})
        assert r.status_code == 201, r.text
        ident = r.json()["checkpoint_id"]
        red = redis.Redis.from_url(redis_url, decode_responses=True)
        red.hset(Keys.node("w0"), "bw:remote", "1e6")  # a slow store link: each transfer queues ~seconds

        def invoke() -> None:
            try:  # the cold start blocks on the FIFO: the client gives up, the request is counted
                httpx.post(f"{gw.url}/v1/chat/completions", headers=admin_headers(), timeout=1.0,
                           json={"model": "hot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            except httpx.HTTPError:
                pass

        client = [threading.Thread(target=invoke) for _ in range(6)]  # ~0.1/s over the meter's 60 s
        for t in client:
            t.start()

        def asked() -> list[str]:
            return [ln for ln in worker.log.read_text(errors="replace").splitlines() if "prefetch of " in ln]

        assert until(lambda: len(asked()) >= 1, 30), worker.output()
        queue = red.hget(Keys.node("w0"), "tq:remote")
        time.sleep(3.0)  # ~15 autoscaler steps while the copy is in flight
        assert [ln.split(": ")[-1] for ln in asked()] == ["started"], asked()
        assert red.hget(Keys.node("w0"), "tq:remote") == queue
        assert red.zrange(Keys.prefetching(ident), 0, -1) == ["w0"]
        assert "autoscaler: prefetch of" in gw.output()
        # the loads end: the worker publishes the DRAM copy, then ends the prefetch's record
        expiry = red.zscore(Keys.prefetching(ident), "w0")
        assert expiry is not None
        assert feed_fifo(fifo, data, timeout_s=5.0)
        assert until(lambda: red.exists(Keys.prefetching(ident)) == 0, 30), worker.output()
        assert time.time() < expiry  # ended by the worker, not expired
        assert red.hget(Keys.node_holdings("w0"), ident) == "dram"
        assert [ln.split(": ")[-1] for ln in asked()] == ["started"], asked()
    finally:
        feed_fifo(fifo, data, timeout_s=0.5)  # a load still blocked ends, so the worker stops promptly
        for p in reversed(procs):
            p.stop()
        for t in client:
            t.join(5)


