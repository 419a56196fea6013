"""Making room for a cold start when no device has free memory: evict idle instances.

Pure: the platform's gateway (and tests) hand in what Redis says; nothing here touches state.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ember.scheduler.memory import release_bytes


def makes_room(policy: Any) -> bool:
    """Whether a cold start placed by `policy` may evict idle instances when no device has room
    (the gateway's `InstanceStarter._make_room` and the simulator's `_relieve_pressure` both ask):
    not for a baseline whose published scheduler never does (`evicts = False`), whose request
    waits for a device instead."""
    return bool(getattr(policy, "evicts", True))


@dataclass(frozen=True)
class IdleInstance:
    """A ready instance with no outstanding request."""

    instance_id: str
    function: str
    device_key: str  # "node/device"
    nbytes: int
    last_used_s: float
    checkpoint: str = ""
    kv_bytes: int = 0  # its KV budget: freed with it
    holders: int = 1  # instances on its device sharing its checkpoint's weights (busy ones too)


def choose_evictions(
    nbytes: int,
    free_bytes: Mapping[str, int],
    idle: Sequence[IdleInstance],
    spare: Mapping[str, int],
) -> list[IdleInstance]:
    """The idle instances to evict so that one device has `nbytes` free: on each device the least
    recently used go first, and the device needing the fewest evictions wins (then the one whose
    victims were idle longest). `spare[f]`: how many instances of function f may go (those above its
    min_instances). [] when no device can be freed enough. An instance frees its KV budget, and
    its checkpoint's weights only with the last instance on the device that shares them."""
    by_device: dict[str, list[IdleInstance]] = defaultdict(list)
    for inst in idle:
        if inst.device_key in free_bytes:
            by_device[inst.device_key].append(inst)
    best: tuple[tuple[int, float, str], list[IdleInstance]] | None = None
    for key, group in by_device.items():
        room, left, chosen = free_bytes[key], dict(spare), []
        sharing = {i.checkpoint: i.holders for i in group}
        for inst in sorted(group, key=lambda i: (i.last_used_s, i.instance_id)):
            if room >= nbytes:
                break
            if left.get(inst.function, 0) <= 0:
                continue
            left[inst.function] -= 1
            chosen.append(inst)
            sharing[inst.checkpoint] -= 1
            room += release_bytes(inst.nbytes, inst.kv_bytes, sharing[inst.checkpoint] <= 0)
        if chosen and room >= nbytes:
            rank = (len(chosen), max(i.last_used_s for i in chosen), key)
            if best is None or rank < best[0]:
                best = (rank, chosen)
    return best[1] if best else []


class EvictableInstance(Protocol):
    """What eviction reads of an instance (the live InstanceRecord and the simulator's satisfy it)."""

    instance_id: str
    function: str
    node_id: str
    device_id: str
    state: str
    outstanding: int
    nbytes: int
    last_used_s: float


def plan_evictions(nbytes: int, free_bytes: Mapping[str, int], instances: Iterable[EvictableInstance], *,
                   for_function: str, min_instances: Mapping[str, int]) -> list[IdleInstance]:
    """`choose_evictions` over `instances` (all of the cluster's, or those of some devices): the
    idle ones (ready, nothing outstanding) of functions other than `for_function` may go, never
    taking a function below its `min_instances`. The gateway and the simulator both call this."""
    insts = list(instances)
    holders = Counter((i.node_id, i.device_id, getattr(i, "checkpoint", "")) for i in insts)
    idle = [IdleInstance(i.instance_id, i.function, f"{i.node_id}/{i.device_id}", i.nbytes, i.last_used_s,
                         getattr(i, "checkpoint", ""), getattr(i, "kv_bytes", 0),
                         holders[(i.node_id, i.device_id, getattr(i, "checkpoint", ""))])
            for i in insts if i.state == "ready" and i.outstanding == 0 and i.function != for_function]
    if not idle:
        return []
    counts = Counter(i.function for i in insts)
    spare = {f: n - min_instances.get(f, 0) for f, n in counts.items()}
    return choose_evictions(nbytes, free_bytes, idle, spare)
