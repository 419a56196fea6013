"""The retention rule of a node's DRAM checkpoint tier: which unpinned entry goes first when a new
one needs room.

Each entry carries an integer retention priority `keep` (0 unless the load asked for more: the
scheduler asks 1 for a checkpoint whose cold start from the node's SSD would miss its function's
TTFT SLO). The lowest keep goes first, then the least recently used, then the lowest name, so the
choice is deterministic. Two callers use this one function, so they evict alike: the live DRAM
tier (`ember.loader.dram.DramTier.allocate`) and the simulator's in-memory cluster.
"""

from __future__ import annotations

from collections.abc import Iterable


def victim(candidates: Iterable[tuple[str, int, float]]) -> str | None:
    """(name, keep, last_used) of unpinned entries -> the name to evict first: the lowest keep, then
    the least recently used, then the lowest name. None when there is none."""
    # one min() over (keep, last_used, name): called in the simulator's inner loop
    first = min(((keep, last_used, name) for name, keep, last_used in candidates), default=None)
    return None if first is None else first[2]
