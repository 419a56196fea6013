"""The shared base of the cluster's parts: one Redis client, its scripts, and error mapping."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from ember.errors import StateUnavailable
from ember.platform.cluster.scripts import Scripts

F = TypeVar("F", bound=Callable[..., Any])


# Replies of a Redis that is up but cannot serve writes now: a replica after a failover (READONLY),
# a failed snapshot (MISCONF), memory full (OOM), loading its data set, a script running too long,
# too few replicas. Like a connection failure, they are the state being unavailable, not a bug.
_UNAVAILABLE_REPLIES = ("READONLY", "MISCONF", "OOM", "LOADING", "BUSY", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN",
                        "CLUSTERDOWN")


def unavailable(e: redis.RedisError) -> bool:
    """Whether `e` means Redis cannot serve this now (as opposed to a malformed command or script)."""
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)):
        return True
    return isinstance(e, redis.ResponseError) and str(e).lstrip("-").startswith(_UNAVAILABLE_REPLIES)


def state_errors(fn: F) -> F:
    """Redis connection failures, and replies that it cannot serve writes now (READONLY, MISCONF,
    OOM, ...), become StateUnavailable (HTTP 503): callers that keep going without Redis catch
    one error, whatever the reason."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            if unavailable(e):
                raise StateUnavailable(f"cluster state (Redis) unavailable: {e}") from e
            raise

    return cast(F, wrapper)


class ClusterBase:
    """Holds the client and its registered scripts; the parts (nodes, lifecycle, leases, view)
    are mixins over it, combined in `RedisCluster`."""

    def __init__(self, client: redis.Redis, *, heartbeat_ttl_s: float = 5.0, claim_timeout_s: float = 60.0,
                 slot_ttl_s: float = 60.0) -> None:
        self.r = client
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.claim_timeout_s = claim_timeout_s  # a claim not loading by then is reaped
        self.slot_ttl_s = slot_ttl_s  # a request slot nobody renews lapses after this
        self.scripts = Scripts(client)
