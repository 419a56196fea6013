"""SimulatedGpu behaves like a GPU under the calibration of docs/energy-calibration.md: energy is
power x time, slower clocks and tighter caps never speed a phase up nor raise its power, a cap
above a phase's draw changes nothing, idle and warm-idle draw follow the last work, settings
are refused or range-checked like NVML's. (The reference numbers live in the docs, not here.)"""

from __future__ import annotations

import pytest

from ember.energy.device import Device
from ember.energy.simulated import (
    PHASES,
    SimulatedGpu,
    clock_fraction,
    phase_energy_j,
    phase_power_w,
    phase_time_factor,
)
from ember.errors import DevicePermissionError, DeviceSettingOutOfRange


def measure(gpu: SimulatedGpu, phase: str, full_clock_s: float = 10.0) -> tuple[float, float, float]:
    """(elapsed s, joules, average W) of running `phase` for `full_clock_s` full-clock seconds."""
    e0, t0 = gpu.energy_j(), gpu.now_s()
    gpu.run(phase, full_clock_s)
    elapsed, joules = gpu.now_s() - t0, gpu.energy_j() - e0
    return elapsed, joules, joules / elapsed


def _clocks(gpu: SimulatedGpu) -> list[float]:
    top = gpu.max_sm_clock_mhz()
    return [top * f for f in (1.0, 0.9, 0.8, 0.7, 0.6)]


def _caps(gpu: SimulatedGpu) -> list[float]:
    lo, hi = gpu.power_limit_range_w()
    return [hi - k * (hi - lo) / 5 for k in range(6)]


def test_is_a_device_with_factory_settings() -> None:
    gpu = SimulatedGpu()
    assert isinstance(gpu, Device)
    lo, hi = gpu.power_limit_range_w()
    assert 0 < lo < hi and gpu.power_limit_w() == gpu.default_power_limit_w() == hi
    assert gpu.sm_clock_mhz() == gpu.max_sm_clock_mhz() and gpu.locked_sm_clock_mhz() is None


@pytest.mark.parametrize("phase", PHASES)
def test_energy_is_power_times_time(phase: str) -> None:
    gpu = SimulatedGpu()
    for cap, clock in [(None, None), (500.0, None), (None, 1400.0), (400.0, 1200.0)]:
        if cap is not None:
            gpu.set_power_limit_w(cap)
        gpu.lock_sm_clock_mhz(clock)
        elapsed, joules, _ = measure(gpu, phase, 4.0)
        assert elapsed == pytest.approx(4.0 * gpu.time_factor(phase))
        assert joules == pytest.approx(gpu.average_power_w(phase) * elapsed)
        assert joules == pytest.approx(phase_energy_j(phase, 4.0, gpu.power_limit_w(), clock))
    assert gpu.busy_s == pytest.approx(gpu.now_s())


@pytest.mark.parametrize("phase", PHASES)
def test_lower_clock_is_never_faster_nor_hungrier(phase: str) -> None:
    ref = SimulatedGpu()
    times, powers = [], []
    for clock in _clocks(ref):
        gpu = SimulatedGpu()
        gpu.lock_sm_clock_mhz(clock)
        elapsed, _, watts = measure(gpu, phase)
        times.append(elapsed)
        powers.append(watts)
    assert times == sorted(times) and powers == sorted(powers, reverse=True)
    assert times[-1] > times[0] and powers[-1] < powers[0]  # the clock does something in both phases


@pytest.mark.parametrize("phase", PHASES)
def test_tighter_cap_is_never_faster_nor_hungrier_and_power_stays_under_it(phase: str) -> None:
    times, powers = [], []
    for cap in _caps(SimulatedGpu()):
        gpu = SimulatedGpu()
        gpu.set_power_limit_w(cap)
        elapsed, _, watts = measure(gpu, phase)
        assert watts <= cap + 1e-6
        times.append(elapsed)
        powers.append(watts)
    assert times == sorted(times) and powers == sorted(powers, reverse=True)


def test_a_cap_binds_only_below_the_phase_draw() -> None:
    for phase in PHASES:
        draw = phase_power_w(phase)
        above = SimulatedGpu()
        above.set_power_limit_w(min(above.power_limit_range_w()[1], draw + 50))
        assert measure(above, phase) == pytest.approx(measure(SimulatedGpu(), phase))
    # prefill draws more than decode: a cap between the two slows prefill only
    cap = (phase_power_w("prefill") + phase_power_w("decode")) / 2
    gpu = SimulatedGpu()
    gpu.set_power_limit_w(cap)
    assert gpu.time_factor("prefill") > 1.0 and gpu.time_factor("decode") == 1.0
    assert clock_fraction("prefill", cap) < 1.0 == clock_fraction("decode", cap)


def test_decode_clock_locking_saves_energy_prefill_capping_saves_some() -> None:
    """What the controllers rely on: a lower decode clock costs a few percent of time and saves
    energy; a prefill cap saves energy at a proportional slowdown."""
    full = SimulatedGpu()
    _, e_full, _ = measure(full, "decode")
    slow = SimulatedGpu()
    slow.lock_sm_clock_mhz(0.6 * slow.max_sm_clock_mhz())
    t_slow, e_slow, _ = measure(slow, "decode")
    assert e_slow < 0.85 * e_full and t_slow < 1.1 * 10.0


def test_idle_and_warm_idle() -> None:
    gpu = SimulatedGpu()
    gpu.idle(10.0)
    cold_w = gpu.energy_j() / 10.0
    gpu.run("decode", 1.0)
    e0 = gpu.energy_j()
    gpu.idle(0.5)  # right after work: warm
    warm_w = (gpu.energy_j() - e0) / 0.5
    gpu.idle(5.0)
    e1 = gpu.energy_j()
    gpu.idle(5.0)  # long after work: back to idle
    assert warm_w > cold_w > 0
    assert (gpu.energy_j() - e1) / 5.0 == pytest.approx(cold_w)
    assert cold_w < phase_power_w("decode") < phase_power_w("prefill")


def test_refused_and_out_of_range_settings() -> None:
    gpu = SimulatedGpu(refuse_settings=True)
    with pytest.raises(DevicePermissionError):
        gpu.set_power_limit_w(500)
    with pytest.raises(DevicePermissionError):
        gpu.lock_sm_clock_mhz(1500)
    gpu = SimulatedGpu()
    lo, hi = gpu.power_limit_range_w()
    with pytest.raises(DeviceSettingOutOfRange):
        gpu.set_power_limit_w(lo - 1)
    with pytest.raises(DeviceSettingOutOfRange):
        gpu.lock_sm_clock_mhz(gpu.max_sm_clock_mhz() + 1)
    assert gpu.power_limit_w() == hi and gpu.sm_clock_mhz() == gpu.max_sm_clock_mhz()


def test_time_factors_are_at_least_one() -> None:
    for phase in PHASES:
        for cap in _caps(SimulatedGpu()):
            assert phase_time_factor(phase, cap) >= 1.0
