"""Request slots and node marks through a real gateway and worker (uvicorn processes, a real
redis-server): what comes back when the gateway reaps a node whose worker was alive (the slots of
streams still running on its instances, the node's draining mark), and a worker's 409
instance_draining costs the client nothing and leaks neither a slot nor a claim."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ember.platform.cluster import RedisCluster
from ember.platform.redis_server import RedisServerProcess
from ember.platform.state import Keys
from tests.platform.conftest import (
    CLUSTER_TOKEN,
    Proc,
    admin_headers,
    base_env,
    start_gateway,
    start_worker,
    until,
    wait_healthy,
)

pytestmark = pytest.mark.slow
WORKER = {"x-ember-cluster-token": CLUSTER_TOKEN}
# greedy from "Hello" the tiny model never meets EOS: 2,000 tokens, about a second of generation
LONG = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2000, "temperature": 0}


class Env:
    def __init__(self, redis_url: str, gateway: Proc, worker: Proc) -> None:
        self.gateway, self.worker = gateway, worker
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.cluster = RedisCluster(self.r)

    def deploy(self, name: str, **scaling: object) -> None:
        r = httpx.put(f"{self.gateway.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                      json={"checkpoint": "tiny", "scaling": {"keep_alive_s": 300, **scaling}})
        assert r.status_code in (200, 201), r.text

    def chat(self, name: str, **body: object) -> httpx.Response:
        return httpx.post(f"{self.gateway.url}/v1/chat/completions", headers=admin_headers(), timeout=120,
                          json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                **body})

    def stream_in_background(self, name: str) -> tuple[threading.Event, dict]:
        """A long stream through the gateway; the event is set once its first chunk arrived, and the
        dict gets its status and every line when it ends."""
        first, out = threading.Event(), {}

        def run() -> None:
            with httpx.stream("POST", f"{self.gateway.url}/v1/chat/completions", headers=admin_headers(),
                              json={"model": name, "stream": True, **LONG}, timeout=120) as resp:
                lines = []
                for line in resp.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()
                out.update(status=resp.status_code, lines=lines)
            first.set()

        threading.Thread(target=run, daemon=True).start()
        return first, out

    def reap_while_alive(self, gone: str = "") -> None:
        """Pause the worker past its heartbeat TTL until the gateway reaps its node (and with it the
        instance `gone` and its slot leases), then let it go on: it registers again with what it holds."""
        os.kill(self.worker.proc.pid, signal.SIGSTOP)
        try:
            assert until(lambda: "w0" not in self.r.smembers(Keys.nodes), 20)  # reaped: its heartbeat lapsed
            assert not gone or (self.cluster.instance(gone) is None and not self.r.exists(Keys.instance_slots(gone)))
        finally:
            os.kill(self.worker.proc.pid, signal.SIGCONT)

    def slots_in_redis(self, name: str) -> dict[str, tuple[int, int]]:
        """Instance id -> (outstanding, slot leases) for each instance of the function."""
        return {i.instance_id: (i.outstanding, self.r.zcard(Keys.instance_slots(i.instance_id)))
                for i in self.cluster.instances(name)}

    def claims_match_instances(self) -> bool:
        """Every device books what its instances hold: each checkpoint's weights once per device plus
        each instance's KV budget (claim.lua)."""
        booked: dict[str, int] = {}
        weights: dict[tuple[str, str], int] = {}
        for i in self.cluster.instances():
            key = f"{i.node_id}/{i.device_id}"
            booked[key] = booked.get(key, 0) + i.kv_bytes
            weights[(key, i.checkpoint)] = i.nbytes
        for (key, _), nbytes in weights.items():
            booked[key] = booked.get(key, 0) + nbytes
        node = self.cluster.node("w0")
        return node is not None and all(d.memory_bytes - d.free_bytes == booked.get(d.key, 0) for d in node.devices)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    from ember.loader import open_store

    tmp = tmp_path_factory.mktemp("slots")
    store_url = f"file://{tmp / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    server = RedisServerProcess(tmp / "redis", persistent=False).start()
    e = base_env(server.url, store_url, EMBER_SLO_TIMEOUT_S="30", EMBER_CPU_SLOTS="2", EMBER_DRAIN_GRACE_S="30")
    procs: list[Proc] = []
    try:
        procs.append(start_gateway(tmp, e, wait=False))  # both boot side by side
        procs.append(start_worker(tmp, e, "w0", wait=False))
        for p in procs:
            wait_healthy(p)
        assert until(lambda: httpx.get(f"{procs[0].url}/readyz").json().get("workers") == 1, 20)
        yield Env(server.url, procs[0], procs[1])
    finally:
        for p in procs:
            p.stop()
        server.stop()


def test_a_reaped_instance_comes_back_with_the_slots_of_its_running_streams(env: Env) -> None:
    """The worker pauses past its heartbeat TTL mid-stream: the gateway reaps its node (instance and
    slot leases gone from Redis), the worker comes back, registers again and restores the instance.
    It used to come back with `outstanding` 0 while the stream still ran on it: a second request was
    admitted beyond target_concurrency 1 (and keep-alive or eviction could take it from under the
    stream). Now the stream's slot comes back with it, and the gateway's release at the end finds it."""
    env.deploy("kept", max_instances=1, target_concurrency=1)
    assert env.chat("kept").status_code == 200
    (iid,) = env.slots_in_redis("kept")
    first, out = env.stream_in_background("kept")
    assert first.wait(60) and "status" not in out
    env.reap_while_alive(gone=iid)
    assert until(lambda: env.cluster.instance(iid) is not None, 20)  # registered again, restored
    restored = env.slots_in_redis("kept")
    still_running = "status" not in out
    assert still_running, "the stream ended before the instance was restored: nothing was checked"
    assert restored == {iid: (1, 1)}, restored  # before: {iid: (0, 0)}
    assert env.cluster.acquire_warm("kept", 1) is None  # at its target concurrency: nothing more admitted
    assert until(lambda: "status" in out, 60)
    assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]"
    assert until(lambda: env.slots_in_redis("kept") == {iid: (0, 0)}, 10), env.slots_in_redis("kept")
    assert env.chat("kept").headers["x-ember-cold-start"] == "false"  # the same instance serves on


def test_a_409_instance_draining_is_retried_elsewhere_and_leaks_nothing(env: Env) -> None:
    """An instance draining on its worker (an unload while a stream runs on it; Redis still says
    ready) refuses the next request the gateway routes there with a 409 instance_draining: the
    gateway tries elsewhere (a new instance on the other slot), the client gets its answer, and
    afterwards no slot lease or claim is left behind."""
    env.deploy("refused", max_instances=2, target_concurrency=2)
    assert env.chat("refused").status_code == 200
    (iid,) = env.slots_in_redis("refused")
    first, out = env.stream_in_background("refused")
    assert first.wait(60) and "status" not in out
    unload = httpx.delete(f"{env.worker.url}/internal/instances/{iid}", params={"wait_s": 0}, timeout=30,
                          headers=WORKER)
    assert unload.status_code == 202, unload.text  # draining on the worker while the stream runs
    assert env.cluster.instance(iid).state == "ready"  # Redis does not know: the gateway routes there
    assert "status" not in out
    r = env.chat("refused")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None
    assert r.headers["x-ember-cold-start"] == "true"  # served by a new instance, not by the refusing one
    booked = {i.instance_id for i in env.cluster.instances()}  # Redis first: the worker removes after it drops
    held = set(httpx.get(f"{env.worker.url}/internal/healthz", headers=WORKER, timeout=10).json()["instances"])
    assert held <= booked, (held, booked)  # the refusal freed no claim of an instance the worker still holds
    log = env.gateway.log.read_text(errors="replace")
    assert f"takes no new request on {iid}: trying another instance of refused" in log  # refused there first
    assert until(lambda: "status" in out, 60)
    assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]"  # the running stream ran to its end
    assert until(lambda: env.cluster.instance(iid) is None, 30)  # dropped by its worker once idle
    assert not env.r.exists(Keys.instance_slots(iid))
    left = env.slots_in_redis("refused")
    assert len(left) == 1 and iid not in left and set(left.values()) == {(0, 0)}, left
    assert until(env.claims_match_instances, 10), (env.cluster.instances(), env.cluster.node("w0"))
    again = env.chat("refused")
    assert again.status_code == 200 and again.headers["x-ember-cold-start"] == "false"


def test_a_draining_node_reaped_while_alive_stays_draining(env: Env) -> None:
    """The node scaler drains w0; the gateway reaps it while its worker is alive (paused past its
    TTL) and the worker registers again. It used to come back without its draining mark: warm
    requests and new placements went to a node being drained."""
    env.deploy("drained", max_instances=1)
    assert env.chat("drained").status_code == 200
    (iid,) = env.slots_in_redis("drained")
    env.cluster.set_draining("w0", True)  # as the node scaler's Drain marks it
    try:
        env.reap_while_alive(gone=iid)
        assert until(lambda: env.cluster.instance(iid) is not None, 20)  # registered again, restored
        assert env.cluster.draining_nodes() == {"w0"}
        assert env.cluster.acquire_warm("drained", 4) is None  # warm routing skips it
        assert env.cluster.devices_with_room(1) == []  # placement does not see it
    finally:
        env.cluster.set_draining("w0", False)
    r = env.chat("drained")  # taken back (the node scaler's Undrain): it serves again
    assert r.status_code == 200 and r.headers["x-ember-cold-start"] == "false"
