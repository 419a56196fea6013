"""Runs the scheduler's `NodeScaler` live. Every gateway publishes how many of its requests wait
for room to Redis each step (its `ember_placements_waiting` gauge is set by the invoker); one gateway at a time (the
"nodescaler" lease) reads the fleet from Redis, asks the node scaler, and carries out its actions
through the cloud backend:

- ScaleOut: raise the group's desired capacity;
- Drain: mark the node draining in Redis (placement and warm routing skip it), then unload each
  of its instances once it serves nothing (an atomic evict-if-idle, so no request is cut);
- Terminate: the drained node holds nothing: terminate its instance with the desired capacity
  decremented (or complete the lifecycle action that held it), and forget the node.
Nodes the cloud puts in `Terminating:Wait` (the lifecycle hook) are drained first the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import redis
from anyio import to_thread
from prometheus_client.core import GaugeMetricFamily, Metric

from ember.errors import EmberError
from ember.platform.cloud import CloudBackend
from ember.platform.cluster import InstanceRecord
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.state import Keys
from ember.scheduler.nodescaler import (
    Drain,
    FleetNode,
    NodeActivity,
    NodeScaler,
    NodeScalerConfig,
    ScaleOut,
    Terminate,
    Undrain,
)

log = logging.getLogger(__name__)

WAITING_FRESH_S = 30.0  # a gateway's waiting count older than this is ignored (the gateway is gone)


def scaler_config(settings: Any) -> NodeScalerConfig:
    return NodeScalerConfig(
        min_nodes=settings.node_min, max_nodes=settings.node_max, node_power_w=settings.node_power_w,
        idle_power_w=settings.node_idle_power_w, boot_power_w=settings.node_idle_power_w,
        boot_s=settings.node_boot_s, grace_s=settings.node_grace_s,
        target_memory_utilization=settings.node_target_memory_utilization,
        consolidate_below=settings.node_consolidate_below, requests_per_node=settings.node_requests_per_node,
        max_scale_in_per_step=settings.node_max_scale_in_per_step)


class NodeScalerLoop:
    def __init__(self, app: Any, holder: str, backend: CloudBackend | None) -> None:
        self.app = app
        self.holder = holder
        self.backend = backend
        self.settings = app.state.settings
        self.scaler = NodeScaler(scaler_config(self.settings))
        self.activity = NodeActivity(default_keep_alive_s=0.0)  # a node that never ran anything: grace only
        self.held_s = -float("inf")  # when this gateway last stepped holding the lease
        self.booting_since: dict[str, float] = {}  # cloud id -> first seen, until its worker registers

    async def run(self) -> None:
        while True:
            try:
                await self.publish_waiting()
                if self.backend is not None:
                    await self.step()
            except (redis.RedisError, EmberError, OSError) as e:  # OSError: a local worker would not start
                log.warning("node scaler step skipped: %s", e)
            except Exception:  # noqa: BLE001 - any other failure skips this step, never the loop
                log.exception("node scaler step failed; trying again next step")
            await asyncio.sleep(self.settings.node_scaler_interval_s)

    async def publish_waiting(self) -> None:
        """This gateway's requests waiting for room, for whichever gateway holds the lease."""
        n = self.app.state.invoker.waiting_for_room  # (the invoker keeps the gauge exact)
        r = self.app.state.redis
        await to_thread.run_sync(lambda: r.hset(Keys.placements_waiting, self.holder, f"{n} {time.time():.3f}"))

    async def step(self) -> None:
        cluster = self.app.state.cluster
        ttl = max(self.settings.lease_ttl_s, 3 * self.settings.node_scaler_interval_s)
        if not await to_thread.run_sync(cluster.try_lease, "nodescaler", self.holder, ttl):
            return
        backend = self.backend
        assert backend is not None
        now = time.time()
        if now - self.held_s > ttl:  # (again) the holder after a gap: what it saw then is stale, start afresh
            self.activity = NodeActivity(default_keep_alive_s=0.0)
        self.held_s = now
        facts, waiting, budget_w, by_node = await to_thread.run_sync(self._read, now)
        cloud = await to_thread.run_sync(backend.instances)
        registered = {f.cloud_id for f in facts if f.cloud_id}
        # Nodes the cloud wants gone (lifecycle hook): drain them like our own.
        held = {cid for cid, state in cloud.items() if state.startswith("Terminating:Wait")}
        for f in facts:
            if f.cloud_id in held and not f.draining:
                await to_thread.run_sync(cluster.set_draining, f.node_id, True)
        facts = [replace(f, draining=f.draining or f.cloud_id in held, leaving=f.cloud_id in held) for f in facts]
        for cid in held - registered:  # nothing to drain (our own terminations included): let it go
            try:
                await to_thread.run_sync(backend.complete_termination, cid)
            except EmberError as e:  # already past the hook: nothing to do
                log.info("node scaler: lifecycle action of %s: %s", cid, e)
        booting = [cid for cid, state in cloud.items() if cid not in registered
                   and not state.startswith(("Terminating", "Terminated", "Warmed:Stopped"))]
        unprotected = getattr(backend, "unprotected", None)  # Ember, not the group, picks which node goes
        if unprotected is not None:
            await to_thread.run_sync(lambda: backend.protect(unprotected()))
        actions = self.scaler.step(facts, now, waiting=waiting, booting=len(booting), budget_w=budget_w,
                                   watched_s=self.activity.watched_s(now))
        for a in actions:
            if isinstance(a, ScaleOut):
                desired = await to_thread.run_sync(backend.desired_capacity)
                log.info("node scaler: scale out by %d (%s)", a.count, a.reason)
                await to_thread.run_sync(backend.set_desired_capacity, desired + a.count)
            elif isinstance(a, Undrain):
                log.info("node scaler: taking %s back from draining", a.node_id)
                await to_thread.run_sync(cluster.set_draining, a.node_id, False)
            elif isinstance(a, Drain):
                log.info("node scaler: draining %s (idle %.0f s)", a.node_id, a.idle_s)
                await to_thread.run_sync(cluster.set_draining, a.node_id, True)
                await self._unload_idle(by_node.get(a.node_id, []))
            elif isinstance(a, Terminate):
                await self._terminate(a, held)
        for f in facts:  # draining nodes still holding instances: unload those that went idle
            if f.draining and f.instances and not any(getattr(a, "node_id", None) == f.node_id
                                                      for a in actions if isinstance(a, Undrain)):
                await self._unload_idle(by_node.get(f.node_id, []))
        await self._export(facts, waiting, len(booting), await to_thread.run_sync(backend.desired_capacity), ttl)

    async def _unload_idle(self, instances: list[InstanceRecord]) -> None:
        cluster = self.app.state.cluster
        for inst in instances:
            if inst.state == "ready" and inst.outstanding == 0 and \
                    await to_thread.run_sync(cluster.evict_if_idle, inst.instance_id):
                await self.app.state.invoker.starter.drop_on_worker(inst)

    async def _terminate(self, a: Terminate, held: set[str]) -> None:
        backend = self.backend
        assert backend is not None
        if not a.cloud_id:
            log.warning("node scaler: %s has no cloud instance id; it stays drained", a.node_id)
            return
        log.info("node scaler: terminating %s (%s)", a.node_id, a.cloud_id)
        if a.cloud_id in held:
            await to_thread.run_sync(backend.complete_termination, a.cloud_id)
        else:
            await to_thread.run_sync(backend.terminate, a.cloud_id)
        await to_thread.run_sync(self.app.state.cluster.deregister_node, a.node_id)

    def _read(self, now: float) -> tuple[list[FleetNode], int, float | None, dict[str, list[InstanceRecord]]]:
        """The fleet as the node scaler sees it, from Redis (sync: runs in a thread)."""
        cluster = self.app.state.cluster
        r = cluster.r
        live = cluster.live_nodes()
        draining = cluster.draining_nodes()
        specs = {f.name: f for f in FunctionRegistry(r).list()}
        by_node: dict[str, list[InstanceRecord]] = defaultdict(list)
        for inst in cluster.instances():
            by_node[inst.node_id].append(inst)
        pipe = r.pipeline(transaction=False)
        for n in live:
            pipe.hmget(Keys.node(n), "devices", "cloud_instance_id")
        rows = pipe.execute()
        pipe = r.pipeline(transaction=False)
        devices_of: dict[str, list[str]] = {}
        for n, (devs, _) in zip(live, rows, strict=True):
            devices_of[n] = [d["device_id"] for d in json.loads(devs or "[]")]
            for d in devices_of[n]:
                pipe.hmget(Keys.device(n, d), "memory_bytes", "claimed_bytes")
        dev_rows = iter(pipe.execute())
        facts = []
        for n, (_, cloud_id) in zip(live, rows, strict=True):
            memory = claimed = 0
            for _ in devices_of[n]:
                m, c = next(dev_rows)
                memory += int(m or 0)
                claimed += int(c or 0)
            insts = by_node.get(n, [])
            busy = any(i.state != "ready" or i.outstanding > 0 for i in insts)
            # an instance kept by min_instances is never idle: its node is not a scale-in candidate
            keep = [specs[i.function].scaling.keep_alive_s if specs[i.function].scaling.min_instances == 0
                    else float("inf") for i in insts if i.function in specs]
            last, ka = self.activity.observe(n, now, last_used_s=[i.last_used_s for i in insts], busy=busy,
                                             keep_alive_s=keep)
            facts.append(FleetNode(n, len(insts), busy, last, ka, n in draining, cloud_id or "", memory, claimed))
        self.activity.forget(live)
        waiting = 0
        for gateway, raw in r.hgetall(Keys.placements_waiting).items():
            count, _, stamp = raw.partition(" ")
            if now - float(stamp or 0) <= WAITING_FRESH_S:
                waiting += int(count)
            else:  # that gateway is gone
                r.hdel(Keys.placements_waiting, gateway)
        budget_w = None
        raw_budget = r.get(Keys.energy_budget)
        if raw_budget:
            budget_w = json.loads(raw_budget).get("cluster_watts")
        return facts, waiting, budget_w, by_node

    async def _export(self, facts: list[FleetNode], waiting: int, booting: int, desired: int, ttl_s: float) -> None:
        draining = sum(1 for f in facts if f.draining)
        values = {"PlacementsWaiting": waiting, "NodesActive": len(facts) - draining, "NodesDraining": draining,
                  "NodesBooting": booting, "DesiredNodes": desired}
        counts = {"active": len(facts) - draining, "draining": draining, "booting": booting}
        await to_thread.run_sync(_publish_counts, self.app.state.redis, counts, ttl_s)
        try:
            await to_thread.run_sync(self.backend.put_metrics, values)  # type: ignore[union-attr]
        except EmberError as e:
            log.warning("node scaler: metrics not published: %s", e)


def _publish_counts(client: redis.Redis, counts: dict[str, int], ttl_s: float) -> None:
    pipe = client.pipeline()
    pipe.delete(Keys.fleet_counts)
    pipe.hset(Keys.fleet_counts, mapping=counts)
    pipe.pexpire(Keys.fleet_counts, max(1, int(ttl_s * 1000)))
    pipe.execute()


class NodesCollector:
    """`ember_nodes{state}` (active, draining, booting): the node scaler's last step, exported at
    scrape time by the gateway holding the "nodescaler" lease only (`holds(holder)`), so a sum over
    gateways counts each node once. A gateway that lost the lease used to keep exporting what it
    last set, for good."""

    def __init__(self, client: Callable[[], redis.Redis], holds: Callable[[str], bool]) -> None:
        self.client = client
        self.holds = holds

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("ember_nodes", "Worker nodes by fleet state (node scaler's view)", labels=["state"])
        try:  # a scrape must not fail because Redis is away: the family stays empty
            client = self.client()
            holder, counts = client.pipeline().get(Keys.lease("nodescaler")).hgetall(Keys.fleet_counts).execute()
            if holder is not None and self.holds(holder):
                for state in ("active", "draining", "booting"):
                    if state in counts:
                        family.add_metric([state], float(counts[state]))
        except Exception:  # noqa: BLE001 - see above
            pass
        yield family
