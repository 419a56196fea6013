"""Leases: request slots on instances (each slot a lease with an expiry that the gateway holding
it renews, so a gateway that dies cannot leak one), named leases (the autoscaler and the energy
allocator run in one process at a time), and the asyncio client of the gateway's hot path: slot
acquire/release and the wake channel waiting requests listen on (no polling)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any, cast

from ember.platform.cluster.base import ClusterBase, state_errors
from ember.platform.cluster.records import InstanceRecord
from ember.platform.cluster.scripts import Scripts
from ember.platform.state import PREFIX, Keys

log = logging.getLogger(__name__)

# gateway -> worker: the request slot a token stream holds. The worker keeps the slots of the streams
# it serves and restores them with their instance when Redis forgot it (a restart, a reap).
SLOT_HEADER = "x-ember-slot"


def _acquire_args(target_concurrency: int, ttl_s: float, exclude: Iterable[str]) -> tuple[str, list[Any]]:
    now = time.time()
    slot = uuid.uuid4().hex[:12]
    return slot, [PREFIX, target_concurrency, repr(now), slot, repr(now + ttl_s), *exclude]


def _acquired(flat: Any, slot: str) -> InstanceRecord | None:
    if not flat:
        return None
    instance_id, *rest = flat
    rec = InstanceRecord.from_hash(instance_id, dict(zip(rest[::2], rest[1::2], strict=True)))
    rec.slot_id = slot
    return rec


def _release_args(instance: str | InstanceRecord) -> tuple[list[str], list[str]]:
    if isinstance(instance, InstanceRecord):
        iid, slot, fn = instance.instance_id, instance.slot_id, instance.function
    else:
        iid, slot, fn = instance, "", ""
    return [Keys.instance(iid), Keys.instance_slots(iid), Keys.waiting(fn)], [repr(time.time()), slot, Keys.wake(fn)]


def _waiting_args(function: str, ttl_s: float) -> tuple[str, ...]:
    return ("SET", Keys.waiting(function), "1", "PX", str(max(1, int(ttl_s * 1000))))


class Leases(ClusterBase):
    @state_errors
    def acquire_warm(self, function: str, target_concurrency: int,
                     exclude: Iterable[str] = ()) -> InstanceRecord | None:
        """Atomically take a request slot on the least-outstanding ready instance of `function`
        that is below `target_concurrency` on a live node (not in `exclude`); None if there is
        none. The record's `slot_id` names the slot; it lapses after `slot_ttl_s` unless renewed."""
        slot, args = _acquire_args(target_concurrency, self.slot_ttl_s, exclude)
        return _acquired(self.scripts.acquire_warm(keys=[Keys.function_instances(function)], args=args), slot)

    @state_errors
    def release_request(self, instance: str | InstanceRecord) -> None:
        """A request finished: its slot is freed once (a record from acquire_warm names it; a bare id
        frees the oldest), last_used_s = now, and a waiting request of the function is woken."""
        keys, args = _release_args(instance)
        self.scripts.release_request(keys=keys, args=args)

    @state_errors
    def mark_waiting(self, function: str, ttl_s: float) -> None:
        """Requests of `function` wait here: for `ttl_s`, releases of its slots publish a wake-up
        (mark before trying for a slot, so a release after a failed try always wakes)."""
        self.r.execute_command(*_waiting_args(function, ttl_s))

    @state_errors
    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Acquire the named lease, or renew it if `holder` already has it."""
        return bool(self.scripts.lease(keys=[Keys.lease(name)], args=[holder, max(1, int(ttl_s * 1000))]))

    @state_errors
    def lease_holder(self, name: str) -> str | None:
        """Who holds the named lease now (None: nobody)."""
        return cast("str | None", self.r.get(Keys.lease(name)))


class AsyncSlots:
    """The gateway's hot path on redis.asyncio: take and free request slots, renew the leases of
    the slots this gateway holds, and listen for wake-ups (a slot freed, an instance ready)."""

    def __init__(self, client: Any, slot_ttl_s: float = 60.0) -> None:
        self.r = client
        self.slot_ttl_s = slot_ttl_s
        self.scripts = Scripts(client, ("acquire_warm", "release_request", "renew_slots"))
        self.held: dict[str, str] = {}  # slot id -> instance id, renewed while held
        self._giving_back: set[asyncio.Task] = set()  # releases of slots their callers never saw

    async def acquire(self, function: str, target_concurrency: int,
                      exclude: Iterable[str] = ()) -> InstanceRecord | None:
        """Take a slot; the caller frees it with `release`. A request cancelled while the script
        is in flight would never learn of the slot the script took (leaked until its lease
        lapses): the script's call is shielded, and a slot it took for a cancelled caller is
        given back as soon as its reply arrives."""
        slot, args = _acquire_args(target_concurrency, self.slot_ttl_s, exclude)
        call = asyncio.ensure_future(self.scripts.acquire_warm(keys=[Keys.function_instances(function)], args=args))
        try:
            rec = _acquired(await asyncio.shield(call), slot)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._give_back(done, slot))
            raise
        if rec is not None:
            self.held[slot] = rec.instance_id
        return rec

    def _give_back(self, done: asyncio.Future, slot: str) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        rec = _acquired(done.result(), slot)
        if rec is not None:
            task = asyncio.ensure_future(self.release(rec))
            self._giving_back.add(task)
            task.add_done_callback(self._gave_back)

    def _gave_back(self, task: asyncio.Future) -> None:
        self._giving_back.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:  # retrieved: never "never retrieved"
            log.warning("a slot taken for a cancelled request was not given back (its lease lapses): %s", e)

    async def mark_waiting(self, function: str, ttl_s: float) -> None:
        """`Leases.mark_waiting` on the event loop."""
        await self.r.execute_command(*_waiting_args(function, ttl_s))

    async def release(self, rec: InstanceRecord) -> None:
        self.held.pop(rec.slot_id, None)
        keys, args = _release_args(rec)
        await self.scripts.release_request(keys=keys, args=args)

    async def renew(self) -> int:
        """Extend the lease of every slot this gateway holds; returns how many were still there."""
        held = list(self.held.items())
        if not held:
            return 0
        expiry = repr(time.time() + self.slot_ttl_s)
        return int(await self.scripts.renew_slots(keys=[Keys.instance_slots(i) for _, i in held],
                                                  args=[expiry, *(s for s, _ in held)]))
