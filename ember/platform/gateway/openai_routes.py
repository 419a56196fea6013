"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (streaming and not)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember.errors import BadRequest, EmberError
from ember.platform.gateway.deps import AnyPrincipal
from ember.platform.gateway.invoke import InvocationTarget, Invoker
from ember.platform.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FunctionSpec,
    GenerateRequest,
    _Sampling,
)
from ember.platform.gateway.registry import FunctionRegistry

router = APIRouter()

DEFAULT_CHAT_MAX_TOKENS = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16


@router.get("/v1/models")
async def list_models(request: Request, principal: AnyPrincipal) -> dict[str, Any]:
    specs = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).list)
    visible = [s for s in specs if principal.role in ("admin", "invoker", "operator") or s.owner == principal.id]
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": int(s.created),
                                        "owned_by": s.owner} for s in visible]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: AnyPrincipal) -> Any:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    gen = _generate_request(body, request, DEFAULT_CHAT_MAX_TOKENS, messages=messages)
    return await _invoke(request, principal, body, gen, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, principal: AnyPrincipal) -> Any:
    try:
        prompt = body.prompt_text()
    except ValueError as e:
        raise BadRequest(str(e)) from e
    gen = _generate_request(body, request, DEFAULT_COMPLETION_MAX_TOKENS, prompt=prompt)
    return await _invoke(request, principal, body, gen, chat=False, echo=prompt if body.echo else "")


def _generate_request(body: _Sampling, request: Request, default_max: int, **kw: Any) -> GenerateRequest:
    limit = request.app.state.settings.max_tokens_limit
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max
    if max_tokens > limit:
        raise BadRequest(f"max_tokens {max_tokens} exceeds this gateway's limit of {limit}")
    return GenerateRequest(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                           stop=body.stop_list(), seed=body.seed, **kw)


async def _invoke(request: Request, principal: AnyPrincipal, body: _Sampling, gen: GenerateRequest, *,
                  chat: bool, echo: str = "") -> Any:
    app = request.app
    invoker: Invoker = app.state.invoker
    metrics = app.state.metrics
    registry = FunctionRegistry(app.state.redis)
    spec: FunctionSpec = await to_thread.run_sync(registry.get, body.model)
    registry.check_invoke(spec, principal)
    app.state.demand.count(spec.name)
    gen = gen.model_copy(update={"ttft_slo_s": spec.slo.ttft_ms / 1000, "tpot_slo_s": spec.slo.tpot_ms / 1000,
                                 "eta": spec.energy.eta})
    t_start = time.perf_counter()  # TTFT counts routing and any cold start, as the client sees it
    try:
        target, events = await invoker.open(spec, gen)
    except EmberError as e:
        metrics.requests.labels(spec.name, str(e.status_code)).inc()
        raise
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sse = _sse(request, invoker, target, events, spec, rid, created, chat, include_usage, echo, t_start)
        return _ReleasingStream(sse, events, invoker, target, media_type="text/event-stream",
                                headers=target.headers())
    try:
        text, done, t_first = echo, {}, None
        async for ev in events:
            t_first = t_first or time.perf_counter()
            if "text" in ev:
                text += ev["text"]
            elif "done" in ev:
                done = ev["done"]
    except EmberError as e:
        metrics.requests.labels(spec.name, str(e.status_code)).inc()
        raise
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled request still closes the stream and frees its slot
            await events.aclose()  # type: ignore[attr-defined]
            await invoker.release(target)
    _observe(request, spec.name, done, (t_first or time.perf_counter()) - t_start)
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
                         "usage": usage, "system_fingerprint": None}, headers=target.headers())


async def _sse(request: Request, invoker: Invoker, target: InvocationTarget, events: AsyncIterator[dict[str, Any]],
               spec: FunctionSpec, rid: str, created: int, chat: bool, include_usage: bool, echo: str,
               t_start: float) -> AsyncIterator[bytes]:
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

    status = "200"
    try:
        if chat:
            yield chunk(None, None, first=True)
        if echo:
            yield chunk(echo, None)
        done: dict[str, Any] = {}
        t_first = None
        async for ev in events:
            t_first = t_first or time.perf_counter()
            if "text" in ev:
                yield chunk(ev["text"], None)
            elif "done" in ev:
                done = ev["done"]
        yield chunk(None if chat else "", _finish(done))
        if include_usage:
            payload = {"id": rid, "object": obj, "created": created, "model": spec.name, "choices": [],
                       "usage": _usage(done)}
            yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
        _observe(request, spec.name, done, (t_first or time.perf_counter()) - t_start)
    except EmberError as e:
        status = str(e.status_code)
        yield b"data: " + json.dumps(e.to_openai()).encode() + b"\n\n"
    finally:
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


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = int(done.get("prompt_tokens", 0)), int(done.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(done: dict[str, Any]) -> str:
    return "length" if done.get("finish_reason") == "length" else "stop"


def _observe(request: Request, function: str, done: dict[str, Any], ttft_s: float) -> None:
    if not done:
        return
    request.app.state.invoker.observe_done(function, done)
    metrics = request.app.state.metrics
    metrics.ttft.labels(function).observe(ttft_s)
    if int(done.get("completion_tokens", 0)) > 1:
        metrics.tpot.labels(function).observe(float(done.get("tpot_s", 0.0)))
