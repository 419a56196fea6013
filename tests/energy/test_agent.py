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
