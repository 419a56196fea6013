"""API keys: stored hashed (sha256) in Redis with a role; the plaintext is shown once at creation."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from ember.errors import Conflict, Forbidden, NotFound, Unauthorized
from ember.platform.gateway.protocol import KeyCreated, KeyInfo, Role
from ember.platform.state import Keys

log = logging.getLogger(__name__)

ROLES: tuple[Role, ...] = ("admin", "operator", "developer", "invoker")
BOOTSTRAP_ID = "admin"
REVOKED = "revoked"  # the one field of a revoked bootstrap key's hash: when it was revoked


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, role and name."""

    id: str
    role: Role
    name: str

    def require(self, *roles: Role) -> Principal:
        if self.role not in roles:
            raise Forbidden(f"role {self.role!r} may not do this (needs {' or '.join(roles)})")
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Create, list, revoke and verify API keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def bootstrap_admin(self, key: str) -> bool:
        """Make `key` the bootstrap admin key (id `admin`), replacing an earlier bootstrap key; every
        gateway start calls it with EMBER_ADMIN_KEY (`ember up`: DATA/admin_key). A secret revoked
        with DELETE /v1/keys/admin stays revoked: it left a tombstone, and it is not restored (a
        warning says so; configure another secret). False then, else True."""
        new_hash = hash_key(key)
        while True:
            with self.client.pipeline(transaction=True) as p:
                try:
                    p.watch(Keys.api_key_ids, Keys.api_key(new_hash))
                    row = p.hgetall(Keys.api_key(new_hash))
                    if row.get(REVOKED):
                        p.unwatch()
                        log.warning("the configured admin key (EMBER_ADMIN_KEY; `ember up`: DATA/admin_key) was "
                                    "revoked (DELETE /v1/keys/admin) and is not restored: set another secret to "
                                    "have a bootstrap admin key again")
                        return False
                    old = p.hget(Keys.api_key_ids, BOOTSTRAP_ID)
                    kept = {}  # the limits an admin set on the bootstrap key survive its rotation
                    if old and old != new_hash:
                        kept = {k: v for k, v in p.hgetall(Keys.api_key(old)).items() if k in ("rpm", "tpm")}
                    created = row.get("created") if old == new_hash and row else None  # kept across restarts
                    p.multi()
                    if old and old != new_hash:
                        p.delete(Keys.api_key(old))
                    p.hset(Keys.api_key(new_hash), mapping={"id": BOOTSTRAP_ID, "role": "admin", "name": "bootstrap",
                                                            "created": created or time.time(), **kept})
                    p.hset(Keys.api_key_ids, BOOTSTRAP_ID, new_hash)
                    p.execute()
                    return True
                except redis.WatchError:
                    continue

    def create(self, role: Role, name: str) -> KeyCreated:
        key = "ek-" + secrets.token_urlsafe(32)
        key_id = secrets.token_hex(8)
        created = time.time()
        h = hash_key(key)
        with self.client.pipeline(transaction=True) as p:
            p.hset(Keys.api_key(h), mapping={"id": key_id, "role": role, "name": name, "created": created})
            p.hset(Keys.api_key_ids, key_id, h)
            p.execute()
        return KeyCreated(id=key_id, key=key, role=role, name=name, created=created)

    def list(self) -> list[KeyInfo]:
        ids = self.client.hgetall(Keys.api_key_ids)
        out = []
        with self.client.pipeline(transaction=False) as p:
            for h in ids.values():
                p.hgetall(Keys.api_key(h))
            rows = p.execute()
        for row in rows:
            if row:
                out.append(KeyInfo(id=row["id"], role=row["role"], name=row.get("name", ""),
                                   created=float(row.get("created", 0))))
        return sorted(out, key=lambda k: k.created)

    def get(self, key_id: str) -> KeyInfo:
        h = self.client.hget(Keys.api_key_ids, key_id)
        row = self.client.hgetall(Keys.api_key(h)) if h else None
        if not row:
            raise NotFound(f"no API key with id {key_id!r}", code="key_not_found")
        return KeyInfo(id=row["id"], role=row["role"], name=row.get("name", ""), created=float(row["created"]))

    def delete(self, key_id: str) -> None:
        """Revoke a key; never the last admin key (nobody could manage keys until a gateway restarts
        with EMBER_ADMIN_KEY), checked atomically against other revocations (WATCH). The bootstrap
        key (id `admin`) leaves a tombstone under its hash, so `bootstrap_admin` never restores it."""
        while True:
            with self.client.pipeline(transaction=True) as p:
                try:
                    p.watch(Keys.api_key_ids)
                    ids = p.hgetall(Keys.api_key_ids)
                    h = ids.get(key_id)
                    if not h:
                        raise NotFound(f"no API key with id {key_id!r}", code="key_not_found")
                    if p.hget(Keys.api_key(h), "role") == "admin" and not any(
                            p.hget(Keys.api_key(other), "role") == "admin" for i, other in ids.items() if i != key_id):
                        raise Conflict("the last admin key cannot be revoked (create another admin key first)",
                                       code="last_admin_key")
                    p.multi()
                    p.delete(Keys.api_key(h))
                    if key_id == BOOTSTRAP_ID:  # its secret comes back from the configuration at each start
                        p.hset(Keys.api_key(h), mapping={REVOKED: time.time()})
                    p.hdel(Keys.api_key_ids, key_id)
                    p.execute()
                    return
                except redis.WatchError:
                    continue

    def verify(self, authorization: str | None) -> Principal:
        """Principal for an `Authorization: Bearer KEY` header, or Unauthorized."""
        return principal_of(self.client.hgetall(key_row_for(authorization)))


def key_row_for(authorization: str | None) -> str:
    """The Redis key of the API key an `Authorization: Bearer KEY` header names, or Unauthorized."""
    if not authorization:
        raise Unauthorized("missing Authorization header (expected 'Bearer <key>')")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("malformed Authorization header (expected 'Bearer <key>')")
    return Keys.api_key(hash_key(key.strip()))


def principal_of(row: dict[str, str]) -> Principal:
    if row.get(REVOKED):
        raise Unauthorized("this API key was revoked")
    if not row or "id" not in row or "role" not in row:
        raise Unauthorized("invalid API key")
    return Principal(id=row["id"], role=row["role"], name=row.get("name", ""))


async def verify_async(aclient: Any, authorization: str | None) -> Principal:
    """`KeyStore.verify` on the event loop (redis.asyncio): the request path takes no threadpool
    hop. Always read from Redis, so a revoked key fails on its next request."""
    return principal_of(await aclient.hgetall(key_row_for(authorization)))

