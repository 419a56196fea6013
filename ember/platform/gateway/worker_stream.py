"""The gateway's side of a worker's token stream: NDJSON events in, worker failures and timeouts
mapped to Ember errors, and the worker's own errors rebuilt with their status."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx

from ember.errors import EmberError, WorkerError, WorkerTimeout


async def worker_events(node_id: str, resp: httpx.Response, read_timeout_s: float) -> AsyncIterator[dict[str, Any]]:
    """The events of a worker's stream; closes the response however it ends."""
    try:
        async for line in resp.aiter_lines():
            if not line:
                continue
            ev = json.loads(line)
            if "error" in ev:  # the worker failed mid-stream; it answers in the OpenAI error shape
                raise EmberError(ev["error"]["message"], code=ev["error"].get("code"))
            yield ev
    except httpx.TimeoutException as e:
        raise WorkerTimeout(f"worker {node_id} sent nothing for {read_timeout_s:.0f}s") from e
    except httpx.HTTPError as e:
        raise WorkerError(f"lost the stream from worker {node_id}: {e}") from e
    finally:
        with anyio.CancelScope(shield=True):
            await resp.aclose()


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


def worker_error(resp: httpx.Response, context: str) -> EmberError:
    """Rebuild the worker's Ember error (it answers in the OpenAI error shape), keeping its status."""
    try:
        body = resp.json()["error"]
        err = EmberError(f"{context}: {body['message']}", code=body.get("code") or "worker_error")
        err.status_code = resp.status_code if resp.status_code < 500 or resp.status_code == 503 else 502
        err.error_type = body.get("type") or "server_error"
        if "retry-after" in resp.headers:  # a full instance queue: the client may retry (429)
            err.retry_after_s = float(resp.headers["retry-after"])  # type: ignore[attr-defined]
        return err
    except (ValueError, KeyError, TypeError):
        return WorkerError(f"{context}: HTTP {resp.status_code}")
