"""Waiting for a slot without polling: requests of a function wait in arrival order and are woken
by Redis pub/sub (a slot freed, an instance ready or gone: the cluster scripts PUBLISH on the
function's wake channel). Also keeps this gateway's request-slot leases alive.

Only the request at the head of a function's queue tries to take a slot; when it gets one (or
gives up) the next one tries at once, so requests of one gateway are served in arrival order.
A wake-up lost while Redis restarts costs at most `fallback_s` (the head re-tries then).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict, deque

import redis

from ember.platform.cluster import AsyncSlots
from ember.platform.http_common import ticks
from ember.platform.state import Keys

log = logging.getLogger(__name__)


class WaitQueues:
    """Per function, the waiting requests in arrival order (each an asyncio.Event)."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[asyncio.Event]] = defaultdict(deque)

    def waiting(self, function: str) -> int:
        return len(self.queues.get(function, ()))

    def join(self, function: str) -> asyncio.Event:
        ev = asyncio.Event()
        q = self.queues[function]
        q.append(ev)
        if len(q) == 1:
            ev.set()  # the head tries at once
        return ev

    def is_head(self, function: str, ev: asyncio.Event) -> bool:
        q = self.queues.get(function)
        return bool(q) and q[0] is ev

    def leave(self, function: str, ev: asyncio.Event) -> None:
        q = self.queues.get(function)
        if q is None:
            return
        try:
            q.remove(ev)
        except ValueError:
            pass
        if q:
            q[0].set()  # the next in line tries now
        else:
            self.queues.pop(function, None)

    def wake(self, function: str) -> None:
        q = self.queues.get(function)
        if q:
            q[0].set()

    def wake_all(self) -> None:
        for q in self.queues.values():
            if q:
                q[0].set()


async def listen_for_wakeups(redis_url: str, queues: WaitQueues, stop: asyncio.Event) -> None:
    """Subscribe to every function's wake channel and wake that function's head waiter; reconnect
    (waking everyone, since messages may have been lost) when Redis goes away."""
    import redis.asyncio as aredis

    prefix = Keys.wake("")
    backoff = 0.1
    while not stop.is_set():
        client = aredis.Redis.from_url(redis_url, decode_responses=True, socket_connect_timeout=2)
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe(Keys.wake_pattern)
            queues.wake_all()
            backoff = 0.1
            while not stop.is_set():
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None and msg.get("type") == "pmessage":
                    channel = msg["channel"]
                    if channel.startswith(prefix):
                        queues.wake(channel[len(prefix):])
        except (redis.RedisError, OSError) as e:
            log.warning("wake-up channel lost (%s); reconnecting", e.__class__.__name__)
            queues.wake_all()
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
                pass


async def renew_slot_leases(slots: AsyncSlots, every_s: float, stop: asyncio.Event) -> None:
    """Keep the leases of the slots this gateway's requests hold (they lapse if the gateway dies)."""
    async for _ in ticks(every_s, stop):
        try:
            await slots.renew()
        except (redis.RedisError, OSError) as e:
            log.warning("could not renew request slot leases: %s", e)


__all__ = ["WaitQueues", "listen_for_wakeups", "renew_slot_leases"]
