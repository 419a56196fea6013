"""The live autoscaler's prefetch against a real Redis: a function whose pinned checkpoint sits
only on a node's SSD, too slow for its SLO, is prefetched into that node's DRAM, and the prefetch
is published as the SSD tier's queue (what placement estimates read, as the simulator charges it)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import redis

from ember.config import Settings
from ember.platform.cluster import DeviceSpec, RedisCluster
from ember.platform.gateway.autoscaling import AutoscalerLoop, DemandMeter
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionSpec
from ember.platform.state import Keys


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
                                                        metrics=GatewayMetrics(), demand=DemandMeter(), http=http))
            await AutoscalerLoop(app, "gw-test")._act(cluster, {"hot": 1.0})

    before = time.time()
    asyncio.run(main())
    assert [(r.url.path, json.loads(r.read())) for r in sent] == [
        ("/internal/prefetch", {"checkpoint": ident, "tier": "dram"})]
    busy_until = float(cluster.r.hget(Keys.node("p0"), "tq:ssd") or 0)
    assert busy_until >= before + 0.9 * nbytes / ssd_bps  # 8 GiB at 1 GB/s: the SSD is busy ~8.6 s
