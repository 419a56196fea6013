"""Prometheus metrics of one gateway (a registry per app, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.instances = Gauge("ember_instances", "Function instances by state", ["function", "state"],
                               registry=self.registry)
