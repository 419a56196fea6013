"""The demand the autoscaler's prefetch rule reads: the gateway's meter, fed the same way live and
in the simulator (before, the simulator had its own rule: half the last step's rate plus half the
previous estimate, so one request in a 10 s step already counted as 0.05 per second)."""

from __future__ import annotations

import pytest

from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.demand import DemandMeter
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation, build_trace


def test_the_simulator_feeds_the_autoscaler_the_gateways_demand() -> None:
    cfg = SimConfig(nodes=2, gpus_per_node=2, functions=20, duration_s=120.0, seed=3).check()
    sim = _Simulation(cfg, build_trace(cfg), get_policy("ember"), Autoscaler())
    seen: list[dict[str, float]] = []
    step = sim.autoscaler.step

    def recording(*args, **kw):  # noqa: ANN002, ANN003
        seen.append(dict(kw["demand_per_s"]))
        return step(*args, **kw)

    sim.autoscaler.step = recording  # type: ignore[method-assign]
    meter, reference = DemandMeter(now=0.0), DemandMeter(now=0.0)
    counts = {0: 1}  # one request to fn 0 in the first 10 s step
    sim.cluster.now = 10.0
    sim._autoscale(meter, dict(counts))
    reference.count(sim.names[0])
    want = reference.rates_per_s(10.0)
    assert seen[-1] == pytest.approx(want)
    assert seen[-1][sim.names[0]] == pytest.approx(1 / 60)  # alpha 10/60 of 1 request per 10 s
    assert seen[-1][sim.names[0]] < Autoscaler().prefetch_min_rate_per_s  # one request is not popular


def test_a_function_without_requests_is_forgotten_once_its_rate_has_decayed() -> None:
    """A deleted or idle function's rate decays each step; once it is no demand at all it leaves
    the meter (before, every function ever invoked kept an entry in every gateway for good)."""
    meter = DemandMeter(now=0.0)
    meter.count("gone")
    meter.count("busy")
    assert meter.rates_per_s(1.0)["gone"] > 0
    steps = 0
    while "gone" in meter.rates_per_s(1.0 + steps) and steps < 10_000:
        meter.count("busy")
        steps += 1
    assert 100 < steps < 10_000  # ~1,500 one-second steps at a 60 s window, not at once
    assert meter.rates_per_s(2.0 + steps)["busy"] > 0.5
