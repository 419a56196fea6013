"""The knobs' ladders a `PowerLimitController` walks from the top, and the Zeus-style fit that
ends its profiling: one record per (clock, limit) level profiled, and the slope of the ZeusCost
`eta * J/token + (1 - eta) * s/token` per step down, through every level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.energy.device import Device, nearest_clock_mhz

DEFAULT_CLOCK_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
LIMIT_STEP_W = 50.0


def clock_ladder(device: Device, clock_fractions: Sequence[float]) -> list[float | None]:
    """Unlocked, then each lower fraction of the top clock snapped to the nearest clock the
    device supports (a lock NVML would refuse or round otherwise), each clock once."""
    top_clock = device.max_sm_clock_mhz()
    supported = device.supported_sm_clocks_mhz()
    ladder: list[float | None] = [None]
    for f in clock_fractions[1:]:
        clock = nearest_clock_mhz(f * top_clock, supported)
        if clock is not None and clock not in ladder:
            ladder.append(clock)
    return ladder


def limit_ladder(lo_w: float, hi_w: float) -> list[float]:
    """Power limits from `hi_w` down in LIMIT_STEP_W steps, none below `lo_w`."""
    limits: list[float] = []
    w = hi_w
    while w >= lo_w:
        limits.append(w)
        w -= LIMIT_STEP_W
    return limits


@dataclass
class ProfileLevel:
    """Profile record for one (clock, limit) level."""

    j_per_token: float = 0.0
    s_per_token: float = 0.0
    windows: int = 0
    safe: bool = True


def zeus_cost_slope(levels: dict[tuple[int, int], ProfileLevel], eta: float) -> tuple[float, float] | None:
    """(slope, standard error) per step down of the ZeusCost `eta * E/E0 + (1 - eta) * T/T0`
    (E: J/token, T: s/token, 0: the top), from a least-squares line through the profiled levels:
    one window's J/token is noisy (load moves), a line through every level much less. None: too
    few levels."""
    points = sorted((float(c + li), v.j_per_token, v.s_per_token) for (c, li), v in levels.items())
    if len({p[0] for p in points}) < 3:
        return None
    xs = [p[0] for p in points]
    j0, _, _ = _line(xs, [p[1] for p in points])
    s0, _, _ = _line(xs, [p[2] for p in points])
    if j0 <= 0 or s0 <= 0:
        return None
    _, slope, se = _line(xs, [eta * p[1] / j0 + (1 - eta) * p[2] / s0 for p in points])
    return slope, se


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Ordinary least squares: (intercept, slope, standard error of the slope)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    resid = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    se = (resid / (n - 2) / sxx) ** 0.5 if n > 2 and sxx > 0 else float("inf")
    return intercept, slope, se
