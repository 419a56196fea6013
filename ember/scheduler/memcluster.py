"""The simulator's cluster state in memory: the in-memory backend of `ClusterView`.

It publishes exactly what the live cluster (`RedisCluster`) publishes, kept by the same rules:
per device free bytes (booked by `ember.scheduler.memory`: a checkpoint's weights once per device,
each instance's KV budget), resident instances, load queue (`queue_after_claim` when a load is
claimed, `queue_after_load` when it ends), awake state (instances resident) and idle bytes
(what evicting its ready instances with nothing outstanding frees, `evictable_bytes`); per node
the tier bandwidths (measured, corrected by `ewma_bandwidth_bps` from each finished load),
holdings and per-tier load queues. A test
builds the same state here and in Redis and compares every field a policy reads.

What only the simulator knows (the true bandwidths, when a load really ends) lives on the same
objects under `true_*` names and is never shown to a policy.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Sequence

from ember.scheduler.estimator import (
    DEFAULT_BANDWIDTH_BPS,
    ewma_bandwidth_bps,
    prefetch_expiry_s,
    queue_after_claim,
    queue_after_load,
)
from ember.scheduler.eviction import IdleInstance, choose_evictions
from ember.scheduler.memory import claim_bytes, evictable_bytes, release_bytes
from ember.scheduler.simrecords import SimDevice, SimInstance, SimNode
from ember.scheduler.view import DeviceState, NodeState, Tier, choose_room, room_window, tier_rank

__all__ = ["MemCluster"]

GiB = 1 << 30


class MemCluster:
    """Nodes, devices, instances and checkpoint tiers in memory; the simulator's `ClusterView`."""

    def __init__(self, *, gpu_memory_bytes: int, dram_cache_bytes: int, ssd_bytes: int) -> None:
        self.now = 0.0
        self.late_reads = 0  # node states whose devices were first read after the node changed (`_SimNodeState`)
        self.dram_cache_bytes = dram_cache_bytes
        self.ssd_bytes = ssd_bytes
        self.nodes_by_id: dict[str, SimNode] = {}
        self.node_list: list[SimNode] = []
        self.devices: list[SimDevice] = []
        self.n_buckets = gpu_memory_bytes // GiB + 1
        # free-memory index: per GiB of free memory, (free, "node/device", index) sorted, so a scan
        # lists devices in the order Redis's sorted set does (score, then member)
        self.buckets: list[list[tuple[int, str, int]]] = [[] for _ in range(self.n_buckets)]
        self.holders: dict[str, dict[str, None]] = {}
        self.holder_order: dict[str, list[str]] = {}  # checkpoint -> holders nearest tier first (set_tier drops it)
        self.instances: dict[str, SimInstance] = {}
        self.pending_loads: list[tuple[float, int, SimInstance]] = []
        self.in_flight: dict[str, dict[str, float]] = {}  # checkpoint -> node id -> prefetch expiry (s)
        self._node_ids: list[str] = []
        self._seq = 0

    # --- building ----------------------------------------------------------------------------
    def add_node(self, node_id: str, devices: Sequence[tuple[str, int]], bandwidth_bps: dict[str, float],
                 true_bw: dict[str, float] | None = None) -> SimNode:
        node = SimNode(node_id, dict(true_bw or bandwidth_bps), dict(bandwidth_bps), self.dram_cache_bytes)
        for device_id, memory in devices:
            dev = SimDevice(len(self.devices), node, device_id, memory)
            node.devices.append(dev)
            self.devices.append(dev)
            self._rebucket(dev)
        self.nodes_by_id[node_id] = node
        self.node_list.append(node)
        self._node_ids.append(node_id)
        return node

    # --- ClusterView ---------------------------------------------------------------------------
    def node(self, node_id: str) -> NodeState | None:
        n = self.nodes_by_id.get(node_id)
        return None if n is None else self._node_state(n)

    def nodes_holding(self, checkpoint: str, limit: int | None = None) -> Sequence[NodeState]:
        nodes, ids = self.nodes_by_id, self.holder_order.get(checkpoint)
        if ids is None:
            held = self.holders.get(checkpoint, ())
            ids = self.holder_order[checkpoint] = [n for _, n in sorted((tier_rank(nodes[n].holdings[checkpoint]), n) for n in held)]
        return [self._node_state(nodes[n]) for n in (ids if limit is None else ids[:limit])]

    def devices_with_room(self, nbytes: int, limit: int = 16, spread: bool = False) -> Sequence[DeviceState]:
        want = room_window(limit)
        first = min(self.n_buckets - 1, nbytes // GiB)
        devices = self.devices
        found: list[SimDevice] = []
        if spread:
            for b in range(self.n_buckets - 1, first - 1, -1):
                for free, _, i in reversed(self.buckets[b]):
                    if free < nbytes or len(found) >= want:
                        break
                    found.append(devices[i])
                if len(found) >= want:
                    break
        else:
            for b in range(first, self.n_buckets):
                bucket = self.buckets[b]
                start = bisect_left(bucket, (nbytes,)) if b == first else 0
                for _, _, i in bucket[start:start + want - len(found)]:
                    found.append(devices[i])
                if len(found) >= want:
                    break
        return choose_room([self._device_state(d) for d in found], limit, spread)

    def nodes(self, node_ids: Sequence[str]) -> Sequence[NodeState]:
        return [self._node_state(self.nodes_by_id[n]) for n in node_ids if n in self.nodes_by_id]

    def prefetching(self, checkpoint: str) -> set[str]:
        recs, now = self.in_flight.get(checkpoint), self.now
        return {n for n, until in recs.items() if until > now} if recs else set()

    def node_ids(self) -> Sequence[str]:
        return self._node_ids

    def all_nodes(self) -> Sequence[NodeState]:
        return [self._node_state(n) for n in self.node_list]

    def _device_state(self, d: SimDevice, now: float | None = None) -> DeviceState:
        if now is None:
            now = self.now
        idle = evictable_bytes([(i.checkpoint, i.nbytes, i.kv_bytes) for i in d.instances
                                if i.ready_s <= now and i.last_used_s <= now], d.weights) if d.instances else 0
        queue = d.load_until - now
        return DeviceState(d.node_id, d.device_id, d.memory, d.free, len(d.instances), queue if queue > 0 else 0.0,
                           bool(d.instances), idle)

    def _node_state(self, n: SimNode) -> NodeState:
        now = self.now
        if n.cached_at == (now, n.version):
            return n.cached  # type: ignore[return-value]
        state = _SimNodeState(self, n, now, n.version, dict(n.measured_bw), n.holdings,
                              {t: u - now for t, u in n.tier_until.items() if u > now})
        n.cached, n.cached_at = state, (now, n.version)
        return state

    # --- what the live cluster does atomically -----------------------------------------------
    def claim(self, fn: int, function: str, checkpoint: str, dev: SimDevice, nbytes: int, tier: Tier,
              estimate_s: float, now: float, kv_bytes: int = 0) -> SimInstance:
        """Claim memory on `dev` for a new loading instance as claim.lua does (`claim_bytes`: the
        weights unless the device holds them already, and the KV budget); both load queues take the
        load until its estimated end (`queue_after_claim`). The caller sets the instance's real
        `ready_s` and `load_s` and then calls `schedule_load_end`."""
        node = dev.node
        held = dev.weights.get(checkpoint, 0)
        dev.free -= claim_bytes(nbytes, kv_bytes, held > 0)
        dev.weights[checkpoint] = held + 1
        self._rebucket(dev)
        self._seq += 1
        inst = SimInstance(f"i{self._seq}", fn, function, checkpoint, dev, nbytes, now, kv_bytes)
        inst.tier = inst.load_tier = tier
        inst.expected_end_s = now + estimate_s
        dev.load_until = queue_after_claim(dev.load_until, now, estimate_s)
        node.tier_until[tier] = queue_after_claim(node.tier_until[tier], now, estimate_s)
        dev.instances.append(inst)
        self.instances[inst.instance_id] = inst
        return inst

    def schedule_load_end(self, inst: SimInstance) -> None:
        heapq.heappush(self.pending_loads, (inst.ready_s, self._seq, inst))

    def advance(self, now: float) -> None:
        """Move the clock to `now`, applying the ends of loads that finished by then."""
        pending = self.pending_loads
        while pending and pending[0][0] <= now:
            t, _, inst = heapq.heappop(pending)
            self.load_done(inst, t)
        self.now = now

    def load_done(self, inst: SimInstance, t: float) -> None:
        """A load ended at `t`: correct both queues of the tier claimed (`queue_after_load`) and fold
        the load into the node's bandwidth for the tier it came from (what the gateway reports live)."""
        if inst.loaded:
            return
        inst.loaded = True
        dev = inst.device
        node = dev.node
        dev.load_until = queue_after_load(dev.load_until, inst.expected_end_s, t)
        node.tier_until[inst.tier] = queue_after_load(node.tier_until[inst.tier], inst.expected_end_s, t)
        if inst.load_s > 0:
            src = inst.load_tier
            node.measured_bw[src] = ewma_bandwidth_bps(node.measured_bw.get(src), inst.nbytes, inst.load_s)
        # The copies the load leaves exist once it has filled them, as live (the worker commits its
        # DRAM entry, and a remote load's SSD entry, when the load ends): a load from remote lands on
        # the node's SSD, every load from the node's tiers or remote in its DRAM cache.
        if inst.load_tier != "gpu":
            if inst.load_tier == "remote":
                self.ssd_put(node, inst.checkpoint, inst.nbytes)
            self.dram_put(node, inst.checkpoint, inst.nbytes, inst.dram_keep)
        node.version += 1

    def publish_prefetch(self, node: SimNode, src: Tier, nbytes: int, now: float) -> float:
        """A prefetch from tier `src` is sent to `node`: the tier is busy until its estimated end
        (`queue_after_claim`; the estimate stands, no end corrects it). Returns that end."""
        bw = node.measured_bw.get(src)
        est = max(0.0, node.tier_until[src] - now) + nbytes / (bw if bw and bw > 0 else DEFAULT_BANDWIDTH_BPS[src])
        node.tier_until[src] = queue_after_claim(node.tier_until[src], now, est)
        node.version += 1
        return now + est

    def send_prefetch(self, node: SimNode, checkpoint: str, nbytes: int, now: float) -> Tier | None:
        """What the gateway does as it sends a prefetch, by the live rules (LoadQueues.send_prefetch):
        its source tier (ssd if published there, else remote) takes it (`publish_prefetch`) and it
        is in flight until `prefetch_expiry_s` or `prefetch_landed`. Returns the source tier; None
        (nothing is sent) when the node publishes the checkpoint in DRAM or already fetches it."""
        held = node.holdings.get(checkpoint)
        recs = self.in_flight.get(checkpoint, {})
        if held in ("gpu", "dram") or recs.get(node.node_id, now) > now:
            return None
        src: Tier = "ssd" if held == "ssd" else "remote"
        end = self.publish_prefetch(node, src, nbytes, now)
        recs = self.in_flight[checkpoint] = {n: until for n, until in recs.items() if until > now}  # as live
        recs[node.node_id] = prefetch_expiry_s(now, end)
        return src

    def prefetch_landed(self, node: SimNode, checkpoint: str) -> None:
        """The prefetch's copy is in the node's DRAM (published): no longer in flight."""
        recs = self.in_flight.get(checkpoint)
        if recs is not None and recs.pop(node.node_id, None) is not None and not recs:
            del self.in_flight[checkpoint]

    def remove(self, inst: SimInstance) -> None:
        """Forget an instance and free what it held, as lib_remove.lua does (`release_bytes`), and
        as the worker lets go of its checkpoint."""
        dev = inst.device
        dev.instances.remove(inst)
        del self.instances[inst.instance_id]
        left = dev.weights.get(inst.checkpoint, 0) - 1
        if left > 0:
            dev.weights[inst.checkpoint] = left
        else:
            dev.weights.pop(inst.checkpoint, None)
            # the device's copy goes with its last instance: the node's DRAM copy was used until now
            # (the live tier's `_release_device_copy`)
            dev.node.dram.touch(inst.checkpoint, self.now)
        dev.free += release_bytes(inst.nbytes, inst.kv_bytes, left <= 0)
        self._rebucket(dev)

    # --- eviction: the shared choice (`choose_evictions`), executed here -------------------------
    def idle_on(self, devices: Sequence[SimDevice], for_function: str) -> list[IdleInstance]:
        now = self.now
        return [IdleInstance(i.instance_id, i.function, d.key, i.nbytes, i.last_used_s, i.checkpoint, i.kv_bytes,
                             d.weights[i.checkpoint])
                for d in devices for i in d.instances
                if i.ready_s <= now and i.last_used_s <= now and i.function != for_function]

    def evict(self, devices: Sequence[SimDevice], nbytes: int, for_function: str) -> list[SimInstance]:
        """Make `nbytes` free on one of `devices` by the rule the gateway uses (no function has a
        minimum here); returns the evicted instances ([] when none was needed or possible)."""
        if any(d.free >= nbytes for d in devices):
            return []
        idle = self.idle_on(devices, for_function)
        if not idle:
            return []
        spare: dict[str, int] = {}
        for i in idle:
            spare[i.function] = spare.get(i.function, 0) + 1
        victims = choose_evictions(nbytes, {d.key: d.free for d in devices}, idle, spare)
        out = [self.instances[v.instance_id] for v in victims]
        for inst in out:
            self.remove(inst)
        return out

    # --- tiers and indexes ---------------------------------------------------------------------
    def _rebucket(self, dev: SimDevice) -> None:
        """List `dev` in the free-memory index under its current free bytes."""
        self._unbucket(dev)
        b = min(self.n_buckets - 1, dev.free // GiB)
        dev.room_entry = (dev.free, dev.key, dev.index)
        insort(self.buckets[b], dev.room_entry)
        dev.bucket = b

    def _unbucket(self, dev: SimDevice) -> None:
        """Take `dev` out of the free-memory index (not placeable until listed again)."""
        dev.node.version += 1
        if dev.bucket >= 0:
            bucket = self.buckets[dev.bucket]
            del bucket[bisect_left(bucket, dev.room_entry)]
            dev.bucket = -1

    def set_tier(self, node: SimNode, ck: str) -> None:
        """Publish where `ck` sits on `node`: its DRAM cache or SSD, as live workers publish their
        tiers (a checkpoint on a device is not a published holding live: the worker reuses a device
        copy for another instance on that same device only, which the simulator's cold start models)."""
        node.version += 1
        self.holder_order.pop(ck, None)
        if ck in node.dram:
            tier: Tier | None = "dram"
        elif ck in node.ssd:
            tier = "ssd"
        else:
            tier = None
        if tier is None:
            if node.holdings.pop(ck, None) is not None:
                held = self.holders.get(ck)
                if held is not None:
                    held.pop(node.node_id, None)
                    if not held:
                        del self.holders[ck]
        else:
            node.holdings[ck] = tier
            self.holders.setdefault(ck, {})[node.node_id] = None

    def dram_put(self, node: SimNode, ck: str, nb: int, keep: int = 0) -> None:
        """A copy of `ck` in `node`'s DRAM tier, used now with retention priority `keep` (the latest
        use sets it, as live); room is made by the live tier's rule (`SimDram`: `retention.victim`,
        the lowest keep, then the least recently used)."""
        was_there = ck in node.dram
        gone = node.dram.put(ck, nb, keep, self.now)
        if gone is None or was_there:
            return
        for old in gone:
            self.set_tier(node, old)
        self.set_tier(node, ck)

    def ssd_put(self, node: SimNode, ck: str, nb: int) -> None:
        if ck in node.ssd:
            node.ssd.move_to_end(ck)
            return
        node.ssd[ck] = nb
        node.ssd_used += nb
        while node.ssd_used > self.ssd_bytes:
            old, size = node.ssd.popitem(last=False)
            node.ssd_used -= size
            self.set_tier(node, old)
        self.set_tier(node, ck)


_DEVICES = NodeState.__dict__["devices"]  # the slot NodeState keeps its devices in


class _SimNodeState(NodeState):
    """A node as `MemCluster` shows it, its devices built when first read: the autoscaler's prefetch
    check reads the holdings and bandwidths of a thousand holders every step and never their
    devices (two thirds of the simulated hour's time went into building them). They are built as
    they stood when the state was made: policies read a state before anything changes the node
    (every change bumps `SimNode.version`; a read after one counts in `MemCluster.late_reads`)."""

    __slots__ = ("_cluster", "_node", "_at", "_version")

    def __init__(self, cluster: MemCluster, node: SimNode, at: float, version: int, bandwidth_bps: dict[str, float],
                 holdings: dict[str, Tier], tier_queue_s: dict[str, float]) -> None:
        self.node_id = node.node_id
        self.bandwidth_bps = bandwidth_bps
        self.holdings = holdings
        self.tier_queue_s = tier_queue_s
        self._cluster, self._node, self._at, self._version = cluster, node, at, version

    @property  # type: ignore[override]
    def devices(self) -> tuple[DeviceState, ...]:
        try:
            return _DEVICES.__get__(self)
        except AttributeError:
            cluster, at = self._cluster, self._at
            if self._node.version != self._version:
                cluster.late_reads += 1
            devices = tuple(cluster._device_state(d, at) for d in self._node.devices)
            _DEVICES.__set__(self, devices)
            return devices
