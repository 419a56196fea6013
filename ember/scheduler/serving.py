"""Serving cost for cluster-wide energy (`ember sim --energy`): how long a request holds its
instance and what its GPU draws, given the batch it joins and the GPU's governor.

- Batching: requests on one instance decode together; a request joining `b` running ones has a
  decode step `decode_step_full_clock_s(params, b + 1)` (step time grows with the batch; the
  points and their source: docs/energy-calibration.md). Requests already running are not slowed
  by a later one (an optimistic simplification, the same for every policy).
- Governors (`max_power`: the GPU's default governor, 700 W, clocks unlocked; `ember`: the
  energy controller's rule per request: the lowest SM clock that keeps the request's TTFT within
  `ttft_margin` of its SLO and its decode within `tpot_slowdown` of full speed, one clock for
  both phases: conservative, since live engines can switch per phase and run decode lower).
Power and time at a clock come from ember.energy.simulated (the calibrated SimulatedGpu).
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.energy import simulated as gpu_model
from ember.errors import ConfigError

GOVERNORS = ("max_power", "ember")
_CLOCK_STEPS = tuple(round(1.0 - 0.05 * k, 2) for k in range(9))  # 1.00 .. 0.60 of the max SM clock


@dataclass(frozen=True)
class RequestCost:
    prefill_s: float  # elapsed prefill (TTFT after the request starts)
    held_s: float  # prefill + decode: time the request holds its slot
    prefill_w: float  # board power above idle while prefilling
    decode_w: float  # board power above idle while decoding


class ServingModel:
    """Per-request time and power under batching and a governor."""

    def __init__(self, governor: str = "max_power", *, ttft_margin: float = 0.8, tpot_slowdown: float = 1.05) -> None:
        if governor not in GOVERNORS:
            raise ConfigError(f"unknown governor {governor!r}; known: {', '.join(GOVERNORS)}")
        self.governor = governor
        self.ttft_margin = ttft_margin
        self.tpot_slowdown = tpot_slowdown
        idle = gpu_model.IDLE_POWER_W
        top = gpu_model.MAX_SM_CLOCK_MHZ
        # per clock step: (prefill time factor, decode time factor, prefill W above idle, decode W above idle)
        self.steps = [
            (f, gpu_model.phase_time_factor("prefill", sm_clock_mhz=f * top),
             gpu_model.phase_time_factor("decode", sm_clock_mhz=f * top),
             gpu_model.phase_power_w("prefill", sm_clock_mhz=f * top) - idle,
             gpu_model.phase_power_w("decode", sm_clock_mhz=f * top) - idle)
            for f in _CLOCK_STEPS
        ]
        self.clock_choices: dict[float, int] = {}

    def cost(self, prefill_full_s: float, step_full_s: float, output_tokens: int, batch: int,
             startup_s: float, ttft_slo_s: float) -> RequestCost:
        """`prefill_full_s`: its prefill at full clock; `step_full_s`: one decode step of the
        model alone at full clock; `batch`: requests decoding together once it joins."""
        step = step_full_s * (1.0 + gpu_model.DECODE_BATCH_PENALTY * max(0, batch - 1))
        decode_full = output_tokens * step
        chosen = self.steps[0]
        if self.governor == "ember":
            budget = self.ttft_margin * ttft_slo_s - startup_s
            for s in self.steps:
                if prefill_full_s * s[1] <= budget and s[2] <= self.tpot_slowdown:
                    chosen = s
                else:
                    break
        self.clock_choices[chosen[0]] = self.clock_choices.get(chosen[0], 0) + 1
        _, fp, fd, pw, dw = chosen
        pf = prefill_full_s * fp
        return RequestCost(pf, pf + decode_full * fd, pw, dw)
