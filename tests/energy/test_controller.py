"""PowerLimitController on SimulatedGpus: profiling from the top, feedback with hysteresis,
re-profiling, eta, modes, and a device that refuses settings."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ember.energy.controller import PowerLimitController
from ember.energy.monitor import RequestRecord
from ember.energy.simulated import SimulatedGpu
from ember.errors import ConfigError


@dataclass
class Fn:
    name: str
    ttft_s: float  # at full clock
    tpot_s: float
    ttft_slo_s: float
    tpot_slo_s: float
    eta: float = 0.5
    per_window: int = 20


def drive(ctrl: PowerLimitController, gpu: SimulatedGpu, fns: list[Fn], windows: int) -> list[float]:
    """Run `windows` windows of requests whose latency follows the device's settings; returns
    the clock the device ran at in each window."""
    clocks = []
    for _ in range(windows):
        clocks.append(gpu.sm_clock_mhz())
        for fn in fns:
            for _ in range(fn.per_window):
                ttft = fn.ttft_s * gpu.time_factor("prefill")
                tpot = fn.tpot_s * gpu.time_factor("decode")
                ctrl.observe(
                    RequestRecord(
                        fn.name, gpu.device_id, 100, ttft, tpot, fn.ttft_slo_s, fn.tpot_slo_s, fn.eta
                    )
                )
            gpu.run("prefill", 0.05 * fn.per_window)
            gpu.run("decode", 0.2 * fn.per_window)
        gpu.idle(1.0)
        ctrl.step()
    return clocks


def test_profiles_from_the_top_down_while_slack_remains() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate")
    clocks = drive(ctrl, gpu, [Fn("chat", 0.1, 0.01, 2.0, 0.1, eta=1.0)], windows=60)
    assert clocks[0] == 1980  # starts at the top
    assert clocks == sorted(clocks, reverse=True)  # only steps down under slack
    assert gpu.locked_sm_clock_mhz() == pytest.approx(0.6 * 1980, abs=7.5)  # the supported clock nearest
    assert gpu.power_limit_w() < 700  # then the limit, while TTFT still had slack
    assert all(d.reason for d in ctrl.decisions)
    assert "lowering SM clock" in ctrl.decisions[0].reason
    assert ctrl.slo_attainment == 1.0


def test_tight_ttft_stops_the_descent_and_keeps_the_slo() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate")
    # TTFT ratio at full clock 0.5: the 0.8 risk line is crossed below f = 0.625
    drive(ctrl, gpu, [Fn("agent", 0.5, 0.01, 1.0, 0.1)], windows=200)
    assert ctrl.slo_attainment is not None and ctrl.slo_attainment >= 0.99
    assert gpu.sm_clock_mhz() > 0.6 * 1980
    assert gpu.sm_clock_mhz() < 1980


def test_violation_steps_up_at_once_and_bans_the_level() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate", cooldown_windows=50, sustain_windows=2)
    fn = Fn("chat", 0.1, 0.01, 2.0, 0.1)
    drive(ctrl, gpu, [fn], windows=8)
    low = gpu.sm_clock_mhz()
    assert low < 1980
    # the load gets heavier: TPOT doubles the SLO at this setting
    slow = Fn("chat", 0.1, 0.2, 2.0, 0.1)
    drive(ctrl, gpu, [slow], windows=1)
    up = ctrl.last_decision
    assert up is not None and "SLO violations" in up.reason and "TPOT" in up.reason
    assert gpu.sm_clock_mhz() > low
    # back to light load: it steps down again, but not into the banned level during the cooldown
    clocks = drive(ctrl, gpu, [fn], windows=40)
    assert min(clocks) > low


def test_eta_zero_keeps_the_fastest_setting() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate")
    drive(ctrl, gpu, [Fn("latency-only", 0.1, 0.01, 2.0, 0.1, eta=0.0)], windows=40)
    done = [d for d in ctrl.decisions if d.reason.startswith("profile done")]
    assert done and "eta 0.00" in done[0].reason
    assert gpu.locked_sm_clock_mhz() is None and gpu.power_limit_w() == 700


def test_mix_change_reprofiles_from_the_top() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate", reprofile_min_windows=5)
    drive(ctrl, gpu, [Fn("a", 0.1, 0.01, 2.0, 0.1)], windows=40)
    assert ctrl.phase == "online"
    drive(ctrl, gpu, [Fn("b", 0.1, 0.01, 2.0, 0.1)], windows=10)
    assert any("mix changed" in d.reason for d in ctrl.decisions)


def test_observe_and_recommend_never_touch_the_device() -> None:
    for mode in ("observe", "recommend"):
        gpu = SimulatedGpu()
        ctrl = PowerLimitController(gpu, mode=mode)
        drive(ctrl, gpu, [Fn("chat", 0.1, 0.01, 2.0, 0.1)], windows=20)
        assert gpu.power_limit_w() == 700 and gpu.locked_sm_clock_mhz() is None
        if mode == "observe":
            assert not ctrl.decisions
        else:
            assert ctrl.decisions and not any(d.applied for d in ctrl.decisions)
            assert ctrl.setting.sm_clock_mhz is not None  # it recommends a lower clock
    with pytest.raises(ConfigError):
        PowerLimitController(SimulatedGpu(), mode="turbo")  # type: ignore[arg-type]


def test_refused_setting_falls_back_to_recommend() -> None:
    gpu = SimulatedGpu(refuse_settings=True)
    ctrl = PowerLimitController(gpu, mode="actuate")
    assert ctrl.mode == "recommend"
    assert ctrl.last_error is not None and "DevicePermissionError" in ctrl.last_error
    drive(ctrl, gpu, [Fn("chat", 0.1, 0.01, 2.0, 0.1)], windows=10)  # keeps working
    assert ctrl.decisions and gpu.locked_sm_clock_mhz() is None


def test_refusal_midway_is_logged_in_the_decision() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate")
    gpu.refuse_settings = True  # e.g. the process lost its privilege
    drive(ctrl, gpu, [Fn("chat", 0.1, 0.01, 2.0, 0.1)], windows=3)
    refused = [d for d in ctrl.decisions if "device refused" in d.reason]
    assert refused and not refused[0].applied and ctrl.mode == "recommend"


def test_budget_cap_bounds_the_limit() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate")
    ctrl.set_cap_w(400)
    assert gpu.power_limit_w() == 400
    assert "budget cap" in ctrl.decisions[-1].reason
    ctrl.set_cap_w(None)
    assert gpu.power_limit_w() == 700


def drive_phases(ctrl: PowerLimitController, gpu: SimulatedGpu, fns: list[Fn], windows: int) -> None:
    """Like `drive`, with an engine that runs prefills at the controller's prefill clock."""
    from ember.energy.simulated import phase_time_factor

    for _ in range(windows):
        prefill_mhz = ctrl.setting.prefill_sm_clock_mhz
        for fn in fns:
            for _ in range(fn.per_window):
                ttft = fn.ttft_s * phase_time_factor("prefill", gpu.power_limit_w(), prefill_mhz)
                tpot = fn.tpot_s * gpu.time_factor("decode")
                ctrl.observe(
                    RequestRecord(
                        fn.name, gpu.device_id, 100, ttft, tpot, fn.ttft_slo_s, fn.tpot_slo_s, fn.eta
                    )
                )
            gpu.run("decode", 0.2 * fn.per_window)
        gpu.idle(1.0)
        ctrl.step()


def test_phase_clocks_lower_decode_while_a_tight_ttft_keeps_prefill_at_the_top() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate", phase_clocks=True)
    # TTFT at 0.55 of its SLO at full clock: a shared clock could not go below ~0.7
    drive_phases(ctrl, gpu, [Fn("agent", 0.55, 0.01, 1.0, 0.1)], windows=120)
    assert gpu.locked_sm_clock_mhz() == pytest.approx(0.6 * 1980, abs=7.5)  # decode at the floor (the supported clock nearest)
    assert ctrl.setting.sm_clock_mhz == gpu.locked_sm_clock_mhz()
    assert ctrl.setting.prefill_sm_clock_mhz is None  # prefill unlocked
    assert gpu.power_limit_w() == 700
    assert ctrl.slo_attainment == 1.0
    assert any("lowering decode SM clock" in d.reason for d in ctrl.decisions)


def test_phase_clocks_lower_prefill_only_on_a_wide_ttft_margin_and_lift_it_on_risk() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate", phase_clocks=True, sustain_windows=2)
    drive_phases(ctrl, gpu, [Fn("chat", 0.02, 0.01, 2.0, 0.1)], windows=60)  # TTFT at 1% of its SLO
    low_prefill = ctrl.setting.prefill_sm_clock_mhz
    assert low_prefill is not None and low_prefill < 1980
    decode_mhz = gpu.locked_sm_clock_mhz()
    # prompts get much longer: TTFT near its SLO at the lowered prefill clock
    drive_phases(ctrl, gpu, [Fn("chat", 1.5, 0.01, 2.0, 0.1)], windows=1)
    up = ctrl.last_decision
    assert up is not None and "TTFT" in up.reason
    lifted = ctrl.setting.prefill_sm_clock_mhz
    assert lifted is None or lifted > low_prefill
    assert gpu.locked_sm_clock_mhz() == decode_mhz  # the decode clock stays where TPOT put it


def test_without_phase_clocks_prefill_runs_at_the_device_lock() -> None:
    gpu = SimulatedGpu()
    ctrl = PowerLimitController(gpu, mode="actuate")
    drive(ctrl, gpu, [Fn("chat", 0.1, 0.01, 2.0, 0.1)], windows=10)
    assert ctrl.setting.prefill_sm_clock_mhz == ctrl.setting.sm_clock_mhz == gpu.locked_sm_clock_mhz()


def test_clock_ladder_locks_only_clocks_the_device_supports() -> None:
    """Each fraction of the top clock snaps to the nearest clock the device lists (15 MHz apart on
    an H100): every lock the controller makes, decode or prefill, is one the device supports."""
    gpu = SimulatedGpu()
    supported = {1980.0 - 15 * k for k in range(110)}  # 1980 down to 345 MHz
    locks: list[float | None] = []
    real_lock = gpu.lock_sm_clock_mhz
    gpu.lock_sm_clock_mhz = lambda mhz: (locks.append(mhz), real_lock(mhz))[1]  # type: ignore[method-assign]
    ctrl = PowerLimitController(gpu, mode="actuate", phase_clocks=True)
    drive(ctrl, gpu, [Fn("chat", 0.1, 0.01, 2.0, 0.1, eta=1.0)], windows=60)
    locked = {m for m in locks if m is not None}
    assert len(locked) >= 5 and locked <= supported
    clocks = [ctrl.setting.prefill_sm_clock_mhz, *(d.setting.sm_clock_mhz for d in ctrl.decisions)]
    assert {c for c in clocks if c is not None} <= supported
    assert set(gpu.supported_sm_clocks_mhz()) == supported
