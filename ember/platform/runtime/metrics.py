"""Prometheus metrics of a worker's engines, read at scrape time from each instance's engine:
KV-cache usage ratio, batch size, queue depth, preemptions (labels: function, instance, node).

The collectors are module-level classes holding what they report: a class defined inside the
render function is a reference cycle (every type is), and its closure held the scrape's list of
instances, so each scrape kept the instances (and their models) alive until a full garbage
collection found it; with the worker's frozen heap (ember.platform.heap) that was never.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_LABELS = ["function", "instance", "node"]


class _Engines:
    def __init__(self, node_id: str, instances: list[Any]) -> None:
        self.node_id, self.instances = node_id, instances

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        usage = GaugeMetricFamily("ember_engine_kv_cache_usage_ratio",
                                  "KV-cache tokens reserved by running sequences / the instance's KV budget",
                                  labels=_LABELS)
        budget = GaugeMetricFamily("ember_engine_kv_budget_tokens", "The instance's KV-cache budget in tokens",
                                   labels=_LABELS)
        batch = GaugeMetricFamily("ember_engine_batch_size", "Sequences in the engine's batch", labels=_LABELS)
        queue = GaugeMetricFamily("ember_engine_queue_depth", "Sequences waiting for admission", labels=_LABELS)
        preempt = CounterMetricFamily("ember_engine_preemptions", "Sequences preempted (the policy never preempts)",
                                      labels=_LABELS)
        steps = CounterMetricFamily("ember_engine_steps", "Forward passes (prefill and decode)", labels=_LABELS)
        for inst in self.instances:
            try:
                s = inst.stats()
            except Exception:  # an instance closing meanwhile: skipped this scrape
                continue
            lv = [inst.function, inst.instance_id, self.node_id]
            usage.add_metric(lv, float(s["kv_usage_ratio"]))
            budget.add_metric(lv, float(s["kv_budget_tokens"]))
            batch.add_metric(lv, float(s["batch_size"]))
            queue.add_metric(lv, float(s["queue_depth"]))
            preempt.add_metric(lv, float(s["preemptions"]))
            steps.add_metric(lv, float(s["steps"]))
        yield from (usage, budget, batch, queue, preempt, steps)


class _Heap:
    def __init__(self, frozen_objects: int | None, torch_threads: int | None = None) -> None:
        self.frozen_objects = frozen_objects
        self.torch_threads = torch_threads

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        if self.frozen_objects is not None:
            yield GaugeMetricFamily("ember_worker_gc_frozen_objects",
                                    "Objects in the permanent generation: skipped by full garbage collections",
                                    value=float(self.frozen_objects))
        if self.torch_threads is not None:
            yield GaugeMetricFamily("ember_worker_torch_threads", "torch's intra-op threads (EMBER_TORCH_THREADS)",
                                    value=float(self.torch_threads))


def render_engine_metrics(node_id: str, instances: list[Any], *, frozen_objects: int | None = None,
                          torch_threads: int | None = None) -> tuple[bytes, str]:
    """The engines' metrics, plus the process's garbage-collector counters (collections per
    generation) and, when given, the objects frozen out of full collections (ember.platform.heap)
    and torch's intra-op threads."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, generate_latest

    registry = CollectorRegistry()
    registry.register(_Engines(node_id, instances))
    registry.register(_Heap(frozen_objects, torch_threads))
    GCCollector(registry=registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
