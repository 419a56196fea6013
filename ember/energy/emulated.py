"""`EmulatedGpu`: a SimulatedGpu that lives on the wall clock of a live worker and is driven by the
work the engine really runs on it (CPU-only machines get a device that moves with load).

How time and energy are derived (never from CPU time, so CPU contention does not change them):

- The engine reports each forward pass (ember.energy.steps). Its GPU-equivalent work at full clock
  comes from the model's size and the calibration in ember.energy.simulated, taking the model as
  bf16 (parameters = weight bytes / 2):
  prefill: tokens x 2 x parameters FLOPs at PREFILL_FLOPS_PER_S (400 TFLOP/s);
  decode: the weight bytes read once per step at DECODE_BYTES_PER_S (2.5 TB/s), +2% per extra
  sequence in the step.
- `charge(phase, full_clock_s, sm_clock_mhz)` turns that into the elapsed seconds and the draw of
  the phase at the device's power limit and the given clock (calibration table), and books the
  step on the device's timeline: steps queue one after another (a GPU runs one at a time), so
  the draw never exceeds the phase's calibrated power.
- Between steps the device idles on the wall clock: 110 W within a second of the last step, 70 W
  otherwise. `energy_j()` integrates the timeline up to now; `power_w()` is the average since the
  previous reading (at most a second or two back; one heartbeat in a worker), as NVML's power
  reading averages over its own short window.
- The caller (the node's energy agent) makes the request wait `elapsed - full_clock_s`: the extra
  time a lower clock or cap costs, so latencies show the controller's decisions.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ember.energy.simulated import (
    DECODE_BATCH_PENALTY,
    DECODE_BYTES_PER_S,
    IDLE_POWER_W,
    PREFILL_FLOPS_PER_S,
    WARM_IDLE_POWER_W,
    WARM_IDLE_S,
    Phase,
    SimulatedGpu,
    phase_power_w,
    phase_time_factor,
)

POWER_WINDOW_S = 1.0
_UNSET = object()


def step_full_clock_s(phase: Phase, tokens: int, batch_size: int, model_bytes: float) -> float:
    """GPU-equivalent seconds at full clock of one forward pass of a bf16 model of `model_bytes`."""
    if model_bytes <= 0:
        return 0.0
    if phase == "prefill":
        # 2 x parameters FLOPs per token, parameters = bytes / 2
        return max(0, tokens) * model_bytes / PREFILL_FLOPS_PER_S
    return model_bytes / DECODE_BYTES_PER_S * (1.0 + DECODE_BATCH_PENALTY * max(0, batch_size - 1))


class EmulatedGpu(SimulatedGpu):
    """A SimulatedGpu on the wall clock, charged step by step (see the module docstring)."""

    def __init__(self, device_id: str = "sim:0", *, clock: Callable[[], float] = time.monotonic,
                 refuse_settings: bool = False) -> None:
        super().__init__(device_id, refuse_settings=refuse_settings)
        self.name = "EmulatedGpu(H100 SXM 80GB)"
        self._clock = clock
        self._origin = clock()
        self._mutex = threading.Lock()
        self._segments: deque[list[float]] = deque()  # [start, end, watts] booked on the timeline
        self._acc_s = 0.0  # the timeline is integrated up to here
        self._last_busy_end: float | None = None
        self._samples: deque[tuple[float, float]] = deque()  # (t, energy) for the power average
        self.steps = {"prefill": 0, "decode": 0}
        self.clock_switches: deque[tuple[float, float | None]] = deque(maxlen=1000)  # (t, MHz) of recent changes
        self.clock_switch_count = 0  # every change of the clock lock

    # --- Device readings on the wall clock ---
    def now_s(self) -> float:
        return self._clock() - self._origin

    def energy_j(self) -> float:
        with self._mutex:
            self._advance(self.now_s())
            return self._energy_j

    def power_w(self) -> float:
        with self._mutex:
            now = self.now_s()
            self._advance(now)
            self._sample(now)
            t0, e0 = self._samples[0]
            if now - t0 >= 0.05:
                return (self._energy_j - e0) / (now - t0)
            return self._instant_w(now)

    def lock_sm_clock_mhz(self, mhz: float | None) -> None:
        before = self._lock_mhz
        super().lock_sm_clock_mhz(mhz)
        if self._lock_mhz != before:
            self.clock_switches.append((self.now_s(), self._lock_mhz))
            self.clock_switch_count += 1

    # --- driven by the engine ---
    def charge(self, phase: Phase, full_clock_s: float, sm_clock_mhz: object = _UNSET) -> float:
        """Book `full_clock_s` seconds (full clock) of `phase` at the device's power limit and
        `sm_clock_mhz` (default: the clock lock in force); returns the elapsed seconds."""
        clock = self._lock_mhz if sm_clock_mhz is _UNSET else sm_clock_mhz
        with self._mutex:
            now = self.now_s()
            self._advance(now)
            self.steps[phase] += 1
            if full_clock_s <= 0:
                return 0.0
            elapsed = full_clock_s * phase_time_factor(phase, self._limit_w, clock)  # type: ignore[arg-type]
            watts = phase_power_w(phase, self._limit_w, clock)  # type: ignore[arg-type]
            start = max(now, self._segments[-1][1]) if self._segments else now
            self._segments.append([start, start + elapsed, watts])
            self.busy_s += elapsed
            self._sample(now)
            return elapsed

    # --- the timeline ---
    def _sample(self, now: float) -> None:
        self._samples.append((now, self._energy_j))
        while len(self._samples) > 2 and self._samples[1][0] <= now - POWER_WINDOW_S:
            self._samples.popleft()

    def _advance(self, t: float) -> None:
        """Integrate busy segments and idle gaps from the last accounted time up to `t`."""
        while self._acc_s < t:
            seg = self._segments[0] if self._segments else None
            if seg is not None and seg[0] <= self._acc_s:
                end = min(seg[1], t)
                self._energy_j += seg[2] * (end - self._acc_s)
                self._power_w = seg[2]
                self._acc_s = end
                if end >= seg[1]:
                    self._segments.popleft()
                    self._last_busy_end = seg[1]
                continue
            end = min(seg[0], t) if seg is not None else t
            warm_until = -1.0 if self._last_busy_end is None else self._last_busy_end + WARM_IDLE_S
            warm = max(0.0, min(end, warm_until) - self._acc_s)
            self._energy_j += WARM_IDLE_POWER_W * warm + IDLE_POWER_W * (end - self._acc_s - warm)
            self._acc_s = end
        self._now_s = max(self._now_s, t)

    def _instant_w(self, now: float) -> float:
        if self._segments and self._segments[0][0] <= now:
            return self._segments[0][2]
        if self._last_busy_end is not None and now - self._last_busy_end < WARM_IDLE_S:
            return WARM_IDLE_POWER_W
        return IDLE_POWER_W

    def run(self, phase: Phase, full_clock_s: float) -> float:  # the offline simulators' API
        raise TypeError("an EmulatedGpu runs on the wall clock: use charge(), not run()")

    def idle(self, seconds: float, gaps: int = 1) -> None:
        raise TypeError("an EmulatedGpu idles on the wall clock")
