"""Shared fixtures: a real Redis-protocol server process per session, flushed per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private redis-server (or valkey-server) process on a free loopback port."""
    from ember.platform.redis_server import RedisServerProcess

    # with a password, as `ember up` runs it: every client in the suite must pass it (in the URL)
    server = RedisServerProcess(tmp_path_factory.mktemp("redis"), persistent=False,
                                password="test-redis-password").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session Redis server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    yield redis_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face model directory made by Ember (seed 0), shared by the session."""
    from ember.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
