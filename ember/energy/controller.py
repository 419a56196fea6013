"""`PowerLimitController`: per device, the lowest power setting that keeps the SLOs of its functions.

Two knobs, both ladders from the top:

- the SM clock lock (fractions 1.0, 0.95, ... 0.6 of the maximum): slows decode a little and
  prefill a lot, and is the only knob that saves energy in decode, where caps do not bind;
- the power limit (700 W down in 50 W steps): binds only above-the-cap phases (prefill), so it
  is tried after the clock has reached its floor, while TTFT still has slack.

With `phase_clocks` (a serving engine that switches the SM clock per phase, as GreenLLM does) the
knobs are a decode clock and a prefill clock instead: the device lock is the decode clock, driven
by TPOT alone (decode time is x(1 + 0.15 (1 - f)), and it does not slow prefill), and prefills
run at `setting.prefill_sm_clock_mhz`, driven by TTFT: prefill time is x 1/f and a prefill
queue's tail grows faster than that, so the prefill clock stays at the top unless TTFT's p99 is a
small share of its SLO (`prefill_slack_ratio`). A TTFT risk raises the prefill clock only, a TPOT
risk both (a slower prefill steals time from decode). The power limit stays at the top (the
prefill clock is the finer knob for the one phase a cap binds); budget caps still apply.

Every `step()` reads the window of finished requests since the last step:

- SLO risk (a window's attainment under target, or its p95 latency above `risk_ratio` of the
  SLO) steps up at once (a violation jumps to the top of the knob; a near miss one step) and bans
  the level that caused it for `cooldown_windows` (hysteresis);
- slack (p95 below `slack_ratio` of both SLOs) for `sustain_windows` windows in a row steps down;
- profiling (Zeus-style, at start and when the function mix changes) starts from the top and
  steps down after every window of slack, recording energy per token and time per token per
  level; at its end it fits lines through that curve and takes the end with the lower Zeus
  cost `eta * J/token + (1 - eta) * s/token` (each relative to the top; eta: the most
  time-sensitive function's): time first pins the device to the top, energy first leaves
  online feedback to go as low as the SLOs allow. eta also widens the slack margin for low eta.

Modes: `observe` (measure only), `recommend` (decide, never touch the device), `actuate` (apply).
A device that refuses a setting is logged with the error and the controller falls back to
`recommend` for it. Every decision is kept (and logged) with its reason.

The ladders and the profile's fit are ember/energy/ladder.py; `Setting` and `Decision`
ember/energy/decision.py.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ember.energy.decision import MODES, Decision, Mode, Setting
from ember.energy.device import Device
from ember.energy.ladder import (
    DEFAULT_CLOCK_FRACTIONS,
    ProfileLevel,
    clock_ladder,
    limit_ladder,
    zeus_cost_slope,
)
from ember.energy.monitor import RequestRecord
from ember.energy.window import WindowParts, WindowStats, merged_stats, window_parts
from ember.errors import ConfigError, DeviceError

log = logging.getLogger(__name__)


@dataclass
class PowerLimitController:
    """Controller for one device; see the module docstring."""

    device: Device
    mode: Mode = "recommend"
    target_attainment: float = 0.99
    risk_ratio: float = 0.85
    slack_ratio: float = 0.6
    sustain_windows: int = 8  # windows of slack (at the current setting) before stepping down
    profile_windows: int = 2  # the same while profiling
    horizon_windows: int = 24  # recent windows the p99 and attainment are taken over
    hard_step_up: int = 2  # levels to climb at once on actual violations
    cooldown_windows: int = 360
    min_requests: int = 5  # fewer requests in a window: no slack decision (but violations count)
    mix_change: float = 0.3  # L1 distance between function mixes that triggers re-profiling
    reprofile_min_windows: int = 120  # at most one re-profile per this many windows
    clock_fractions: Sequence[float] = DEFAULT_CLOCK_FRACTIONS
    history: int = 200
    cap_w: float | None = None  # budget cap from the allocator: the limit never goes above it
    # the serving engine switches the SM clock per phase (GreenLLM-style): the device lock is the
    # decode clock, and prefills run at `setting.prefill_sm_clock_mhz`; each phase has its own
    # ladder, decode driven by TPOT, prefill by TTFT
    phase_clocks: bool = False
    prefill_slack_ratio: float = 0.1  # TTFT p99 under this share of the SLO to lower the prefill clock

    decisions: deque[Decision] = field(init=False)
    last_error: str | None = field(init=False, default=None)
    last_window: WindowStats | None = field(init=False, default=None)
    phase: str = field(init=False, default="profiling")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"controller mode must be one of {MODES}, not {self.mode!r}")
        self.decisions = deque(maxlen=self.history)
        lo, hi = self.device.power_limit_range_w()
        self._min_limit_w, self._max_limit_w = lo, hi
        self._clocks = clock_ladder(self.device, self.clock_fractions)
        self._limits = limit_ladder(lo, hi)
        self._clock_i = 0
        self._limit_i = 0
        self._prefill_i = 0  # prefill clock ladder (phase_clocks only)
        self._pending: list[RequestRecord] = []
        self._horizon: deque[WindowParts] = deque(maxlen=self.horizon_windows)
        self._banned: dict[tuple[str, int], int] = {}  # (knob, index) -> windows left
        self._profile: dict[tuple[int, int], ProfileLevel] = {}
        self._floor: tuple[int, int] | None = None  # lowest level online may step down to
        self._mix: dict[str, float] = {}
        self._profile_mix: dict[str, float] | None = None
        self._windows_seen = 0
        self._profiled_at = 0
        self._mark_j = self.device.energy_j()
        self._requests_total = 0
        self._requests_met = 0
        if self.mode == "actuate":
            self._apply(self.setting, "start: top of the ladder")

    # --- public ---
    @property
    def setting(self) -> Setting:
        """The setting the controller wants now (applied only in actuate mode)."""
        limit = self._limits[self._limit_i]
        if self.cap_w is not None:
            limit = max(self._min_limit_w, min(limit, self.cap_w))
        clock = self._clocks[self._clock_i]
        prefill = self._clocks[self._prefill_i] if self.phase_clocks else clock
        return Setting(limit, clock, prefill)

    @property
    def last_decision(self) -> Decision | None:
        return self.decisions[-1] if self.decisions else None

    @property
    def slo_attainment(self) -> float | None:
        """Fraction of all requests seen that met both SLOs (None before any)."""
        return self._requests_met / self._requests_total if self._requests_total else None

    def observe(self, record: RequestRecord) -> None:
        """Add a finished request to the current window."""
        self._pending.append(record)
        self._requests_total += 1
        self._requests_met += int(record.meets_slo)

    def set_cap_w(self, watts: float | None, now_s: float | None = None) -> None:
        """Apply an allocator's budget cap (None: no cap); logged as a decision when it changes."""
        if watts == self.cap_w:
            return
        previous = self.setting
        self.cap_w = watts
        if self.setting != previous:
            self._decide(previous, f"budget cap {watts} W from the allocator", now_s)

    def step(self, now_s: float | None = None) -> Decision | None:
        """Close the current window and decide; returns the decision if the setting changed."""
        now_s = self.device.now_s() if now_s is None else now_s
        window, self._pending = self._pending, []
        energy_now = self.device.energy_j()
        energy_j, self._mark_j = energy_now - self._mark_j, energy_now
        self._windows_seen += 1
        self._banned = {k: v - 1 for k, v in self._banned.items() if v > 1}
        parts = window_parts(window)
        stats = merged_stats([parts])
        self.last_window = stats
        if self.mode == "observe" or stats.requests == 0:
            return None
        self._update_mix(stats)
        previous = self.setting
        self._horizon.append(parts)
        rolling = merged_stats(self._horizon, q=0.99)

        if (
            rolling.attainment < self.target_attainment
            or max(stats.ttft_ratio_p95, stats.tpot_ratio_p95) > self.risk_ratio
            or max(rolling.ttft_ratio_p95, rolling.tpot_ratio_p95) > 1.0
        ):
            return self._step_up(stats, rolling, previous, now_s)

        self._record_profile(stats, energy_j)
        if self.phase == "online" and self._mix_changed():
            self.phase = "profiling"
            self._profile.clear()
            self._floor = None
            self._clock_i = self._limit_i = self._prefill_i = 0
            return self._decide(previous, "function mix changed: re-profiling from the top", now_s)

        needed = self.profile_windows if self.phase == "profiling" else self.sustain_windows
        if len(self._horizon) < needed or rolling.requests < self.min_requests * needed:
            return None
        # eta shifts the margin: time-sensitive functions (low eta) need more slack to step down
        slack_ratio = min(self.risk_ratio * 0.9, self.slack_ratio * (0.5 + rolling.eta))
        ttft_slack = rolling.ttft_ratio_p95 < slack_ratio
        tpot_slack = rolling.tpot_ratio_p95 < slack_ratio
        reason_base = (
            f"slack for {len(self._horizon)} window(s): p99 ttft {rolling.ttft_ratio_p95:.2f}, "
            f"tpot {rolling.tpot_ratio_p95:.2f} of SLO, attainment {rolling.attainment:.4f}"
        )
        if self.phase_clocks:
            ttft_slack = True  # the decode clock does not slow prefill: TPOT slack alone lowers it
        if ttft_slack and tpot_slack and self._can_lower("clock"):
            self._clock_i += 1
            what = "decode SM clock" if self.phase_clocks else "SM clock"
            return self._decide(previous, reason_base + f"; lowering {what}", now_s)
        # a lower cap slows prefill, which also delays the decode steps queued behind it
        tpot_room = rolling.tpot_ratio_p95 < (slack_ratio + self.risk_ratio) / 2
        clock_banned = ("clock", self._clock_i + 1) in self._banned  # near the edge: hold
        if self.phase_clocks:
            # prefill time is x 1/f, and a queue's tail grows faster than that: only a wide TTFT
            # margin lowers the prefill clock
            prefill_slack = rolling.ttft_ratio_p95 < min(slack_ratio, self.prefill_slack_ratio)
            if prefill_slack and tpot_room and not clock_banned and self._can_lower("prefill"):
                self._prefill_i += 1
                return self._decide(previous, reason_base + "; lowering prefill SM clock", now_s)
        elif ttft_slack and tpot_room and not clock_banned and self._can_lower("limit"):
            self._limit_i += 1
            return self._decide(previous, reason_base + "; lowering power limit (TTFT slack)", now_s)
        if self.phase == "profiling":
            return self._finish_profile(stats, previous, now_s, "no lower level to try")
        return None

    def snapshot(self) -> dict[str, object]:
        """Plain dict of the controller's state (for the agent's snapshot)."""
        last = self.last_decision
        return {
            "mode": self.mode,
            "phase": self.phase,
            "setting": asdict(self.setting),
            "slo_attainment": self.slo_attainment,
            "last_decision": None if last is None else last.to_dict(),
            "last_error": self.last_error,
        }

    # --- helpers ---
    def _can_lower(self, knob: str) -> bool:
        i = {"clock": self._clock_i, "limit": self._limit_i, "prefill": self._prefill_i}[knob]
        ladder = self._limits if knob == "limit" else self._clocks
        if i + 1 >= len(ladder) or (knob, i + 1) in self._banned:
            return False
        if self.phase == "online" and self._floor is not None:
            floor_clock, floor_second = self._floor
            if knob == "clock" and i + 1 > floor_clock:
                return False
            if knob != "clock" and self._clock_i >= floor_clock and i + 1 > floor_second:
                return False
        return True

    @property
    def _level(self) -> tuple[int, int]:
        """(clock index, second knob's index): the limit, or the prefill clock with phase_clocks."""
        return (self._clock_i, self._prefill_i if self.phase_clocks else self._limit_i)

    def _step_up(
        self, stats: WindowStats, rolling: WindowStats, previous: Setting, now_s: float
    ) -> Decision | None:
        hard = stats.attainment < 0.9 or max(stats.ttft_ratio_p95, stats.tpot_ratio_p95) > 1.0
        steps = self.hard_step_up if hard else 1
        level = self._level
        if level in self._profile:
            self._profile[level].safe = False
        ttft_risk = stats.ttft_ratio_p95 > self.risk_ratio or rolling.ttft_ratio_p95 > 1.0
        tpot_risk = stats.tpot_ratio_p95 > self.risk_ratio or rolling.tpot_ratio_p95 > 1.0
        if not (ttft_risk or tpot_risk):  # scattered violations: treat as both
            ttft_risk = tpot_risk = True
        # the limit (or the prefill clock) binds prefill first (TTFT); the clock is what decode
        # (TPOT) feels; a slower prefill also steals time from decode
        second_i = self._prefill_i if self.phase_clocks else self._limit_i
        raise_prefill = self.phase_clocks and second_i > 0 and (ttft_risk or tpot_risk)
        raise_limit = self._limit_i > 0 and (ttft_risk or tpot_risk)
        # with per-phase clocks the decode clock does not slow prefill: only TPOT raises it
        raise_clock = self._clock_i > 0 and (
            tpot_risk or (ttft_risk and second_i == 0 and not self.phase_clocks)
        )
        if raise_prefill:
            self._banned[("prefill", self._prefill_i)] = self.cooldown_windows
            self._prefill_i = 0 if hard else self._prefill_i - 1
        if raise_limit:
            self._banned[("limit", self._limit_i)] = self.cooldown_windows
            # violations lift the cap off entirely: a capped prefill also stalls decode
            self._limit_i = 0 if hard else self._limit_i - 1
        if raise_clock:
            self._banned[("clock", self._clock_i)] = self.cooldown_windows
            self._clock_i = max(0, self._clock_i - steps)
        what = "SLO violations" if hard else "SLO risk"
        reason = (
            f"{what} ({'TTFT' if ttft_risk else ''}{'+' if ttft_risk and tpot_risk else ''}"
            f"{'TPOT' if tpot_risk else ''}): window attainment {stats.attainment:.3f}, "
            f"p95 ttft {stats.ttft_ratio_p95:.2f}, tpot {stats.tpot_ratio_p95:.2f} of SLO; "
            f"recent attainment {rolling.attainment:.4f} (worst: {stats.worst_function}); stepping up"
        )
        if self.phase == "profiling":
            return self._finish_profile(stats, previous, now_s, reason)
        if self.setting == previous:
            return None
        return self._decide(previous, reason, now_s)

    def _record_profile(self, stats: WindowStats, energy_j: float) -> None:
        if stats.tokens <= 0:
            return
        rec = self._profile.setdefault(self._level, ProfileLevel())
        n = rec.windows
        rec.j_per_token = (rec.j_per_token * n + energy_j / stats.tokens) / (n + 1)
        rec.s_per_token = (rec.s_per_token * n + stats.s_per_token) / (n + 1)
        rec.windows = n + 1

    def _finish_profile(
        self, stats: WindowStats, previous: Setting, now_s: float, why: str
    ) -> Decision | None:
        self.phase = "online"
        self._profile_mix = dict(self._mix)
        self._profiled_at = self._windows_seen
        safe = {k: v for k, v in self._profile.items() if v.safe and v.windows > 0}
        fitted = zeus_cost_slope(safe, stats.eta)
        if fitted is not None:
            # the fitted ZeusCost is linear in the steps from the top, so its minimum is at an end:
            # the top (time matters more) or the lowest level that kept the SLOs (energy matters
            # more); when the fit cannot tell (|slope| < 2 standard errors) eta decides
            slope, se = fitted
            energy_first = slope < -2 * se or (abs(slope) <= 2 * se and stats.eta >= 0.5)
            # energy first: no floor (SLO feedback alone decides how low, as load moves);
            # time first: pinned to the top
            self._floor = None if energy_first else (0, 0)
            if not energy_first:
                self._clock_i = self._limit_i = self._prefill_i = 0
            why = f"{why}; ZeusCost slope {slope:+.4f} +- {se:.4f} per step"
        reason = f"profile done ({why}); eta {stats.eta:.2f}, floor level {self._floor}"
        return self._decide(previous, reason, now_s, force=True)

    def _update_mix(self, stats: WindowStats) -> None:
        alpha = 0.05  # ~20 windows: a few requests of a rare function are not a new mix
        names = set(self._mix) | set(stats.mix)
        self._mix = {n: (1 - alpha) * self._mix.get(n, 0.0) + alpha * stats.mix.get(n, 0.0) for n in names}
        self._mix = {n: s for n, s in self._mix.items() if s > 1e-3}

    def _mix_changed(self) -> bool:
        if self._profile_mix is None or self._windows_seen - self._profiled_at < self.reprofile_min_windows:
            return False
        names = set(self._mix) | set(self._profile_mix)
        distance = sum(abs(self._mix.get(n, 0.0) - self._profile_mix.get(n, 0.0)) for n in names)
        return distance > self.mix_change

    def _decide(
        self, previous: Setting, reason: str, now_s: float | None, force: bool = False
    ) -> Decision | None:
        setting = self.setting
        if setting == previous and not force:
            return None
        self._horizon.clear()  # slack must be shown again at the new setting
        now_s = self.device.now_s() if now_s is None else now_s
        applied = False
        if self.mode == "actuate" and setting != previous:
            applied = self._apply(setting, reason)
            if not applied:
                reason = f"{reason}; device refused ({self.last_error}): falling back to recommend"
        decision = Decision(
            now_s, self.device.device_id, self.mode, self.phase, setting, previous, reason, applied
        )
        self.decisions.append(decision)
        log.info(
            "energy %s %s: %s -> %s W / %s MHz (prefill %s MHz) (%s)",
            self.device.device_id,
            self.mode,
            previous,
            setting.power_limit_w,
            setting.sm_clock_mhz,
            setting.prefill_sm_clock_mhz,
            reason,
        )
        return decision

    def _apply(self, setting: Setting, reason: str) -> bool:
        """Set the device; on refusal remember the error and fall back to recommend."""
        try:
            if self.device.power_limit_w() != setting.power_limit_w:
                self.device.set_power_limit_w(setting.power_limit_w)
            self.device.lock_sm_clock_mhz(setting.sm_clock_mhz)
        except DeviceError as e:
            self.last_error = f"{type(e).__name__}: {e.message}"
            self.mode = "recommend"
            log.warning(
                "energy %s: %s; falling back to recommend (%s)",
                self.device.device_id,
                self.last_error,
                reason,
            )
            return False
        return True
