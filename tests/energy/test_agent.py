"""NodeEnergyAgent snapshots and its Prometheus metrics."""

from __future__ import annotations

from ember.energy.agent import NodeEnergyAgent
from ember.energy.simulated import SimulatedGpu

FIELDS = {
    "node",
    "device",
    "power_w",
    "limit_w",
    "sm_clock_mhz",
    "energy_j",
    "j_per_token",
    "slo_attainment",
    "mode",
    "last_decision",
}


def test_snapshot_has_the_api_fields_and_attribution() -> None:
    gpus = [SimulatedGpu("sim:0"), SimulatedGpu("sim:1")]
    agent = NodeEnergyAgent("n1", gpus, "recommend")
    gpus[0].run("decode", 2.0)
    agent.record_request("chat", "sim:0", 100, 0.2, 0.02, 1.0, 0.05)
    agent.record_request("chat", "sim:0", 100, 2.0, 0.02, 1.0, 0.05)  # misses its TTFT SLO
    attributions, _ = agent.tick()
    assert sum(a.energy_j for a in attributions) == gpus[0].energy_j()
    snaps = {s["device"]: s for s in agent.snapshot()}
    assert FIELDS <= set(snaps["sim:0"])
    assert snaps["sim:0"]["slo_attainment"] == 0.5 and snaps["sim:1"]["slo_attainment"] is None
    assert snaps["sim:0"]["j_per_token"] == gpus[0].energy_j() / 200
    assert snaps["sim:0"]["functions"]["chat"]["requests"] == 2
    assert snaps["sim:0"]["mode"] == "recommend" and snaps["sim:0"]["limit_w"] == 700


def test_prometheus_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from ember.energy.metrics import EnergyMetrics

    gpu = SimulatedGpu("sim:0")
    agent = NodeEnergyAgent("n1", [gpu], "observe")
    registry = CollectorRegistry()
    metrics = EnergyMetrics(registry)
    metrics.update(agent)
    gpu.run("decode", 1.0)
    agent.record_request("chat", "sim:0", 10, 0.1, 0.01, 1.0, 0.05)
    agent.tick()
    metrics.update(agent)
    text = generate_latest(registry).decode()
    assert 'ember_gpu_power_watts{device="sim:0",node="n1"} 315.0' in text
    assert 'ember_gpu_power_limit_watts{device="sim:0",node="n1"} 700.0' in text
    assert 'ember_energy_joules_total{device="sim:0",node="n1"} 315.0' in text
    assert 'ember_energy_per_token_joules{function="chat"} 31.5' in text


def _first_request_slow(warmup: int) -> NodeEnergyAgent:
    gpu = SimulatedGpu("sim:0")
    agent = NodeEnergyAgent("n1", [gpu], "recommend", warmup_requests=warmup, profile_windows=2, min_requests=3)
    agent.record_request("chat", "sim:0", 64, 0.9, 0.01, 0.5, 0.1)  # kernels loading: TTFT 1.8x the SLO
    for window in range(4):
        for _ in range(3 if window == 0 else 4):
            agent.record_request("chat", "sim:0", 64, 0.01, 0.009, 0.5, 0.1)
        agent.tick()
    return agent


def test_warmup_requests_are_counted_but_not_shown_to_the_controller() -> None:
    plain, warm = _first_request_slow(0), _first_request_slow(1)
    # without a warm-up allowance the one slow first request ends profiling at the top
    assert plain.controllers["sim:0"].phase == "online"
    assert plain.controllers["sim:0"].setting.sm_clock_mhz is None
    # with it, profiling goes on stepping down through the slack
    assert warm.controllers["sim:0"].phase == "profiling"
    assert warm.controllers["sim:0"].setting.sm_clock_mhz is not None
    # the slow request still counts against the function's SLO attainment either way
    for agent in (plain, warm):
        chat = agent.snapshot()[0]["functions"]["chat"]
        assert chat["requests"] == 16 and chat["slo_attainment"] == 15 / 16
