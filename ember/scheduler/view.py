"""The contract between placement policies and whoever keeps cluster state (Redis or the simulator).

Units: bytes, seconds, bytes per second. Tiers name where a checkpoint sits on a node, nearest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ember.scheduler.memory import claim_bytes

Tier = Literal["gpu", "dram", "ssd", "remote"]
TIERS: tuple[Tier, ...] = ("gpu", "dram", "ssd", "remote")
TIER_RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}  # nearest first (holders are sorted by it)


def tier_rank(tier: str | None) -> int:
    """Rank of a tier, nearest first; unknown or missing tiers rank as remote."""
    return TIER_RANK.get(tier or "remote", TIER_RANK["remote"])


# Snapshots below are plain slotted dataclasses, not frozen ones: a placement decision builds
# hundreds of them and frozen construction costs ~8x more. Treat them as read-only.
@dataclass(slots=True)
class DeviceState:
    """One device (a GPU, or a CPU slot on GPU-less nodes) as placement sees it."""

    node_id: str
    device_id: str  # "cuda:0", "cpu:1", ...
    memory_bytes: int
    free_bytes: int  # memory not held or claimed by instances
    instances: int = 0  # instances resident (loading or ready)
    queue_s: float = 0.0  # estimated wait before a new load could start here
    awake: bool = False  # ran work recently (consolidating onto awake devices saves idle energy)
    idle_bytes: int = 0  # what evicting its idle instances frees (`memory.evictable_bytes`; 0: never evict)

    @property
    def key(self) -> str:
        return f"{self.node_id}/{self.device_id}"


@dataclass(slots=True)
class NodeState:
    """A node: its devices, measured tier bandwidths and which checkpoints it holds where."""

    node_id: str
    devices: tuple[DeviceState, ...]
    bandwidth_bps: dict[str, float]  # tier -> bytes/s into device memory ("dram", "ssd", "remote")
    holdings: dict[str, Tier] = field(default_factory=dict)  # checkpoint -> nearest tier on this node
    tier_queue_s: dict[str, float] = field(default_factory=dict)  # tier -> wait before a load from it starts


def room_window(limit: int) -> int:
    """How many devices with room `devices_with_room(limit)` reads, in scan order, before ordering
    them: twice the answer, so a device slightly fuller than the first `limit` may still win by
    being awake or less queued."""
    return 2 * limit


def choose_room(scanned: Sequence[DeviceState], limit: int, spread: bool) -> list[DeviceState]:
    """`devices_with_room`'s answer in every backend, from the devices with room in scan order:
    least free first, ties by "node/device" (with `spread`: most free first, ties by "node/device"
    descending), as Redis's free-memory index lists them. The first `room_window(limit)` of them,
    in `room_order`, cut to `limit`."""
    return room_order(scanned[: room_window(limit)], spread)[:limit]


def room_order(devices: Sequence[DeviceState], spread: bool) -> list[DeviceState]:
    """The order `devices_with_room` answers in, in every backend: packing (awake, least queued,
    least free first) or, with `spread`, most free first; ties by "node/device"."""
    if spread:
        return sorted(devices, key=lambda d: (-d.free_bytes, d.queue_s, d.node_id, d.device_id))
    return sorted(devices, key=lambda d: (not d.awake, d.queue_s, d.free_bytes, d.node_id, d.device_id))


@dataclass(frozen=True)
class PlacementRequest:
    """A cold start to place."""

    function: str
    checkpoint: str
    nbytes: int
    ttft_slo_s: float = 1.0
    policy: str | None = None  # per-deployment override of the global policy
    max_instances: int | None = None  # the claim fails atomically once the function has this many
    kv_bytes: int = 0  # claimed beyond the weights: the instance's KV-cache budget (weights are shared per device)

    @property
    def room_bytes(self) -> int:
        """What a device must have free (or freeable) for this claim: the weights and the KV
        budget. (A device already holding the checkpoint's weights needs only the KV budget;
        asking for both there is conservative, never an overcommit.)"""
        return self.nbytes + self.kv_bytes

    def claim_bytes(self, weights_held: bool) -> int:
        """What the claim takes on a device that holds (`weights_held`) or lacks the checkpoint's
        weights: what eviction makes room for once a device is chosen (`memory.claim_bytes`)."""
        return claim_bytes(self.nbytes, self.kv_bytes, weights_held)


@dataclass(slots=True)
class StartupEstimate:
    node_id: str
    device_id: str
    tier: Tier
    seconds: float  # queue_wait + bytes / bandwidth(tier) (+ eviction cost)
    awake: bool = False


class ClusterView(Protocol):
    """What a policy may ask of the cluster. Implementations answer from indexes, not full scans,
    where the cluster is large (`nodes_holding`, `devices_with_room`)."""

    def node(self, node_id: str) -> NodeState | None: ...

    def nodes_holding(self, checkpoint: str, limit: int | None = None) -> Sequence[NodeState]:
        """Nodes with the checkpoint in a local tier (gpu/dram/ssd), nearest tier first;
        at most `limit` of them when given (popular checkpoints sit on many nodes)."""
        ...

    def devices_with_room(self, nbytes: int, limit: int = 16, spread: bool = False) -> Sequence[DeviceState]:
        """Up to `limit` devices with at least `nbytes` free, awake and least-queued first (packing);
        with `spread`, most free first (what load balancers without locality do)."""
        ...

    def nodes(self, node_ids: Sequence[str]) -> Sequence[NodeState]:
        """The live ones among `node_ids`, in one read where the store allows."""
        ...

    def prefetching(self, checkpoint: str) -> set[str]:
        """Ids of live nodes a prefetch of `checkpoint` into DRAM is in flight to: sent, not landed
        and not expired (`ember.scheduler.estimator.prefetch_expiry_s`)."""
        ...

    def node_ids(self) -> Sequence[str]:
        """Ids of every live node (cheap: no device or holdings reads)."""
        ...

    def all_nodes(self) -> Sequence[NodeState]:
        """Every live node (small clusters, baselines that scan)."""
        ...


class PlacementPolicy(Protocol):
    """Chooses a device for a cold start. The SAME objects run live and in the simulator."""

    name: str

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        """The chosen device and its estimate, or None if nothing can hold the model now."""
        ...
