"""`ember sim --fleet-bound SIZES`: the most node-hours any node scaler could save on a trace within
an SLO-attainment bound, measured on fixed fleets.

A node scaler can do no better in a stretch of the trace than a fleet of the size it keeps there
whose caches are as warm as they get: a fixed fleet of that size that has run the whole trace
(no boot lag, no node drained with its DRAM and instance-store copies, no request waiting for a
node to come up). So: run the `ember` policy on fixed fleets of each size in SIZES (the fleet's
SSD total kept at the largest fleet's, so that a smaller fleet loses DRAM and GPUs, not checkpoint
copies: in its favour), count SLO misses per time bin, and choose one size per bin to minimise
misses under a mean fleet size. That schedule is optimistic for any scaler on the same sizes and
bins; what it cannot reach, no node scaler reaches in this simulator.

Reported: each fixed fleet (attainment, misses per bin), the best schedule at the target cut
(default 40% fewer node-hours than the largest size), and the largest cut whose best schedule
stays within `allowed_drop` of the largest fixed fleet's attainment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation
from ember.scheduler.trace import Trace

__all__ = ["best_schedule", "fleet_bound", "fixed_fleet_bins"]


def fixed_fleet_bins(cfg: SimConfig, trace: Trace, nodes: int, bin_s: float, *, ssd_total_bytes: int,
                     policy: str = "ember", progress: Callable[[float], None] | None = None) -> dict:
    """One fixed fleet of `nodes` on `trace`: its attainment and SLO misses per `bin_s` bin."""
    sized = replace(cfg, nodes=nodes, ssd_bytes=ssd_total_bytes // nodes).check()
    sim = _Simulation(sized, trace, get_policy(policy, seed=cfg.seed), Autoscaler())
    res = sim.run((lambda _, frac: progress(frac)) if progress else None)
    bins, nbins = _bins(trace, bin_s)
    missed = np.bincount(bins[~res.slo_met], minlength=nbins)
    return {"nodes": nodes, "slo_attainment": round(float(res.slo_met.mean()) if res.slo_met.size else 1.0, 6),
            "misses_per_bin": [int(m) for m in missed], "cold_starts": res.loads}


def _bins(trace: Trace, bin_s: float) -> tuple[np.ndarray, int]:
    """Each arrival's bin, and how many bins the trace's duration has."""
    nbins = max(1, math.ceil(trace.duration_s / bin_s))
    return np.minimum((trace.arrival_s // bin_s).astype(np.int64), nbins - 1), nbins


def _schedules(misses: dict[int, Sequence[int]]) -> dict[int, tuple[int, list[int]]]:
    """Every sum of sizes over the bins -> the fewest misses of a schedule with that sum, and that
    schedule (one size per bin). Dynamic programming over the running sum."""
    sizes = sorted(misses)
    nbins = len(next(iter(misses.values()))) if misses else 0
    if any(len(m) != nbins for m in misses.values()):
        raise ConfigError("best_schedule: every size needs the same bins")
    best: dict[int, tuple[int, list[int]]] = {0: (0, [])}
    for b in range(nbins):
        nxt: dict[int, tuple[int, list[int]]] = {}
        for total, (m, sched) in best.items():
            for size in sizes:
                t, cand = total + size, m + int(misses[size][b])
                if t not in nxt or cand < nxt[t][0]:
                    nxt[t] = (cand, [*sched, size])
        best = nxt
    return best


def _key(entry: tuple[int, list[int]]) -> tuple[int, int]:
    return entry[0], sum(entry[1])  # the fewest misses, then the fewest node-bins


def best_schedule(misses: dict[int, Sequence[int]], max_node_bins: int) -> tuple[int, list[int]] | None:
    """One size per bin (keys of `misses`: size -> misses per bin) with sum(sizes) <= `max_node_bins`,
    minimising total misses: (misses, sizes per bin), or None when even the smallest sizes exceed it."""
    fits = [v for t, v in _schedules(misses).items() if t <= max_node_bins]
    return min(fits, key=_key) if fits else None


def fleet_bound(cfg: SimConfig, trace: Trace, sizes: Sequence[int], *, bin_s: float = 600.0, cut: float = 0.40,
                allowed_drop: float = 0.005, policy: str = "ember",
                progress: Callable[[str, float], None] | None = None) -> dict:
    """The `{"fleet_bound": ...}` document (see the module docstring)."""
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError("--fleet-bound: give positive fleet sizes, e.g. 60,75,90,100,125")
    if bin_s <= 0 or not 0 < cut < 1 or allowed_drop < 0:
        raise ConfigError("--fleet-bound: need bin_s > 0, 0 < cut < 1 and allowed_drop >= 0")
    ref = sizes[-1]
    ssd_total = cfg.ssd_bytes * ref
    fixed = {}
    for size in sizes:
        fixed[size] = fixed_fleet_bins(cfg, trace, size, bin_s, ssd_total_bytes=ssd_total, policy=policy,
                                       progress=(lambda frac, n=size: progress(f"fixed {n}", frac)) if progress else None)
    total = len(trace)
    bins, nbins = _bins(trace, bin_s)
    table = _schedules({s: fixed[s]["misses_per_bin"] for s in sizes})  # one DP for every question below
    floor_att = fixed[ref]["slo_attainment"] - allowed_drop

    def described(got: tuple[int, list[int]]) -> dict:
        m, sched = got
        mean = sum(sched) / nbins
        return {"mean_nodes": round(mean, 3), "node_hours_cut": round(1 - mean / ref, 4),
                "slo_attainment": round(1 - m / total, 6) if total else 1.0, "nodes_per_bin": sched}

    cap = int(math.floor(ref * (1 - cut) * nbins + 1e-9))
    fits = [v for t, v in table.items() if t <= cap]
    at_cut = described(min(fits, key=_key)) if fits else None
    # the largest cut within the bound: the smallest node-bin sum whose best schedule holds it
    largest = None
    best_so_far: tuple[int, list[int]] | None = None
    for t in sorted(table):
        if best_so_far is None or _key(table[t]) < _key(best_so_far):
            best_so_far = table[t]
        if described(best_so_far)["slo_attainment"] >= floor_att:
            largest = described(best_so_far)
            break
    return {"fleet_bound": {
        "reference_nodes": ref, "bin_s": bin_s, "bins": nbins, "invocations": total,
        "invocations_per_bin": [int(c) for c in np.bincount(bins, minlength=nbins)],
        "fixed": {str(s): fixed[s] for s in sizes},
        "slo_attainment_floor": round(floor_att, 6),
        "at_target_cut": {"cut": cut, **(at_cut or {})},
        "target_reachable": bool(at_cut is not None and at_cut["slo_attainment"] >= floor_att),
        "largest_cut_within_floor": largest,
    }}
