"""The live autoscaler under its Redis lease (real redis-server): a gateway whose step outlives its
lease stops acting, so two gateways never act at once."""

from __future__ import annotations

import asyncio
import time
import types

import redis

from ember.config import Settings
from ember.errors import StateUnavailable
from ember.platform.cluster import RedisCluster
from ember.platform.gateway import autoscaling
from ember.platform.gateway.autoscaling import AutoscalerLoop
from ember.scheduler.demand import DemandMeter


def test_a_step_that_loses_its_lease_stops(redis_url: str, monkeypatch) -> None:  # noqa: ANN001
    """Gateway A's step is long (a cold start) and A loses Redis for longer than the lease's TTL: the
    lease lapses and gateway B takes it. A must stop its step then; before, A's renewal noticed and
    only logged, and A went on acting while B acted."""
    monkeypatch.setattr(autoscaling.energy_state, "allocate_and_store", lambda *a, **k: None)
    acting: dict[str, list[tuple[float, float | None]]] = {}

    def gateway(holder: str, cluster: RedisCluster) -> AutoscalerLoop:
        state = types.SimpleNamespace(settings=Settings(lease_ttl_s=1.5, autoscaler_interval_s=0.2),
                                      demand=DemandMeter(), cluster=cluster, redis=cluster.r,
                                      policy_for=lambda spec: None)
        loop = AutoscalerLoop(types.SimpleNamespace(state=state), holder)

        async def long_step(cluster: RedisCluster, demand: dict) -> None:
            acting.setdefault(holder, []).append((time.monotonic(), None))
            await asyncio.sleep(4.0)
            acting[holder][-1] = (acting[holder][-1][0], time.monotonic())

        loop._act = long_step  # type: ignore[method-assign]
        return loop

    ca = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True))
    cb = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True))
    partitioned = False
    real_try_lease = ca.try_lease

    def a_try_lease(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        if partitioned:
            raise StateUnavailable("cluster state (Redis) unavailable: partition")
        return real_try_lease(*a, **kw)

    ca.try_lease = a_try_lease  # type: ignore[method-assign]
    a, b = gateway("gw-A", ca), gateway("gw-B", cb)

    async def main() -> float:
        nonlocal partitioned
        step_a = asyncio.create_task(a.step())  # A holds the lease, its step runs 4 s
        await asyncio.sleep(0.3)
        partitioned = True  # A cannot reach Redis for 2 s (> the 1.5 s TTL)
        await asyncio.sleep(2.0)
        partitioned = False
        b_started = time.monotonic()
        await asyncio.gather(step_a, b.step())  # B's next step: the lease lapsed, B takes it
        return b_started

    b_started = asyncio.run(main())
    assert [end for _, end in acting["gw-B"]] != [None]  # B acted to the end
    (a_start, a_end), = acting["gw-A"]
    assert a_end is None  # A's step was stopped before its end ...
    assert ca.r.get("ember:lease:autoscaler") == "gw-B"
    ca.r.close()
    cb.r.close()
    assert a_start < b_started
