"""Admin API: functions (deploy, list, get, delete) and API keys."""

from __future__ import annotations

import logging
import random
from typing import Any

import httpx
from anyio import to_thread
from fastapi import APIRouter, Depends, Request, Response

from ember.errors import BadRequest
from ember.platform.gateway.auth import KeyStore
from ember.platform.gateway.deps import AdminPrincipal, AnyPrincipal, require_roles
from ember.platform.gateway.invoke import CLUSTER_TOKEN_HEADER, worker_error
from ember.platform.gateway.protocol import FunctionDeploy, FunctionSpec, KeyCreate, KeyCreated, KeyInfo
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.names import check_name

log = logging.getLogger(__name__)
router = APIRouter()

Reader = Depends(require_roles("admin", "operator", "developer"))


@router.put("/v1/functions/{name}")
async def put_function(name: str, body: FunctionDeploy, request: Request, response: Response,
                       principal: AnyPrincipal) -> FunctionSpec:
    principal.require("admin", "developer")
    check_name(name, "function name")
    if body.scaling.min_instances > body.scaling.max_instances:
        raise BadRequest("scaling.min_instances must not exceed scaling.max_instances", code="invalid_scaling")
    if body.placement_policy is not None:
        from ember.scheduler.policies import get_policy

        get_policy(body.placement_policy)  # unknown names are a 400 now, not at the first cold start
    nbytes = await resolve_checkpoint(request, body.checkpoint)
    spec, created = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).put, name, body, principal,
                                             nbytes)
    response.status_code = 201 if created else 200
    return spec


@router.get("/v1/functions", dependencies=[Reader])
async def list_functions(request: Request) -> dict[str, list[FunctionSpec]]:
    return {"functions": await to_thread.run_sync(FunctionRegistry(request.app.state.redis).list)}


@router.get("/v1/functions/{name}", dependencies=[Reader])
async def get_function(name: str, request: Request) -> dict[str, Any]:
    spec = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).get, name)
    instances = await to_thread.run_sync(request.app.state.cluster.instances, name)
    return {**spec.model_dump(), "instances": [
        {"id": i.instance_id, "node": i.node_id, "device": i.device_id, "state": i.state,
         "outstanding": i.outstanding} for i in instances]}


@router.delete("/v1/functions/{name}", status_code=204)
async def delete_function(name: str, request: Request, principal: AnyPrincipal) -> Response:
    principal.require("admin", "developer")
    spec = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).delete, name, principal)
    # instances of a deleted function go away at once (the autoscaler would also reap them)
    for inst in await to_thread.run_sync(request.app.state.cluster.instances, spec.name):
        await unload_instance(request.app, inst, force=True)
    return Response(status_code=204)


@router.post("/v1/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request, _: AdminPrincipal) -> KeyCreated:
    if body.name:
        check_name(body.name, "key name")
    return await to_thread.run_sync(KeyStore(request.app.state.redis).create, body.role, body.name)


@router.get("/v1/keys")
async def list_keys(request: Request, _: AdminPrincipal) -> dict[str, list[KeyInfo]]:
    return {"keys": await to_thread.run_sync(KeyStore(request.app.state.redis).list)}


@router.get("/v1/keys/{key_id}")
async def get_key(key_id: str, request: Request, _: AdminPrincipal) -> KeyInfo:
    return await to_thread.run_sync(KeyStore(request.app.state.redis).get, key_id)


@router.delete("/v1/keys/{key_id}", status_code=204)
async def delete_key(key_id: str, request: Request, _: AdminPrincipal) -> Response:
    await to_thread.run_sync(KeyStore(request.app.state.redis).delete, key_id)
    return Response(status_code=204)


async def resolve_checkpoint(request: Request, checkpoint: str) -> int:
    """Ask a live worker for the checkpoint's size (gateways never read the store themselves).
    Returns 0 when no worker is up yet; the first cold start then learns the size."""
    app = request.app
    nodes = await to_thread.run_sync(app.state.cluster.live_nodes)
    if not nodes:
        return 0
    node = random.choice(nodes)
    url = await to_thread.run_sync(app.state.cluster.node_url, node)
    try:
        resp = await app.state.http.get(f"{url}/internal/checkpoints", params={"ref": checkpoint},
                                        headers={CLUSTER_TOKEN_HEADER: app.state.settings.resolved_cluster_token()},
                                        timeout=30.0)
    except httpx.HTTPError as e:
        log.warning("could not ask worker %s about %s: %s", node, checkpoint, e)
        return 0
    if resp.status_code != 200:
        raise worker_error(resp, f"checkpoint {checkpoint!r}")
    return int(resp.json()["nbytes"])


async def unload_instance(app: Any, inst: Any, *, force: bool = False) -> bool:
    """Drain the instance, then its worker drops it when idle (its checkpoint stays in the DRAM
    tier) and removes it. Without `force`, only an instance with no outstanding request."""
    return bool(await app.state.invoker.unload(inst, force=force))
