"""Live cluster state in Redis: nodes, devices, instances (their lifecycle), claims and leases.

`RedisCluster` is the platform's `ClusterView` (ember.scheduler.view): placement policies read
nodes, devices and checkpoint holdings from here, and `place` claims device memory atomically
(a Lua script), so two gateways never book the same bytes. Workers register and heartbeat (a key
with a TTL); each beat reconciles the instances the worker really holds; a node whose heartbeat
lapsed is never chosen and `reap_dead_nodes` releases what it held.

Parts: records.py (data and the instance lifecycle), view.py (reads), nodes.py (membership),
lifecycle.py (instance transitions), leases.py (request slots, named leases, the asyncio hot
path), scripts.py + lua/ (the scripts, package data read once).

Units: bytes, seconds (wall clock, `time.time()`), bytes per second. Some scripts build keys from
the prefix at run time (a node's instances, the instances of a function), so this targets one Redis
(or an ElastiCache replication group), not Redis Cluster's sharded mode.
"""

from __future__ import annotations

import redis

from ember.platform.cluster.leases import SLOT_HEADER, AsyncSlots, Leases
from ember.platform.cluster.lifecycle import InstanceLifecycle
from ember.platform.cluster.nodes import NodeMembership
from ember.platform.cluster.records import (
    DeviceSpec,
    Heartbeat,
    InstanceRecord,
    InstanceState,
    Placement,
)
from ember.platform.cluster.view import ClusterReads, DecisionView
from ember.scheduler.estimator import EWMA_ALPHA

_DecisionView = DecisionView  # the name tests and older branches import

__all__ = ["SLOT_HEADER", "AsyncSlots", "DeviceSpec", "Heartbeat", "InstanceRecord", "InstanceState", "Placement",
           "RedisCluster", "EWMA_ALPHA"]


class RedisCluster(NodeMembership, InstanceLifecycle, Leases, ClusterReads):
    """Cluster state over one Redis; also the live `ClusterView` that placement policies read."""

    def __init__(self, client: redis.Redis, *, heartbeat_ttl_s: float = 5.0, claim_timeout_s: float = 60.0,
                 slot_ttl_s: float = 60.0) -> None:
        super().__init__(client, heartbeat_ttl_s=heartbeat_ttl_s, claim_timeout_s=claim_timeout_s,
                         slot_ttl_s=slot_ttl_s)
