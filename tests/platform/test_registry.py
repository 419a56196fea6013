"""The function registry against a real redis-server: ownership of a name is decided atomically."""

from __future__ import annotations

import pytest
import redis

from ember.errors import Forbidden
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.protocol import FunctionDeploy
from ember.platform.gateway.registry import FunctionRegistry
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
    alice_side = FunctionRegistry(_RacingClient(real, FunctionRegistry(real)))  # type: ignore[arg-type]
    with pytest.raises(Forbidden):
        alice_side.put("shared-name", FunctionDeploy(checkpoint="alices"), ALICE, 0)
    stored = FunctionRegistry(real).get("shared-name")
    assert stored.owner == BOB.id and stored.checkpoint == "bobs"
    spec, replaced = FunctionRegistry(real).put("shared-name", FunctionDeploy(checkpoint="bobs2"), BOB, 0)
    assert replaced is not None and replaced.checkpoint == "bobs" and spec.owner == BOB.id
    assert real.hlen(Keys.functions) == 1
    real.close()
