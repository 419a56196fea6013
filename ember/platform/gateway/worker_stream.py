"""The gateway's side of a worker's token stream: NDJSON events in, worker failures and timeouts
mapped to Ember errors, and the worker's own errors rebuilt with their status.

The stream is read with aiohttp (the hot path: a third of httpx's CPU per request here, measured
0.26 vs 0.74 ms); the gateway's other worker calls (loads, unloads, sizes) use httpx."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx

from ember.errors import EmberError, WorkerError, WorkerTimeout

log = logging.getLogger(__name__)


async def worker_events(node_id: str, resp: aiohttp.ClientResponse,
                        read_timeout_s: float) -> AsyncIterator[dict[str, Any]]:
    """The events of a worker's stream. However it ends the response is let go of: a stream read
    to its end returns its connection to the pool; any other end (an error, the client gone, a
    cancellation) closes the connection, which tells the worker to stop generating."""
    whole = False
    try:
        async for raw in resp.content:
            line = raw.strip()
            if not line:
                continue
            ev = json.loads(line)
            if "error" in ev:  # the worker failed mid-stream; it answers in the OpenAI error shape
                raise EmberError(ev["error"]["message"], code=ev["error"].get("code"))
            yield ev
        whole = True
    except asyncio.TimeoutError as e:  # aiohttp's read timeout (ServerTimeoutError is one too)
        log.warning("worker %s sent nothing for %.0fs", node_id, read_timeout_s)
        raise WorkerTimeout(f"the worker sent nothing for {read_timeout_s:.0f}s") from e
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: a line past the read buffer
        log.warning("lost the stream from worker %s: %s", node_id, e)
        raise WorkerError(f"lost the stream from the worker: {e}") from e
    finally:
        if whole:
            resp.release()
        else:
            resp.close()  # synchronous: nothing here a cancellation could interrupt


class Retry(Exception):
    """This attempt failed before anything reached the client: try another instance."""

    def __init__(self, error: EmberError, stalled: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.stalled = stalled  # the worker accepted the request and then died or stalled


async def prepend(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        if first is not None:
            yield first
            async for ev in rest:
                yield ev
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def worker_error(resp: httpx.Response, context: str, client_context: str = "") -> EmberError:
    """Rebuild the worker's Ember error (it answers in the OpenAI error shape), keeping its status."""
    return error_from(resp.status_code, resp.headers, resp.content, context, client_context)


def error_from(status: int, headers: Mapping[str, str], body: bytes, context: str,
               client_context: str = "") -> EmberError:
    """`worker_error` from a response's parts (an httpx or an aiohttp response). `context` (which
    worker: a node id) goes to the log, never to the client, whose message is the worker's own,
    after `client_context` when given."""
    prefix = f"{client_context}: " if client_context else ""
    try:
        detail = json.loads(body)["error"]
        log.info("%s: HTTP %s %s", context, status, detail.get("message"))
        err = EmberError(f"{prefix}{detail['message']}", code=detail.get("code") or "worker_error")
        err.status_code = status if status < 500 or status == 503 else 502
        err.error_type = detail.get("type") or "server_error"
        retry_after = headers.get("retry-after")
        if retry_after is not None:  # a full instance queue: the client may retry (429)
            err.retry_after_s = float(retry_after)  # type: ignore[attr-defined]
        return err
    except (ValueError, KeyError, TypeError):
        log.warning("%s: HTTP %s without an error body", context, status)
        return WorkerError(f"{prefix}the worker answered HTTP {status}")
