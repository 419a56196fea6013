"""Demand per function: requests per second, smoothed over about `window_s`. The autoscaler's
prefetch rule reads it. The gateway feeds it each request it routes and reads it at each
autoscaler step (wall clock); the simulator does the same at its own clock."""

from __future__ import annotations

import time
from collections import defaultdict

FORGET_BELOW_PER_S = 1e-9  # a rate this low is no demand (prefetch needs ~0.05/s): forgotten


class DemandMeter:
    def __init__(self, window_s: float = 60.0, now: float | None = None) -> None:
        self.window_s = window_s
        self.counts: dict[str, int] = defaultdict(int)
        self.rates: dict[str, float] = {}
        self.last = time.monotonic() if now is None else now

    def count(self, function: str, n: int = 1) -> None:
        self.counts[function] += n

    def rates_per_s(self, now: float | None = None) -> dict[str, float]:
        """Fold the requests counted since the last call into each function's rate (an EWMA with
        weight elapsed / window) and return the rates (read-only: the meter never changes a dict it
        returned, each call builds a new one)."""
        now = time.monotonic() if now is None else now
        dt = max(now - self.last, 1e-3)
        alpha = min(1.0, dt / self.window_s)
        keep = 1 - alpha
        # keep * rate + alpha * count / dt for every function, in two passes over what changed: a
        # function without requests only decays (adding its 0.0 changes no bit), a new one starts at 0;
        # one decayed below FORGET_BELOW_PER_S is forgotten (deleted or idle functions, kept forever before)
        rates = {fn: keep * r for fn, r in self.rates.items() if keep * r >= FORGET_BELOW_PER_S}
        for fn, c in self.counts.items():
            rates[fn] = rates.get(fn, 0.0) + alpha * c / dt
        self.counts.clear()
        self.last = now
        self.rates = rates
        return rates
