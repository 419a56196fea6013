"""The gateway's FastAPI app factory. Everything is built inside `create_app(settings)`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import redis
from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ember.config import Settings
from ember.errors import EmberError, StateUnavailable
from ember.platform import energy_api, energy_state, heap
from ember.platform.cloud import make_backend
from ember.platform.cluster import AsyncSlots, RedisCluster
from ember.platform.gateway import admin_routes, openai_routes
from ember.platform.gateway.auth import KeyStore
from ember.platform.gateway.autoscaling import AutoscalerLoop
from ember.platform.gateway.fast_path import InvocationFastPath
from ember.platform.gateway.fleet import FleetCollector
from ember.platform.gateway.invoke import Invoker
from ember.platform.gateway.metrics import ClusterEnergyCollector, GatewayMetrics, InstancesCollector
from ember.platform.gateway.nodescaling import NodeScalerLoop, NodesCollector
from ember.platform.gateway.operator_routes import mount_console
from ember.platform.gateway.processes import GROUP_ENV, METRICS_DIR_ENV
from ember.platform.gateway.protocol import FunctionSpec
from ember.platform.gateway.ratelimit import KeyLimits, RateLimiter
from ember.platform.gateway.stats import InvocationStats, share_stats
from ember.platform.gateway.tracing import InvocationTracer, provider_from_env
from ember.platform.gateway.waiting import listen_for_wakeups, renew_slot_leases
from ember.platform.http_common import BodyReadTimeout, BodySizeLimit, install_error_handlers, log_task_errors
from ember.platform.redis_mux import MuxRedis
from ember.scheduler.demand import DemandMeter
from ember.scheduler.policies import PolicyChooser

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, tracer_provider: Any = None) -> FastAPI:
    """Build a gateway app; Redis, HTTP clients and the autoscaler start in its lifespan.
    `tracer_provider`: an OpenTelemetry TracerProvider for invocation traces (default: what the
    OTEL_* variables ask for, usually none: tracing off)."""
    settings = settings or Settings()
    # the processes of one gateway (processes.py) share a group: "gw-GROUP-ID", each its own lease holder
    group = os.environ.get(GROUP_ENV, "")
    gateway_id = f"gw-{group}-{uuid.uuid4().hex[:8]}" if group else f"gw-{uuid.uuid4().hex[:8]}"

    def ours(holder: str) -> bool:
        """Whether a lease holder is this gateway (this process or, with several, one of them)."""
        return holder == gateway_id or (bool(group) and holder.startswith(f"gw-{group}-"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.redis_url:
            raise StateUnavailable("the gateway needs EMBER_REDIS_URL (or --redis-url)")
        client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5,
                                      health_check_interval=10)
        app.state.redis = client
        app.state.cluster = RedisCluster(client, heartbeat_ttl_s=settings.heartbeat_ttl_s,
                                         claim_timeout_s=settings.claim_timeout_s, slot_ttl_s=settings.slot_ttl_s)
        # TCP_NODELAY: a request's headers and body go out as separate writes; with Nagle on, the body
        # waited for the worker's delayed ACK (a median ~150-190 ms added to warm requests here)
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        app.state.http = httpx.AsyncClient(transport=transport)
        app.state.metrics.add_cluster_collector(ClusterEnergyCollector(lambda: energy_state.device_snapshots(client)))
        app.state.metrics.add_cluster_collector(FleetCollector(lambda: client, lambda: app.state.cluster))
        app.state.metrics.add_cluster_collector(InstancesCollector(lambda: app.state.cluster, ours))
        app.state.metrics.add_cluster_collector(NodesCollector(lambda: client, ours))
        # the request path's client (auth, spec, limits, slots): one multiplexed connection, no threadpool hops
        aclient = MuxRedis.from_url(settings.redis_url, timeout_s=5, connect_timeout_s=2)
        app.state.aredis = aclient
        app.state.ratelimiter = RateLimiter(client, KeyLimits(settings.default_rpm, settings.default_tpm), aclient)
        slots = AsyncSlots(aclient, slot_ttl_s=settings.slot_ttl_s)
        app.state.invoker = Invoker(settings, app.state.cluster, app.state.http, app.state.metrics, _policy_for, slots)
        stop = asyncio.Event()
        helpers = [asyncio.create_task(listen_for_wakeups(settings.redis_url, app.state.invoker.queues, stop),
                                       name="wake-listener"),
                   asyncio.create_task(renew_slot_leases(slots, settings.slot_ttl_s / 3, stop), name="slot-leases")]
        if app.state.stats.share_dir is not None:
            helpers.append(asyncio.create_task(share_stats(app.state.stats, 1.0, stop), name="share-stats"))
        for t in helpers:
            t.add_done_callback(log_task_errors)
        try:
            await to_thread.run_sync(KeyStore(client).bootstrap_admin, settings.resolved_admin_key())
            await to_thread.run_sync(app.state.ratelimiter.adopt_legacy_limits)
        except redis.RedisError as e:
            log.warning("could not write the bootstrap admin key yet (Redis unavailable): %s", e)
        scaler = AutoscalerLoop(app, gateway_id)
        task = asyncio.create_task(scaler.run(), name="autoscaler")
        task.add_done_callback(log_task_errors)
        backend = make_backend(settings)  # the machines under the platform (None: nobody scales nodes)
        node_task = asyncio.create_task(NodeScalerLoop(app, gateway_id, backend).run(), name="nodescaler")
        node_task.add_done_callback(log_task_errors)
        heap.settle()  # what startup built (fastapi, pydantic, redis-py...) out of every later full collection
        try:
            yield
        finally:
            stop.set()
            task.cancel()
            node_task.cancel()
            await asyncio.gather(task, node_task, *helpers, return_exceptions=True)
            if backend is not None:
                await to_thread.run_sync(backend.close)
            await app.state.invoker.aclose()
            await app.state.http.aclose()
            await aclient.aclose()
            client.close()
            app.state.tracer.shutdown()

    policies = PolicyChooser(settings.placement_policy)  # built once: round_robin and random keep state

    def _policy_for(spec: FunctionSpec) -> Any:
        return policies.get(spec.placement_policy or settings.placement_policy)

    app = FastAPI(title="Ember gateway", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.policy_for = _policy_for  # FunctionSpec -> its placement policy (invocations, autoscaler)
    app.state.metrics = GatewayMetrics()
    app.state.gateway_id = gateway_id
    app.state.demand = DemandMeter()
    app.state.stats = InvocationStats(share_dir=os.environ.get(METRICS_DIR_ENV))  # set with several processes
    app.state.tracer = InvocationTracer(tracer_provider if tracer_provider is not None else provider_from_env())
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(InvocationFastPath, max_bytes=settings.max_request_bytes)  # see fast_path
    app.add_middleware(BodyReadTimeout, timeout_s=settings.body_timeout_s)  # outermost: every body read
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(energy_api.router)
    mount_console(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "gateway": gateway_id}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        try:
            nodes = await to_thread.run_sync(request.app.state.cluster.live_nodes)
        except (redis.RedisError, EmberError) as e:
            return JSONResponse({"status": "unavailable", "reason": f"redis: {e}"}, status_code=503)
        expected = settings.expected_workers
        if expected and len(nodes) < expected:  # `ember up` says how many it runs: one is missing
            return JSONResponse({"status": "degraded", "workers": len(nodes), "expected": expected},
                                status_code=503)
        return JSONResponse({"status": "ready", "workers": len(nodes)})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if settings.metrics_require_key:  # every tenant's function names and traffic: admins and operators
            principal = await to_thread.run_sync(KeyStore(request.app.state.redis).verify,
                                                 request.headers.get("authorization"))
            principal.require("admin", "operator")
        # the cluster families read Redis (blocking): off the event loop
        body = await to_thread.run_sync(request.app.state.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app

