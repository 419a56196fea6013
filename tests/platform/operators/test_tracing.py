"""Invocation traces through a real gateway and worker, read from the SDK's in-memory exporter:
the span tree of a cold and of a warm request, GenAI attributes, joules, the trace id header."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from ember.errors import ConfigError
from ember.platform.gateway.tracing import TRACE_HEADER, provider_from_env
from tests.platform.operators.conftest import OpsPlatform


def _trace(ops: OpsPlatform, trace_id: str, root_name: str) -> tuple[Any, dict[str, Any]]:
    """The finished root span of `trace_id` and its children by name (the root of a streamed
    response ends just after the last byte, so wait for it briefly)."""
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in ops.spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]
        roots = [s for s in spans if s.name == root_name]
        if roots or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert len(children) == len(spans) - 1, "every other span is a direct child of the invocation span"
    return root, children


def test_cold_then_warm_request_span_trees(ops: OpsPlatform) -> None:
    ops.deploy("traced")
    cold = ops.chat("traced", max_tokens=6, temperature=0.0)
    assert cold.status_code == 200, cold.text
    assert cold.headers["x-ember-cold-start"] == "true"
    root, kids = _trace(ops, cold.headers[TRACE_HEADER], "chat traced")
    assert set(kids) == {"ember.queue", "ember.placement", "ember.load", "ember.prefill", "ember.decode"}
    a = root.attributes
    usage = cold.json()["usage"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "traced"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.request.max_tokens"] == 6 and a["gen_ai.request.temperature"] == 0.0
    assert a["ember.function"] == "traced" and a["ember.worker"] == cold.headers["x-ember-worker"] == "ops-node"
    assert a["ember.cold_start"] is True and a["ember.load_tier"] == cold.headers["x-ember-load-tier"]
    assert a["ember.energy_j"] > 0.0  # the emulated GPU drew energy while the request ran on it
    load = kids["ember.load"].attributes
    assert load["ember.load_tier"] == cold.headers["x-ember-load-tier"]
    assert load["ember.load_bytes"] > 0 and load["ember.load_seconds"] > 0
    assert kids["ember.placement"].attributes["ember.worker"] == "ops-node"
    # the phases follow each other: queue (holding the cold start) -> prefill -> decode
    assert kids["ember.queue"].end_time <= kids["ember.prefill"].start_time + 1
    assert kids["ember.prefill"].end_time <= kids["ember.decode"].start_time + 1
    assert kids["ember.load"].start_time >= kids["ember.placement"].end_time - 1

    # warm and streamed, continuing the caller's trace from a W3C traceparent
    parent_trace = "0af7651916cd43dd8448eb211c80319c"
    with httpx.stream("POST", f"{ops.url}/v1/chat/completions", headers={
            **ops.headers(), "traceparent": f"00-{parent_trace}-b7ad6b7169203331-01"}, timeout=60,
            json={"model": "traced", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                  "stream": True, "stream_options": {"include_usage": True}}) as warm:
        assert warm.status_code == 200
        assert warm.headers["x-ember-cold-start"] == "false"
        assert warm.headers[TRACE_HEADER] == parent_trace
        lines = [line for line in warm.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    root, kids = _trace(ops, parent_trace, "chat traced")
    assert f"{root.parent.span_id:016x}" == "b7ad6b7169203331"
    assert set(kids) == {"ember.queue", "ember.prefill", "ember.decode"}
    assert root.attributes["ember.cold_start"] is False and root.attributes["ember.load_tier"] == "warm"
    assert root.attributes["gen_ai.usage.output_tokens"] >= 1


def test_refused_invocation_is_an_error_span(ops: OpsPlatform) -> None:
    ops.deploy("traced")
    r = ops.chat("traced", max_tokens=4000)  # the worker refuses: prompt + max_tokens exceed the context
    assert r.status_code == 400, r.text
    deadline = time.monotonic() + 10
    while not (errors := [s for s in ops.spans.get_finished_spans()
                          if s.name == "chat traced" and s.attributes.get("http.response.status_code") == 400]):
        assert time.monotonic() < deadline, "no error span"
        time.sleep(0.05)
    assert errors[-1].status.status_code.name == "ERROR" and errors[-1].attributes["error.type"] == "EmberError"


def test_tracing_is_off_unless_otel_variables_ask() -> None:
    assert provider_from_env({}) is None
    assert provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}) is None
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw-a"})
    try:
        assert provider is not None and provider.resource.attributes["service.name"] == "gw-a"
    finally:
        provider.shutdown()
    otlp = provider_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert otlp is not None
    otlp.shutdown()
    with pytest.raises(ConfigError, match="unknown OTEL_TRACES_EXPORTER"):
        provider_from_env({"OTEL_TRACES_EXPORTER": "zipkin-nope"})
