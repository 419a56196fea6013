"""Per-key limits live in the key's own hash (the request path reads caller, limits and spec in one
round trip): set only on a key that exists, kept when the bootstrap admin key rotates, and limits an
earlier version stored apart are adopted at gateway start. Against a real Redis server."""

from __future__ import annotations

import pytest
import redis

from ember.errors import NotFound
from ember.platform.gateway.auth import KeyStore, hash_key, key_row_for, principal_of
from ember.platform.gateway.ratelimit import KeyLimits, RateLimiter
from ember.platform.state import Keys


def test_limits_are_fields_of_the_key_and_never_revive_a_revoked_key(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    keys, limiter = KeyStore(r), RateLimiter(r, KeyLimits(rpm=0, tpm=50))
    created = keys.create("invoker", "tenant")
    assert limiter.set_limits(created.id, 7, None) == KeyLimits(rpm=7, tpm=50)  # tpm: the default
    row = r.hgetall(key_row_for(f"Bearer {created.key}"))  # what a request reads, in one HGETALL
    assert principal_of(row).id == created.id and limiter.limits_of(row) == KeyLimits(rpm=7, tpm=50)
    keys.delete(created.id)
    with pytest.raises(NotFound):
        limiter.set_limits(created.id, 9, 9)
    assert not r.exists(Keys.api_key(hash_key(created.key)))  # no row of limits without a role


def test_the_bootstrap_key_keeps_its_limits_when_it_rotates(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    keys, limiter = KeyStore(r), RateLimiter(r, KeyLimits())
    keys.bootstrap_admin("first-admin-key-0123456789")
    limiter.set_limits("admin", 100, 1000)
    keys.bootstrap_admin("second-admin-key-0123456789")
    assert not r.exists(Keys.api_key(hash_key("first-admin-key-0123456789")))
    row = r.hgetall(Keys.api_key(hash_key("second-admin-key-0123456789")))
    assert principal_of(row).role == "admin" and limiter.limits_of(row) == KeyLimits(rpm=100, tpm=1000)


def test_limits_stored_apart_by_an_earlier_version_are_adopted(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    keys, limiter = KeyStore(r), RateLimiter(r, KeyLimits())
    created = keys.create("developer", "old")
    r.hset(Keys.key_limits(created.id), mapping={"rpm": 5, "tpm": 500})
    r.hset(Keys.key_limits("gone-key"), mapping={"rpm": 1})  # its key was revoked: dropped
    assert limiter.adopt_legacy_limits() == 1
    assert limiter.limits(created.id) == KeyLimits(rpm=5, tpm=500)
    assert not list(r.scan_iter(Keys.key_limits("*")))
    assert limiter.adopt_legacy_limits() == 0  # idempotent
