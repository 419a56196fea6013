"""What the live cluster publishes beyond claims, so that policies read live what they read in the
simulator (`ember.scheduler.memcluster.MemCluster` keeps the same by the same rules):

- per device, a load queue: `busy_until_s` in the device hash (the claim script sets it by
  `queue_after_claim`; `load_done` below corrects it by `queue_after_load` when the load ends);
- per node and tier, a load queue: field `tq:<tier>` of the node hash (busy-until, seconds since
  the epoch), set the same way, and by prefetches (`send_prefetch`);
- per checkpoint, the prefetches of it in flight (`Keys.prefetching`: node id -> expiry), recorded
  by `send_prefetch` with the queue time, until `prefetch_expiry_s`, `prefetch_ended` (not sent
  after all) or `prefetch_landed` (the worker published its DRAM copy);
- per device, evictable idle bytes: the bytes of ready instances with nothing outstanding,
  summed when a node is read (`idle_by_device` in cluster/lua/lib_node_entry.lua);
- per node, learned bandwidths: `bw:<tier>`, folded by `load_done` from each finished load
  (the EWMA of `ember.scheduler.estimator`, alpha EWMA_ALPHA);
- awake: a device with instances resident (the snapshot's instance count).

And eviction's execution for a placement that chose a device by its idle bytes
(`evict_for_placement`): the shared choice (`plan_evictions`), each victim taken atomically
(`RedisCluster.evict_if_idle`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.platform.cluster.scripts import Scripts
from ember.platform.state import Keys
from ember.scheduler.estimator import DEFAULT_BANDWIDTH_BPS, EWMA_ALPHA, PREFETCH_GRACE_S
from ember.scheduler.eviction import plan_evictions

if TYPE_CHECKING:
    import redis

    from ember.platform.cluster import InstanceRecord, RedisCluster

__all__ = ["LoadQueues", "PrefetchSent", "evict_for_placement", "min_instances_of"]


@dataclass(frozen=True)
class PrefetchSent:
    """A prefetch recorded as in flight: the tier it reads from, when it is estimated to end, and
    the record's expiry as stored (what `prefetch_ended` matches, so it never drops a newer one)."""

    tier: str
    end_s: float
    expiry: str


class LoadQueues:
    """The live writers of load queues and learned bandwidths (beside `RedisCluster`'s claim)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        scripts = Scripts(client, names=("load_done", "publish_prefetch", "prefetch_ended"))  # cluster/lua/*.lua
        self._done = scripts.load_done
        self._prefetch = scripts.publish_prefetch
        self._prefetch_ended = scripts.prefetch_ended

    def load_done(self, instance_id: str, node_id: str, device_id: str, nbytes: int, seconds: float,
                  now: float | None = None, tier: str = "") -> bool:
        """A load ended (`seconds` long, 0 if unknown): correct the device's and the claimed tier's
        queue by how far off its estimate was, and fold the load into the node's bandwidth for the
        tier it really came from (`tier`, "" for the tier claimed)."""
        return bool(self._done(keys=[Keys.instance(instance_id), Keys.device(node_id, device_id), Keys.node(node_id)],
                               args=[repr(time.time() if now is None else now), int(nbytes),
                                     repr(max(0.0, float(seconds))), repr(EWMA_ALPHA), tier]))

    def send_prefetch(self, node_id: str, checkpoint: str, nbytes: int,
                      now: float | None = None) -> PrefetchSent | None:
        """A prefetch is about to be sent to the node: its source tier is busy until the estimated
        end, and it is in flight there (`ClusterReads.prefetching`) until it expires or ends. None:
        send nothing (the node holds the checkpoint in DRAM, already fetches it, or is unknown)."""
        got = self._prefetch(keys=[Keys.node(node_id), Keys.node_holdings(node_id), Keys.prefetching(checkpoint)],
                             args=[repr(time.time() if now is None else now), checkpoint, int(nbytes),
                                   repr(DEFAULT_BANDWIDTH_BPS["ssd"]), repr(DEFAULT_BANDWIDTH_BPS["remote"]),
                                   node_id, repr(PREFETCH_GRACE_S)])
        if not got:
            return None
        src, end, expiry = got
        return PrefetchSent(src, float(end), expiry)

    def prefetch_ended(self, node_id: str, checkpoint: str, sent: PrefetchSent, now: float | None = None) -> bool:
        """The prefetch `sent` ended (or never reached the worker): no longer in flight, and its
        source tier's queue corrected as a load's end corrects it. False if its record was gone."""
        return bool(self._prefetch_ended(keys=[Keys.node(node_id), Keys.prefetching(checkpoint)],
                                         args=[repr(time.time() if now is None else now), node_id, sent.tier,
                                               repr(sent.end_s), sent.expiry]))

    def prefetch_landed(self, node_id: str, checkpoint: str) -> None:
        """The worker's prefetch landed and its DRAM copy is published: no longer in flight (its
        queue time stands, as the simulator keeps it)."""
        self.r.zrem(Keys.prefetching(checkpoint), node_id)


def min_instances_of(client: redis.Redis, functions: set[str]) -> dict[str, int]:
    """Each function's min_instances from the registry (0 when unknown)."""
    if not functions:
        return {}
    names = sorted(functions)
    out: dict[str, int] = {}
    for name, raw in zip(names, client.hmget(Keys.functions, names), strict=True):
        try:
            out[name] = int(json.loads(raw)["scaling"]["min_instances"]) if raw else 0
        except (ValueError, KeyError, TypeError):
            out[name] = 0
    return out


def evict_for_placement(cluster: RedisCluster, node_id: str, device_id: str, nbytes: int, free_bytes: int,
                        for_function: str) -> list[InstanceRecord]:
    """The policy chose a device that needs idle instances evicted: evict them by the shared rule
    (`plan_evictions`, never below a function's min_instances), each atomically. Returns the
    instances evicted (their workers must be told), [] if none was needed or possible."""
    if free_bytes >= nbytes:
        return []
    ids = sorted(cluster.r.smembers(Keys.node_instances(node_id)))
    recs = [r for r in cluster._records(ids) if r.device_id == device_id]
    key = f"{node_id}/{device_id}"
    mins = min_instances_of(cluster.r, {r.function for r in recs})
    # min_instances counts a function's instances cluster-wide, not only those on this device.
    totals: dict[str, Any] = {f: cluster.r.scard(Keys.function_instances(f)) for f in mins}
    spare_min = {f: mins[f] - (int(totals[f]) - sum(1 for r in recs if r.function == f)) for f in mins}
    victims = plan_evictions(nbytes, {key: free_bytes}, recs, for_function=for_function,
                             min_instances={f: max(0, m) for f, m in spare_min.items()})
    by_id = {r.instance_id: r for r in recs}
    out = []
    for v in victims:
        if not cluster.evict_if_idle(v.instance_id):
            break  # it took a request meanwhile
        out.append(by_id[v.instance_id])
    return out
