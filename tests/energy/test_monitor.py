"""Measurement windows and per-request energy attribution on simulated GPUs."""

from __future__ import annotations

import pytest

from ember.energy.monitor import IDLE, EnergyMonitor, RequestRecord
from ember.energy.simulated import SimulatedGpu
from ember.errors import NotFound


def rec(function: str, device: str, tokens: int, busy_s: float | None = None) -> RequestRecord:
    return RequestRecord(function, device, tokens, 0.1, 0.01, 1.0, 0.05, busy_s=busy_s)


def test_window_measures_energy_and_time() -> None:
    a, b = SimulatedGpu("sim:0"), SimulatedGpu("sim:1")
    mon = EnergyMonitor([a, b])
    mon.begin_window("w")
    a.run("decode", 2.0)
    b.idle(5.0)
    out = mon.end_window("w")
    assert out["sim:0"].time_s == pytest.approx(2.0)
    assert out["sim:0"].avg_power_w == pytest.approx(315, rel=0.01)
    assert out["sim:1"].energy_j == pytest.approx(350, rel=0.01)
    with pytest.raises(NotFound):
        mon.end_window("w")


def test_attribution_by_tokens_then_by_busy_time() -> None:
    gpu = SimulatedGpu("sim:0")
    mon = EnergyMonitor([gpu])
    gpu.run("decode", 1.0)  # 315 J
    mon.record_request(rec("chat", "sim:0", 30))
    mon.record_request(rec("code", "sim:0", 10))
    shares = {a.record.function: a.energy_j for a in mon.attribute()}
    assert shares["chat"] == pytest.approx(315 * 0.75) and shares["code"] == pytest.approx(315 * 0.25)

    gpu.run("prefill", 1.0)  # 665 J
    mon.record_request(rec("chat", "sim:0", 100, busy_s=0.2))
    mon.record_request(rec("code", "sim:0", 1, busy_s=0.8))
    shares = {a.record.function: a.energy_j for a in mon.attribute()}
    assert shares["code"] == pytest.approx(665 * 0.8)
    assert mon.functions["chat"].tokens == 130
    assert mon.functions["chat"].j_per_token == pytest.approx((315 * 0.75 + 665 * 0.2) / 130)


def test_energy_without_requests_is_booked_as_idle() -> None:
    gpu = SimulatedGpu("sim:0")
    mon = EnergyMonitor([gpu])
    gpu.idle(10.0)
    assert mon.attribute() == []
    assert mon.functions[IDLE].energy_j == pytest.approx(700)
    with pytest.raises(NotFound):
        mon.record_request(rec("chat", "cuda:9", 1))
