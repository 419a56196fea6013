"""The gateway's multiplexed Redis client against a real redis-server: replies reach their own
callers under concurrency and cancellation, scripts load themselves, and a paused, restarted or
wrong-password Redis gives redis-py's errors and a working client afterwards."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from ember.platform.redis_mux import MuxRedis
from ember.platform.redis_server import RedisServerProcess
from tests.platform.tls_redis import PASSWORD, tls_redis


def test_concurrent_commands_get_their_own_replies_in_one_connection(redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    sync.hset("h", mapping={"a": "1", "b": "é"})
    for i in range(500):
        sync.set(f"k{i}", f"v{i}")

    before = len(sync.client_list())

    async def main() -> None:
        async with MuxRedis.from_url(redis_url) as r:
            got = await asyncio.gather(*(r.execute_command("GET", f"k{i}") for i in range(500)))
            assert got == [f"v{i}" for i in range(500)]
            assert await r.hgetall("h") == {"a": "1", "b": "é"}
            assert await r.hgetall("missing") == {}
            assert await r.hget("h", "b") == "é" and await r.hget("h", "zz") is None
            assert len(sync.client_list()) == before + 1  # all of it over one connection
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                await r.hget("k1", "x")
            assert await r.execute_command("GET", "k2") == "v2"  # an error reply does not shift the others

    asyncio.run(main())


def test_pipelines_and_transactions(redis_url: str) -> None:
    async def main() -> None:
        async with MuxRedis.from_url(redis_url) as r:
            async with r.pipeline(transaction=True) as p:
                p.hincrby("w", "10", 5)
                p.expire("w", 61)
                assert await p.execute() == [5, True]
            async with r.pipeline(transaction=False) as p:
                p.hgetall("w")
                p.hget("w", "10")
                p.hget("nope", "x")
                assert await p.execute() == [{"10": "5"}, "5", None]
            big = "x" * (1 << 20)  # replies over many reads
            await r.execute_command("SET", "big", big)
            async with r.pipeline(transaction=False) as p:
                for _ in range(4):
                    p.hget("w", "10")
                res, got_big = await asyncio.gather(p.execute(), r.execute_command("GET", "big"))
            assert res == ["5"] * 4 and got_big == big

    asyncio.run(main())


def test_scripts_load_themselves_after_a_script_flush(redis_url: str) -> None:
    async def main() -> None:
        async with MuxRedis.from_url(redis_url) as r:
            add = r.register_script("return {KEYS[1], tonumber(ARGV[1]) + 1, 'ok'}")
            assert await add(keys=["k"], args=[41]) == ["k", 42, "ok"]
            await r.execute_command("SCRIPT", "FLUSH")
            assert await add(keys=["k"], args=[1.5]) == ["k", 2, "ok"]  # Lua numbers to integers, as Redis does
            bad = r.register_script("return redis.call('NOPE')")
            with pytest.raises(redis.ResponseError):
                await bad()

    asyncio.run(main())


def test_a_cancelled_caller_does_not_take_anothers_reply(redis_url: str) -> None:
    async def main() -> None:
        async with MuxRedis.from_url(redis_url) as r:
            await r.execute_command("SET", "a", "A")
            await r.execute_command("SET", "b", "B")
            slow = asyncio.ensure_future(r.execute_command("BLPOP", "empty-list", "0.3"))
            await asyncio.sleep(0.05)
            slow.cancel()
            after = await r.execute_command("GET", "a")  # queued behind the BLPOP on the same connection
            assert after == "A"
            assert await r.execute_command("GET", "b") == "B"

    asyncio.run(main())


def test_paused_redis_times_out_and_a_restarted_one_is_used_again(tmp_path: Path) -> None:
    server = RedisServerProcess(tmp_path / "r", persistent=False, password="pw-0123").start()

    async def main() -> None:
        async with MuxRedis.from_url(server.url, timeout_s=1.0) as r:
            assert await r.ping()
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                with pytest.raises(redis.TimeoutError):
                    await r.execute_command("GET", "x")
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            assert time.monotonic() - t0 < 3.5
            assert await r.execute_command("SET", "x", "1") == "OK"  # a new connection
            server.stop()
            with pytest.raises(redis.ConnectionError):
                await r.execute_command("GET", "x")
            server.start()  # same port: the stale connection is replaced without the caller seeing it
            assert await r.execute_command("SET", "x", "2") == "OK"

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_wrong_password_is_an_authentication_error(redis_server: str) -> None:
    bad = redis_server.replace("test-redis-password", "wrong-password")
    assert bad != redis_server

    async def main() -> None:
        r = MuxRedis.from_url(bad)
        with pytest.raises(redis.AuthenticationError):
            await r.ping()
        await r.aclose()

    asyncio.run(main())


def test_tls_with_a_private_ca_as_redis_py_accepts_it(tmp_path: Path) -> None:
    """`rediss://` with the URL's `ssl_ca_certs`: the multiplexed client verifies the server against
    that CA as redis-py does (before, it used the system's CAs only: a gateway whose Redis had a
    private CA failed every request while its redis-py client worked), and refuses a server it
    cannot verify."""
    with tls_redis(tmp_path) as (port, ca):
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        sync = redis.Redis.from_url(url, decode_responses=True)
        sync.set("k", "over tls")

        async def main() -> None:
            async with MuxRedis.from_url(url) as r:
                assert await r.execute_command("GET", "k") == "over tls"
                async with r.pipeline(transaction=True) as p:
                    p.hincrby("h", "n", 2)
                    p.expire("h", 60)
                    assert await p.execute() == [2, True]
            async with MuxRedis.from_url(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0") as stranger:
                with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
                    await stranger.execute_command("GET", "k")  # the system's CAs do not know this server
            async with MuxRedis.from_url(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none") as blind:
                assert await blind.execute_command("GET", "k") == "over tls"  # verification off, as asked

        asyncio.run(main())
        sync.close()
