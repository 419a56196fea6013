"""A simulated node's DRAM checkpoint tier: its index (bytes, keep, last use per checkpoint) and
the live tier's eviction rule (`ember.loader.retention.victim`: the lowest keep, then the least
recently used, then the name), asked only about the entries that can win.

Entries of each keep sit in use order (the simulation's clock never goes back), so the live
rule's winner is among the front entries of the lowest keep that share its oldest use: `victim`
is called on those alone, not on the whole index (a node holds hundreds of entries and the hour
evicts tens of thousands of times).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from ember.loader.retention import victim

__all__ = ["SimDram"]


class SimDram:
    __slots__ = ("capacity", "entries", "order", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: dict[str, list] = {}  # checkpoint -> [bytes, keep, last used]
        self.order: dict[int, OrderedDict[str, None]] = {}  # keep -> checkpoints, least recently used first
        self.used = 0

    def __contains__(self, ck: object) -> bool:
        return ck in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, ck: str) -> list:
        return self.entries[ck]

    def put(self, ck: str, nbytes: int, keep: int, now: float) -> list[str] | None:
        """`ck` used at `now` with retention priority `keep` (the latest use sets it, as live),
        added if absent. Returns the checkpoints evicted to make room; None when it cannot be
        cached at all (larger than the tier)."""
        e = self.entries.get(ck)
        if e is not None:
            if e[1] != keep:
                del self.order[e[1]][ck]
                e[1] = keep
                self.order.setdefault(keep, OrderedDict())[ck] = None
            self.touch(ck, now)
            return []
        if nbytes > self.capacity:
            return None
        self.entries[ck] = [nbytes, keep, now]
        self.order.setdefault(keep, OrderedDict())[ck] = None
        self.used += nbytes
        gone: list[str] = []
        while self.used > self.capacity:
            old = self._victim(ck)
            if old is None:
                break
            nb, k, _ = self.entries.pop(old)
            del self.order[k][old]
            self.used -= nb
            gone.append(old)
        return gone

    def touch(self, ck: str, now: float) -> None:
        """`ck`, if held, used at `now`, its keep unchanged (the live tier's `DramTier.touch`)."""
        e = self.entries.get(ck)
        if e is not None:
            self.order[e[1]].move_to_end(ck)
            e[2] = now

    def _victim(self, spare: str) -> str | None:
        """The live rule's choice among every entry but `spare` (the one being added)."""
        for k in sorted(self.order):
            first: list[tuple[str, int, float]] = []
            for ck in self.order[k]:
                if ck == spare:
                    continue
                t = self.entries[ck][2]
                if first and t != first[0][2]:
                    break
                first.append((ck, k, t))
            if first:
                return victim(first)
        return None

    def clear(self) -> None:
        self.entries.clear()
        self.order.clear()
        self.used = 0
