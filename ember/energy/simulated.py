"""`SimulatedGpu`: an H100 SXM power/performance model with simulated time, and the pure helpers
behind it (the scheduler's simulator calls those directly).

The model is the calibration table in docs/energy-calibration.md (reference points and sources):

- limits 200-700 W (default 700 W), SM clock up to 1980 MHz;
- idle 70 W, 110 W within a second of running work;
- prefill (compute-bound): power 70 + 595 f^2 W, time x 1/f at SM clock fraction f;
- decode (memory-bound): power 70 + 245 f W, time x (1 + 0.15 (1 - f));
- a power cap acts as the highest clock fraction whose power fits under it, so a cap above a
  phase's draw changes nothing (decode draws 315 W, so caps rarely bind there).

Work is given as "seconds at full clock, uncapped"; the device turns it into elapsed seconds
and joules under its current limit and clock lock.
"""

from __future__ import annotations

import math
import uuid
from typing import Literal

from ember.errors import DevicePermissionError, DeviceSettingOutOfRange

Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")

# --- calibration (H100 SXM 80 GB; sources in docs/energy-calibration.md) -------------------
MIN_POWER_LIMIT_W = 200.0
MAX_POWER_LIMIT_W = 700.0
DEFAULT_POWER_LIMIT_W = 700.0
MAX_SM_CLOCK_MHZ = 1980.0
MIN_SM_CLOCK_MHZ = 345.0
SM_CLOCK_STEP_MHZ = 15.0  # the H100's supported graphics clocks are 15 MHz apart
IDLE_POWER_W = 70.0
WARM_IDLE_POWER_W = 110.0
WARM_IDLE_S = 1.0  # a GPU that ran work within this long still draws WARM_IDLE_POWER_W
PREFILL_STATIC_W = 70.0
PREFILL_DYNAMIC_W = 595.0  # x f^2
DECODE_STATIC_W = 70.0
DECODE_DYNAMIC_W = 245.0  # x f
DECODE_SLOWDOWN = 0.15  # time x (1 + 0.15 (1 - f))
MEMORY_BYTES = 80 * 1024**3

# A rough serving cost model for an H100 (bf16): prefill is compute-bound, decode streams the
# weights once per step. Used by simulators to turn tokens into full-clock seconds.
PREFILL_FLOPS_PER_S = 400e12
DECODE_BYTES_PER_S = 2.5e12
DECODE_BATCH_PENALTY = 0.02  # each extra sequence in a decode step adds 2% to the step time


# --- pure helpers -------------------------------------------------------------------------
def clock_fraction(
    phase: Phase, power_limit_w: float = DEFAULT_POWER_LIMIT_W, sm_clock_mhz: float | None = None
) -> float:
    """The SM clock fraction a phase actually runs at under a power limit and an optional clock lock."""
    f_lock = 1.0 if sm_clock_mhz is None else min(1.0, sm_clock_mhz / MAX_SM_CLOCK_MHZ)
    if phase == "prefill":
        headroom = max(0.0, power_limit_w - PREFILL_STATIC_W) / PREFILL_DYNAMIC_W
        f_cap = math.sqrt(headroom)
    elif phase == "decode":
        f_cap = max(0.0, power_limit_w - DECODE_STATIC_W) / DECODE_DYNAMIC_W
    else:
        raise ValueError(f"unknown phase {phase!r}")
    return max(MIN_SM_CLOCK_MHZ / MAX_SM_CLOCK_MHZ, min(1.0, f_lock, f_cap))


def phase_power_w(
    phase: Phase, power_limit_w: float = DEFAULT_POWER_LIMIT_W, sm_clock_mhz: float | None = None
) -> float:
    """Board power while running `phase`, in watts."""
    f = clock_fraction(phase, power_limit_w, sm_clock_mhz)
    if phase == "prefill":
        return PREFILL_STATIC_W + PREFILL_DYNAMIC_W * f * f
    return DECODE_STATIC_W + DECODE_DYNAMIC_W * f


def phase_time_factor(
    phase: Phase, power_limit_w: float = DEFAULT_POWER_LIMIT_W, sm_clock_mhz: float | None = None
) -> float:
    """Elapsed time of `phase` relative to full clock, uncapped (>= 1)."""
    f = clock_fraction(phase, power_limit_w, sm_clock_mhz)
    if phase == "prefill":
        return 1.0 / f
    return 1.0 + DECODE_SLOWDOWN * (1.0 - f)


def phase_energy_j(
    phase: Phase,
    full_clock_s: float,
    power_limit_w: float = DEFAULT_POWER_LIMIT_W,
    sm_clock_mhz: float | None = None,
) -> float:
    """Joules to run `full_clock_s` seconds (at full clock) of `phase` under the given settings."""
    factor = phase_time_factor(phase, power_limit_w, sm_clock_mhz)
    return phase_power_w(phase, power_limit_w, sm_clock_mhz) * full_clock_s * factor


def idle_power_w(seconds_since_busy: float | None) -> float:
    """Idle draw: 110 W within a second of running work, 70 W otherwise (None: never ran)."""
    if seconds_since_busy is not None and seconds_since_busy < WARM_IDLE_S:
        return WARM_IDLE_POWER_W
    return IDLE_POWER_W


def prefill_full_clock_s(prompt_tokens: int, params_b: float) -> float:
    """Seconds to prefill `prompt_tokens` tokens of a `params_b`-billion-parameter model at full clock."""
    return prompt_tokens * 2.0 * params_b * 1e9 / PREFILL_FLOPS_PER_S


def decode_step_full_clock_s(params_b: float, batch: float = 1.0) -> float:
    """Seconds for one decode step (one token for each of `batch` sequences) at full clock."""
    weights_bytes = 2.0 * params_b * 1e9
    return weights_bytes / DECODE_BYTES_PER_S * (1.0 + DECODE_BATCH_PENALTY * max(0.0, batch - 1.0))


SUPPORTED_SM_CLOCKS_MHZ = tuple(MAX_SM_CLOCK_MHZ - SM_CLOCK_STEP_MHZ * k
                                for k in range(int((MAX_SM_CLOCK_MHZ - MIN_SM_CLOCK_MHZ) // SM_CLOCK_STEP_MHZ) + 1))


# --- the device -----------------------------------------------------------------------------
class SimulatedGpu:
    """An H100 SXM following the calibration table, with its own simulated clock.

    `run(phase, full_clock_s)` and `idle(seconds)` advance time and energy; the `Device`
    readings and setters behave like NVML's. `refuse_settings=True` makes setters raise
    DevicePermissionError, as an unprivileged NVML process would see.
    """

    def __init__(
        self,
        device_id: str = "sim:0",
        *,
        start_s: float = 0.0,
        refuse_settings: bool = False,
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        self.device_id = device_id
        self.name = "SimulatedGpu(H100 SXM 80GB)"
        self.memory_bytes = memory_bytes
        self.refuse_settings = refuse_settings
        self._now_s = float(start_s)
        self._energy_j = 0.0
        self.energy_origin = f"sim:{uuid.uuid4().hex[:12]}"  # a new device counts from zero
        self._limit_w = DEFAULT_POWER_LIMIT_W
        self._lock_mhz: float | None = None
        self._last_busy_end_s: float | None = None
        self._power_w = IDLE_POWER_W
        self.busy_s = 0.0  # total seconds spent running work

    # --- Device protocol ---
    def now_s(self) -> float:
        return self._now_s

    def power_w(self) -> float:
        return self._power_w

    def energy_j(self) -> float:
        return self._energy_j

    def power_limit_w(self) -> float:
        return self._limit_w

    def power_limit_range_w(self) -> tuple[float, float]:
        return (MIN_POWER_LIMIT_W, MAX_POWER_LIMIT_W)

    def default_power_limit_w(self) -> float:
        return DEFAULT_POWER_LIMIT_W

    def sm_clock_mhz(self) -> float:
        return MAX_SM_CLOCK_MHZ if self._lock_mhz is None else self._lock_mhz

    def max_sm_clock_mhz(self) -> float:
        return MAX_SM_CLOCK_MHZ

    def supported_sm_clocks_mhz(self) -> tuple[float, ...]:
        """The H100's graphics clocks from the top in 15 MHz steps (what NVML lists for it). The
        model itself takes any clock in range, so offline sweeps may lock between them."""
        return SUPPORTED_SM_CLOCKS_MHZ

    def locked_sm_clock_mhz(self) -> float | None:
        """The clock lock in force (None: unlocked)."""
        return self._lock_mhz

    def set_power_limit_w(self, watts: float) -> None:
        if self.refuse_settings:
            raise DevicePermissionError(f"{self.device_id}: setting the power limit needs root")
        lo, hi = self.power_limit_range_w()
        if not lo <= watts <= hi:
            raise DeviceSettingOutOfRange(f"{self.device_id}: power limit {watts} W outside {lo}-{hi} W")
        self._limit_w = float(watts)

    def lock_sm_clock_mhz(self, mhz: float | None) -> None:
        if self.refuse_settings:
            raise DevicePermissionError(f"{self.device_id}: locking SM clocks needs root")
        if mhz is not None and not MIN_SM_CLOCK_MHZ <= mhz <= MAX_SM_CLOCK_MHZ:
            raise DeviceSettingOutOfRange(
                f"{self.device_id}: SM clock {mhz} MHz outside {MIN_SM_CLOCK_MHZ}-{MAX_SM_CLOCK_MHZ} MHz"
            )
        self._lock_mhz = None if mhz is None else float(mhz)

    # --- simulation ---
    def run(self, phase: Phase, full_clock_s: float) -> float:
        """Run `full_clock_s` seconds (at full clock) of `phase`; returns the elapsed seconds."""
        if full_clock_s <= 0:
            return 0.0
        elapsed_s = full_clock_s * phase_time_factor(phase, self._limit_w, self._lock_mhz)
        power = phase_power_w(phase, self._limit_w, self._lock_mhz)
        self._energy_j += power * elapsed_s
        self._now_s += elapsed_s
        self.busy_s += elapsed_s
        self._last_busy_end_s = self._now_s
        self._power_w = power
        return elapsed_s

    def idle(self, seconds: float, gaps: int = 1) -> None:
        """Stay idle for `seconds`, split into `gaps` gaps between short bursts of work
        (each gap starts warm: the first second of each is paid at 110 W)."""
        if seconds <= 0:
            return
        gaps = max(1, int(gaps))
        gap_s = seconds / gaps
        since = None if self._last_busy_end_s is None else self._now_s - self._last_busy_end_s
        first_warm_s = 0.0 if since is None else min(gap_s, max(0.0, WARM_IDLE_S - since))
        warm_s = first_warm_s + (gaps - 1) * min(gap_s, WARM_IDLE_S)
        energy = WARM_IDLE_POWER_W * warm_s + IDLE_POWER_W * (seconds - warm_s)
        self._energy_j += energy
        self._now_s += seconds
        if gaps > 1:
            self._last_busy_end_s = self._now_s - gap_s
        self._power_w = idle_power_w(
            None if self._last_busy_end_s is None else self._now_s - self._last_busy_end_s
        )

    def average_power_w(self, phase: Phase) -> float:
        """Draw `phase` would have now, under the current settings."""
        return phase_power_w(phase, self._limit_w, self._lock_mhz)

    def time_factor(self, phase: Phase) -> float:
        """Slowdown of `phase` now, under the current settings."""
        return phase_time_factor(phase, self._limit_w, self._lock_mhz)
