"""The simulator's records: an instance, a device and a node as `MemCluster` keeps them (the live
cluster's Redis records, with what only the simulator knows under `true_*` names), and `refresh`,
which brings instances' slots and state to a time."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from ember.scheduler.simdram import SimDram
from ember.scheduler.view import NodeState, Tier

__all__ = ["SimDevice", "SimInstance", "SimNode", "refresh"]


class SimInstance:
    __slots__ = ("instance_id", "function", "fn", "checkpoint", "node_id", "device_id", "device", "nbytes",
                 "kv_bytes", "ready_s", "ends", "last_used_s", "created_s", "state", "outstanding", "tier",
                 "load_tier", "expected_end_s", "load_s", "loaded", "dram_keep")

    def __init__(self, instance_id: str, fn: int, function: str, checkpoint: str, device: SimDevice,
                 nbytes: int, now: float, kv_bytes: int = 0) -> None:
        self.instance_id = instance_id
        self.fn = fn
        self.function = function
        self.checkpoint = checkpoint
        self.device = device
        self.node_id = device.node_id
        self.device_id = device.device_id
        self.nbytes = nbytes  # the checkpoint's weights (shared with its other instances on the device)
        self.kv_bytes = kv_bytes  # its KV-cache budget, claimed beyond the weights
        self.ready_s = now
        self.ends: list[float] = []  # heap: end times of requests holding a slot
        self.last_used_s = now
        self.created_s = now
        self.state = "loading"
        self.outstanding = 0
        self.tier: Tier = "remote"  # the tier claimed (the placement's estimate)
        self.load_tier: Tier = "remote"  # the tier it really loads from
        self.expected_end_s = now  # claim time + the placement's estimate
        self.dram_keep = 0  # the retention priority its load gives the node's DRAM copy (`caching.dram_keep`)
        self.load_s = 0.0  # the transfer itself (what a worker reports as the load's duration)
        self.loaded = False  # load_done applied


def refresh(insts: Sequence[SimInstance], now: float) -> None:
    """Set the instances' `outstanding` and `state` at `now` (ended requests leave their slots)."""
    for inst in insts:
        ends = inst.ends
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        inst.outstanding = len(ends)
        inst.state = "ready" if inst.ready_s <= now else "loading"


class SimDevice:
    __slots__ = ("index", "node", "node_id", "device_id", "memory", "free", "instances", "weights",
                 "load_until", "true_until", "busy_until", "extra_j", "bucket", "room_entry")

    def __init__(self, index: int, node: SimNode, device_id: str, memory: int) -> None:
        self.index = index
        self.node = node
        self.node_id = node.node_id
        self.device_id = device_id
        self.memory = memory
        self.free = memory
        self.instances: list[SimInstance] = []
        self.weights: dict[str, int] = {}  # checkpoint -> its instances here (live: the device's 'ckpt:' fields)
        self.load_until = 0.0  # published load queue (busy-until)
        self.true_until = 0.0  # when its loads really end
        self.busy_until = -1e9  # end of the last work (energy: warm idle tail)
        self.extra_j = 0.0  # energy above idle power
        self.bucket = -1  # free-memory bucket (GiB) it is listed in; -1: not placeable
        self.room_entry: tuple[int, str, int] = (0, "", index)  # (free, "node/device", index) there

    @property
    def key(self) -> str:
        return f"{self.node_id}/{self.device_id}"


class SimNode:
    __slots__ = ("node_id", "devices", "true_bw", "measured_bw", "dram", "ssd", "ssd_used",
                 "holdings", "tier_until", "true_tier_until", "version", "cached", "cached_at")

    def __init__(self, node_id: str, true_bw: dict[str, float], measured_bw: dict[str, float],
                 dram_bytes: int = 0) -> None:
        self.node_id = node_id
        self.devices: list[SimDevice] = []
        self.true_bw = true_bw
        self.measured_bw = measured_bw
        self.dram = SimDram(dram_bytes)  # the DRAM tier: its index and the live tier's eviction rule
        self.ssd: OrderedDict[str, int] = OrderedDict()
        self.ssd_used = 0
        self.holdings: dict[str, Tier] = {}
        self.tier_until: dict[str, float] = {"gpu": 0.0, "dram": 0.0, "ssd": 0.0, "remote": 0.0}  # published
        self.true_tier_until: dict[str, float] = {"gpu": 0.0, "dram": 0.0, "ssd": 0.0, "remote": 0.0}
        self.version = 0  # bumped on every change a NodeState shows (cache key with the time)
        self.cached: NodeState | None = None
        self.cached_at: tuple[float, int] = (-1.0, -1)

    @property
    def dram_used(self) -> int:
        return self.dram.used
