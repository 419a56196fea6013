"""Admin API: functions (deploy, list, get, delete) and API keys."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Request, Response

from ember.errors import BadRequest, NotFound
from ember.platform.gateway.auth import KeyStore, Principal
from ember.platform.gateway.checkpoints import CheckpointPolicy, canonical_store, size_checkpoint
from ember.platform.gateway.deps import AdminPrincipal, AnyPrincipal, require_roles
from ember.platform.gateway.protocol import (
    CheckpointGrant,
    FunctionDeploy,
    FunctionSpec,
    KeyCreate,
    KeyCreated,
    KeyInfo,
    KeyLimitsUpdate,
    StoreAllow,
)
from ember.platform.gateway.registry import DeveloperQuota, FunctionRegistry
from ember.platform.names import check_name
from ember.platform.state import Keys
from ember.scheduler.autoscaler import of_another_checkpoint

log = logging.getLogger(__name__)
router = APIRouter()

ReaderPrincipal = Annotated[Principal, Depends(require_roles("admin", "operator", "developer"))]


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
    policy = CheckpointPolicy(request.app.state.redis, request.app.state.settings)
    await to_thread.run_sync(policy.check_deploy, principal, body.checkpoint)
    app = request.app
    size = await size_checkpoint(app.state.cluster, app.state.http, app.state.settings, body.checkpoint)  # None: no worker up, sized before placing
    settings = app.state.settings
    quota = DeveloperQuota(settings.developer_max_functions, settings.developer_max_instances)
    spec, old = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).put, name, body, principal,
                                         size.nbytes if size else 0, size.ref if size else "",
                                         size.kv_bytes if size else 0, quota)
    if old is not None and (old.checkpoint != spec.checkpoint or old.checkpoint_ref != spec.checkpoint_ref):
        await retire_instances(app, spec)  # another checkpoint, or the same name with other bytes
    response.status_code = 201 if old is None else 200
    return spec


async def retire_instances(app: Any, spec: FunctionSpec) -> int:
    """A redeploy changed the checkpoint: the function's instances of any other checkpoint take no
    new request and go once their requests finish (the drain grace bounds the wait); the next
    requests start instances of the new one. Returns how many were retired."""
    retired = 0
    for inst in of_another_checkpoint(spec.checkpoint_ref, await to_thread.run_sync(app.state.cluster.instances,
                                                                                   spec.name)):
        if inst.state != "draining":
            retired += await unload_instance(app, inst, force=True)
    if retired:
        log.info("function %s now serves %s: %d instance(s) of its previous checkpoint retired", spec.name,
                 spec.checkpoint_ref, retired)
    return retired


@router.get("/v1/functions")
async def list_functions(request: Request, principal: ReaderPrincipal) -> dict[str, list[FunctionSpec]]:
    return {"functions": await to_thread.run_sync(FunctionRegistry(request.app.state.redis).visible, principal)}


@router.get("/v1/functions/{name}")
async def get_function(name: str, request: Request, principal: ReaderPrincipal) -> dict[str, Any]:
    spec = await to_thread.run_sync(FunctionRegistry(request.app.state.redis).get_visible, name, principal)
    instances = await to_thread.run_sync(request.app.state.cluster.instances, name)
    return {**spec.model_dump(), "instances": [
        {"id": i.instance_id, "node": i.node_id, "device": i.device_id, "state": i.state,
         "outstanding": i.outstanding} for i in instances]}


@router.delete("/v1/functions/{name}", status_code=204)
async def delete_function(name: str, request: Request, principal: AnyPrincipal) -> Response:
    principal.require("admin", "developer")
    await to_thread.run_sync(FunctionRegistry(request.app.state.redis).delete, name, principal)
    # instances of a deleted function go away at once (the autoscaler would also reap them)
    for inst in await to_thread.run_sync(request.app.state.cluster.instances, name):
        await unload_instance(request.app, inst, force=True)
    return Response(status_code=204)


@router.post("/v1/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request, _: AdminPrincipal) -> KeyCreated:
    if body.name:
        check_name(body.name, "key name")
    created = await to_thread.run_sync(KeyStore(request.app.state.redis).create, body.role, body.name)
    limits = await to_thread.run_sync(request.app.state.ratelimiter.set_limits, created.id, body.rpm, body.tpm)
    return created.model_copy(update={"rpm": limits.rpm, "tpm": limits.tpm})


@router.get("/v1/keys")
async def list_keys(request: Request, _: AdminPrincipal) -> dict[str, list[KeyInfo]]:
    keys = await to_thread.run_sync(KeyStore(request.app.state.redis).list)
    limiter = request.app.state.ratelimiter
    limits = await to_thread.run_sync(lambda: [limiter.limits(info.id) for info in keys])
    return {"keys": [info.model_copy(update={"rpm": lim.rpm, "tpm": lim.tpm}) for info, lim in zip(keys, limits,
                                                                                                   strict=True)]}


@router.get("/v1/keys/{key_id}")
async def get_key(key_id: str, request: Request, _: AdminPrincipal) -> KeyInfo:
    info = await to_thread.run_sync(KeyStore(request.app.state.redis).get, key_id)
    limits = await to_thread.run_sync(request.app.state.ratelimiter.limits, key_id)
    return info.model_copy(update={"rpm": limits.rpm, "tpm": limits.tpm})


@router.patch("/v1/keys/{key_id}")
async def update_key_limits(key_id: str, body: KeyLimitsUpdate, request: Request, _: AdminPrincipal) -> KeyInfo:
    """Change a key's requests/tokens per minute; takes effect at the key's next request."""
    info = await to_thread.run_sync(KeyStore(request.app.state.redis).get, key_id)
    limits = await to_thread.run_sync(request.app.state.ratelimiter.set_limits, key_id, body.rpm, body.tpm)
    return info.model_copy(update={"rpm": limits.rpm, "tpm": limits.tpm})


@router.delete("/v1/keys/{key_id}", status_code=204)
async def delete_key(key_id: str, request: Request, _: AdminPrincipal) -> Response:
    """Revoke a key. The stated rule: the functions it owns go with it (deleted, their instances
    unloaded), so nothing keeps serving on behalf of a tenant whose access was revoked; so do the
    checkpoint grants naming it as owner (a shared one stays shared, with no owner)."""
    app = request.app
    await to_thread.run_sync(KeyStore(app.state.redis).delete, key_id)
    await to_thread.run_sync(app.state.ratelimiter.forget, key_id)
    await to_thread.run_sync(_drop_grants_of, CheckpointPolicy(app.state.redis, app.state.settings), key_id)
    registry = FunctionRegistry(app.state.redis)
    for spec in await to_thread.run_sync(registry.owned_by, key_id):
        await to_thread.run_sync(app.state.redis.hdel, Keys.functions, spec.name)
        for inst in await to_thread.run_sync(app.state.cluster.instances, spec.name):
            await unload_instance(app, inst, force=True)  # busy ones too: nothing serves for a revoked key
        log.info("function %s deleted with its owner's revoked key %s", spec.name, key_id)
    return Response(status_code=204)


# --- stores and checkpoint grants (tenancy) -----------------------------------------------------
@router.get("/v1/stores")
async def list_stores(request: Request, _: AdminPrincipal) -> dict[str, list[str]]:
    policy = CheckpointPolicy(request.app.state.redis, request.app.state.settings)
    return {"stores": await to_thread.run_sync(policy.allowed_stores)}


@router.put("/v1/stores")
async def allow_store(body: StoreAllow, request: Request, _: AdminPrincipal) -> dict[str, str]:
    policy = CheckpointPolicy(request.app.state.redis, request.app.state.settings)
    return {"store": await to_thread.run_sync(policy.allow_store, body.uri)}


@router.delete("/v1/stores", status_code=204)
async def disallow_store(uri: str, request: Request, _: AdminPrincipal) -> Response:
    policy = CheckpointPolicy(request.app.state.redis, request.app.state.settings)
    await to_thread.run_sync(policy.disallow_store, uri)
    return Response(status_code=204)


@router.get("/v1/checkpoints")
async def list_grants(request: Request, principal: ReaderPrincipal) -> dict[str, list[dict[str, Any]]]:
    policy = CheckpointPolicy(request.app.state.redis, request.app.state.settings)
    grants = await to_thread.run_sync(policy.grants)
    if principal.role == "developer":
        grants = [g for g in grants if g.get("shared") or g.get("owner") == principal.id]
    return {"checkpoints": grants}


@router.put("/v1/checkpoints/{name}")
async def grant_checkpoint(name: str, body: CheckpointGrant, request: Request, _: AdminPrincipal) -> dict[str, Any]:
    """Give a checkpoint an owner (a key id) and/or mark it shared: who may deploy it."""
    check_name(name, "checkpoint name")
    settings = request.app.state.settings
    store = canonical_store(body.store or settings.resolved_store_url)
    if body.owner is not None:
        await to_thread.run_sync(KeyStore(request.app.state.redis).get, body.owner)  # 404 for an unknown key
    policy = CheckpointPolicy(request.app.state.redis, settings)
    return await to_thread.run_sync(policy.grant, store, name, body.owner, body.shared)


@router.delete("/v1/checkpoints/{name}", status_code=204)
async def revoke_grant(name: str, request: Request, _: AdminPrincipal, store: str | None = None) -> Response:
    settings = request.app.state.settings
    policy = CheckpointPolicy(request.app.state.redis, settings)
    await to_thread.run_sync(policy.revoke_grant, canonical_store(store or settings.resolved_store_url), name)
    return Response(status_code=204)


def _drop_grants_of(policy: CheckpointPolicy, key_id: str) -> None:
    """A revoked key's checkpoint grants: revoked, or kept without owner where shared."""
    for g in policy.grants():
        if g.get("owner") != key_id:
            continue
        if g.get("shared"):
            policy.grant(g["store"], g["name"], None, True)
        else:
            try:
                policy.revoke_grant(g["store"], g["name"])
            except NotFound:  # revoked meanwhile
                continue
        log.info("checkpoint grant %s/%s of revoked key %s %s", g["store"], g["name"], key_id,
                 "kept shared, without owner" if g.get("shared") else "revoked")


async def unload_instance(app: Any, inst: Any, *, force: bool = False) -> bool:
    """Drain the instance, then its worker drops it when idle (its checkpoint stays in the DRAM
    tier) and removes it. Without `force`, only an instance with no outstanding request."""
    return bool(await app.state.invoker.starter.unload(inst, force=force))
