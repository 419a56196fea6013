"""Runs the scheduler's autoscaler live: in one gateway at a time (a Redis lease), every
`autoscaler_interval_s`, and carries out its actions against workers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis
from anyio import to_thread

from ember.errors import EmberError
from ember.platform.gateway.admin_routes import unload_instance
from ember.platform.gateway.registry import FunctionRegistry

log = logging.getLogger(__name__)


class AutoscalerLoop:
    def __init__(self, app: Any, holder: str) -> None:
        self.app = app
        self.holder = holder
        self.settings = app.state.settings

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except (redis.RedisError, EmberError) as e:
                log.warning("autoscaler step skipped: %s", e)
            await asyncio.sleep(self.settings.autoscaler_interval_s)

    async def step(self) -> None:
        cluster = self.app.state.cluster
        ttl = max(self.settings.lease_ttl_s, 3 * self.settings.autoscaler_interval_s)
        if not await to_thread.run_sync(cluster.try_lease, "autoscaler", self.holder, ttl):
            return
        await to_thread.run_sync(cluster.reap_dead_nodes)
        specs = {s.name: s for s in await to_thread.run_sync(FunctionRegistry(self.app.state.redis).list)}
        instances = await to_thread.run_sync(cluster.instances)
        now = time.time()
        metrics = self.app.state.metrics
        metrics.instances.clear()
        for inst in instances:
            metrics.instances.labels(inst.function, inst.state).inc()
            spec = specs.get(inst.function)
            if spec is None:  # function deleted
                await unload_instance(self.app, inst)
                continue
            idle_s = now - max(inst.last_used_s, inst.created_s)
            keep = spec.scaling.min_instances
            ready = [i for i in instances if i.function == inst.function and i.state == "ready"]
            if inst.state == "ready" and inst.outstanding == 0 and idle_s > spec.scaling.keep_alive_s \
                    and len(ready) > keep:
                log.info("unloading %s of %s: idle %.1fs > keep_alive_s %.1f", inst.instance_id, inst.function,
                         idle_s, spec.scaling.keep_alive_s)
                await unload_instance(self.app, inst)
                instances.remove(inst)
