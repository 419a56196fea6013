"""What the cluster records in Redis, as plain data: devices, instances (with their lifecycle),
placements, and the parsers of the compact rows the snapshot scripts return.

Instance lifecycle (one owner per transition, each one atomic step in Redis):

    claimed  -- the gateway placed it: device memory booked, `deadline_s` = now + claim_timeout_s
    loading  -- the worker accepted the load (begin_load); its heartbeats extend the deadline
    ready    -- the worker built it (mark_ready); only ready instances take requests
    draining -- unload asked (keep-alive, eviction, delete): no new requests; the worker drops it
                when it has no active request, then removes it
    gone     -- the record is deleted and the claim freed (remove_instance)

A claimed or loading instance past its deadline is reaped (`reap_stuck`, and the heartbeat of its
node). The worker publishes what it really holds on every heartbeat and re-registration: Redis
drops instances the worker does not have, the worker drops instances Redis does not know.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import cast

from ember.scheduler.view import TIER_RANK as _TIER_RANK
from ember.scheduler.view import DeviceState, NodeState, Tier


class InstanceState(str, Enum):
    CLAIMED = "claimed"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


STARTING_STATES = frozenset({InstanceState.CLAIMED.value, InstanceState.LOADING.value})


@dataclass(frozen=True)
class DeviceSpec:
    """A device a worker offers: an id ("cuda:0", "cpu:1") and its memory for instances."""

    device_id: str
    memory_bytes: int
    uuid: str = ""  # the GPU's UUID ("GPU-..."), how a GPU is identified across workers and NVML


@dataclass
class InstanceRecord:
    """One function instance on one device, as Redis records it (see the lifecycle above)."""

    instance_id: str
    function: str
    checkpoint: str
    node_id: str
    device_id: str
    worker_url: str
    state: str
    outstanding: int
    nbytes: int
    created_s: float
    last_used_s: float
    tier: str = "remote"  # where the checkpoint was when the instance was placed
    deadline_s: float = 0.0  # claimed/loading: reaped after this (wall clock)
    slot_id: str = ""  # set on a record returned by acquire_warm: the request slot it holds
    kv_bytes: int = 0  # the instance's KV-cache budget, claimed on top of the (shared) weights

    @classmethod
    def from_hash(cls, instance_id: str, h: dict[str, str]) -> InstanceRecord:
        return cls(
            instance_id=instance_id,
            function=h.get("function", ""),
            checkpoint=h.get("checkpoint", ""),
            node_id=h.get("node_id", ""),
            device_id=h.get("device_id", ""),
            worker_url=h.get("worker_url", ""),
            state=h.get("state", "loading"),
            outstanding=int(h.get("outstanding", 0)),
            nbytes=int(h.get("nbytes", 0)),
            created_s=float(h.get("created_s", 0.0)),
            last_used_s=float(h.get("last_used_s", 0.0)),
            tier=h.get("tier", "remote"),
            deadline_s=float(h.get("deadline_s", 0.0) or 0.0),
            kv_bytes=int(h.get("kv_bytes", 0) or 0),
        )

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k not in ("instance_id", "slot_id")}

    @property
    def starting(self) -> bool:
        return self.state in STARTING_STATES


@dataclass(frozen=True)
class Placement:
    """Where a cold start goes: the claimed device and the estimate that chose it."""

    instance_id: str
    node_id: str
    device_id: str
    worker_url: str
    tier: str
    estimate_s: float
    ssd_bps: float = 0.0  # the node's learned SSD bandwidth as the decision read it (0: unknown)


@dataclass(frozen=True)
class Heartbeat:
    """What Redis answered a worker's beat: instances to drop, to unload when idle, removed."""

    known: bool
    unknown: tuple[str, ...] = ()
    draining: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.known


TIER_RANK = _TIER_RANK  # the scheduler's (ember.scheduler.view), one table for both backends


def pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def node_entry(entry: list, now: float) -> NodeState:
    """Parse a node entry of the snapshot scripts (lib_node_entry.lua)."""
    node_id, bw, holdings = entry[0], entry[1], pairs(entry[2])
    devices = tuple(compact_device(node_id, row, now) for row in entry[3:])
    bandwidth, tier_queue = parse_bandwidth_and_queues(bw, now)
    return NodeState(node_id=node_id, devices=devices, bandwidth_bps=bandwidth,
                     holdings=cast("dict[str, Tier]", holdings), tier_queue_s=tier_queue)


def parse_bandwidth_and_queues(flat: str, now: float) -> tuple[dict[str, float], dict[str, float]]:
    """Parse "tier=bps;...;tq:tier=busy_until;..." into (bandwidths, tier load queues in seconds
    from `now`, only those still in the future: ember.platform.loadqueues)."""
    bandwidth: dict[str, float] = {}
    queues: dict[str, float] = {}
    for kv in flat.split(";"):
        if not kv:
            continue
        k, v = kv.split("=", 1)
        if k.startswith("tq:"):
            left = float(v) - now
            if left > 0:
                queues[k[3:]] = left
        else:
            bandwidth[k] = float(v)
    return bandwidth, queues


def room_devices(rows: list[str], nbytes: int, now: float) -> list[DeviceState]:
    """Parse "node/device,memory,claimed,instances,busy_until,idle_bytes" rows, keeping those with room."""
    out = []
    for row in rows:
        member, rest = row.split(",", 1)
        node_id, device_id = member.split("/", 1)
        d = compact_device(node_id, f"{device_id},{rest}", now)
        if d.free_bytes >= nbytes:
            out.append(d)
    return out


def compact_device(node_id: str, row: str, now: float) -> DeviceState:
    """Parse "device_id,memory,claimed,instances,busy_until,idle_bytes" (device ids hold no commas)."""
    device_id, memory, claimed, instances, busy, idle = row.rsplit(",", 5)
    mem, n = int(memory), int(instances)
    return DeviceState(node_id=node_id, device_id=device_id, memory_bytes=mem,
                       free_bytes=max(0, mem - int(claimed)), instances=n,
                       queue_s=max(0.0, float(busy) - now), awake=n > 0, idle_bytes=int(idle))
