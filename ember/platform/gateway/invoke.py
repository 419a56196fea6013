"""Getting an invocation to an instance: warm routing, cold starts through the scheduler, and the
token stream from the worker.

Order of preference for one request: a ready instance with spare concurrency (warm); an instance
already loading for this function when its spare slots cover the waiting requests; otherwise a new
placement (cold start) while the function is below `max_instances`; otherwise wait, up to the
gateway's SLO timeout, then 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import httpx
import redis
from anyio import to_thread

from ember.config import Settings
from ember.errors import EmberError, NoCapacity, StateUnavailable, WorkerError, WorkerTimeout
from ember.platform.cluster import AsyncSlots, InstanceRecord, RedisCluster
from ember.platform.gateway import tracing
from ember.platform.gateway.checkpoints import sized_spec
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionSpec, GenerateRequest, LoadResult
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.gateway.waiting import WaitQueues
from ember.platform.gateway.worker_stream import Retry, error_from, prepend, worker_error, worker_events
from ember.platform.loadqueues import LoadQueues
from ember.platform.wire import CLUSTER_TOKEN_HEADER  # noqa: F401 - some callers import it from here
from ember.scheduler.estimator import SERVICE_EWMA_ALPHA, ewma
from ember.scheduler.eviction import plan_evictions
from ember.scheduler.policies import LocalCopyPolicy
from ember.scheduler.routing import should_start
from ember.scheduler.view import PlacementRequest

log = logging.getLogger(__name__)

WAITING_MARK_S = 10.0  # a gateway's "requests of this function wait here" marker lives this long


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
    record: InstanceRecord | None = None  # the slot's holder (its slot_id)
    acquired_at: float = field(default_factory=time.monotonic)
    released: bool = False

    def headers(self) -> dict[str, str]:
        return {
            "x-ember-cold-start": "true" if self.cold else "false",
            "x-ember-load-tier": self.tier,
            "x-ember-worker": self.node_id,
            "x-ember-startup-ms": f"{self.startup_ms:.1f}",
        }


class Invoker:
    """Routes invocations of one gateway. The hot path (slots, wake-ups) is redis.asyncio; the cold
    path (placement, eviction) runs the sync cluster in the threadpool."""

    def __init__(self, settings: Settings, cluster: RedisCluster, http: httpx.AsyncClient,
                 metrics: GatewayMetrics, policy_for: Any, slots: AsyncSlots | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self._load_queues: LoadQueues | None = None
        self.http = http
        self.metrics = metrics
        self.policy_for = policy_for  # FunctionSpec -> PlacementPolicy
        self.slots = slots
        self.queues = WaitQueues()
        self.waiting_for_room = 0  # requests of this gateway whose placement found no room (node scaler input)
        self._releasing: set[asyncio.Task[None]] = set()  # release_soon's tasks, kept until done
        self.service_s: dict[str, float] = {}  # EWMA of a request's time holding a slot, per function
        self.startup_s: dict[str, float] = {}  # EWMA of observed cold starts, per function
        self.prefill_s: dict[str, float] = {}  # EWMA of the workers' time to first token, per function
        self.token = settings.resolved_cluster_token()
        self._room_tried: dict[str, float] = {}  # function -> when this gateway last tried evicting for it
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.worker_connect_timeout_s,
                                                    sock_read=settings.worker_read_timeout_s)
        self._stream_session: aiohttp.ClientSession | None = None

    def load_queues(self) -> LoadQueues:
        if self._load_queues is None:
            self._load_queues = LoadQueues(self.cluster.r)
        return self._load_queues

    @property
    def waiting(self) -> dict[str, int]:
        return {fn: len(q) for fn, q in self.queues.queues.items()}

    async def _take(self, spec: FunctionSpec, exclude: set[str]) -> InstanceRecord | None:
        if self.slots is not None:
            try:
                return await self.slots.acquire(spec.name, spec.scaling.target_concurrency, exclude)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                raise StateUnavailable(f"cluster state (Redis) unavailable: {e}") from e
        return await to_thread.run_sync(self.cluster.acquire_warm, spec.name, spec.scaling.target_concurrency,
                                        exclude)

    async def _mark_waiting(self, function: str) -> None:
        """Tell the cluster that requests of `function` wait here, before each try for a slot:
        releases publish a wake-up only while such a marker lives, so a release after a failed try
        always wakes (one more command, on the waiting path only). A marker that cannot be written
        costs at most the head's one-second retry."""
        try:
            if self.slots is not None:
                await self.slots.mark_waiting(function, WAITING_MARK_S)
            else:
                await to_thread.run_sync(self.cluster.mark_waiting, function, WAITING_MARK_S)
        except (EmberError, redis.RedisError, OSError) as e:
            log.debug("could not mark %s as waited for: %s", function, e)

    async def acquire(self, spec: FunctionSpec, exclude: set[str] | None = None) -> InvocationTarget:
        """A target with one request slot taken for this request; release it with `release`.
        Requests that must wait queue in arrival order and are woken (pub/sub) when a slot frees or
        an instance becomes ready; the head of the queue starts cold instances when needed."""
        exclude = exclude or set()
        name = spec.name
        if not self.queues.waiting(name):  # nobody waiting: never jump the queue
            rec = await self._take(spec, exclude)
            if rec is not None:
                return InvocationTarget(rec.instance_id, rec.node_id, rec.worker_url, False, "warm", 0.0, name, rec)
        deadline = time.monotonic() + self.settings.slo_timeout_s
        t0 = time.monotonic()
        cold: LoadResult | None = None
        starting: asyncio.Task[LoadResult | None] | None = None
        placed: dict[str, str] = {}  # the instance id our cold start placed, once placed
        waits_for_room = False
        ev = self.queues.join(name)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoCapacity(
                        f"no instance of {name!r} could serve within {self.settings.slo_timeout_s:.0f}s "
                        "(all busy or no device has room)")
                waiter = asyncio.ensure_future(ev.wait())
                pending = {waiter} | ({starting} if starting is not None else set())
                await asyncio.wait(pending, timeout=min(remaining, 1.0), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if starting is not None and starting.done():
                    cold = starting.result()  # a failed cold start fails the request that started it
                    starting = None
                    if cold is None and not waits_for_room:  # no device had room: the node scaler's signal
                        waits_for_room = True
                        self.waiting_for_room += 1
                        self.metrics.placements_waited.inc()
                if not self.queues.is_head(name, ev):
                    ev.clear()
                    continue
                ev.clear()
                await self._mark_waiting(name)
                rec = await self._take(spec, exclude)
                if rec is not None:
                    if starting is not None and placed.get("instance_id") == rec.instance_id:
                        # our cold start's instance is ready; its load answer is on its way
                        try:
                            await asyncio.wait({starting}, timeout=5.0)
                        except BaseException:
                            await self.release(InvocationTarget(rec.instance_id, rec.node_id, rec.worker_url,
                                                                True, "", 0.0, name, rec))
                            raise
                        if starting.done() and not starting.cancelled() and starting.exception() is None:
                            cold, starting = starting.result(), None
                    if cold is not None and rec.instance_id == cold.instance_id:
                        return InvocationTarget(rec.instance_id, rec.node_id, rec.worker_url, True, cold.tier,
                                                cold.startup_ms, name, rec)
                    waited_cold = cold is not None or starting is not None
                    return InvocationTarget(rec.instance_id, rec.node_id, rec.worker_url, waited_cold,
                                            cold.tier if cold else "warm",
                                            (time.monotonic() - t0) * 1000 if waited_cold else 0.0, name, rec)
                if starting is None and await self._should_start(spec):
                    placed = {}
                    starting = asyncio.ensure_future(self.cold_start(spec, placed))
        finally:
            self.queues.leave(name, ev)
            if starting is not None and not starting.done():
                starting.add_done_callback(_log_cold_start)  # it finishes for the next request
            if waits_for_room:
                self.waiting_for_room -= 1

    async def release(self, target: InvocationTarget) -> None:
        """Free the request's slot; shielded, so a cancelled request (a client that went away)
        still frees it. A release that cannot reach Redis leaves a lease that lapses."""
        if target.released:
            return
        target.released = True
        self._ewma(self.service_s, target.function, time.monotonic() - target.acquired_at)
        with anyio.CancelScope(shield=True):
            try:
                if self.slots is not None and target.record is not None:
                    await self.slots.release(target.record)
                else:
                    await to_thread.run_sync(self.cluster.release_request, target.record or target.instance_id)
            except (EmberError, redis.RedisError, OSError) as e:
                log.warning("could not release a slot of instance %s (%s): its lease lapses", target.instance_id, e)

    def release_soon(self, target: InvocationTarget) -> None:
        """`release` in a task of its own, so an answer already complete goes out without waiting
        for the round trip to Redis (a waiting request is woken by the release either way). The
        task is not the request's: a client that goes away does not cancel it."""
        if target.released:
            return
        task = asyncio.ensure_future(self.release(target))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _should_start(self, spec: FunctionSpec) -> bool:
        """The scheduler's scale-out rule (`routing.should_start`, the simulator's too) on what this
        gateway knows: the function's instances (draining ones do not count), its waiting requests,
        and EWMAs of service, prefill and cold-start times. The predicted wait: with a ready
        instance, the queue drains at slots/service_s per second; with only starting ones, the
        earliest expected end of a load (the cold-start EWMA from when each was placed)."""
        instances = [i for i in await to_thread.run_sync(self.cluster.instances, spec.name) if i.state != "draining"]
        s = spec.scaling
        waiting = self.queues.waiting(spec.name)
        starting = [i for i in instances if i.state in ("claimed", "loading")]
        startup_s = self.startup_s.get(spec.name, 0.0)
        if instances and len(starting) == len(instances):
            now = time.time()
            wait_s = min(max(0.0, startup_s - (now - i.created_s)) for i in starting)
        else:
            wait_s = self.service_s.get(spec.name, 0.0) * waiting / max(1, len(instances) * s.target_concurrency)
        return should_start(instances=len(instances), loading=len(starting), waiting=waiting,
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

    async def cold_start(self, spec: FunctionSpec, placed: dict[str, str] | None = None) -> LoadResult | None:
        """Place and load one new instance of `spec`; None when no device has room now. `placed`
        receives the instance id as soon as it is placed."""
        sized = await sized_spec(self.cluster, self.http, self.settings, spec)  # never booked by a guess
        if sized is None:
            return None  # no worker up to tell the checkpoint's size yet: wait as for a full cluster
        spec = sized
        request = PlacementRequest(function=spec.name, checkpoint=spec.checkpoint_ref, nbytes=spec.nbytes,
                                   ttft_slo_s=spec.slo.ttft_ms / 1000, policy=spec.placement_policy,
                                   max_instances=spec.scaling.max_instances,
                                   kv_bytes=spec.kv_bytes or self.settings.kv_budget_bytes)
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
                if placement is None and await self._make_room(spec, request):
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
                            "ember.load_seconds": result.startup_ms / 1000})
        return result

    async def _load_on_worker(self, spec: FunctionSpec, placement: Any) -> LoadResult | None:
        """POST the load to the placed worker; None when the worker is gone (place again)."""
        try:
            resp = await self.http.post(
                f"{placement.worker_url}/internal/instances",
                json={"instance_id": placement.instance_id, "function": spec.name, "checkpoint": spec.checkpoint_ref,
                      "kv_budget_bytes": spec.kv_bytes or self.settings.kv_budget_bytes},
                headers={CLUSTER_TOKEN_HEADER: self.token},
                timeout=httpx.Timeout(self.settings.slo_timeout_s * 4, connect=self.settings.worker_connect_timeout_s),
            )
        except httpx.ConnectError as e:
            await self._forget(placement.instance_id)
            await self._node_gone(placement.node_id, e)
            return None  # the caller places again, on a live node
        except BaseException as e:  # timed out, cancelled: give up (a load finishing later finds its claim gone)
            await self._forget(placement.instance_id)
            if isinstance(e, httpx.HTTPError):
                raise WorkerError(f"worker {placement.node_id} failed to start {spec.name!r}: {e}") from e
            raise
        if resp.status_code != 200:
            await self._forget(placement.instance_id)
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

    async def _forget(self, instance_id: str) -> None:
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
                await self._forget(inst.instance_id)
        except httpx.HTTPError as e:  # its worker learns of the drain at its next heartbeat (or is reaped)
            log.warning("unload of %s on %s: %s (the worker's heartbeat finishes it)", inst.instance_id,
                        inst.node_id, e)
        return True

    async def open(self, spec: FunctionSpec, req: GenerateRequest,
                   attempts: int = 3) -> tuple[InvocationTarget, AsyncIterator[dict[str, Any]]]:
        """Acquire a target and open its token stream, reading its first event before returning. An
        instance whose worker cannot be reached (or no longer has it) is forgotten and another is
        tried; a worker that dies or stalls before sending anything costs one retry elsewhere, not
        an error (nothing has reached the client yet). The slot is released on every failure here;
        closing the returned iterator cancels generation on the worker."""
        last: EmberError | None = None
        tried: set[str] = set()
        stalls = 0
        for _ in range(attempts):
            target = await self.acquire(spec, tried)
            try:
                events = await self._start(target, req)
            except Retry as r:
                await self.release(target)
                tried.add(target.instance_id)
                last = r.error
                if r.stalled:
                    stalls += 1
                    if stalls > 1:
                        raise r.error from None
                continue
            except BaseException:
                await self.release(target)
                raise
            return target, events
        raise last or WorkerError(f"no reachable instance of {spec.name!r}")

    def stream_session(self) -> aiohttp.ClientSession:
        """The aiohttp session of the token streams (made in the running loop, closed by `aclose`)."""
        if self._stream_session is None or self._stream_session.closed:
            self._stream_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, limit_per_host=0, keepalive_timeout=30),
                read_bufsize=1 << 20, auto_decompress=False)
        return self._stream_session

    async def _post_stream(self, url: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        session, headers = self.stream_session(), {CLUSTER_TOKEN_HEADER: self.token}
        try:
            return await session.post(url, json=body, headers=headers, timeout=self.stream_timeout)
        except aiohttp.ServerDisconnectedError:  # a pooled connection closed under us: once more on a new one
            return await session.post(url, json=body, headers=headers, timeout=self.stream_timeout)

    async def aclose(self) -> None:
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        if self._stream_session is not None:
            await self._stream_session.close()

    async def _start(self, target: InvocationTarget, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        url = f"{target.worker_url}/internal/instances/{target.instance_id}/generate"
        try:  # connect, first byte and gaps between chunks are bounded; the whole stream is not
            resp = await self._post_stream(url, req.model_dump())
        except aiohttp.ClientConnectorError as e:  # refused: the worker process is gone
            await self._node_gone(target.node_id, e)
            raise Retry(WorkerError(f"worker {target.node_id} unreachable: {e}")) from e
        except asyncio.TimeoutError as e:
            raise Retry(WorkerTimeout(f"worker {target.node_id} did not answer within "
                                       f"{self.settings.worker_read_timeout_s:.0f}s"), stalled=True) from e
        except aiohttp.ClientError as e:
            raise Retry(WorkerError(f"worker {target.node_id} failed before answering: {e}"), stalled=True) from e
        if resp.status in (404, 409):
            resp.release()
            await self._forget(target.instance_id)
            raise Retry(WorkerError(f"worker {target.node_id} no longer has instance {target.instance_id}"))
        if resp.status != 200:
            try:
                body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                body = b""
            finally:
                resp.release()
            raise error_from(resp.status, resp.headers, body, f"worker {target.node_id} refused the request")
        events = worker_events(target.node_id, resp, self.settings.worker_read_timeout_s)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except WorkerError as e:
            await events.aclose()
            raise Retry(e, stalled=True) from e
        except BaseException:
            await events.aclose()
            raise
        return prepend(first, events)

    async def _node_gone(self, node_id: str, err: Exception) -> None:
        """A refused connection means the worker process is gone: drop the node and its instances
        now rather than after its heartbeat lapses (a live worker re-registers at its next beat)."""
        log.warning("worker %s refused a connection (%s); deregistering it", node_id, err)
        await to_thread.run_sync(self.cluster.deregister_node, node_id)

def _log_cold_start(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a cold start no request waits for anymore failed: %s", task.exception())
