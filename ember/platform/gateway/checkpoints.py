"""Checkpoints as the gateway sees them: which stores a deploy may name, who may deploy which
checkpoint, and a checkpoint's identity and size (asked of a live worker: gateways never read a store).

Rules (README "Tenancy"):
- A checkpoint ref names a store: none (the cluster's store), or a URI. A URI that is not one of
  the cluster's configured stores (EMBER_STORE_URL, EMBER_ALLOWED_STORES, or one an admin allowed
  with PUT /v1/stores) is refused with 403 `store_not_allowed`.
- Admins deploy any checkpoint of an allowed store. Developers deploy a checkpoint only when an
  admin registered it to them (owner) or marked it shared (PUT /v1/checkpoints/{name}).
- A deploy pins the checkpoint's identity (store + manifest digest) and size; both are learned from
  a live worker. With no worker up they are learned before the first placement, never booked as 0.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import httpx
import redis
from anyio import to_thread

from ember.errors import BadRequest, EmberError, Forbidden, NotFound
from ember.loader.identity import split_digest
from ember.loader.store import open_store, split_ref
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.registry import FunctionRegistry
from ember.platform.gateway.worker_stream import worker_error
from ember.platform.state import Keys
from ember.platform.wire import CLUSTER_TOKEN_HEADER
from ember.scheduler.memory import instance_kv_bytes

log = logging.getLogger(__name__)


class StoreNotAllowed(Forbidden):
    code = "store_not_allowed"


class CheckpointNotShared(Forbidden):
    code = "checkpoint_not_allowed"


class ModelTooLarge(BadRequest):
    code = "model_too_large"


@dataclass(frozen=True)
class CheckpointSize:
    """What a worker reports about a checkpoint: its canonical ref (store/name#digest) and tensor bytes."""

    ref: str
    nbytes: int
    kv_bytes: int = 0  # the instance's KV-cache budget the worker derived from the model config


def canonical_store(uri: str) -> str:
    """A store URI in the form the loader names it (no I/O)."""
    try:
        return open_store(uri).uri.rstrip("/")
    except EmberError as e:
        raise BadRequest(str(e), code="invalid_store") from e


def store_and_name(settings: Any, checkpoint: str) -> tuple[str, str]:
    """(canonical store URI, checkpoint name) of a deploy's checkpoint ref."""
    base, _ = split_digest(checkpoint)
    store_uri, name = split_ref(base)
    return canonical_store(store_uri or settings.resolved_store_url), name


class CheckpointPolicy:
    """Allowed stores and checkpoint grants, kept in Redis (durable)."""

    def __init__(self, client: redis.Redis, settings: Any) -> None:
        self.client = client
        self.settings = settings

    # --- stores ----------------------------------------------------------------------------
    def configured_stores(self) -> set[str]:
        extra = [s.strip() for s in (self.settings.allowed_stores or "").split(",") if s.strip()]
        return {canonical_store(u) for u in [self.settings.resolved_store_url, *extra]}

    def allowed_stores(self) -> list[str]:
        return sorted(self.configured_stores() | set(self.client.smembers(Keys.allowed_stores)))

    def allow_store(self, uri: str) -> str:
        canon = canonical_store(uri)
        self.client.sadd(Keys.allowed_stores, canon)
        return canon

    def disallow_store(self, uri: str) -> None:
        if not self.client.srem(Keys.allowed_stores, canonical_store(uri)):
            raise NotFound(f"store {uri!r} was not allowed by an admin", code="store_not_found")

    # --- grants ----------------------------------------------------------------------------
    def grant(self, store: str, name: str, owner: str | None, shared: bool) -> dict[str, Any]:
        row = {"store": store, "name": name, "owner": owner, "shared": shared}
        self.client.hset(Keys.checkpoint_grants, f"{store}/{name}", json.dumps(row))
        return row

    def revoke_grant(self, store: str, name: str) -> None:
        if not self.client.hdel(Keys.checkpoint_grants, f"{store}/{name}"):
            raise NotFound(f"no grant for checkpoint {store}/{name}", code="checkpoint_not_found")

    def grants(self) -> list[dict[str, Any]]:
        return sorted((json.loads(v) for v in self.client.hgetall(Keys.checkpoint_grants).values()),
                      key=lambda g: (g["store"], g["name"]))

    def check_deploy(self, principal: Principal, checkpoint: str) -> None:
        """Refuse a store that is not allowed (everyone) and a checkpoint not granted (developers)."""
        store, name = store_and_name(self.settings, checkpoint)
        if store not in self.configured_stores() and not self.client.sismember(Keys.allowed_stores, store):
            raise StoreNotAllowed(f"checkpoint store {store!r} is not one of this cluster's stores "
                                  "(an admin may allow it: PUT /v1/stores)")
        if principal.role == "admin":
            return
        raw = self.client.hget(Keys.checkpoint_grants, f"{store}/{name}")
        grant = json.loads(raw) if raw else None
        if grant is None or not (grant.get("shared") or grant.get("owner") == principal.id):
            raise CheckpointNotShared(f"checkpoint {name!r} of {store} is neither yours nor shared "
                                      "(an admin grants it: PUT /v1/checkpoints/{name})")


async def size_checkpoint(cluster: Any, http: httpx.AsyncClient, settings: Any,
                          checkpoint: str) -> CheckpointSize | None:
    """Ask a live worker for the checkpoint's identity and size; None when no worker is up (or
    none answered). A model whose weights, or weights plus one instance's KV budget, fit no live
    device is a ModelTooLarge (400): it could never be placed."""
    nodes = await to_thread.run_sync(cluster.live_nodes)
    if not nodes:
        return None
    node = random.choice(nodes)
    url = await to_thread.run_sync(cluster.node_url, node)
    try:
        resp = await http.get(f"{url}/internal/checkpoints", params={"ref": checkpoint},
                              headers={CLUSTER_TOKEN_HEADER: settings.resolved_cluster_token()}, timeout=30.0)
    except httpx.HTTPError as e:
        log.warning("could not ask worker %s about %s: %s", node, checkpoint, e)
        return None
    if resp.status_code != 200:
        raise worker_error(resp, f"worker {node} sizing {checkpoint!r}", f"checkpoint {checkpoint!r}")
    body = resp.json()
    size = CheckpointSize(ref=str(body.get("id", "")), nbytes=int(body["nbytes"]),
                          kv_bytes=int(body.get("kv_budget_bytes", 0) or 0))
    states = await to_thread.run_sync(cluster.nodes, nodes)
    largest = max((d.memory_bytes for n in states for d in n.devices), default=0)
    # an instance claims its weights and its KV budget on one device (as placement books it)
    kv_bytes = instance_kv_bytes(size.kv_bytes, settings.kv_budget_bytes)
    if largest and size.nbytes > largest:
        raise ModelTooLarge(f"checkpoint {checkpoint!r} needs {size.nbytes} bytes; the largest device of "
                            f"this cluster has {largest}")
    if largest and size.nbytes + kv_bytes > largest:
        raise ModelTooLarge(f"checkpoint {checkpoint!r} needs {size.nbytes} bytes of weights and {kv_bytes} of "
                            f"KV-cache budget per instance ({size.nbytes + kv_bytes}); the largest device of this "
                            f"cluster has {largest} (a smaller EMBER_KV_BUDGET_TOKENS would fit)")
    return size


async def sized_spec(cluster: Any, http: httpx.AsyncClient, settings: Any, spec: Any) -> Any:
    """The spec with its checkpoint's identity and size known: a spec deployed while no worker
    was up learns them here, before anything is placed (stored for the next requests). None while
    no worker can tell them (the caller waits, as for a full cluster)."""
    if spec.nbytes > 0 and spec.checkpoint_id:
        return spec
    size = await size_checkpoint(cluster, http, settings, spec.checkpoint)
    if size is None:
        return None
    return await to_thread.run_sync(FunctionRegistry(cluster.r).set_resolved, spec, size.nbytes, size.ref,
                                    size.kv_bytes)
