"""SimulatedGpu reproduces every reference point of the calibration table (shared/DESIGN.md) within 10%."""

from __future__ import annotations

import pytest

from ember.energy.device import Device
from ember.energy.simulated import (
    SimulatedGpu,
    clock_fraction,
    idle_power_w,
    phase_power_w,
    phase_time_factor,
)
from ember.errors import DevicePermissionError, DeviceSettingOutOfRange


def close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= 0.10 * abs(expected)


def measure(gpu: SimulatedGpu, phase: str, full_clock_s: float = 10.0) -> tuple[float, float]:
    """(average power W, time factor) of running `phase`, measured from energy and time."""
    e0, t0 = gpu.energy_j(), gpu.now_s()
    gpu.run(phase, full_clock_s)
    elapsed = gpu.now_s() - t0
    return (gpu.energy_j() - e0) / elapsed, elapsed / full_clock_s


def test_is_a_device() -> None:
    assert isinstance(SimulatedGpu(), Device)


def test_limits_and_clocks() -> None:
    gpu = SimulatedGpu()
    lo, hi = gpu.power_limit_range_w()
    assert close(lo, 200) and close(hi, 700)
    assert close(gpu.default_power_limit_w(), 700) and close(gpu.power_limit_w(), 700)
    assert close(gpu.max_sm_clock_mhz(), 1980) and close(gpu.sm_clock_mhz(), 1980)


def test_idle_power() -> None:
    gpu = SimulatedGpu()
    e0 = gpu.energy_j()
    gpu.idle(10.0)
    assert close((gpu.energy_j() - e0) / 10.0, 70)  # never ran
    gpu.run("decode", 1.0)
    e0 = gpu.energy_j()
    gpu.idle(0.5)  # within the last second of work
    assert close((gpu.energy_j() - e0) / 0.5, 110)
    gpu.idle(0.5)
    e0 = gpu.energy_j()
    gpu.idle(5.0)
    assert close((gpu.energy_j() - e0) / 5.0, 70)
    assert idle_power_w(0.2) == 110 and idle_power_w(3.0) == 70 and idle_power_w(None) == 70


def test_prefill_uncapped_full_clock() -> None:
    power, factor = measure(SimulatedGpu(), "prefill")
    assert close(power, 665) and close(factor, 1.0)


def test_prefill_capped_below_draw() -> None:
    gpu = SimulatedGpu()
    gpu.set_power_limit_w(572)
    power, factor = measure(gpu, "prefill")
    assert close(clock_fraction("prefill", 572), 0.92)
    assert close(factor, 1.09) and power <= 572 + 1e-6 and close(power, 572)


def test_decode_full_clock_and_cap_above_draw() -> None:
    power, factor = measure(SimulatedGpu(), "decode")
    assert close(power, 315) and close(factor, 1.0)
    gpu = SimulatedGpu()
    gpu.set_power_limit_w(400)  # above decode's draw: nothing changes
    assert measure(gpu, "decode") == pytest.approx((power, factor))


@pytest.mark.parametrize("f", [0.6, 0.7, 0.8, 0.9, 1.0])
def test_decode_at_sm_clock(f: float) -> None:
    gpu = SimulatedGpu()
    gpu.lock_sm_clock_mhz(f * 1980)
    power, factor = measure(gpu, "decode")
    assert close(factor, 1 + 0.15 * (1 - f)) and close(power, 70 + 245 * f)


@pytest.mark.parametrize("f", [0.5, 0.6, 0.8, 0.92, 1.0])
def test_prefill_at_sm_clock(f: float) -> None:
    gpu = SimulatedGpu()
    gpu.lock_sm_clock_mhz(f * 1980)
    power, factor = measure(gpu, "prefill")
    assert close(factor, 1 / f) and close(power, 70 + 595 * f**2)
    assert close(phase_power_w("prefill", 700, f * 1980), 70 + 595 * f**2)
    assert close(phase_time_factor("prefill", 700, f * 1980), 1 / f)


def test_refused_and_out_of_range_settings() -> None:
    gpu = SimulatedGpu(refuse_settings=True)
    with pytest.raises(DevicePermissionError):
        gpu.set_power_limit_w(500)
    with pytest.raises(DevicePermissionError):
        gpu.lock_sm_clock_mhz(1500)
    gpu = SimulatedGpu()
    with pytest.raises(DeviceSettingOutOfRange):
        gpu.set_power_limit_w(100)
    with pytest.raises(DeviceSettingOutOfRange):
        gpu.lock_sm_clock_mhz(2500)
    assert gpu.power_limit_w() == 700 and gpu.sm_clock_mhz() == 1980
