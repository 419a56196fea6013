"""The shared base of the cluster's parts: one Redis client, its scripts, and error mapping."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from ember.errors import StateUnavailable
from ember.platform.cluster.scripts import Scripts

F = TypeVar("F", bound=Callable[..., Any])


def state_errors(fn: F) -> F:
    """Redis connection failures become StateUnavailable (HTTP 503)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StateUnavailable(f"cluster state (Redis) unavailable: {e}") from e

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
