"""The simulator's prefetches follow the live rule: one in flight to a node is published
(`MemCluster.prefetching`) until it lands, so the autoscaler never sends the same one again and
no checkpoint is copied twice at once into one node's DRAM."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

from ember.scheduler.autoscaler import Autoscaler, Prefetch
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation, build_trace


class _Recording(_Simulation):
    """A simulation that records each prefetch transfer it starts: (node, checkpoint) -> [(start, end)]."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.transfers: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        self.in_flight_seen = 0  # autoscaler steps that found a prefetch in flight

    def _start_prefetch(self, a: Prefetch, now: float) -> None:
        before = self.prefetches
        super()._start_prefetch(a, now)
        if self.prefetches > before:
            end = next(p[0] for p in self.pending_prefetch if p[1] == self.prefetches)
            self.transfers[(a.node_id, a.checkpoint)].append((now, end))

    def _autoscale(self, *args, **kw) -> None:
        self.in_flight_seen += bool(self.cluster.in_flight)
        super()._autoscale(*args, **kw)


def test_a_prefetch_in_flight_is_never_started_again() -> None:
    """Every transfer starts after the previous one of its (node, checkpoint) ended: as many
    transfers as distinct copies in flight. Before, the autoscaler asked again at every step until
    the copy landed and each ask moved the bytes once more (here 47 transfers of 8 copies, 39 while one ran)."""
    cfg = SimConfig(nodes=4, gpus_per_node=4, functions=150, duration_s=600.0, seed=1, autoscaler_interval_s=1.0).check()
    sim = _Recording(cfg, build_trace(cfg), get_policy("ember"), Autoscaler())
    sim.run(None)
    assert sim.prefetches > 0 and sim.in_flight_seen > 0
    overlapping = 0
    for spans in sim.transfers.values():
        for (_, end), (start, _) in pairwise(spans):
            overlapping += start < end
    assert overlapping == 0
    assert sim.prefetches == sum(len(s) for s in sim.transfers.values())
