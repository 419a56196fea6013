"""The function registry against a real redis-server: ownership of a name is decided atomically."""

from __future__ import annotations

import pytest
import redis

from ember.errors import Forbidden, Unauthorized
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.protocol import FunctionDeploy
from ember.platform.gateway.registry import DeveloperQuota, FunctionRegistry
from ember.platform.state import Keys

ALICE = Principal("key-alice", "developer", "alice")
BOB = Principal("key-bob", "developer", "bob")


class _RacingClient:
    """A Redis client through which the first read of the functions hash lets another tenant's deploy
    of the same name land right after it: the interleaving of two concurrent PUTs (the deploy route
    sizes the checkpoint between request and write, which widens this window in practice)."""

    def __init__(self, real: redis.Redis, competitor: FunctionRegistry) -> None:
        self.real, self.competitor, self.raced = real, competitor, False

    def _after_read(self) -> None:
        if not self.raced:
            self.raced = True
            self.competitor.put("shared-name", FunctionDeploy(checkpoint="bobs"), BOB, 0)

    def hget(self, *a):  # noqa: ANN002, ANN201
        value = self.real.hget(*a)
        self._after_read()
        return value

    def pipeline(self, *a, **kw):  # noqa: ANN002, ANN003, ANN201
        outer, pipe = self, self.real.pipeline(*a, **kw)
        hget = pipe.hget

        def racing_hget(*args):  # noqa: ANN002, ANN202
            value = hget(*args)
            if pipe.watching:
                outer._after_read()
            return value

        pipe.hget = racing_hget
        return pipe

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.real, name)


def test_two_tenants_creating_one_name_at_once_are_not_both_owners(redis_url: str) -> None:
    """Alice's deploy reads "no such function", then Bob's deploy of the same name lands, then Alice's
    write: before, Alice's write replaced Bob's spec and both were told 201 (Bob then got 403 on his
    own function). Now Alice's write sees the change and she is refused."""
    real = redis.Redis.from_url(redis_url, decode_responses=True)
    real.hset(Keys.api_key_ids, mapping={ALICE.id: "h-alice", BOB.id: "h-bob"})  # both keys exist
    alice_side = FunctionRegistry(_RacingClient(real, FunctionRegistry(real)))  # type: ignore[arg-type]
    with pytest.raises(Forbidden):
        alice_side.put("shared-name", FunctionDeploy(checkpoint="alices"), ALICE, 0)
    stored = FunctionRegistry(real).get("shared-name")
    assert stored.owner == BOB.id and stored.checkpoint == "bobs"
    spec, replaced = FunctionRegistry(real).put("shared-name", FunctionDeploy(checkpoint="bobs2"), BOB, 0)
    assert replaced is not None and replaced.checkpoint == "bobs" and spec.owner == BOB.id
    assert real.hlen(Keys.functions) == 1
    real.close()


def test_a_deploy_racing_its_keys_revocation_does_not_outlive_it(redis_url: str) -> None:
    """The admin revokes Alice's key (DELETE /v1/keys/{id}: key gone, then her functions deleted)
    while a deploy of hers is between its key check and its write: before, that function was written
    after the revocation's sweep and kept serving for a revoked tenant."""
    real = redis.Redis.from_url(redis_url, decode_responses=True)
    real.hset(Keys.api_key_ids, ALICE.id, "h-alice")

    class Revoking(_RacingClient):
        def _after_read(self) -> None:
            if not self.raced:
                self.raced = True
                real.hdel(Keys.api_key_ids, ALICE.id)  # the revocation lands now

    with pytest.raises(Unauthorized):
        FunctionRegistry(Revoking(real, FunctionRegistry(real))).put(  # type: ignore[arg-type]
            "late", FunctionDeploy(checkpoint="c"), ALICE, 0)
    assert real.hget(Keys.functions, "late") is None
    real.close()


def test_a_developer_keys_quota(redis_url: str) -> None:
    """A developer key owns at most N functions and M instances (summed max_instances): one tenant's
    min_instances 1,024 took every device of the cluster before."""
    real = redis.Redis.from_url(redis_url, decode_responses=True)
    real.hset(Keys.api_key_ids, mapping={ALICE.id: "h-alice", "admin": "h-admin"})
    reg, quota = FunctionRegistry(real), DeveloperQuota(max_functions=3, max_instances=8)
    body = FunctionDeploy(checkpoint="c", scaling={"max_instances": 4})
    reg.put("a1", body, ALICE, 0, quota=quota)
    reg.put("a2", body, ALICE, 0, quota=quota)
    with pytest.raises(Forbidden, match="instances"):
        reg.put("a3", FunctionDeploy(checkpoint="c", scaling={"max_instances": 1}), ALICE, 0, quota=quota)
    reg.put("a2", FunctionDeploy(checkpoint="c", scaling={"max_instances": 2}), ALICE, 0, quota=quota)  # its own: fine
    reg.put("a3", FunctionDeploy(checkpoint="c", scaling={"max_instances": 2}), ALICE, 0, quota=quota)
    with pytest.raises(Forbidden, match="functions"):
        reg.put("a4", FunctionDeploy(checkpoint="c", scaling={"max_instances": 1}), ALICE, 0, quota=quota)
    admin = Principal("admin", "admin", "bootstrap")
    reg.put("big", FunctionDeploy(checkpoint="c", scaling={"max_instances": 1024}), admin, 0, quota=quota)  # admins: none
    real.close()
