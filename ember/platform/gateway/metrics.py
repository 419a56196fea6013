"""Prometheus metrics of one gateway (a registry per app, so tests can build many apps)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time to first token, seen by the gateway",
                              ["function"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("ember_time_per_output_token_seconds", "Mean time per output token after the first",
                              ["function"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("ember_requests_total", "Invocations by function and HTTP status",
                                ["function", "status"], registry=self.registry)
        self.cold_starts = Counter("ember_cold_starts_total", "Cold starts by the tier the checkpoint came from",
                                   ["tier"], registry=self.registry)
        self.startup = Histogram("ember_startup_seconds", "Cold-start time until the instance was ready",
                                 ["tier"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        # ember_instances: InstancesCollector (read from Redis at scrape time)
        self.slo_requests = Counter("ember_slo_requests", "Finished requests by whether they met the function's "
                                    "TTFT and TPOT SLO (TTFT as the client saw it)", ["function", "result"],
                                    registry=self.registry)
        self.placements_waiting = Gauge("ember_placements_waiting",
                                        "Requests of this gateway waiting because no device had room",
                                        registry=self.registry, multiprocess_mode="livesum")
        self.placements_waited = Counter("ember_placements_waited", "Requests that waited because no device had room",
                                         registry=self.registry)
        # ember_nodes: nodescaling.NodesCollector (the node scaler's counts, read from Redis at scrape time)
        self.evictions = Counter("ember_evictions_total", "Idle instances evicted to make room for a cold start",
                                 ["function"], registry=self.registry)
        self._cluster: list[Any] = []  # scrape-time collectors reading Redis (the whole cluster's state)
        self._slo_seen: set[str] = set()

    def slo_request(self, function: str, met: bool) -> None:
        """Count a finished request as met or missed. Both series exist from a function's first
        request, so met/total is 0 rather than empty when none is met (the SLO alert must fire)."""
        if function not in self._slo_seen:
            self._slo_seen.add(function)
            self.slo_requests.labels(function, "missed" if met else "met")
        self.slo_requests.labels(function, "met" if met else "missed").inc()

    def add_cluster_collector(self, collector: Any) -> None:
        self.registry.register(collector)
        self._cluster.append(collector)

    def exposition(self) -> bytes:
        """The text a scrape gets. With several gateway processes (PROMETHEUS_MULTIPROC_DIR set) the
        values of all of them, summed, whichever answers; the cluster collectors read Redis once."""
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        for c in self._cluster:
            registry.register(c)
        return generate_latest(registry)


class InstancesCollector:
    """`ember_instances{function,state}`, counted in Redis at scrape time by the gateway that holds
    the autoscaler lease (`holds(holder)`: this process, or another process of the same gateway).
    One gateway exports it, so a sum over gateways counts each instance once; a gateway without the
    lease exports none (it used to export the counts it last set while it held the lease, for good)."""

    def __init__(self, cluster: Callable[[], Any], holds: Callable[[str], bool]) -> None:
        self.cluster = cluster
        self.holds = holds

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("ember_instances", "Function instances by state", labels=["function", "state"])
        try:  # a scrape must not fail because Redis is away: the family stays empty
            cluster = self.cluster()
            holder = cluster.lease_holder("autoscaler")
            if holder is not None and self.holds(holder):
                for (fn, state), n in sorted(cluster.instance_counts().items()):
                    family.add_metric([fn, state], float(n))
        except Exception:  # noqa: BLE001 - see above
            pass
        yield family


class ClusterEnergyCollector:
    """GPU power, limits and energy of every device in the cluster, read at scrape time from the
    snapshots workers publish to Redis: `ember_gpu_power_watts`, `ember_gpu_power_limit_watts`,
    `ember_energy_joules_total`, `ember_gpu_sm_clock_mhz`, `ember_gpu_power_cap_watts` (the allocator's
    cap, where one is set), `ember_gpu_slo_attainment` (labels node, device) and
    `ember_energy_per_token_joules{function}`."""

    def __init__(self, snapshots: Callable[[], list[dict[str, Any]]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        power = GaugeMetricFamily("ember_gpu_power_watts", "GPU board power draw", labels=["node", "device"])
        limit = GaugeMetricFamily("ember_gpu_power_limit_watts", "GPU power limit in force",
                                  labels=["node", "device"])
        energy = CounterMetricFamily("ember_energy_joules", "GPU energy drawn since the worker started",
                                     labels=["node", "device"])
        per_token = GaugeMetricFamily("ember_energy_per_token_joules", "Energy attributed per generated token",
                                      labels=["function"])
        clock = GaugeMetricFamily("ember_gpu_sm_clock_mhz", "GPU SM clock", labels=["node", "device"])
        cap = GaugeMetricFamily("ember_gpu_power_cap_watts", "Power cap the budget allocator set",
                                labels=["node", "device"])
        slo = GaugeMetricFamily("ember_gpu_slo_attainment", "Share of the device's recent requests that met their SLO",
                                labels=["node", "device"])
        tokens_j: dict[str, list[float]] = {}
        try:
            snaps = self.snapshots()
        except Exception:  # a scrape must not fail because Redis is away; the families stay empty
            snaps = []
        for s in snaps:
            labels = [str(s.get("node")), str(s.get("device"))]
            power.add_metric(labels, float(s.get("power_w") or 0.0))
            limit.add_metric(labels, float(s.get("limit_w") or 0.0))
            energy.add_metric(labels, float(s.get("energy_j") or 0.0))
            clock.add_metric(labels, float(s.get("sm_clock_mhz") or 0.0))
            if s.get("cap_w") is not None:
                cap.add_metric(labels, float(s["cap_w"]))
            if s.get("slo_attainment") is not None:
                slo.add_metric(labels, float(s["slo_attainment"]))
            for fn, f in (s.get("functions") or {}).items():
                if f.get("j_per_token"):
                    tokens_j.setdefault(fn, []).append(float(f["j_per_token"]))
        for fn, values in sorted(tokens_j.items()):
            per_token.add_metric([fn], sum(values) / len(values))
        yield from (power, limit, energy, per_token, clock, cap, slo)
