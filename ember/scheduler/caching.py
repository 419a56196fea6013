"""What a node's DRAM tier keeps longest: the retention priority (`keep`) a load or a prefetch
asks for, decided here for the gateway and the simulator alike.

A node's DRAM tier evicts the lowest `keep` first, then the least recently used
(`ember.loader.retention.victim`, the one rule of the live tier and the simulator's). Under a
policy with an SLO-aware cache (`slo_aware_cache = True`: `ember`), a checkpoint whose cold start
from the node's SSD would miss its function's TTFT SLO (`nbytes / ssd bandwidth > SLO`: the
largest models) gets `keep` 1: a DRAM copy of it is worth an SLO; one of a model the SSD loads
in time is worth a fraction of a second, and goes first. Other policies keep 0: plain LRU, the
tier every baseline had.

Measured on the README's simulated hour (1,000 GPUs, 10,000 functions, seed 0): with plain LRU
the DRAM tier turns over every ~3.5 minutes, so a large model called every few minutes loads
from SSD (8-9 s for 60-70 GB) nearly every time; its copy kept first, it loads from DRAM.
"""

from __future__ import annotations

from typing import Any

from ember.scheduler.estimator import DEFAULT_BANDWIDTH_BPS

__all__ = ["KEEP_SLO", "dram_keep", "slo_aware_cache"]

KEEP_SLO = 1  # the copy saves an SLO: kept before every copy that does not


def slo_aware_cache(policy: Any) -> bool:
    """Whether `policy` asks DRAM tiers to keep SLO-saving copies first (else plain LRU)."""
    return bool(getattr(policy, "slo_aware_cache", False))


def dram_keep(slo_aware: bool, nbytes: int, ttft_slo_s: float, ssd_bps: float | None) -> int:
    """The `keep` of a DRAM copy of an `nbytes` checkpoint on a node whose SSD reads at `ssd_bps`
    (its learned bandwidth; None or <= 0: the default) for a function with TTFT SLO `ttft_slo_s`."""
    if not slo_aware or nbytes <= 0:
        return 0
    bps = ssd_bps if ssd_bps is not None and ssd_bps > 0 else DEFAULT_BANDWIDTH_BPS["ssd"]
    return KEEP_SLO if nbytes / bps > ttft_slo_s else 0
