"""Prometheus metrics of a worker's engines, read at scrape time from each instance's engine:
KV-cache usage ratio, batch size, queue depth, preemptions (labels: function, instance, node)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def render_engine_metrics(node_id: str, instances: list[Any], *, frozen_objects: int | None = None) -> tuple[bytes, str]:
    """The engines' metrics, plus the process's garbage-collector counters (collections per
    generation) and, when given, the objects frozen out of full collections (worker.heap)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

    class _Engines:
        def collect(self) -> Iterator[Metric]:
            labels = ["function", "instance", "node"]
            usage = GaugeMetricFamily("ember_engine_kv_cache_usage_ratio",
                                      "KV-cache tokens reserved by running sequences / the instance's KV budget", labels=labels)
            budget = GaugeMetricFamily("ember_engine_kv_budget_tokens", "The instance's KV-cache budget in tokens",
                                       labels=labels)
            batch = GaugeMetricFamily("ember_engine_batch_size", "Sequences in the engine's batch", labels=labels)
            queue = GaugeMetricFamily("ember_engine_queue_depth", "Sequences waiting for admission", labels=labels)
            preempt = CounterMetricFamily("ember_engine_preemptions", "Sequences preempted (the policy never preempts)",
                                          labels=labels)
            steps = CounterMetricFamily("ember_engine_steps", "Forward passes (prefill and decode)", labels=labels)
            for inst in instances:
                try:
                    s = inst.stats()
                except Exception:  # an instance closing meanwhile: skipped this scrape
                    continue
                lv = [inst.function, inst.instance_id, node_id]
                usage.add_metric(lv, float(s["kv_usage_ratio"]))
                budget.add_metric(lv, float(s["kv_budget_tokens"]))
                batch.add_metric(lv, float(s["batch_size"]))
                queue.add_metric(lv, float(s["queue_depth"]))
                preempt.add_metric(lv, float(s["preemptions"]))
                steps.add_metric(lv, float(s["steps"]))
            yield from (usage, budget, batch, queue, preempt, steps)

    class _Heap:
        def collect(self) -> Iterator[Metric]:
            if frozen_objects is not None:
                yield GaugeMetricFamily("ember_worker_gc_frozen_objects",
                                        "Objects in the permanent generation: skipped by full garbage collections",
                                        value=float(frozen_objects))

    registry = CollectorRegistry()
    registry.register(_Engines())
    registry.register(_Heap())
    GCCollector(registry=registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
