"""The worker's internal HTTP API (gateway -> worker). Every route needs the cluster token."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
import torch
from anyio import to_thread
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ember.config import Settings
from ember.errors import EmberError, Unauthorized
from ember.platform import heap
from ember.platform.cluster import SLOT_HEADER, RedisCluster
from ember.platform.http_common import error_response, install_error_handlers
from ember.platform.runtime.engine import GenerationDone, TokenDelta
from ember.platform.wire import (
    CLUSTER_TOKEN_HEADER,
    GenerateRequest,
    LoadRequest,
    LoadResult,
    PrefetchRequest,
)
from ember.platform.worker.node import WorkerNode

log = logging.getLogger(__name__)


def create_worker_app(settings: Settings, url: str) -> FastAPI:
    """Build a worker app; the node registers and heartbeats during the app's lifespan."""
    token = settings.resolved_cluster_token()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True, socket_timeout=5)
        # the same claim timeout as the gateway's: a beat that reports a load extends its claim by it
        node = WorkerNode(settings, RedisCluster(client, heartbeat_ttl_s=settings.heartbeat_ttl_s,
                                                 claim_timeout_s=settings.claim_timeout_s), url)
        await to_thread.run_sync(node.start)
        app.state.node = node
        try:
            yield
        finally:
            await to_thread.run_sync(node.stop)
            client.close()

    def check_token(x_ember_cluster_token: Annotated[str | None, Header()] = None) -> None:
        if not x_ember_cluster_token or not secrets.compare_digest(x_ember_cluster_token.encode(), token.encode()):
            raise Unauthorized(f"missing or wrong {CLUSTER_TOKEN_HEADER}")

    app = FastAPI(title="Ember worker", lifespan=lifespan, dependencies=[Depends(check_token)])
    install_error_handlers(app)

    async def public_healthz(request: Request) -> JSONResponse:
        """Liveness for load-balancer health checks (the cloud group replaces a worker that fails
        it): no token, nothing about the node beyond that it serves."""
        return JSONResponse({"status": "ok"})

    app.router.routes.append(Route("/healthz", public_healthz, methods=["GET"]))  # outside the token dependency

    @app.get("/internal/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        node: WorkerNode = request.app.state.node
        return {"status": "ok", "node": node.node_id, "instances": {
            i.instance_id: {"function": i.function, "active": i.active, "finished": i.finished,
                            "state": node.states.get(i.instance_id, "ready"), "engine": i.stats()}
            for i in list(node.instances.values())},
            "loading": [k for k, v in list(node.states.items()) if v == "loading"]}

    @app.get("/internal/checkpoints")
    async def checkpoint_info(ref: str, request: Request) -> dict[str, Any]:
        node: WorkerNode = request.app.state.node
        return await to_thread.run_sync(node.checkpoint_info, ref)

    @app.post("/internal/instances")
    async def load(body: LoadRequest, request: Request) -> LoadResult:
        node: WorkerNode = request.app.state.node
        return await to_thread.run_sync(node.load, body)

    @app.post("/internal/prefetch", status_code=202)
    async def prefetch(body: PrefetchRequest, request: Request) -> dict[str, str]:
        node: WorkerNode = request.app.state.node
        started = node.prefetch(body.checkpoint, body.dram_keep)
        # a repeat while one runs starts nothing (its keep applies when that one ends), and is said: the
        # gateway should not have sent it
        log.info("prefetch of %s into the DRAM tier: %s", body.checkpoint,
                 "started" if started else "already running (the repeat's keep applies when it ends)")
        return {"status": "started" if started else "already running", "checkpoint": body.checkpoint}

    @app.delete("/internal/instances/{instance_id}")
    async def unload(instance_id: str, request: Request, wait_s: float = 5.0) -> JSONResponse:
        """Drop an instance when it has no active request (the gateway marked it draining first),
        then remove it from Redis. Waits up to `wait_s`; 202 when it is still draining then."""
        node: WorkerNode = request.app.state.node
        node.get(instance_id)  # 404 when this worker does not hold it
        node.drop_when_idle(instance_id, remove=True)
        deadline = asyncio.get_running_loop().time() + max(0.0, min(wait_s, 60.0))
        # done once it is closed (its memory freed, its DRAM entry let go) and out of Redis
        while node.held(instance_id) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        done = not node.held(instance_id)
        return JSONResponse({"status": "unloaded" if done else "draining", "instance_id": instance_id},
                            status_code=200 if done else 202)

    @app.post("/internal/instances/{instance_id}/generate")
    async def generate(instance_id: str, body: GenerateRequest, request: Request) -> StreamingResponse:
        node: WorkerNode = request.app.state.node
        inst = node.get(instance_id, serving=True)
        # tokenized and queued before streaming, so a context-length error is a 400, a full queue a 429
        # (Retry-After) and a request no KV budget could hold a 503, rather than in-stream errors
        seq = await to_thread.run_sync(inst.submit, body)
        slot = request.headers.get(SLOT_HEADER, "")
        return StreamingResponse(_ndjson(node, inst, body, seq, slot), media_type="application/x-ndjson")

    async def metrics(request: Request) -> Response:
        """Prometheus: each instance's engine (KV-cache usage, batch size, queue depth, preemptions)."""
        if settings.metrics_require_key:
            given = request.headers.get(CLUSTER_TOKEN_HEADER, "")
            if not secrets.compare_digest(given.encode(), token.encode()):  # bytes: any header, never a TypeError
                return error_response(Unauthorized(f"missing or wrong {CLUSTER_TOKEN_HEADER}"))
        from ember.platform.runtime.metrics import render_engine_metrics

        node: WorkerNode = request.app.state.node
        body, content_type = render_engine_metrics(node.node_id, list(node.instances.values()),
                                                    frozen_objects=heap.frozen(), torch_threads=torch.get_num_threads())
        return Response(body, media_type=content_type)

    app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))  # outside the token dependency
    return app


async def _ndjson(node: WorkerNode, inst: Any, body: GenerateRequest, seq: Any, slot: str) -> AsyncIterator[bytes]:
    """Relay the sequence's events (its engine runs them); cancel it when the client goes away.
    The engine's thread hands each event to this loop directly (no relay thread per request).
    While it runs, the gateway's request `slot` counts for the instance (`node.slots`)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def sink(ev: Any) -> None:  # on the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed (worker stopping): nobody is listening
            pass

    energy_mark = node.begin_request_energy(inst)
    stop = inst.watch(seq, sink)
    try:
        with node.slots.held(inst.instance_id, slot):
            while True:
                ev = await queue.get()
                if isinstance(ev, TokenDelta):
                    yield json.dumps({"text": ev.text}).encode() + b"\n"
                elif isinstance(ev, GenerationDone):
                    node.record_request(inst, ev, body)
                    yield json.dumps({"done": {
                        "finish_reason": ev.finish_reason, "prompt_tokens": ev.prompt_tokens,
                        "completion_tokens": ev.completion_tokens, "ttft_s": ev.ttft_s, "tpot_s": ev.tpot_s,
                        "energy_j": node.end_request_energy(energy_mark),
                    }}).encode() + b"\n"
                    break
                elif isinstance(ev, EmberError):
                    yield json.dumps(ev.to_openai()).encode() + b"\n"
                    break
    finally:
        stop()  # client gone before the end: the engine drops the sequence before its next step
