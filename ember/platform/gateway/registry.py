"""The function registry: function specs stored durably in one Redis hash."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from ember.errors import Forbidden, FunctionNotFound, FunctionUnreadable, Unauthorized
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.protocol import FunctionDeploy, FunctionSpec
from ember.platform.names import check_name
from ember.platform.state import Keys

log = logging.getLogger(__name__)
_PUT_ATTEMPTS = 16


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
        try:
            return FunctionSpec.model_validate_json(raw)
        except ValidationError as e:
            raise FunctionUnreadable(f"the stored spec of function {name!r} cannot be read "
                                     f"({e.error_count()} problem(s), first: {e.errors()[0]['msg']}); "
                                     "deploy it again or delete it") from None

    def list(self) -> list[FunctionSpec]:
        """Every readable spec; one that cannot be read is skipped (and logged), never the listing."""
        return sorted(self._readable(self.client.hgetall(Keys.functions)), key=lambda s: s.name)

    def _readable(self, stored: dict[str, str]) -> list[FunctionSpec]:
        """The specs of a functions hash's contents that can be read (the others logged)."""
        specs = []
        for name, raw in stored.items():
            try:
                specs.append(self.parse(name, raw))
            except FunctionUnreadable as e:
                log.warning("%s", e)
        return specs

    def visible(self, principal: Principal) -> list[FunctionSpec]:
        """The specs a caller may see: a developer its own, every other role all of them."""
        specs = self.list()
        return [s for s in specs if principal.role != "developer" or s.owner == principal.id]

    def get_visible(self, name: str, principal: Principal) -> FunctionSpec:
        """A spec the caller may see; another tenant's function is as unknown as a missing one."""
        return self.parse(name, self._visible_raw(name, principal))

    def _visible_raw(self, name: str, principal: Principal) -> str:
        """The stored spec of a function the caller may see (its JSON, readable or not), else 404."""
        check_name(name, "function name")
        raw = self.client.hget(Keys.functions, name)
        if raw is None or (principal.role == "developer" and _stored_owner(raw) != principal.id):
            raise FunctionNotFound(f"the model (function) {name!r} does not exist")
        return raw

    def put(self, name: str, body: FunctionDeploy, owner: Principal, nbytes: int,
            checkpoint_id: str = "", kv_bytes: int = 0,
            quota: DeveloperQuota | None = None) -> tuple[FunctionSpec, FunctionSpec | None]:
        """Create or replace, atomically against another deploy or delete of any function (WATCH):
        two tenants creating one name at once cannot both be told they own it, and a deploy racing
        the revocation of its key cannot outlive it (the key is checked under the same WATCH).
        Returns (spec, the spec it replaced or None when created). A stored spec that cannot be
        read is replaced by its owner (read from its JSON) or an admin. `quota`: a developer's
        limits on functions and instances, counted over what it owns."""
        check_name(name, "function name")
        for _ in range(_PUT_ATTEMPTS):
            with self.client.pipeline() as p:
                try:
                    p.watch(Keys.functions, Keys.api_key_ids)
                    if not p.hexists(Keys.api_key_ids, owner.id):
                        raise Unauthorized("this API key was revoked")
                    raw = p.hget(Keys.functions, name)
                    old = self._readable_or_owner_checked(name, raw, owner)
                    if quota is not None and owner.role == "developer":
                        quota.check(name, body, [s for s in self._readable(p.hgetall(Keys.functions))
                                                 if s.owner == owner.id and s.name != name])
                    if not checkpoint_id and old is not None and old.checkpoint == body.checkpoint:
                        # no worker could tell the identity now: the one known for this checkpoint stays
                        checkpoint_id, nbytes, kv_bytes = old.checkpoint_id, old.nbytes, old.kv_bytes
                    now = time.time()
                    # a replaced spec keeps its owner and creation (an unreadable one: the owner in its JSON)
                    owner_id = old.owner if old is not None else (raw and _stored_owner(raw)) or owner.id
                    created = old.created if old is not None else now
                    spec = FunctionSpec(name=name, owner=owner_id, created=created, updated=now, nbytes=nbytes,
                                        checkpoint_id=checkpoint_id, kv_bytes=kv_bytes, **body.model_dump())
                    p.multi()
                    p.hset(Keys.functions, name, spec.model_dump_json())
                    p.execute()
                    return spec, old
                except redis.WatchError:
                    continue
        raise redis.WatchError(f"function {name!r}: too many concurrent changes to the registry")

    def _readable_or_owner_checked(self, name: str, raw: str | None, principal: Principal) -> FunctionSpec | None:
        """The stored spec (None when absent or unreadable), after checking `principal` may change it."""
        if raw is None:
            return None
        try:
            old = self.parse(name, raw)
        except FunctionUnreadable:
            if principal.role == "developer" and _stored_owner(raw) != principal.id:
                raise Forbidden(f"function {name!r} belongs to another key") from None
            return None
        self.check_owner(old, principal)
        return old

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

    def delete(self, name: str, principal: Principal) -> None:
        """Delete a spec the caller owns (an unreadable one too); another tenant's is as unknown as
        a missing one."""
        self._visible_raw(name, principal)
        self.client.hdel(Keys.functions, name)

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
        if principal.role == "developer":  # as unknown as a missing one (GET says 404 too)
            raise FunctionNotFound(f"the model (function) {spec.name!r} does not exist")
        raise Forbidden(f"role {principal.role!r} may not invoke functions")


def _stored_owner(raw: str) -> str | None:
    """The owner field of a stored spec's JSON, however unreadable the rest is."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    owner = doc.get("owner") if isinstance(doc, dict) else None
    return owner if isinstance(owner, str) else None


@dataclass(frozen=True)
class DeveloperQuota:
    """What one developer key may hold (0: no limit): functions, and instances summed over its
    functions' `max_instances`. One tenant cannot then claim every device of the cluster
    (min_instances and max_instances 1,024 on a function of its own took them all)."""

    max_functions: int = 0
    max_instances: int = 0

    def check(self, name: str, body: FunctionDeploy, others: list[FunctionSpec]) -> None:
        if self.max_functions and len(others) + 1 > self.max_functions:
            raise Forbidden(f"this key may own {self.max_functions} functions (EMBER_DEVELOPER_MAX_FUNCTIONS); "
                            f"it owns {len(others)}", code="quota_exceeded")
        held = sum(s.scaling.max_instances for s in others)
        if self.max_instances and held + body.scaling.max_instances > self.max_instances:
            raise Forbidden(f"this key's functions may have {self.max_instances} instances in all "
                            f"(EMBER_DEVELOPER_MAX_INSTANCES, counted by max_instances): {held} are taken by its "
                            f"other functions, {name!r} asks for {body.scaling.max_instances}", code="quota_exceeded")
