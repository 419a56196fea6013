"""Starting and stopping instances for the gateway: a cold start (placement through the scheduler's
policy, making room by evicting idle instances when no device has it, the load on the placed
worker, a retry on another node's copy after a checksum failure), unloads that drain first, and
forgetting instances and nodes that are gone. The warm path (slots, waiting, the token stream)
is `invoke.Invoker`, which owns one of these.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import httpx
import redis
from anyio import to_thread

from ember.config import Settings
from ember.errors import EmberError, FunctionNotFound, WorkerError
from ember.platform.cluster import InstanceRecord, Placement, RedisCluster
from ember.platform.gateway import tracing
from ember.platform.gateway.checkpoints import sized_spec
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionSpec, LoadResult
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.gateway.worker_stream import worker_error
from ember.platform.loadqueues import LoadQueues
from ember.platform.wire import CLUSTER_TOKEN_HEADER
from ember.scheduler.caching import dram_keep, slo_aware_cache
from ember.scheduler.estimator import ewma_into
from ember.scheduler.eviction import makes_room, plan_evictions
from ember.scheduler.memory import instance_kv_bytes
from ember.scheduler.policies import LocalCopyPolicy
from ember.scheduler.view import TIERS, PlacementRequest

log = logging.getLogger(__name__)


class InstanceStarter:
    """Cold starts and unloads of one gateway (see the module docstring)."""

    def __init__(self, settings: Settings, cluster: RedisCluster, http: httpx.AsyncClient,
                 metrics: GatewayMetrics, policy_for: Any) -> None:
        self.settings = settings
        self.cluster = cluster
        self.http = http
        self.metrics = metrics
        self.policy_for = policy_for  # FunctionSpec -> PlacementPolicy
        self.token = settings.resolved_cluster_token()
        self.startup_s: dict[str, float] = {}  # EWMA of observed cold starts, per function
        self._room_tried: dict[str, float] = {}  # function -> when this gateway last tried evicting for it
        self._load_queues: LoadQueues | None = None

    def load_queues(self) -> LoadQueues:
        if self._load_queues is None:
            self._load_queues = LoadQueues(self.cluster.r)
        return self._load_queues

    async def cold_start(self, spec: FunctionSpec, placed: dict[str, str] | None = None) -> LoadResult | None:
        """Place and load one new instance of the function `spec` names, as it is deployed now (a
        caller's copy may predate a redeploy); None when no device has room now. `placed` receives
        the instance id as soon as it is placed. An instance removed while it loaded (a redeploy
        onto another checkpoint retired it) is placed again, once, from the spec read again (removed for
        any other reason, it is not: a reaped hung load would only start another); a
        function deleted meanwhile is a FunctionNotFound (404), never a 409 instance_gone."""
        used = await self._current(spec)
        try:
            return await self._cold_start(used, placed)
        except EmberError as e:
            if e.code != "instance_gone":
                raise
            current = await self._current(spec)
            if current.checkpoint_ref == used.checkpoint_ref:
                # not a redeploy: its claim lapsed (a load past EMBER_MAX_LOAD_S, reaped) or it was
                # evicted; placing it again would only start another such load for this request
                raise
            log.info("instance of %s removed while it loaded (%s); placing %s again", spec.name, e,
                     current.checkpoint_ref)
            return await self._cold_start(current, placed)

    async def _current(self, spec: FunctionSpec) -> FunctionSpec:
        """The function's spec as stored now; FunctionNotFound when it was deleted (or deleted and
        created again: another function of the same name, maybe another tenant's)."""
        current = await to_thread.run_sync(FunctionRegistry(self.cluster.r).get, spec.name)
        if current.created != spec.created:
            raise FunctionNotFound(f"the model (function) {spec.name!r} was deleted")
        return current

    async def _cold_start(self, spec: FunctionSpec, placed: dict[str, str] | None) -> LoadResult | None:
        sized = await sized_spec(self.cluster, self.http, self.settings, spec)  # never booked by a guess
        if sized is None:
            return None  # no worker up to tell the checkpoint's size yet: wait as for a full cluster
        spec = sized
        request = PlacementRequest(function=spec.name, checkpoint=spec.checkpoint_ref, nbytes=spec.nbytes,
                                   ttft_slo_s=spec.slo.ttft_ms / 1000, policy=spec.placement_policy,
                                   max_instances=spec.scaling.max_instances,
                                   kv_bytes=instance_kv_bytes(spec.kv_bytes, self.settings.kv_budget_bytes))
        placement = await self._place(spec, request, self.policy_for(spec))
        if placement is None:
            return None
        if placed is not None:
            placed["instance_id"] = placement.instance_id
        try:
            return await self._load_traced(spec, placement)
        except EmberError as e:
            if e.code != "checksum_mismatch":
                raise
            # Every copy that worker could reach was bad (its tiers were dropped, then the store's
            # failed too): a good copy may still sit in another node's tier. Tried once.
            retry = await self._place(spec, request, LocalCopyPolicy(exclude={placement.node_id}))
            if retry is None:
                raise
            log.warning("%s: no good copy on %s (%s); loading the copy held on %s", spec.checkpoint_ref,
                        placement.node_id, e, retry.node_id)
            if placed is not None:
                placed["instance_id"] = retry.instance_id
            return await self._load_traced(spec, retry)

    async def _place(self, spec: FunctionSpec, request: PlacementRequest, policy: Any) -> Any:
        """Claim a device for `request` (making room if none has it); None when nothing fits."""
        evicted: list[InstanceRecord] = []
        try:
            with tracing.step("ember.placement", **{"ember.function": spec.name}) as step:
                placement = await to_thread.run_sync(self.cluster.place, request, policy, evicted)
                if placement is None and makes_room(policy) and await self._make_room(spec, request):
                    placement = await to_thread.run_sync(self.cluster.place, request, policy, evicted)
                step.set(**({"ember.placed": False} if placement is None else {
                    "ember.placed": True, "ember.worker": placement.node_id, "ember.device": placement.device_id,
                    "ember.estimate_s": placement.estimate_s}))
        finally:
            for inst in evicted:  # chosen for their idle bytes: Redis forgot them, the worker must too
                self.metrics.evictions.labels(inst.function).inc()
                await self.drop_on_worker(inst)
        return placement

    async def _load_traced(self, spec: FunctionSpec, placement: Any) -> LoadResult | None:
        with tracing.step("ember.load", **{"ember.worker": placement.node_id}) as step:
            result = await self._load_on_worker(spec, placement)
            if result is not None:
                step.set(**{"ember.load_tier": result.tier, "ember.load_bytes": result.nbytes,
                            "ember.load_seconds": result.startup_ms / 1000,
                            "ember.load_transfer_seconds": result.transfer_s})
        return result

    async def _load_on_worker(self, spec: FunctionSpec, placement: Any) -> LoadResult | None:
        """POST the load to the placed worker; None when the worker is gone (place again). The
        worker's DRAM tier keeps the copy by the function's policy (`caching.dram_keep`, as the
        simulator's cold start decides it, on the node's SSD bandwidth the placement read)."""
        keep = dram_keep(slo_aware_cache(self.policy_for(spec)), spec.nbytes, spec.slo.ttft_ms / 1000,
                         placement.ssd_bps)
        try:
            resp = await self.http.post(
                f"{placement.worker_url}/internal/instances",
                json={"instance_id": placement.instance_id, "function": spec.name, "checkpoint": spec.checkpoint_ref,
                      "kv_budget_bytes": instance_kv_bytes(spec.kv_bytes, self.settings.kv_budget_bytes),
                      "dram_keep": keep},
                headers={CLUSTER_TOKEN_HEADER: self.token},
                timeout=httpx.Timeout(self.settings.slo_timeout_s * 4, connect=self.settings.worker_connect_timeout_s),
            )
        except httpx.ConnectError as e:
            await self.forget(placement.instance_id)
            await self.node_gone(placement.node_id, e)
            return None  # the caller places again, on a live node
        except BaseException as e:  # timed out, cancelled: give up (a load finishing later finds its claim gone)
            await self.forget(placement.instance_id)
            if isinstance(e, httpx.HTTPError):
                raise WorkerError(f"worker {placement.node_id} failed to start {spec.name!r}: {e}") from e
            raise
        if resp.status_code != 200:
            await self.forget(placement.instance_id)
            raise worker_error(resp, f"worker {placement.node_id} could not load {spec.checkpoint!r}")
        result = LoadResult.model_validate(resp.json())
        ewma_into(self.startup_s, spec.name, result.startup_ms / 1000)
        try:  # correct the published load queues, learn the tier's bandwidth
            await to_thread.run_sync(publish_load_end, self.load_queues(), placement, result)
        except redis.RedisError as e:
            log.warning("could not publish the end of load %s: %s", placement.instance_id, e)
        self.metrics.cold_starts.labels(result.tier).inc()
        self.metrics.startup.labels(result.tier).observe(result.startup_ms / 1000)
        return result

    async def drop_on_worker(self, inst: InstanceRecord) -> None:
        """Tell a worker to drop an instance Redis already forgot (evicted, or unloaded from a draining
        node by the node scaler); if it cannot be reached, its next heartbeat reconciles (Redis no
        longer knows the instance)."""
        with anyio.CancelScope(shield=True):
            try:
                await self.http.delete(f"{inst.worker_url}/internal/instances/{inst.instance_id}",
                                       params={"wait_s": 0}, headers={CLUSTER_TOKEN_HEADER: self.token},
                                       timeout=httpx.Timeout(5.0, connect=self.settings.worker_connect_timeout_s))
            except httpx.HTTPError as e:
                log.warning("drop of %s on %s: %s (its heartbeat reconciles)", inst.instance_id,
                            inst.node_id, e)

    async def forget(self, instance_id: str) -> None:
        """Remove an instance this gateway gave up on (shielded: it runs when cancelled too)."""
        with anyio.CancelScope(shield=True):
            try:
                await to_thread.run_sync(self.cluster.remove_instance, instance_id)
            except EmberError as e:  # the claim's deadline reaps it
                log.warning("could not forget instance %s: %s", instance_id, e)

    async def _make_room(self, spec: FunctionSpec, request: PlacementRequest) -> bool:
        """No device has room: drain least recently used idle instances of other functions (never
        below their min_instances, never one serving a request) on the device that needs the fewest;
        their workers drop them and free the claims. Tried at most every 0.5 s per function by this
        gateway; True if something was unloaded."""
        now = time.monotonic()
        if now - self._room_tried.get(spec.name, -1.0) < 0.5:
            return False
        self._room_tried[spec.name] = now
        instances = await to_thread.run_sync(self.cluster.instances)
        idle_nodes = sorted({i.node_id for i in instances if i.state == "ready" and i.outstanding == 0
                             and i.function != spec.name})
        if not idle_nodes:
            return False
        specs = {f.name: f for f in await to_thread.run_sync(FunctionRegistry(self.cluster.r).list)}
        nodes = await to_thread.run_sync(self.cluster.nodes, idle_nodes)  # live ones
        free = {d.key: d.free_bytes for n in nodes for d in n.devices}
        victims = plan_evictions(request.room_bytes, free, instances, for_function=spec.name,
                                 min_instances={f: s.scaling.min_instances for f, s in specs.items()})
        by_id = {i.instance_id: i for i in instances}
        evicted = False
        for v in victims:
            if not await self.unload(by_id[v.instance_id]):
                break  # it took a request meanwhile: the device stays full
            evicted = True
            log.info("evicted idle instance %s of %s from %s to make room for %s", v.instance_id, v.function,
                     v.device_key, spec.name)
            self.metrics.evictions.labels(v.function).inc()
        return evicted

    async def unload(self, inst: InstanceRecord, *, force: bool = False, wait_s: float = 5.0) -> bool:
        """Unload an instance: draining first (atomically, and without `force` only when it has no
        outstanding request), then its worker drops it when idle and removes it from Redis. False
        when it is busy or not ready (nothing changed)."""
        state = await to_thread.run_sync(lambda: self.cluster.drain(inst.instance_id, force=force))
        if state == "removed":
            return True
        if state != "draining":
            return False
        try:
            resp = await self.http.delete(f"{inst.worker_url}/internal/instances/{inst.instance_id}",
                                          params={"wait_s": wait_s}, headers={CLUSTER_TOKEN_HEADER: self.token},
                                          timeout=httpx.Timeout(wait_s + 5.0, connect=self.settings.worker_connect_timeout_s))
            if resp.status_code == 404:  # the worker does not hold it: nothing is loaded, free the claim
                await self.forget(inst.instance_id)
        except httpx.HTTPError as e:  # its worker learns of the drain at its next heartbeat (or is reaped)
            log.warning("unload of %s on %s: %s (the worker's heartbeat finishes it)", inst.instance_id,
                        inst.node_id, e)
        return True

    async def node_gone(self, node_id: str, err: Exception) -> None:
        """A refused connection means the worker process is gone: drop the node and its instances
        now rather than after its heartbeat lapses (a live worker re-registers at its next beat)."""
        log.warning("worker %s refused a connection (%s); deregistering it", node_id, err)
        await to_thread.run_sync(self.cluster.deregister_node, node_id)


def publish_load_end(queues: LoadQueues, placement: Placement, result: LoadResult, now: float | None = None) -> bool:
    """The one place a finished load reaches the cluster view (the simulator's twin is
    `MemCluster.load_done`): both queues the placement claimed are corrected, and the load is folded
    once into the node's bandwidth for the tier its bytes really came from, with the seconds the
    worker measured for the transfer (`result.transfer_s`; never `startup_ms`, which adds building
    the instance). False when the instance is gone or its end was already published."""
    real_tier = result.tier if result.tier in TIERS else ""  # "": the tier claimed
    return queues.load_done(placement.instance_id, placement.node_id, placement.device_id, result.nbytes,
                            result.transfer_s, now, real_tier)
