"""HTTP plumbing shared by the gateway and the worker apps: error mapping, body limits, task logging."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.errors import EmberError, PayloadTooLarge, RequestTimeout, StateUnavailable

log = logging.getLogger(__name__)


# errors of 5xx status that no retry can fix: a prompt no instance's KV budget can hold, a model
# larger than every device
_FUTILE_CODES = frozenset({"exceeds_kv_budget", "model_too_large"})
NO_RETRY = {"x-should-retry": "false"}  # the OpenAI clients' own header: they retry 408, 409, 429, 5xx


def error_response(err: EmberError) -> JSONResponse:
    """The OpenAI error body ({"error": {"message", "type", "param", "code"}}) with its status;
    Retry-After when waiting helps, `x-should-retry: false` when retrying the same request cannot
    succeed."""
    headers = None
    retry_after_s = getattr(err, "retry_after_s", None)
    if retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    elif not retry_may_help(err):
        headers = NO_RETRY
    body = err.to_openai()
    body["error"]["param"] = getattr(err, "param", None)
    return JSONResponse(body, status_code=err.status_code, headers=headers)


def retry_may_help(err: EmberError) -> bool:
    """Whether the same request may succeed later: not for a client error (4xx; 409s included: an
    unreadable function, a changed checkpoint, the last admin key), except a stalled body (408) and
    limits that lapse (429); not for an error whose code says it never can."""
    explicit = getattr(err, "should_retry", None)
    if explicit is not None:
        return bool(explicit)
    if err.code in _FUTILE_CODES:
        return False
    return not 400 <= err.status_code < 500 or err.status_code in (408, 429)


def exception_response(method: str, path: str, exc: Exception) -> JSONResponse:
    """The OpenAI-shaped answer to an exception a handler raised: Ember's own errors with their
    status, Redis errors as 503, anything else a logged 500 (a bug, not bad input: the client gets
    the shape, not the details)."""
    if isinstance(exc, EmberError):
        return error_response(exc)
    if isinstance(exc, redis.RedisError):
        return error_response(StateUnavailable(f"shared state (Redis) unavailable: {exc.__class__.__name__}"))
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(EmberError(f"internal error ({exc.__class__.__name__})"))


def install_error_handlers(app: FastAPI) -> None:
    """One place that maps errors to the OpenAI error shape, found by class hierarchy."""

    @app.exception_handler(EmberError)
    async def _ember(request: Request, exc: EmberError) -> JSONResponse:
        return exception_response(request.method, request.url.path, exc)

    @app.exception_handler(redis.RedisError)
    async def _redis(request: Request, exc: redis.RedisError) -> JSONResponse:
        return exception_response(request.method, request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"error": {"message": "request body is not valid JSON", "type": "invalid_request_error",
                                           "code": "invalid_json"}}, status_code=400)
        parts, params = [], []
        for e in errors[:5]:
            loc = _param_of(e.get("loc", ()))
            params.append(loc)
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        return JSONResponse({"error": {"message": "; ".join(parts), "type": "invalid_request_error",
                                       "param": params[0] if params else None, "code": "invalid_body"}},
                            status_code=422, headers=NO_RETRY)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return exception_response(request.method, request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
            exc.status_code, "invalid_request_error")
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "code": str(exc.status_code)}},
                            status_code=exc.status_code)


def _param_of(loc: Any) -> str:
    """A validation error's location as OpenAI names parameters: `messages[0].content` (pydantic
    adds the union member it tried, such as `str` or `list[dict]`: dropped)."""
    out = ""
    for x in loc:
        if x == "body" and not out:
            continue
        if isinstance(x, int):
            out += f"[{x}]"
        elif isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool")):
            continue
        else:
            out += f".{x}" if out else str(x)
    return out


class _BodyStalled(BaseException):
    """Raised from `receive` (a BaseException, so no exception handler inside the app turns it
    into a 500): caught by BodyReadTimeout, which answers 408."""


class BodyReadTimeout:
    """A client that stalls for `timeout_s` in the middle of its request body gets a 408 and the
    request ends: without it, each connection that declares a body and never finishes it held up to
    `max_request_bytes` of buffered body, before any key was checked, for as long as it stayed open.
    Only the body is timed: once it is whole, `receive` is the app's (a stream waits on it for the
    client's disconnect). Outermost, so it sees every body read."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        whole = False
        started = False

        async def timed_receive() -> Message:
            nonlocal whole
            if whole:
                return await receive()
            try:
                async with asyncio.timeout(self.timeout_s):
                    message = await receive()
            except TimeoutError:
                raise _BodyStalled from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                whole = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, watched_send)
        except _BodyStalled:
            if not started:
                await error_response(RequestTimeout(
                    f"the request body stalled for {self.timeout_s:g} s"))(scope, receive, send)


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413, by Content-Length or while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_bytes:
                        await error_response(too_large)(scope, receive, send)
                        return
                except ValueError:
                    pass
        if not any(name == b"content-length" for name, _ in scope.get("headers", [])):
            # A body without a length (chunked): read it here, up to the limit, and answer 413
            # past it. (Raised from inside the app, FastAPI's body parsing would turn it into a 400.)
            chunks, seen, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    await self.app(scope, replay([message]), send)
                    return
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                more = message.get("more_body", False)
                if seen > self.max_bytes:
                    await error_response(too_large)(scope, receive, send)
                    return
            body = b"".join(chunks)
            await self.app(scope, replay([{"type": "http.request", "body": body, "more_body": False}], receive),
                           send)
            return
        await self.app(scope, receive, send)


class ClientWatch:
    """A cancel scope that the client's disconnect cancels: `with ClientWatch(request.receive) as
    client:` around work done for a client that waits for a whole answer (a non-streamed
    completion), so the work stops when nobody waits for it any more; `client.left` says so after.
    Once the request body is read, the server's `receive` answers only `http.disconnect` (uvicorn:
    when the connection closes), so a task waits on it. Enter it after the body is read, and leave
    it before a streaming response starts (which watches `receive` itself)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._scope = anyio.CancelScope()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def left(self) -> bool:
        """The client disconnected and what ran inside was cancelled."""
        return self._scope.cancelled_caught

    def __enter__(self) -> ClientWatch:
        self._scope.__enter__()
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._watcher is not None:
            self._watcher.cancel()
        return bool(self._scope.__exit__(*exc))

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception as e:  # a receive that fails tells nothing about the client: keep serving it
            log.debug("stopped watching for the client's disconnect: %s", e)
            return
        self._scope.cancel()


def replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A receive() that yields `messages` first, then defers to `then` (a disconnect, later)."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


async def ticks(every_s: float, stop: asyncio.Event) -> AsyncIterator[None]:
    """Yield every `every_s` seconds until `stop` is set (once more when it is: a last round)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        except asyncio.TimeoutError:
            pass
        yield


def log_task_errors(task: asyncio.Task[Any]) -> None:
    """Done-callback for background tasks: an exception is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def serve(app: Any, host: str, port: int, *, log_level: str = "info", grace_s: float = 30.0,
          on_sigterm: Any = None, access_log: bool = True, reuse_port: bool = False) -> None:
    """Run `app` under uvicorn. On SIGTERM/SIGINT, `on_sigterm()` runs first (in a thread: a worker
    stops taking new requests), then uvicorn stops accepting connections and lets requests in
    flight, streams included, finish for up to `grace_s` seconds before cancelling them.
    `access_log`: uvicorn's line per request (off for the worker's internal API: the gateway logs,
    counts and traces every request already). `reuse_port`: bind with SO_REUSEPORT, so that
    several processes serve one port (the kernel spreads connections over them)."""
    import threading

    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_sigterm is not None and not self.should_exit:
                threading.Thread(target=on_sigterm, name="on-sigterm", daemon=True).start()
            super().handle_exit(sig, frame)

    # keep-alive longer than the gateway's pooled connections live (30 s): a server closing an idle
    # connection just as a request goes out on it is a failure the client cannot tell from a crash
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                            timeout_keep_alive=75, access_log=access_log)
    # Listening before the app's startup: a worker registers in Redis during its startup, and a
    # gateway that connected before uvicorn listened was refused and took the worker for dead (it
    # deregistered it). Connections made meanwhile wait in the backlog until the app serves.
    try:
        sock = listening_socket(host, port, reuse_port=reuse_port)
    except OSError as e:
        log.error("error while attempting to bind on address (%s, %s): %s", host, port, e.strerror or e)
        raise SystemExit(1) from None
    _Server(config).run(sockets=[sock])


def listening_socket(host: str, port: int, *, reuse_port: bool = False, backlog: int = 2048,
                     listen: bool = True) -> Any:
    """A TCP socket bound to (host, port) and listening (unless not `listen`); with `reuse_port`,
    bound with SO_REUSEPORT so that several processes serve one port (OSError when the port is held
    by one that is not)."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
