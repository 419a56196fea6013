"""Prometheus metrics for a NodeEnergyAgent. prometheus_client is imported when an
`EnergyMetrics` is made, never when ember.energy is imported (GPU machines may lack it)."""

from __future__ import annotations

from typing import Any

from ember.energy.agent import NodeEnergyAgent
from ember.energy.monitor import IDLE


class EnergyMetrics:
    """`ember_gpu_power_watts`, `ember_gpu_power_limit_watts`, `ember_energy_joules_total`
    (labels node, device) and `ember_energy_per_token_joules{function}`."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = REGISTRY if registry is None else registry
        self.power = Gauge(
            "ember_gpu_power_watts", "GPU board power draw", ["node", "device"], registry=registry
        )
        self.limit = Gauge(
            "ember_gpu_power_limit_watts", "GPU power limit in force", ["node", "device"], registry=registry
        )
        self.energy = Counter(
            "ember_energy_joules", "GPU energy drawn", ["node", "device"], registry=registry
        )
        self.per_token = Gauge(
            "ember_energy_per_token_joules",
            "Energy attributed per generated token",
            ["function"],
            registry=registry,
        )
        self._seen_j: dict[tuple[str, str], float] = {}

    def update(self, agent: NodeEnergyAgent) -> None:
        """Refresh every metric from the agent (call after `agent.tick()`)."""
        for device_id, controller in agent.controllers.items():
            dev = controller.device
            labels = (agent.node_id, device_id)
            self.power.labels(*labels).set(dev.power_w())
            self.limit.labels(*labels).set(dev.power_limit_w())
            energy_j = dev.energy_j()
            last = self._seen_j.get(labels)
            if last is not None and energy_j > last:
                self.energy.labels(*labels).inc(energy_j - last)
            elif last is None:
                self.energy.labels(*labels).inc(0)
            self._seen_j[labels] = energy_j
        for function, totals in agent.monitor.functions.items():
            if function != IDLE and totals.j_per_token is not None:
                self.per_token.labels(function).set(totals.j_per_token)
