"""The `zeus_static` baseline of `ember energy sim`: Zeus-style power-limit profiling, run once,
then the same static SM clock knob Ember has."""

from __future__ import annotations

import numpy as np

from ember.energy.simulated import SimulatedGpu


class _ZeusStatic:
    """Zeus's power-limit optimizer, run once: each limit from the top for `windows_per_limit`
    intervals, the lowest ZeusCost (eta 0.5, per device) kept; then, with the same clock knob
    Ember gets, each static SM clock lock (from the top) at that limit, the lowest cost kept for
    the rest of the run. (Zeus itself profiles power limits only:
    github.com/ml-energy/zeus, `zeus.optimizer.power_limit.GlobalPowerLimitOptimizer`.)"""

    CLOCKS_MHZ = (None, 1800.0, 1600.0, 1400.0, 1200.0, 1000.0)  # None: unlocked

    def __init__(
        self, gpus: list[SimulatedGpu], interval_s: float, windows_per_limit: int = 6, eta: float = 0.5
    ) -> None:
        self.gpus = {g.device_id: g for g in gpus}
        self.eta = eta
        self.windows_per_limit = windows_per_limit
        lo, hi = gpus[0].power_limit_range_w()
        self.limits = [float(w) for w in np.arange(hi, lo - 1, -50.0)]
        self.index = 0
        self.windows = 0
        self.done = False
        self.marks = {d: g.energy_j() for d, g in self.gpus.items()}
        self.tokens: dict[str, float] = dict.fromkeys(self.gpus, 0.0)
        self.latency: dict[str, float] = dict.fromkeys(self.gpus, 0.0)
        self.profile: dict[str, dict[float, list[float]]] = {d: {} for d in self.gpus}
        self.clock_index = -1  # -1: still sweeping limits
        self.clock_profile: dict[str, dict[float | None, float]] = {d: {} for d in self.gpus}

    def observe(self, device_id: str, output: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> None:
        if self.done:
            return
        self.tokens[device_id] += float(output.sum())
        self.latency[device_id] += float((ttft + tpot * np.maximum(output - 1, 0)).sum())

    def step(self) -> int:
        """End one interval; returns the number of setting changes made."""
        if self.done:
            return 0
        self.windows += 1
        if self.windows < self.windows_per_limit:
            return 0
        sweeping_clocks = self.clock_index >= 0
        for d, g in self.gpus.items():
            energy = g.energy_j() - self.marks[d]
            self.marks[d] = g.energy_j()
            if self.tokens[d] > 0:
                j_tok = energy / self.tokens[d]
                s_tok = self.latency[d] / self.tokens[d]
                cost = self.eta * j_tok + (1 - self.eta) * g.power_limit_range_w()[1] * s_tok
                if sweeping_clocks:
                    self.clock_profile[d][self.CLOCKS_MHZ[self.clock_index]] = cost
                else:
                    self.profile[d][self.limits[self.index]] = [cost]
            self.tokens[d] = self.latency[d] = 0.0
        self.windows = 0
        if sweeping_clocks:
            return self._next_clock()
        self.index += 1
        if self.index < len(self.limits):
            for g in self.gpus.values():
                g.set_power_limit_w(self.limits[self.index])
            return len(self.gpus)
        for d, g in self.gpus.items():
            costs = self.profile[d]
            best = min(costs, key=lambda w: costs[w][0]) if costs else g.default_power_limit_w()
            g.set_power_limit_w(best)
            if costs:
                self.clock_profile[d][None] = costs[best][0]  # unlocked at the best limit: profiled already
        self.clock_index = 0
        return self._next_clock()

    def _next_clock(self) -> int:
        """Lock the next static clock to profile; after the last, keep the cheapest per device."""
        self.clock_index += 1
        if self.clock_index < len(self.CLOCKS_MHZ):
            for g in self.gpus.values():
                g.lock_sm_clock_mhz(self.CLOCKS_MHZ[self.clock_index])
            return len(self.gpus)
        self.done = True
        for d, g in self.gpus.items():
            costs = self.clock_profile[d]
            g.lock_sm_clock_mhz(min(costs, key=lambda c: costs[c]) if costs else None)
        return len(self.gpus)
