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
    bins = _bin_of(trace, bin_s)
    nbins = int(bins.max()) + 1 if bins.size else 0
    missed = np.bincount(bins[~res.slo_met], minlength=nbins)
    return {"nodes": nodes, "slo_attainment": round(float(res.slo_met.mean()) if res.slo_met.size else 1.0, 6),
            "misses_per_bin": [int(m) for m in missed[:nbins]], "cold_starts": res.loads}


def _bin_of(trace: Trace, bin_s: float) -> np.ndarray:
    last = max(0, math.ceil(trace.duration_s / bin_s) - 1)
    return np.minimum((trace.arrival_s // bin_s).astype(np.int64), last)


def best_schedule(misses: dict[int, Sequence[int]], max_node_bins: int) -> tuple[int, list[int]] | None:
    """One size per bin (keys of `misses`: size -> misses per bin) with sum(sizes) <= `max_node_bins`,
    minimising total misses: (misses, sizes per bin), or None when even the smallest sizes exceed it.
    Dynamic programming over the running sum of sizes."""
    sizes = sorted(misses)
    nbins = len(next(iter(misses.values()))) if misses else 0
    if any(len(m) != nbins for m in misses.values()):
        raise ConfigError("best_schedule: every size needs the same bins")
    # best[s] = (misses, schedule) over the bins so far with sizes summing to s
    best: dict[int, tuple[int, list[int]]] = {0: (0, [])}
    for b in range(nbins):
        nxt: dict[int, tuple[int, list[int]]] = {}
        for total, (m, sched) in best.items():
            for size in sizes:
                t = total + size
                if t > max_node_bins:
                    break
                cand = m + int(misses[size][b])
                if t not in nxt or cand < nxt[t][0]:
                    nxt[t] = (cand, [*sched, size])
        best = nxt
    if not best:
        return None
    return min(best.values(), key=lambda v: (v[0], sum(v[1])))


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
    nbins = len(fixed[ref]["misses_per_bin"])
    misses = {s: fixed[s]["misses_per_bin"] for s in sizes}
    floor_att = fixed[ref]["slo_attainment"] - allowed_drop

    def schedule(max_mean: float) -> dict | None:
        got = best_schedule(misses, int(math.floor(max_mean * nbins + 1e-9)))
        if got is None:
            return None
        m, sched = got
        mean = sum(sched) / nbins
        return {"mean_nodes": round(mean, 3), "node_hours_cut": round(1 - mean / ref, 4),
                "slo_attainment": round(1 - m / total, 6) if total else 1.0, "nodes_per_bin": sched}

    at_cut = schedule(ref * (1 - cut))
    # the largest cut within the bound: the smallest node-bin sum whose best schedule holds it
    largest = None
    for node_bins in range(sizes[0] * nbins, ref * nbins + 1):
        s = schedule(node_bins / nbins)
        if s is not None and s["slo_attainment"] >= floor_att:
            largest = s
            break
    return {"fleet_bound": {
        "reference_nodes": ref, "bin_s": bin_s, "bins": nbins, "invocations": total,
        "invocations_per_bin": [int(c) for c in np.bincount(_bin_of(trace, bin_s), minlength=nbins)[:nbins]],
        "fixed": {str(s): fixed[s] for s in sizes},
        "slo_attainment_floor": round(floor_att, 6),
        "at_target_cut": {"cut": cut, **(at_cut or {})},
        "target_reachable": bool(at_cut is not None and at_cut["slo_attainment"] >= floor_att),
        "largest_cut_within_floor": largest,
    }}
