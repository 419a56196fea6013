"""The function registry: function specs stored durably in one Redis hash."""

from __future__ import annotations

import time

import redis

from ember.errors import Forbidden, FunctionNotFound
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.protocol import FunctionDeploy, FunctionSpec
from ember.platform.names import check_name
from ember.platform.state import Keys


class FunctionRegistry:
    """CRUD over function specs, with ownership rules for the developer role."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def get(self, name: str) -> FunctionSpec:
        check_name(name, "function name")
        return self.parse(name, self.client.hget(Keys.functions, name))

    @staticmethod
    def parse(name: str, raw: str | None) -> FunctionSpec:
        """The spec stored for `name` (`raw`: its field of the functions hash, None when absent)."""
        if raw is None:
            raise FunctionNotFound(f"the model (function) {name!r} does not exist")
        return FunctionSpec.model_validate_json(raw)

    def list(self) -> list[FunctionSpec]:
        return sorted((FunctionSpec.model_validate_json(v) for v in self.client.hgetall(Keys.functions).values()),
                      key=lambda s: s.name)

    def visible(self, principal: Principal) -> list[FunctionSpec]:
        """The specs a caller may see: a developer its own, every other role all of them."""
        specs = self.list()
        return [s for s in specs if principal.role != "developer" or s.owner == principal.id]

    def get_visible(self, name: str, principal: Principal) -> FunctionSpec:
        """A spec the caller may see; another tenant's function is as unknown as a missing one."""
        spec = self.get(name)
        if principal.role == "developer" and spec.owner != principal.id:
            raise FunctionNotFound(f"the model (function) {name!r} does not exist")
        return spec

    def put(self, name: str, body: FunctionDeploy, owner: Principal, nbytes: int,
            checkpoint_id: str = "", kv_bytes: int = 0) -> tuple[FunctionSpec, bool]:
        """Create or replace; returns (spec, created)."""
        check_name(name, "function name")
        raw = self.client.hget(Keys.functions, name)
        now = time.time()
        if raw is not None:
            old = FunctionSpec.model_validate_json(raw)
            self.check_owner(old, owner)
            spec = FunctionSpec(name=name, owner=old.owner, created=old.created, updated=now, nbytes=nbytes,
                                checkpoint_id=checkpoint_id, kv_bytes=kv_bytes, **body.model_dump())
        else:
            spec = FunctionSpec(name=name, owner=owner.id, created=now, updated=now, nbytes=nbytes,
                                checkpoint_id=checkpoint_id, kv_bytes=kv_bytes, **body.model_dump())
        self.client.hset(Keys.functions, name, spec.model_dump_json())
        return spec, raw is None

    def set_resolved(self, spec: FunctionSpec, nbytes: int, checkpoint_id: str, kv_bytes: int = 0) -> FunctionSpec:
        """Record a checkpoint's size, identity and per-instance KV budget learned after deploy,
        unless the spec changed meanwhile (WATCH): a redeploy's own values win. Returns the spec
        to use now."""
        resolved = spec.model_copy(update={"nbytes": nbytes, "checkpoint_id": checkpoint_id,
                                           "kv_bytes": kv_bytes or spec.kv_bytes})
        with self.client.pipeline() as p:
            try:
                p.watch(Keys.functions)
                raw = p.hget(Keys.functions, spec.name)
                if raw is None or FunctionSpec.model_validate_json(raw).updated != spec.updated:
                    p.unwatch()
                    return resolved
                p.multi()
                p.hset(Keys.functions, spec.name, resolved.model_dump_json())
                p.execute()
            except redis.WatchError:
                pass
        return resolved

    def set_nbytes(self, name: str, nbytes: int) -> None:
        raw = self.client.hget(Keys.functions, name)
        if raw is not None:
            spec = FunctionSpec.model_validate_json(raw)
            spec.nbytes = nbytes
            self.client.hset(Keys.functions, name, spec.model_dump_json())

    def owned_by(self, owner: str) -> list[FunctionSpec]:
        return [s for s in self.list() if s.owner == owner]

    def delete(self, name: str, principal: Principal) -> FunctionSpec:
        spec = self.get(name)
        self.check_owner(spec, principal)
        self.client.hdel(Keys.functions, name)
        return spec

    @staticmethod
    def check_owner(spec: FunctionSpec, principal: Principal) -> None:
        if principal.role == "developer" and spec.owner != principal.id:
            raise Forbidden(f"function {spec.name!r} belongs to another key")

    @staticmethod
    def check_invoke(spec: FunctionSpec, principal: Principal) -> None:
        """admin and invoker invoke anything; a developer only its own functions; operators do not invoke."""
        if principal.role in ("admin", "invoker"):
            return
        if principal.role == "developer" and spec.owner == principal.id:
            return
        if principal.role == "developer":
            raise Forbidden(f"function {spec.name!r} belongs to another key")
        raise Forbidden(f"role {principal.role!r} may not invoke functions")
