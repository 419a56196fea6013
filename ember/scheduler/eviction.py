"""Making room for a cold start when no device has free memory: evict idle instances.

Pure: the platform's gateway (and tests) hand in what Redis says; nothing here touches state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class IdleInstance:
    """A ready instance with no outstanding request."""

    instance_id: str
    function: str
    device_key: str  # "node/device"
    nbytes: int
    last_used_s: float


def choose_evictions(
    nbytes: int,
    free_bytes: Mapping[str, int],
    idle: Sequence[IdleInstance],
    spare: Mapping[str, int],
) -> list[IdleInstance]:
    """The idle instances to evict so that one device has `nbytes` free: on each device the least
    recently used go first, and the device needing the fewest evictions wins (then the one whose
    victims were idle longest). `spare[f]`: how many instances of function f may go (those above its
    min_instances). [] when no device can be freed enough."""
    by_device: dict[str, list[IdleInstance]] = defaultdict(list)
    for inst in idle:
        if inst.device_key in free_bytes:
            by_device[inst.device_key].append(inst)
    best: tuple[tuple[int, float, str], list[IdleInstance]] | None = None
    for key, group in by_device.items():
        room, left, chosen = free_bytes[key], dict(spare), []
        for inst in sorted(group, key=lambda i: (i.last_used_s, i.instance_id)):
            if room >= nbytes:
                break
            if left.get(inst.function, 0) <= 0:
                continue
            left[inst.function] -= 1
            chosen.append(inst)
            room += inst.nbytes
        if chosen and room >= nbytes:
            rank = (len(chosen), max(i.last_used_s for i in chosen), key)
            if best is None or rank < best[0]:
                best = (rank, chosen)
    return best[1] if best else []
