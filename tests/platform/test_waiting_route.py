"""The waiting path of `POST /v1/chat/completions` through real processes (a redis-server, a worker
and a gateway under uvicorn), for two rules the gateway's waiting head follows:

- a placement that found no room is tried again at the head's next wake (a slot freed, an instance
  ready, or its 1 s timeout), not at once: while the only device is held by another function's
  `min_instances`, the gateway runs a handful of placement decisions in seconds (counted as the
  real redis-server runs their snapshot script: the gateway exports no count of placements, its
  `ember_placements_waited` counts requests), and the request is served, with no client retry, once that
  function is deleted;
- a fresh function (no request has ended, so no service time is learned) scales out while more
  requests wait than its starting instances take: a burst of three on a cold function with
  `target_concurrency` 1 and `max_instances` 2 is served by two cold-started instances, both
  serving before any request has ended.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from ember.platform.cluster.scripts import source
from ember.platform.redis_server import RedisServerProcess
from tests.platform.conftest import (
    Proc,
    admin_headers,
    base_env,
    start_gateway,
    start_worker,
    until,
    wait_healthy,
)

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    redis_url: str
    gateway: Proc
    worker: Proc

    @property
    def url(self) -> str:
        return self.gateway.url

    def deploy(self, name: str, **scaling: object) -> None:
        r = httpx.put(f"{self.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                      json={"checkpoint": "m", "scaling": {"keep_alive_s": 300, **scaling}})
        assert r.status_code in (200, 201), r.text

    def instances(self, name: str) -> list[dict]:
        return httpx.get(f"{self.url}/v1/functions/{name}", headers=admin_headers(), timeout=10).json()["instances"]


def _start(tmp: Path, store_url: str, **env: str) -> Iterator[Cluster]:
    server = RedisServerProcess(tmp / "redis").start()
    procs: list[Proc] = []
    try:
        e = base_env(server.url, store_url, **env)
        procs.append(start_worker(tmp, e, "w0", wait=False))  # both boot side by side
        procs.append(start_gateway(tmp, e, wait=False))
        for p in procs:
            wait_healthy(p)
        yield Cluster(server.url, procs[1], procs[0])
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()


@pytest.fixture
def one_room(tmp_path: Path) -> Iterator[Cluster]:
    """One CPU slot with room for one instance of checkpoint `m`: the weights and one KV budget
    (0.4x the weights) fit, a second KV budget does not."""
    from ember.loader import open_store
    from ember.loader.convert import convert_checkpoint, read_manifest
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", TinyModelSpec(layers=4, hidden=256, heads=4, kv_heads=2))
    convert_checkpoint(hf, tmp_path / "conv")
    nbytes = read_manifest(tmp_path / "conv").total_bytes
    store_url = f"file://{tmp_path / 'store'}"
    open_store(store_url).push(tmp_path / "conv", "m")
    capacity = (nbytes * 3 // 2 // (2 << 20) + 1) * (2 << 20)  # the DRAM tier's 2 MiB blocks
    assert nbytes < capacity < 2 * nbytes
    kv_tokens = int(0.4 * nbytes) // (4 * 2 * 64 * 2 * 4)  # layers x KV heads x head dim x K,V x fp32
    yield from _start(tmp_path, store_url, EMBER_SLO_TIMEOUT_S="30", EMBER_CPU_SLOTS="1",
                      EMBER_DRAM_CAPACITY_BYTES=str(capacity), EMBER_KV_BUDGET_TOKENS=str(kv_tokens))


@pytest.fixture
def roomy(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    """The tiny model as checkpoint `m` on one worker with room for many instances of it."""
    from ember.loader import open_store

    store_url = f"file://{tmp_path / 'store'}"
    open_store(store_url).push(tiny_model_dir, "m")
    yield from _start(tmp_path, store_url, EMBER_SLO_TIMEOUT_S="30")


class ScriptCalls:
    """The calls of one cluster script the real redis-server runs (its MONITOR stream), with the
    server's time of each: what the gateway asks Redis, not what a fake records."""

    def __init__(self, redis_url: str, script: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.sha = self.client.register_script(source(script)).sha
        self.times: list[float] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ScriptCalls:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)  # the workers' heartbeats (every 0.3 s) end its wait for a command
        self.client.close()

    def _watch(self) -> None:
        with self.client.monitor() as m:
            self._ready.set()
            while not self._stop.is_set():
                cmd = m.next_command()
                if cmd["command"].lower().startswith(f"evalsha {self.sha}"):
                    self.times.append(float(cmd["time"]))

    def between(self, start_s: float, end_s: float) -> list[float]:
        return [t for t in self.times if start_s <= t < end_s]


def _chat(url: str, model: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=admin_headers(), timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body})


def _rounds(times: list[float], gap_s: float = 0.25) -> list[list[float]]:
    """`times` split where more than `gap_s` passes between two of them."""
    rounds: list[list[float]] = []
    for t in sorted(times):
        if rounds and t - rounds[-1][-1] <= gap_s:
            rounds[-1].append(t)
        else:
            rounds.append([t])
    return rounds


def test_a_request_waiting_for_room_places_once_a_wake_and_is_served_when_room_frees(one_room: Cluster) -> None:
    """Function `keeper` holds the only device (min_instances 1: never evicted); a request for
    `waiter` waits for room. Its placements run once per wake (the 1 s timeout here), not back to
    back: 3 or 4 rounds of placement decisions in 3 s, each two decision snapshots, 1 s apart (before d2bbff0: one round after another, hundreds of snapshots). Deleting
    `keeper` frees the device and the same request is served."""
    c = one_room
    c.deploy("keeper", min_instances=1)
    assert until(lambda: [i["state"] for i in c.instances("keeper")] == ["ready"], 30), c.instances("keeper")
    c.deploy("waiter")
    got: dict[str, httpx.Response] = {}
    # one placement decision reads one snapshot (DecisionView); it picks keeper's device for its
    # idle bytes, which min_instances keeps, then decides once more without them
    with ScriptCalls(c.redis_url, "decision_snapshot") as decisions:
        client = threading.Thread(target=lambda: got.update(r=_chat(c.url, "waiter")))
        client.start()
        try:
            assert until(lambda: bool(decisions.times), 10), "the waiting request never placed"
            first = decisions.times[0]
            assert until(lambda: "ember_placements_waiting 1.0" in httpx.get(f"{c.url}/metrics").text, 5)
            time.sleep(max(0.0, first + 3.0 - time.time()))  # the window counted below
            window = decisions.between(first, first + 3.0)
            assert "r" not in got and c.instances("waiter") == []  # still waiting, nothing placed
            rounds = _rounds(window)
            # at 0, 1 and 2 s (the next at ~3 s may fall in the window); before: one continuous round
            assert 2 <= len(rounds) <= 4, [(r[0] - first, len(r)) for r in rounds][:10]
            # two decisions a wake: keeper's device for its idle bytes, then, those found unfreeable
            # (min_instances), again without them: nothing else has room (before: _CLAIM_ATTEMPTS
            # decisions a wake, the same device each time)
            assert [len(r) for r in rounds] == [2] * len(rounds), [(r[0] - first, len(r)) for r in rounds]
            assert min(b[0] - a[-1] for a, b in zip(rounds, rounds[1:], strict=False)) >= 0.5
            r = httpx.delete(f"{c.url}/v1/functions/keeper", headers=admin_headers(), timeout=60)
            assert r.status_code == 204, r.text
        finally:
            client.join(60)
    r = got["r"]
    assert r.status_code == 200, r.text  # the request that waited, not a retry
    assert r.headers["x-ember-cold-start"] == "true"
    assert [i["state"] for i in c.instances("waiter")] == ["ready"]


@dataclass
class Streamed:
    """One streaming request as its client saw it (times on this process's monotonic clock)."""

    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    headers_s: float = 0.0  # the response began (the gateway had a slot and the first event)
    end_s: float = 0.0  # the stream ended
    chunks: int = 0


def _stream(url: str, model: str, max_tokens: int, out: Streamed) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=admin_headers(), json=body, timeout=60) as r:
        out.headers_s, out.status, out.headers = time.monotonic(), r.status_code, dict(r.headers)
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.chunks += len(json.loads(line[6:])["choices"])
    out.end_s = time.monotonic()


def test_a_fresh_function_scales_out_before_its_first_request_ends(roomy: Cluster) -> None:
    """Three streaming requests at once on a fresh function (target_concurrency 1, max_instances 2).
    The first cold-starts an instance and takes its one slot; the next head finds it full, with no
    service time learned (nothing has ended) and two waiting where no instance is starting: it
    starts a second. Both instances serve a request before any request ends (each generates 1,000
    tokens, seconds on the tiny model; a load from the DRAM tier takes well under one); the third
    waits for a slot. Before 81fd148 the wait was estimated at 0: the second request waited for
    the first to end, then took its instance warm."""
    c = roomy
    c.deploy("burst", target_concurrency=1, max_instances=2)
    seen = [Streamed() for _ in range(3)]
    clients = [threading.Thread(target=_stream, args=(c.url, "burst", 1000, s)) for s in seen]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    assert [s.status for s in seen] == [200] * 3, [s.status for s in seen]
    assert all(s.end_s and s.chunks > 1 for s in seen)
    cold = [s for s in seen if s.headers["x-ember-cold-start"] == "true"]
    # the first two to be served were the two cold starts (before: the second took the first's
    # instance warm once it ended; the third cold-started only then, its service time learned)
    in_order = sorted(seen, key=lambda s: s.headers_s)
    assert [s.headers["x-ember-cold-start"] for s in in_order] == ["true", "true", "false"], \
        [(s.headers_s, s.end_s, s.headers["x-ember-cold-start"]) for s in in_order]
    first_end = min(s.end_s for s in seen)
    # both cold-started instances were serving before the first request ended
    assert max(s.headers_s for s in cold) < first_end, [(s.headers_s, s.end_s) for s in seen]
    assert len(c.instances("burst")) == 2  # never beyond max_instances
