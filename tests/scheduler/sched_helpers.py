"""Test helpers: a static ClusterView answered without indexes, and NodeState builders."""

from __future__ import annotations

from collections.abc import Sequence

from ember.scheduler.view import DeviceState, NodeState

GB = 10**9


class StaticView:
    def __init__(self, nodes: list[NodeState], prefetching: dict[str, set[str]] | None = None) -> None:
        self.by_id = {n.node_id: n for n in nodes}
        self.in_flight = prefetching or {}  # checkpoint -> nodes a prefetch of it is in flight to

    def prefetching(self, checkpoint: str) -> set[str]:
        return set(self.in_flight.get(checkpoint, ()))

    def node(self, node_id: str) -> NodeState | None:
        return self.by_id.get(node_id)

    def nodes_holding(self, checkpoint: str, limit: int | None = None) -> Sequence[NodeState]:
        rank = {"gpu": 0, "dram": 1, "ssd": 2}
        held = sorted((n for n in self.by_id.values() if checkpoint in n.holdings),
                      key=lambda n: rank[n.holdings[checkpoint]])
        return held if limit is None else held[:limit]

    def devices_with_room(self, nbytes: int, limit: int = 16, spread: bool = False) -> Sequence[DeviceState]:
        ds = [d for n in self.by_id.values() for d in n.devices if d.free_bytes >= nbytes]
        if spread:
            ds.sort(key=lambda d: (-d.free_bytes, d.queue_s))
        else:
            ds.sort(key=lambda d: (not d.awake, d.queue_s, d.free_bytes))
        return ds[:limit]

    def nodes(self, node_ids: Sequence[str]) -> Sequence[NodeState]:
        return [self.by_id[n] for n in node_ids if n in self.by_id]

    def node_ids(self) -> Sequence[str]:
        return list(self.by_id)

    def all_nodes(self) -> Sequence[NodeState]:
        return list(self.by_id.values())


def make_node(node_id: str, *, free: list[int], holdings: dict | None = None, awake: list[bool] | None = None,
              idle: list[int] | None = None, bw: dict | None = None, queue: list[float] | None = None) -> NodeState:
    devices = tuple(
        DeviceState(node_id, f"cuda:{i}", 80 * GB, f, instances=int((awake or [False] * len(free))[i]),
                    queue_s=(queue or [0.0] * len(free))[i], awake=(awake or [False] * len(free))[i],
                    idle_bytes=(idle or [0] * len(free))[i])
        for i, f in enumerate(free)
    )
    return NodeState(node_id, devices, bw or {"gpu": 200e9, "dram": 25e9, "ssd": 8e9, "remote": 1.25e9},
                     holdings or {})


