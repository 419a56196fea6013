"""The allocator: watts split by SLO pressure, misses with reasons, the day's energy budget."""

from __future__ import annotations

import pytest

from ember.energy.budget import EnergyBudget, allocate, need_w


def snap(node: str, device: str, avg_w: float, pressure: float = 0.3, fn: str = "chat") -> dict[str, object]:
    return {
        "node": node,
        "device": device,
        "avg_power_w": avg_w,
        "power_w": avg_w,
        "limit_w": 700.0,
        "min_limit_w": 200.0,
        "max_limit_w": 700.0,
        "pressure": pressure,
        "functions": {fn: {}},
    }


def test_no_budget_means_no_caps() -> None:
    a = allocate(EnergyBudget(), [snap("n1", "g0", 300)], used_j_today=0, seconds_left_today=3600)
    assert a.caps_w == {"n1/g0": None} and a.misses == []
    assert a.projected_kwh_today == pytest.approx(300 * 3600 / 3.6e6)


def test_pressure_raises_the_need() -> None:
    assert need_w(snap("n", "g", 300, pressure=0.2)) == pytest.approx(330)
    assert need_w(snap("n", "g", 300, pressure=0.9)) > 330
    assert need_w(snap("n", "g", 300, pressure=1.2)) == 700  # missing SLOs already: uncapped
    assert need_w(snap("n", "g", 50)) == 200  # never below the hardware minimum


def test_roomy_budget_gives_needs_then_splits_the_rest_by_pressure() -> None:
    devices = [snap("n1", "g0", 300, pressure=0.2), snap("n1", "g1", 300, pressure=0.7)]
    a = allocate(EnergyBudget(cluster_watts=1000), devices, 0, 3600)
    caps = a.caps_w
    assert sum(caps.values()) == pytest.approx(1000, abs=1)  # type: ignore[arg-type]
    assert caps["n1/g1"] > caps["n1/g0"] >= a.need_w["n1/g0"]  # type: ignore[operator]
    assert a.misses == []


def test_short_budget_reports_the_functions_that_miss() -> None:
    devices = [snap("n1", "g0", 400, fn="chat"), snap("n1", "g1", 400, fn="code")]
    a = allocate(EnergyBudget(cluster_watts=600), devices, 0, 3600)
    assert sum(a.caps_w.values()) <= 600 + 1e-6  # type: ignore[arg-type]
    assert {m.function for m in a.misses} == {"chat", "code"}
    assert "cluster budget 600 W" in a.misses[0].reason


def test_node_budget_then_cluster_budget() -> None:
    devices = [snap("n1", "g0", 300), snap("n1", "g1", 300), snap("n2", "g0", 300)]
    a = allocate(EnergyBudget(cluster_watts=1500, node_watts={"n1": 500}), devices, 0, 3600)
    assert a.caps_w["n1/g0"] + a.caps_w["n1/g1"] <= 500 + 1e-6  # type: ignore[operator]
    assert sum(700.0 if c is None else c for c in a.caps_w.values()) <= 1500 + 1e-6  # None: uncapped (700 W)
    assert {m.node for m in a.misses} == {"n1"}


def test_daily_energy_budget_lowers_caps_as_far_as_slos_allow() -> None:
    devices = [snap("n1", "g0", 400, pressure=0.0), snap("n1", "g1", 400, pressure=0.0)]
    # 10 kWh used, 2 h left, 11 kWh budget: 1 kWh / 2 h = 500 W allowed on average vs 800 W drawn
    a = allocate(EnergyBudget(energy_kwh_per_day=11), devices, 10 * 3.6e6, 7200)
    assert all(c is not None and c < 700 for c in a.caps_w.values())
    assert a.misses  # 440 W x 2 needed for the SLOs > 500 W allowed
    assert "11 kWh/day" in a.misses[0].reason
    loose = allocate(EnergyBudget(energy_kwh_per_day=100), devices, 10 * 3.6e6, 7200)
    assert loose.misses == [] and loose.caps_w == {"n1/g0": None, "n1/g1": None}
