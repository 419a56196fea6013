"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming and not)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, NamedTuple

import anyio
from anyio import to_thread
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.errors import EmberError, RateLimited
from ember.platform.gateway.auth import Principal, key_row_for, principal_of
from ember.platform.gateway.deps import AnyPrincipal
from ember.platform.gateway.invoke import InvocationTarget, Invoker
from ember.platform.gateway.openai_input import (
    InvalidParameter,
    chat_messages,
    generate_request,
    upfront_completion_tokens,
)
from ember.platform.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FunctionSpec,
    GenerateRequest,
    _Sampling,
)
from ember.platform.gateway.ratelimit import KeyLimits, estimate_tokens
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.gateway.tracing import InvocationTrace
from ember.platform.http_common import ClientWatch
from ember.platform.names import check_name
from ember.platform.state import Keys

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, principal: AnyPrincipal) -> dict[str, Any]:
    specs = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).list)
    visible = [s for s in specs if principal.role in ("admin", "invoker", "operator") or s.owner == principal.id]
    return {"object": "list", "data": [_model_object(s) for s in visible]}


@router.get("/v1/models/{model}")
async def retrieve_model(model: str, request: Request, principal: AnyPrincipal) -> dict[str, Any]:
    """One model (OpenAI's `models.retrieve`): a function the caller may see, else 404."""
    spec = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).get_visible, model, principal)
    return _model_object(spec)


def _model_object(spec: FunctionSpec) -> dict[str, Any]:
    return {"id": spec.name, "object": "model", "created": int(spec.created), "owned_by": spec.owner}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           authorization: Annotated[str | None, Header()] = None) -> Any:
    caller = await _caller(request, authorization, body.model)
    messages = chat_messages(body)
    gen = generate_request(body, request.app.state.settings.max_tokens_limit, messages=messages)
    return await _invoke(request, caller, body, gen, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      authorization: Annotated[str | None, Header()] = None) -> Any:
    caller = await _caller(request, authorization, body.model)
    try:
        prompt = body.prompt_text()
    except ValueError as e:
        raise InvalidParameter(str(e), param="prompt") from e
    gen = generate_request(body, request.app.state.settings.max_tokens_limit, prompt=prompt)
    return await _invoke(request, caller, body, gen, chat=False, echo=prompt if body.echo else "")


class _Caller(NamedTuple):
    principal: Principal
    key_row: dict[str, str]  # its API-key hash: role, and its limits
    spec_raw: str | None


async def _caller(request: Request, authorization: str | None, model: str) -> _Caller:
    """Who calls (their key's hash, limits included) and the function's spec, in one round trip on
    the event loop: the key is read from Redis on every request, so a revoked key fails at once."""
    row_key = key_row_for(authorization)  # 401 for a missing or malformed header, before any read
    check_name(model, "function name")
    async with request.app.state.aredis.pipeline(transaction=False) as p:
        p.hgetall(row_key)
        p.hget(Keys.functions, model)
        row, raw = await p.execute()
    return _Caller(principal_of(row), row, raw)


async def _invoke(request: Request, caller: _Caller, body: _Sampling, gen: GenerateRequest, *,
                  chat: bool, echo: str = "") -> Any:
    app = request.app
    invoker: Invoker = app.state.invoker
    metrics = app.state.metrics
    principal = caller.principal
    spec: FunctionSpec = FunctionRegistry.parse(body.model, caller.spec_raw)
    FunctionRegistry.check_invoke(spec, principal)
    prompt_chars = len(gen.prompt or "") + sum(len(m.get("content", "")) for m in gen.messages or [])
    estimated = estimate_tokens(prompt_chars, upfront_completion_tokens(gen))
    limits = app.state.ratelimiter.limits_of(caller.key_row)
    try:
        counted_at = await app.state.ratelimiter.admit_async(principal.id, estimated, limits)
    except RateLimited:
        metrics.requests.labels(spec.name, "429").inc()
        raise
    settle = _Settle(app.state.ratelimiter, principal.id, counted_at, estimated, limits)
    app.state.demand.count(spec.name)
    gen = gen.model_copy(update={"ttft_slo_s": spec.slo.ttft_ms / 1000, "tpot_slo_s": spec.slo.tpot_ms / 1000,
                                 "eta": spec.energy.eta})
    t_start = time.perf_counter()  # TTFT counts routing and any cold start, as the client sees it
    trace = app.state.tracer.start(spec.name, "chat" if chat else "text_completion", request.headers,
                                   {"max_tokens": None if gen.fit_max_tokens else gen.max_tokens,
                                    "temperature": gen.temperature, "top_p": gen.top_p, "seed": gen.seed})
    opened = False
    with ClientWatch(request.receive) as client:  # the client leaving cancels what runs in here
        try:
            with trace.active():
                target, events = await invoker.open(spec, gen)
        except BaseException as e:  # a cancellation too: `open` gave its slot back
            if isinstance(e, EmberError):
                metrics.requests.labels(spec.name, str(e.status_code)).inc()
                await _failed(app, spec, settle)
            trace.fail(e)
            trace.end()
            raise
        opened = True
        trace.acquired(target)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:  # from here on the stream watches the client itself (Starlette's StreamingResponse)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = _sse(request, invoker, target, events, spec, rid, created, chat, include_usage, echo, t_start,
                       trace, settle)
            return _ReleasingStream(sse, events, invoker, target, media_type="text/event-stream",
                                    headers={**target.headers(), **trace.headers()})
        try:
            text, done, t_first = echo, {}, None
            async for ev in events:
                if t_first is None:
                    t_first = time.perf_counter()
                    trace.first_token()
                if "text" in ev:
                    text += ev["text"]
                elif "done" in ev:
                    done = ev["done"]
                    trace.done(done, rid)
        except BaseException as e:
            if isinstance(e, EmberError):
                metrics.requests.labels(spec.name, str(e.status_code)).inc()
                await _failed(app, spec, settle)
            trace.fail(e)
            raise
        finally:
            trace.end()
            # a cancelled request (the client left) still closes the worker stream, which stops the
            # generation there, and frees its slot
            with anyio.CancelScope(shield=True):
                await events.aclose()  # type: ignore[attr-defined]
            invoker.release_soon(target)  # need not wait for Redis
    if client.left:
        # nobody to answer: the worker stopped generating when its stream was closed above. A
        # request that never reached a worker is not charged; one that did is not refunded (as a
        # dropped stream: what the worker generated for it is unknown here)
        metrics.requests.labels(spec.name, "499").inc()
        if not opened:
            with anyio.CancelScope(shield=True):
                await settle.refund()
        return Response(status_code=499)
    _observe(request, spec, target, done, (t_first or time.perf_counter()) - t_start)
    await settle(done)
    metrics.requests.labels(spec.name, "200").inc()
    usage = _usage(done)
    finish = _finish(done)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": spec.name, "choices": [choice],
                         "usage": usage, "system_fingerprint": None}, headers={**target.headers(), **trace.headers()})


async def _sse(request: Request, invoker: Invoker, target: InvocationTarget, events: AsyncIterator[dict[str, Any]],
               spec: FunctionSpec, rid: str, created: int, chat: bool, include_usage: bool, echo: str,
               t_start: float, trace: InvocationTrace, settle: _Settle | None = None) -> AsyncIterator[bytes]:
    metrics = request.app.state.metrics
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_text: str | None, finish: str | None, first: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta_text is not None:
                delta["content"] = delta_text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": rid, "object": obj, "created": created, "model": spec.name, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    status = "499"  # the client went away before the end (nginx's "client closed request")
    try:
        if chat:
            yield chunk(None, None, first=True)
        if echo:
            yield chunk(echo, None)
        done: dict[str, Any] = {}
        t_first = None
        async for ev in events:
            if t_first is None:
                t_first = time.perf_counter()
                trace.first_token()
            if "text" in ev:
                yield chunk(ev["text"], None)
            elif "done" in ev:
                done = ev["done"]
                trace.done(done, rid)
        yield chunk(None if chat else "", _finish(done))
        if include_usage:
            payload = {"id": rid, "object": obj, "created": created, "model": spec.name, "choices": [],
                       "usage": _usage(done)}
            yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        status = "200"
        _observe(request, spec, target, done, (t_first or time.perf_counter()) - t_start)
        if settle is not None:
            await settle(done)
    except EmberError as e:
        status = str(e.status_code)
        trace.fail(e)
        await _failed(request.app, spec, settle)
        yield b"data: " + json.dumps(e.to_openai()).encode() + b"\n\n"
    finally:
        trace.end()
        metrics.requests.labels(spec.name, status).inc()
        # Starlette cancels this generator when the client goes away: without the shield these awaits
        # would be cancelled too and the slot would leak
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
            await invoker.release(target)


class _ReleasingStream(StreamingResponse):
    """A streaming response that closes the worker stream and frees the slot however it ends: an
    async generator that never started (the client left before the first chunk) runs no `finally`."""

    def __init__(self, content: AsyncIterator[bytes], events: AsyncIterator[dict[str, Any]], invoker: Invoker,
                 target: InvocationTarget, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._events, self._invoker, self._target = events, invoker, target

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()  # type: ignore[attr-defined]
                await self._invoker.release(self._target)


class _Settle:
    """Corrects a request's up-front token charge with its real usage once it is done."""

    def __init__(self, limiter: Any, key_id: str, counted_at: int, estimated: int, limits: KeyLimits) -> None:
        self.limiter, self.key_id, self.counted_at, self.estimated = limiter, key_id, counted_at, estimated
        self.limits = limits

    async def __call__(self, done: dict[str, Any]) -> None:
        if not done or not self.counted_at:
            return
        await self._to(_usage(done)["total_tokens"])

    async def refund(self) -> None:
        """The request failed with an error of its own (a prompt over the context, no capacity, a
        worker that failed): none of its estimate stays charged. A client that leaves mid-stream
        is not refunded (what it made the worker generate is unknown here)."""
        if self.counted_at:
            await self._to(0)

    async def _to(self, actual: int) -> None:
        try:
            await self.limiter.settle_async(self.key_id, self.counted_at, self.estimated, actual, self.limits)
        except Exception as e:  # best effort: the window keeps the estimate
            log.debug("could not settle the token count of key %s: %s", self.key_id, e)


async def _failed(app: Any, spec: FunctionSpec, settle: _Settle | None) -> None:
    """A request that ended in an error of its own: counted in the function's statistics, and its
    up-front token charge given back (shielded: a cancelled request still refunds)."""
    app.state.stats.failed(spec.name, generation=spec.created)
    if settle is not None:
        with anyio.CancelScope(shield=True):
            await settle.refund()


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = int(done.get("prompt_tokens", 0)), int(done.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(done: dict[str, Any]) -> str:
    return "length" if done.get("finish_reason") == "length" else "stop"


def _observe(request: Request, spec: FunctionSpec, target: InvocationTarget, done: dict[str, Any],
             ttft_s: float) -> None:
    if not done:
        return
    function = spec.name
    request.app.state.invoker.observe_done(function, done)
    metrics = request.app.state.metrics
    metrics.ttft.labels(function).observe(ttft_s)
    tpot_s = float(done.get("tpot_s", 0.0)) if int(done.get("completion_tokens", 0)) > 1 else None
    if tpot_s is not None:
        metrics.tpot.labels(function).observe(tpot_s)
    met = ttft_s <= spec.slo.ttft_ms / 1000 and (tpot_s is None or tpot_s <= spec.slo.tpot_ms / 1000)
    metrics.slo_request(function, met)
    request.app.state.stats.record(function, ttft_s, tpot_s, met, target.tier if target.cold else None,
                                   generation=spec.created)
