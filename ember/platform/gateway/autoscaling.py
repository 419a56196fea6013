"""Runs the scheduler's `Autoscaler` live: in one gateway at a time (a Redis lease), every
`autoscaler_interval_s`, and carries out its actions against workers.

Demand (for prefetch decisions) is this gateway's own request rate per function, an exponentially
weighted average: with several gateways behind a load balancer each sees a similar share.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import redis
from anyio import to_thread

from ember.errors import EmberError
from ember.platform import energy_state
from ember.platform.gateway.admin_routes import unload_instance
from ember.platform.gateway.protocol import FunctionSpec
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.loadqueues import LoadQueues
from ember.platform.wire import CLUSTER_TOKEN_HEADER
from ember.scheduler.autoscaler import (
    Autoscaler,
    EnsureInstances,
    Prefetch,
    ScalingSpec,
    Unload,
    takes_prefetches,
)
from ember.scheduler.caching import slo_aware_cache
from ember.scheduler.demand import DemandMeter

log = logging.getLogger(__name__)


def scaling_spec(spec: FunctionSpec, policy: Any = None) -> ScalingSpec:
    """How `spec` scales; `policy` (its placement policy) says whether it takes DRAM prefetches
    (a baseline whose published system has none does not, as in the simulator) and whether its
    copies are kept by their SLO (`caching`)."""
    s = spec.scaling
    return ScalingSpec(function=spec.name, checkpoint=spec.checkpoint_ref, nbytes=spec.nbytes,
                       min_instances=s.min_instances, max_instances=s.max_instances, keep_alive_s=s.keep_alive_s,
                       target_concurrency=s.target_concurrency, ttft_slo_s=spec.slo.ttft_ms / 1000,
                       prefetch=takes_prefetches(policy), slo_aware_cache=slo_aware_cache(policy))


class AutoscalerLoop:
    def __init__(self, app: Any, holder: str) -> None:
        self.app = app
        self.holder = holder
        self.settings = app.state.settings
        self.autoscaler = Autoscaler(unload_unknown=True)
        self.demand: DemandMeter = app.state.demand

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except (redis.RedisError, EmberError) as e:
                log.warning("autoscaler step skipped: %s", e)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad step must not end autoscaling for good
                log.exception("autoscaler step failed")
            await asyncio.sleep(self.settings.autoscaler_interval_s)

    async def step(self) -> None:
        cluster = self.app.state.cluster
        ttl = max(self.settings.lease_ttl_s, 3 * self.settings.autoscaler_interval_s)
        demand = self.demand.rates_per_s()
        if await to_thread.run_sync(cluster.try_lease, "energy-allocator", self.holder, ttl):
            # split the operator's power budget across devices by SLO pressure (workers apply the caps)
            await to_thread.run_sync(energy_state.allocate_and_store, self.app.state.redis)
        if not await to_thread.run_sync(cluster.try_lease, "autoscaler", self.holder, ttl):
            return
        # The step's actions may take long (a cold start): the lease is renewed while they run,
        # and the step stops once the lease is lost (another gateway may hold it and act by now).
        act = asyncio.create_task(self._act(cluster, demand), name="autoscaler-step")
        renew = asyncio.create_task(self._keep_lease(ttl), name="autoscaler-lease")
        try:
            await asyncio.wait({act, renew}, return_when=asyncio.FIRST_COMPLETED)
            if not act.done():
                act.cancel()
                log.warning("autoscaler step stopped: its lease is lost")
                await asyncio.gather(act, return_exceptions=True)
            else:
                act.result()  # its failure is the step's
        finally:
            for t in (act, renew):
                t.cancel()
            await asyncio.gather(act, renew, return_exceptions=True)

    async def _keep_lease(self, ttl: float) -> None:
        """Renew the lease every ttl/3; returns when it is lost: another gateway took it, or no
        renewal succeeded for a whole ttl (it may have lapsed and been taken meanwhile)."""
        cluster = self.app.state.cluster
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if not await to_thread.run_sync(cluster.try_lease, "autoscaler", self.holder, ttl):
                    log.warning("autoscaler lease lost to another gateway during a step")
                    return
                renewed = time.monotonic()
            except EmberError as e:
                log.warning("could not renew the autoscaler lease: %s", e)
                if time.monotonic() - renewed >= ttl:
                    return

    async def _act(self, cluster: Any, demand: dict[str, float]) -> None:
        await to_thread.run_sync(cluster.reap_dead_nodes)
        stuck = await to_thread.run_sync(cluster.reap_stuck)
        if stuck:
            log.warning("autoscaler: reaped claims stuck starting past their deadline: %s", ", ".join(stuck))
        functions = await to_thread.run_sync(FunctionRegistry(self.app.state.redis).list)
        policy_for = self.app.state.policy_for
        specs = {f.name: scaling_spec(f, policy_for(f)) for f in functions}
        instances = [i for i in await to_thread.run_sync(cluster.instances)
                     if i.state != "draining"]  # on their way out already
        actions = await to_thread.run_sync(
            lambda: self.autoscaler.step(specs, instances, time.time(), view=cluster, demand_per_s=demand))
        by_id = {i.instance_id: i for i in instances}
        by_name = {f.name: f for f in functions}
        for action in actions:
            if isinstance(action, Unload) and action.instance_id in by_id:
                # draining only if still idle at this instant (a request that just took it keeps it),
                # unless it is retired for good (graceful: its requests finish within the drain grace)
                if await unload_instance(self.app, by_id[action.instance_id], force=action.graceful):
                    log.info("autoscaler: unload %s of %s (%s)", action.instance_id, action.function, action.reason)
            elif isinstance(action, EnsureInstances) and action.function in by_name:
                await self._ensure(by_name[action.function], action.count - action.current)
            elif isinstance(action, Prefetch):
                await self._prefetch(action)

    async def _ensure(self, spec: FunctionSpec, missing: int) -> None:
        invoker = self.app.state.invoker
        for _ in range(missing):
            try:
                if await invoker.starter.cold_start(spec) is None:
                    log.warning("autoscaler: no device has room for a minimum instance of %s", spec.name)
                    return
            except EmberError as e:
                log.warning("autoscaler: minimum instance of %s failed: %s", spec.name, e)
                return

    async def _prefetch(self, action: Prefetch) -> None:
        url = await to_thread.run_sync(self.app.state.cluster.node_url, action.node_id)
        if url is None:
            return
        # Recorded as in flight, its source tier busy until its estimated end (as the simulator
        # publishes it), in one step; nothing is sent when the node holds it in DRAM or already
        # fetches it (the autoscaler reads the same record and does not ask).
        queues = LoadQueues(self.app.state.cluster.r)
        sent = await to_thread.run_sync(queues.send_prefetch, action.node_id, action.checkpoint, action.nbytes)
        if sent is None:
            return
        failure = ""
        try:
            r = await self.app.state.http.post(
                f"{url}/internal/prefetch", json={"checkpoint": action.checkpoint, "tier": action.tier,
                                                     "dram_keep": action.keep},
                headers={CLUSTER_TOKEN_HEADER: self.settings.resolved_cluster_token()}, timeout=5.0)
            if not r.is_success:
                failure = f"worker answered {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            failure = str(e) or type(e).__name__
        if failure:
            # not fetching after all: neither in flight nor holding its source tier
            await to_thread.run_sync(queues.prefetch_ended, action.node_id, action.checkpoint, sent)
            log.warning("autoscaler: prefetch of %s to %s failed: %s", action.checkpoint, action.node_id, failure)
        else:
            log.info("autoscaler: prefetch of %s to %s from %s sent (estimated end in %.1f s)", action.checkpoint,
                     action.node_id, sent.tier, max(0.0, sent.end_s - time.time()))
