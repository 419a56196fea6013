"""Getting an invocation to an instance: warm routing, waiting in arrival order, the scale-out
rule, and the token stream from the worker (cold starts and unloads: `coldstart.InstanceStarter`).

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
from ember.platform.cluster import SLOT_HEADER, AsyncSlots, InstanceRecord, RedisCluster
from ember.platform.gateway.coldstart import InstanceStarter
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionSpec, GenerateRequest, LoadResult
from ember.platform.gateway.waiting import WaitQueues
from ember.platform.gateway.worker_stream import Retry, error_from, prepend, worker_events
from ember.platform.wire import CLUSTER_TOKEN_HEADER
from ember.scheduler.estimator import ewma_into
from ember.scheduler.routing import scale_out_rule, should_start_estimated

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
    """Routes invocations of one gateway. The hot path (slots, wake-ups) is on the event loop's
    Redis client; the cold path (`starter`: placement, eviction, loads) runs the sync cluster in the
    threadpool."""

    def __init__(self, settings: Settings, cluster: RedisCluster, http: httpx.AsyncClient,
                 metrics: GatewayMetrics, policy_for: Any, slots: AsyncSlots | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self.starter = InstanceStarter(settings, cluster, http, metrics, policy_for)
        self.slots = slots
        self.queues = WaitQueues()
        self.waiting_for_room = 0  # requests of this gateway whose placement found no room (node scaler input)
        self._releasing: set[asyncio.Task[None]] = set()  # release_soon's tasks, kept until done
        self.service_s: dict[str, float] = {}  # EWMA of a request's time holding a slot, per function
        self.prefill_s: dict[str, float] = {}  # EWMA of the workers' time to first token, per function
        self.token = settings.resolved_cluster_token()
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.worker_connect_timeout_s,
                                                    sock_read=settings.worker_read_timeout_s)
        self._stream_session: aiohttp.ClientSession | None = None

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
                found_no_room = False
                if starting is not None and starting.done():
                    cold = starting.result()  # a failed cold start fails the request that started it
                    starting = None
                    found_no_room = cold is None
                    if cold is None and not waits_for_room:  # no device had room: the node scaler's signal
                        waits_for_room = True
                        self.waiting_for_room += 1
                        self.metrics.placements_waited.inc()
                        self.metrics.placements_waiting.set(self.waiting_for_room)  # exact, not per node scaler step
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
                # A placement that found no room is tried again at the next wake (a slot freed, an
                # instance ready, or the 1 s timeout), not at once: that spun on Redis while full.
                if starting is None and not found_no_room and await self._should_start(spec):
                    placed = {}
                    starting = asyncio.ensure_future(self.starter.cold_start(spec, placed))
        finally:
            self.queues.leave(name, ev)
            if starting is not None and not starting.done():
                starting.add_done_callback(_log_cold_start)  # it finishes for the next request
            if waits_for_room:
                self.waiting_for_room -= 1
                self.metrics.placements_waiting.set(self.waiting_for_room)

    async def release(self, target: InvocationTarget) -> None:
        """Free the request's slot; shielded, so a cancelled request (a client that went away)
        still frees it. A release that cannot reach Redis leaves a lease that lapses."""
        if target.released:
            return
        target.released = True
        ewma_into(self.service_s, target.function, time.monotonic() - target.acquired_at)
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
        """The scale-out rule of the function's placement policy (`routing.scale_out_rule`: Ember's
        `should_start` or a baseline's own) on what this gateway knows (`routing.should_start_estimated`,
        the simulator's call too): the function's instances and when each was claimed, its waiting
        requests, those in flight, and the EWMAs of service, prefill and cold-start times learned here."""
        instances = await to_thread.run_sync(self.cluster.instances, spec.name)
        s, name = spec.scaling, spec.name
        return should_start_estimated(instances, waiting=self.queues.waiting(name),
                                      target_concurrency=s.target_concurrency, max_instances=s.max_instances,
                                      ttft_slo_s=spec.slo.ttft_ms / 1000, service_s=self.service_s.get(name, 0.0),
                                      prefill_s=self.prefill_s.get(name, 0.0),
                                      startup_s=self.starter.startup_s.get(name, 0.0), now_s=time.time(),
                                      rule=scale_out_rule(self.starter.policy_for(spec)))

    def observe_done(self, function: str, done: dict[str, Any]) -> None:
        """Learn the function's prefill time from a finished request (the worker's ttft_s)."""
        if "ttft_s" in done:
            ewma_into(self.prefill_s, function, float(done["ttft_s"]))

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
                log.info("%s: trying another instance of %s", r.error.message, spec.name)
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

    async def _post_stream(self, url: str, body: dict[str, Any], slot: str = "") -> aiohttp.ClientResponse:
        session, headers = self.stream_session(), {CLUSTER_TOKEN_HEADER: self.token}
        if slot:  # the worker restores it with the instance if Redis forgets both (see SLOT_HEADER)
            headers[SLOT_HEADER] = slot
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
            resp = await self._post_stream(url, req.model_dump(), target.record.slot_id if target.record else "")
        except aiohttp.ClientConnectorError as e:  # refused: the worker process is gone
            await self.starter.node_gone(target.node_id, e)
            raise Retry(WorkerError(f"worker {target.node_id} unreachable: {e}")) from e
        except asyncio.TimeoutError as e:
            raise Retry(WorkerTimeout(f"worker {target.node_id} did not answer within "
                                       f"{self.settings.worker_read_timeout_s:.0f}s"), stalled=True) from e
        except aiohttp.ClientError as e:
            raise Retry(WorkerError(f"worker {target.node_id} failed before answering: {e}"), stalled=True) from e
        if resp.status == 404:  # the worker does not hold it: nothing loaded there, its claim goes
            resp.release()
            await self.starter.forget(target.instance_id)
            raise Retry(WorkerError(f"worker {target.node_id} no longer has instance {target.instance_id}"))
        if resp.status == 409:  # it holds it but takes no new request (draining, retired): it removes
            resp.release()      # the instance itself when idle; freeing its claim now would overbook
            raise Retry(WorkerError(f"worker {target.node_id} takes no new request on {target.instance_id}"))
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

def _log_cold_start(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a cold start no request waits for anymore failed: %s", task.exception())
