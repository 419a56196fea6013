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
        raw = self.client.hget(Keys.functions, name)
        if raw is None:
            raise FunctionNotFound(f"the model (function) {name!r} does not exist")
        return FunctionSpec.model_validate_json(raw)

    def list(self) -> list[FunctionSpec]:
        return sorted((FunctionSpec.model_validate_json(v) for v in self.client.hgetall(Keys.functions).values()),
                      key=lambda s: s.name)

    def put(self, name: str, body: FunctionDeploy, owner: Principal, nbytes: int,
            kv_bytes: int = 0) -> tuple[FunctionSpec, bool]:
        """Create or replace; returns (spec, created)."""
        check_name(name, "function name")
        raw = self.client.hget(Keys.functions, name)
        now = time.time()
        if raw is not None:
            old = FunctionSpec.model_validate_json(raw)
            self.check_owner(old, owner)
            spec = FunctionSpec(name=name, owner=old.owner, created=old.created, updated=now, nbytes=nbytes,
                                kv_bytes=kv_bytes, **body.model_dump())
        else:
            spec = FunctionSpec(name=name, owner=owner.id, created=now, updated=now, nbytes=nbytes,
                                kv_bytes=kv_bytes, **body.model_dump())
        self.client.hset(Keys.functions, name, spec.model_dump_json())
        return spec, raw is None

    def set_nbytes(self, name: str, nbytes: int) -> None:
        raw = self.client.hget(Keys.functions, name)
        if raw is not None:
            spec = FunctionSpec.model_validate_json(raw)
            spec.nbytes = nbytes
            self.client.hset(Keys.functions, name, spec.model_dump_json())

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
