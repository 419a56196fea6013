"""OpenTelemetry traces of invocations (off unless the standard OTEL_* variables ask for them).

One span per invocation, named as the GenAI semantic conventions say (`chat tiny`), with child
spans `ember.queue` (waiting for a request slot: routing, and the cold start when there is one),
`ember.placement` and `ember.load` (a cold start: tier, bytes, seconds), `ember.prefill` (until the
first token reached the gateway) and `ember.decode`. The invocation span carries the function, the
worker, `gen_ai.*` attributes (model, token usage, finish reasons) and `ember.energy_j`, the joules
the worker's energy monitor measured on the request's device while it ran. The trace id goes back
in the `x-ember-trace-id` response header; a W3C `traceparent` request header continues a caller's
trace.

Turned on by `OTEL_TRACES_EXPORTER` (e.g. `otlp`, `console`; `none` keeps it off) or by an OTLP
endpoint variable; `OTEL_SDK_DISABLED=true` wins. The exporter, sampler, batch processor and
resource read their usual `OTEL_*` variables. Nothing here imports OpenTelemetry while tracing is
off, and every hook is a cheap no-op then.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ember.errors import ConfigError

TRACE_HEADER = "x-ember-trace-id"
_current: contextvars.ContextVar[InvocationTrace | None] = contextvars.ContextVar("ember_trace", default=None)


def provider_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """A TracerProvider with the exporters OTEL_TRACES_EXPORTER names, or None (tracing off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        raw = "otlp"
    names = [n.strip().lower() for n in raw.split(",") if n.strip() and n.strip().lower() != "none"]
    if not names:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={raw!r} needs opentelemetry-sdk: {e}") from e
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or "ember-gateway"}))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def _exporter(name: str) -> Any:
    """An exporter by its registered name (entry point group `opentelemetry_traces_exporter`);
    `otlp` falls back to the HTTP/protobuf exporter when the gRPC one is not installed."""
    from importlib.metadata import entry_points

    found = {e.name: e for e in entry_points(group="opentelemetry_traces_exporter")}
    if name == "otlp" and "otlp" not in found:
        name = "otlp_proto_http"
    if name not in found:
        raise ConfigError(f"unknown OTEL_TRACES_EXPORTER {name!r} (installed: {', '.join(sorted(found)) or 'none'})")
    return found[name].load()()


class _Otel:
    """The OpenTelemetry names the hooks use, imported once (only when tracing is on)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context, self.trace, self.server = context, trace, SpanKind.SERVER
        self.Status, self.StatusCode = Status, StatusCode
        self.propagator = TraceContextTextMapPropagator()


class InvocationTracer:
    """Starts invocation traces for one gateway app (None provider: every trace is a no-op)."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("ember.gateway") if provider is not None else None
        self.otel = _Otel() if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def start(self, function: str, operation: str, request_headers: Mapping[str, str],
              params: Mapping[str, Any]) -> InvocationTrace:
        """Begin the invocation span (`operation` is "chat" or "text_completion")."""
        if self.tracer is None:
            return _NOOP
        return InvocationTrace(self.tracer, self.otel, function, operation, request_headers, params)

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class InvocationTrace:
    """The spans of one invocation. Call in order: `active()` around routing, `acquired`,
    `first_token`, `done`, and `end` on every path (it is idempotent)."""

    def __init__(self, tracer: Any, otel: _Otel, function: str, operation: str, request_headers: Mapping[str, str],
                 params: Mapping[str, Any]) -> None:
        self.tracer = tracer
        self.otel = otel
        parent = None
        if "traceparent" in request_headers:  # a caller's trace to continue (W3C trace context)
            parent = otel.propagator.extract({k: request_headers[k] for k in ("traceparent", "tracestate")
                                              if k in request_headers})
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "ember",
                                 "gen_ai.request.model": function, "ember.function": function}
        attrs.update({f"gen_ai.request.{k}": v for k, v in params.items() if v is not None})
        self.root = tracer.start_span(f"{operation} {function}", context=parent, kind=otel.server, attributes=attrs)
        self.root_context = otel.trace.set_span_in_context(self.root)
        self.t0_ns = time.time_ns()
        self.t_acquired_ns: int | None = None
        self.t_first_ns: int | None = None
        self.ended = False

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make the invocation span current, so placement and load spans become its children."""
        token = self.otel.context.attach(self.root_context)
        cv = _current.set(self)
        try:
            yield
        finally:
            _current.reset(cv)
            self.otel.context.detach(token)

    def child(self, name: str, start_ns: int | None = None, **attrs: Any) -> Any:
        return self.tracer.start_span(name, context=self.root_context, start_time=start_ns,
                                      attributes={k: v for k, v in attrs.items() if v is not None})

    def headers(self) -> dict[str, str]:
        ctx = self.root.get_span_context()
        return {TRACE_HEADER: f"{ctx.trace_id:032x}"} if ctx.is_valid else {}

    def acquired(self, target: Any) -> None:
        """A request slot is held on `target` (an InvocationTarget): end the queue span."""
        self.t_acquired_ns = time.time_ns()
        self.root.set_attributes({"ember.worker": target.node_id, "ember.instance": target.instance_id,
                                  "ember.cold_start": bool(target.cold), "ember.load_tier": target.tier,
                                  "ember.startup_ms": float(target.startup_ms), "server.address": target.node_id})
        self.child("ember.queue", self.t0_ns, **{"ember.cold_start": bool(target.cold)}).end(self.t_acquired_ns)

    def first_token(self) -> None:
        if self.t_first_ns is None:
            self.t_first_ns = time.time_ns()
            self.child("ember.prefill", self.t_acquired_ns or self.t0_ns).end(self.t_first_ns)

    def done(self, done: Mapping[str, Any], response_id: str = "") -> None:
        """The worker's final event: token usage, finish reason, worker timings and joules."""
        now = time.time_ns()
        if self.t_first_ns is None:
            self.first_token()
        self.child("ember.decode", self.t_first_ns, **{"gen_ai.usage.output_tokens": done.get("completion_tokens"),
                                                        "ember.tpot_s": done.get("tpot_s")}).end(now)
        attrs = {"gen_ai.usage.input_tokens": done.get("prompt_tokens"),
                 "gen_ai.usage.output_tokens": done.get("completion_tokens"),
                 "gen_ai.response.finish_reasons": [str(done.get("finish_reason", "stop"))],
                 "gen_ai.response.id": response_id or None,
                 "ember.worker.ttft_s": done.get("ttft_s"), "ember.worker.tpot_s": done.get("tpot_s"),
                 "ember.energy_j": done.get("energy_j")}
        self.root.set_attributes({k: v for k, v in attrs.items() if v is not None})

    def fail(self, err: BaseException) -> None:
        self.root.set_status(self.otel.Status(self.otel.StatusCode.ERROR, str(err)[:200]))
        self.root.set_attribute("error.type", type(err).__name__)
        status = getattr(err, "status_code", None)
        if status is not None:
            self.root.set_attribute("http.response.status_code", int(status))

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.root.end()


class _NoTrace(InvocationTrace):
    """Tracing off: every hook does nothing."""

    def __init__(self) -> None:  # noqa: D107 - nothing to hold
        self.ended = True

    @contextmanager
    def active(self) -> Iterator[None]:
        yield

    def headers(self) -> dict[str, str]:
        return {}

    def acquired(self, target: Any) -> None:
        pass

    def first_token(self) -> None:
        pass

    def done(self, done: Mapping[str, Any], response_id: str = "") -> None:
        pass

    def fail(self, err: BaseException) -> None:
        pass

    def end(self) -> None:
        pass


_NOOP = _NoTrace()


class _StepSpan:
    """A child span of the current invocation (or nothing): `set` adds attributes."""

    def __init__(self, span: Any) -> None:
        self.span = span

    def set(self, **attrs: Any) -> None:
        if self.span is not None:
            self.span.set_attributes({k: v for k, v in attrs.items() if v is not None})


@contextmanager
def step(name: str, **attrs: Any) -> Iterator[_StepSpan]:
    """A child span of the invocation being routed in this task (`ember.placement`, `ember.load`);
    a no-op outside a traced invocation. An exception marks the span as failed."""
    trace = _current.get()
    if trace is None:
        yield _StepSpan(None)
        return
    span = trace.child(name, **attrs)
    try:
        yield _StepSpan(span)
    except BaseException as e:
        span.record_exception(e)
        span.set_status(trace.otel.Status(trace.otel.StatusCode.ERROR, type(e).__name__))
        raise
    finally:
        span.end()
