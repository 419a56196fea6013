"""Getting an invocation to an instance: warm routing, cold starts through the scheduler, and the
token stream from the worker.

Order of preference for one request: a ready instance with spare concurrency (warm); an instance
already loading for this function when its spare slots cover the waiting requests; otherwise a new
placement (cold start) while the function is below `max_instances`; otherwise wait, up to the
gateway's SLO timeout, then 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from anyio import to_thread

from ember.config import Settings
from ember.errors import EmberError, NoCapacity, WorkerError
from ember.platform.cluster import InstanceRecord, RedisCluster
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionSpec, GenerateRequest, LoadResult
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.loadqueues import LoadQueues
from ember.scheduler.estimator import SERVICE_EWMA_ALPHA, ewma
from ember.scheduler.eviction import plan_evictions
from ember.scheduler.routing import should_start
from ember.scheduler.view import PlacementRequest

log = logging.getLogger(__name__)

CLUSTER_TOKEN_HEADER = "x-ember-cluster-token"


@dataclass
class InvocationTarget:
    """Where one request runs, and how it got there (the x-ember-* headers)."""

    instance_id: str
    node_id: str
    worker_url: str
    cold: bool
    tier: str
    startup_ms: float
    function: str = ""
    acquired_at: float = field(default_factory=time.monotonic)

    def headers(self) -> dict[str, str]:
        return {
            "x-ember-cold-start": "true" if self.cold else "false",
            "x-ember-load-tier": self.tier,
            "x-ember-worker": self.node_id,
            "x-ember-startup-ms": f"{self.startup_ms:.1f}",
        }


class Invoker:
    """Routes invocations of one gateway. Redis calls run in the threadpool (sync client)."""

    def __init__(self, settings: Settings, cluster: RedisCluster, http: httpx.AsyncClient,
                 metrics: GatewayMetrics, policy_for: Any) -> None:
        self.settings = settings
        self.cluster = cluster
        self._load_queues: LoadQueues | None = None
        self.http = http
        self.metrics = metrics
        self.policy_for = policy_for  # FunctionSpec -> PlacementPolicy
        self.waiting: dict[str, int] = defaultdict(int)
        self.service_s: dict[str, float] = {}  # EWMA of a request's time holding a slot, per function
        self.startup_s: dict[str, float] = {}  # EWMA of observed cold starts, per function
        self.prefill_s: dict[str, float] = {}  # EWMA of the workers' time to first token, per function
        self.token = settings.resolved_cluster_token()
        self._room_tried: dict[str, float] = {}  # function -> when this gateway last tried evicting for it

    def load_queues(self) -> LoadQueues:
        if self._load_queues is None:
            self._load_queues = LoadQueues(self.cluster.r)
        return self._load_queues

    async def acquire(self, spec: FunctionSpec) -> InvocationTarget:
        """A target with one outstanding slot taken for this request; release it with `release`."""
        deadline = time.monotonic() + self.settings.slo_timeout_s
        cold: LoadResult | None = None
        t0 = time.monotonic()
        pause_s = 0.005  # backs off to 50 ms while waiting for a slot (each try is one Redis script)
        self.waiting[spec.name] += 1
        try:
            while True:
                rec = await to_thread.run_sync(self.cluster.acquire_warm, spec.name, spec.scaling.target_concurrency)
                if rec is not None:
                    if cold is None:
                        return InvocationTarget(rec.instance_id, rec.node_id, rec.worker_url, False, "warm", 0.0,
                                                spec.name)
                    startup_ms = (time.monotonic() - t0) * 1000 if rec.instance_id != cold.instance_id \
                        else cold.startup_ms
                    return InvocationTarget(rec.instance_id, rec.node_id, rec.worker_url, True, cold.tier, startup_ms,
                                            spec.name)
                if cold is None and await self._should_start(spec):
                    cold = await self.cold_start(spec)
                    if cold is not None:
                        continue
                    # no device has room: wait (and try again) until the deadline, not in a tight loop
                if time.monotonic() > deadline:
                    raise NoCapacity(
                        f"no instance of {spec.name!r} could serve within {self.settings.slo_timeout_s:.0f}s "
                        "(all busy or no device has room)"
                    )
                await asyncio.sleep(pause_s)
                pause_s = min(0.05, pause_s * 1.5)
        finally:
            self.waiting[spec.name] -= 1

    async def release(self, target: InvocationTarget) -> None:
        self._ewma(self.service_s, target.function, time.monotonic() - target.acquired_at)
        try:
            await to_thread.run_sync(self.cluster.release_request, target.instance_id)
        except EmberError:
            log.warning("could not release a slot of instance %s", target.instance_id)

    async def _should_start(self, spec: FunctionSpec) -> bool:
        """The scheduler's scale-out rule (`routing.should_start`, the simulator's too) on what this
        gateway knows: the function's instances, its waiting requests, and EWMAs of service,
        prefill and cold-start times. The predicted wait: with a ready instance, the queue drains
        at slots/service_s per second; with only loading ones, the earliest expected end of a load."""
        instances = await to_thread.run_sync(self.cluster.instances, spec.name)
        s = spec.scaling
        waiting = self.waiting[spec.name]
        loading = [i for i in instances if i.state == "loading"]
        startup_s = self.startup_s.get(spec.name, 0.0)
        if instances and len(loading) == len(instances):
            now = time.time()
            wait_s = min(max(0.0, startup_s - (now - i.created_s)) for i in loading)
        else:
            wait_s = self.service_s.get(spec.name, 0.0) * waiting / max(1, len(instances) * s.target_concurrency)
        return should_start(instances=len(instances), loading=len(loading), waiting=waiting,
                            target_concurrency=s.target_concurrency, max_instances=s.max_instances,
                            predicted_wait_s=wait_s, prefill_s=self.prefill_s.get(spec.name, 0.0),
                            ttft_slo_s=spec.slo.ttft_ms / 1000, cold_start_s=startup_s)

    def observe_done(self, function: str, done: dict[str, Any]) -> None:
        """Learn the function's prefill time from a finished request (the worker's ttft_s)."""
        if "ttft_s" in done:
            self._ewma(self.prefill_s, function, float(done["ttft_s"]))

    @staticmethod
    def _ewma(table: dict[str, float], key: str, value: float) -> None:
        table[key] = ewma(table.get(key), value, SERVICE_EWMA_ALPHA)

    async def cold_start(self, spec: FunctionSpec) -> LoadResult | None:
        """Place and load one new instance of `spec`; None when no device has room now."""
        request = PlacementRequest(function=spec.name, checkpoint=spec.checkpoint, nbytes=max(spec.nbytes, 1),
                                   ttft_slo_s=spec.slo.ttft_ms / 1000, policy=spec.placement_policy,
                                   max_instances=spec.scaling.max_instances)
        evicted: list[InstanceRecord] = []
        try:
            placement = await to_thread.run_sync(self.cluster.place, request, self.policy_for(spec), evicted)
            if placement is None and await self._make_room(spec, request):
                placement = await to_thread.run_sync(self.cluster.place, request, self.policy_for(spec), evicted)
        finally:
            for inst in evicted:  # chosen for their idle bytes: Redis forgot them, the worker must too
                self.metrics.evictions.labels(inst.function).inc()
                await self.unload_on_worker(inst)
        if placement is None:
            return None
        try:
            resp = await self.http.post(
                f"{placement.worker_url}/internal/instances",
                json={"instance_id": placement.instance_id, "function": spec.name, "checkpoint": spec.checkpoint},
                headers={CLUSTER_TOKEN_HEADER: self.token},
                timeout=httpx.Timeout(self.settings.slo_timeout_s * 4, connect=2.0),
            )
        except httpx.ConnectError as e:
            await self._node_gone(placement.node_id, e)
            return None  # the caller places again, on a live node
        except httpx.HTTPError as e:
            await to_thread.run_sync(self.cluster.remove_instance, placement.instance_id)
            raise WorkerError(f"worker {placement.node_id} failed to start {spec.name!r}: {e}") from e
        if resp.status_code != 200:
            await to_thread.run_sync(self.cluster.remove_instance, placement.instance_id)
            raise worker_error(resp, f"worker {placement.node_id} could not load {spec.checkpoint!r}")
        result = LoadResult.model_validate(resp.json())
        self._ewma(self.startup_s, spec.name, result.startup_ms / 1000)
        try:  # correct the published load queues, learn the tier's bandwidth
            await to_thread.run_sync(self.load_queues().load_done, placement.instance_id, placement.node_id,
                                     placement.device_id, result.nbytes, result.startup_ms / 1000, None,
                                     result.tier if result.tier in ("gpu", "dram", "ssd", "remote") else "")
        except redis.RedisError as e:
            log.warning("could not publish the end of load %s: %s", placement.instance_id, e)
        self.metrics.cold_starts.labels(result.tier).inc()
        self.metrics.startup.labels(result.tier).observe(result.startup_ms / 1000)
        return result

    async def _make_room(self, spec: FunctionSpec, request: PlacementRequest) -> bool:
        """No device has room: evict least recently used idle instances of other functions (never
        below their min_instances, never one serving a request) on the device that needs the fewest.
        Tried at most every 0.5 s per function by this gateway; True if something was evicted."""
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
        victims = plan_evictions(request.nbytes, free, instances, for_function=spec.name,
                                 min_instances={f: s.scaling.min_instances for f, s in specs.items()})
        by_id = {i.instance_id: i for i in instances}
        evicted = False
        for v in victims:
            if not await to_thread.run_sync(self.cluster.evict_if_idle, v.instance_id):
                break  # it took a request meanwhile: the device stays full
            evicted = True
            log.info("evicting idle instance %s of %s from %s to make room for %s", v.instance_id, v.function,
                     v.device_key, spec.name)
            self.metrics.evictions.labels(v.function).inc()
            await self.unload_on_worker(by_id[v.instance_id])
        return evicted

    async def unload_on_worker(self, inst: InstanceRecord) -> None:
        """Ask the worker to drop an instance Redis no longer lists (its checkpoint stays cached)."""
        try:
            await self.http.delete(f"{inst.worker_url}/internal/instances/{inst.instance_id}",
                                   headers={CLUSTER_TOKEN_HEADER: self.token}, timeout=10.0)
        except httpx.HTTPError as e:
            log.warning("unload of %s on %s failed: %s", inst.instance_id, inst.node_id, e)

    async def open(self, spec: FunctionSpec, req: GenerateRequest,
                   attempts: int = 3) -> tuple[InvocationTarget, AsyncIterator[dict[str, Any]]]:
        """Acquire a target and open its token stream. An instance whose worker cannot be reached
        (or no longer has it) is forgotten and another is tried, so a dead worker costs a retry, not
        an error. Closing the returned iterator cancels generation on the worker."""
        last: EmberError | None = None
        for _ in range(attempts):
            target = await self.acquire(spec)
            url = f"{target.worker_url}/internal/instances/{target.instance_id}/generate"
            request = self.http.build_request("POST", url, json=req.model_dump(),
                                              headers={CLUSTER_TOKEN_HEADER: self.token},
                                              timeout=httpx.Timeout(None, connect=2.0))
            try:
                resp = await self.http.send(request, stream=True)
            except httpx.ConnectError as e:
                await self._node_gone(target.node_id, e)
                last = WorkerError(f"worker {target.node_id} unreachable: {e}")
                continue
            if resp.status_code == 404:
                await resp.aclose()
                await to_thread.run_sync(self.cluster.remove_instance, target.instance_id)
                last = WorkerError(f"worker {target.node_id} no longer has instance {target.instance_id}")
                continue
            if resp.status_code != 200:
                await resp.aread()
                await resp.aclose()
                await self.release(target)
                raise worker_error(resp, f"worker {target.node_id} refused the request")
            return target, self._events(target, resp)
        raise last or WorkerError(f"no reachable instance of {spec.name!r}")

    async def _node_gone(self, node_id: str, err: Exception) -> None:
        """A refused connection means the worker process is gone: drop the node and its instances
        now rather than after its heartbeat lapses (a live worker re-registers at its next beat)."""
        log.warning("worker %s refused a connection (%s); deregistering it", node_id, err)
        await to_thread.run_sync(self.cluster.deregister_node, node_id)

    @staticmethod
    async def _events(target: InvocationTarget, resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in resp.aiter_lines():
                if not line:
                    continue
                ev = json.loads(line)
                if "error" in ev:  # the worker failed mid-stream; it answers in the OpenAI error shape
                    raise EmberError(ev["error"]["message"], code=ev["error"].get("code"))
                yield ev
        except httpx.HTTPError as e:
            raise WorkerError(f"lost the stream from worker {target.node_id}: {e}") from e
        finally:
            await resp.aclose()


def worker_error(resp: httpx.Response, context: str) -> EmberError:
    """Rebuild the worker's Ember error (it answers in the OpenAI error shape), keeping its status."""
    try:
        body = resp.json()["error"]
        err = EmberError(f"{context}: {body['message']}", code=body.get("code") or "worker_error")
        err.status_code = resp.status_code if resp.status_code < 500 else 502
        err.error_type = body.get("type") or "server_error"
        return err
    except (ValueError, KeyError, TypeError):
        return WorkerError(f"{context}: HTTP {resp.status_code}")
