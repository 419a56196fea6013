"""Instance lifecycle and faults through the real gateway and workers (uvicorn processes, a real
redis-server): slots freed when clients drop streams, real states published after a
re-registration, claims always matching what workers hold, and timeouts with a retry elsewhere
when a worker stalls before answering."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from ember.platform.cluster import RedisCluster
from ember.platform.redis_server import RedisServerProcess
from ember.scheduler.view import PlacementRequest, StartupEstimate
from tests.platform.conftest import CLUSTER_TOKEN, Proc, admin_headers, base_env, start_gateway, start_worker
from tests.platform.conftest import until as _until

pytestmark = pytest.mark.slow


class Env:
    def __init__(self, redis_url: str, gateway: Proc, workers: dict[str, Proc], store_url: str = "") -> None:
        self.redis_url, self.gateway, self.workers, self.store_url = redis_url, gateway, workers, store_url
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)

    @property
    def url(self) -> str:
        return self.gateway.url

    def deploy(self, name: str, **scaling: object) -> None:
        r = httpx.put(f"{self.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                      json={"checkpoint": "tiny", "scaling": {"keep_alive_s": 300, **scaling}})
        assert r.status_code in (200, 201), r.text

    def chat(self, model: str, timeout: float = 60, **kw: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kw}
        return httpx.post(f"{self.url}/v1/chat/completions", headers=admin_headers(), json=body, timeout=timeout)

    def instances(self, name: str) -> list[dict]:
        r = httpx.get(f"{self.url}/v1/functions/{name}", headers=admin_headers(), timeout=10)
        return r.json()["instances"]

    def held(self, node: str) -> dict:
        r = httpx.get(f"{self.workers[node].url}/internal/healthz", headers={"x-ember-cluster-token": CLUSTER_TOKEN},
                      timeout=10)
        return r.json()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    from ember.loader import open_store

    tmp = tmp_path_factory.mktemp("lifecycle")
    store_url = f"file://{tmp / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    open_store(store_url).push(tiny_model_dir, "hang")  # test_a_hung_load_...: one file becomes a FIFO
    server = RedisServerProcess(tmp / "redis", persistent=False).start()
    e = base_env(server.url, store_url, EMBER_SLO_TIMEOUT_S="20", EMBER_WORKER_READ_TIMEOUT_S="3",
                 EMBER_CPU_SLOTS="1", EMBER_DRAIN_GRACE_S="20", EMBER_MAX_LOAD_S="6",
                 EMBER_CLAIM_TIMEOUT_S="8")
    procs: list[Proc] = []
    try:
        workers: dict[str, Proc] = {}
        # started side by side: most of a worker's start is imports and a bandwidth probe
        starters = [threading.Thread(target=lambda n=node: workers.__setitem__(n, start_worker(tmp, e, n)))
                    for node in ("w0", "w1")]
        for t in starters:
            t.start()
        gateway = start_gateway(tmp, e)
        procs.append(gateway)
        for t in starters:
            t.join()
        procs += list(workers.values())
        assert set(workers) == {"w0", "w1"}
        assert _until(lambda: httpx.get(f"{gateway.url}/readyz").json().get("workers") == 2, 20)
        yield Env(server.url, gateway, workers, store_url)
    finally:
        for p in procs:
            p.stop()
        server.stop()


def test_dropped_streams_release_their_slots(env: Env) -> None:
    """Clients that drop a stream mid-way must not keep its slot (today's main: outstanding stuck
    at target_concurrency, the next request waits for a 503)."""
    env.deploy("drop", max_instances=1, target_concurrency=2)
    assert env.chat("drop").status_code == 200
    body = {"model": "drop", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", f"{env.url}/v1/chat/completions", headers=admin_headers(), json=body,
                          timeout=30) as resp:
            assert resp.status_code == 200
            next(resp.iter_lines())  # the first chunk, then the client goes away
    assert _until(lambda: all(i["outstanding"] == 0 for i in env.instances("drop")), 10), env.instances("drop")
    r = env.chat("drop", timeout=60)
    assert r.status_code == 200 and r.headers["x-ember-cold-start"] == "false"


def _frozen(env: Env, node: str) -> int:
    text = httpx.get(f"{env.workers[node].url}/metrics", headers={"x-ember-cluster-token": CLUSTER_TOKEN},
                     timeout=10).text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ember_worker_gc_frozen_objects ")]
    return int(float(line.split()[1]))


def test_loaded_models_stay_out_of_full_collections_and_go_with_their_instance(env: Env) -> None:
    """A full garbage collection traverses every object the worker holds (a 191 ms stall of all its
    requests once a model was built). The worker freezes what exists after startup and after each
    load (full collections skip it) and releases a dropped model (tests/platform/test_heap.py: even
    one caught in a reference cycle) without a full collection when nothing else holds it."""
    before = {n: _frozen(env, n) for n in env.workers}
    logged = {n: len(env.workers[n].log.read_bytes()) for n in env.workers}
    assert all(v > 50_000 for v in before.values()), before  # torch and transformers, frozen at start
    env.deploy("heap", max_instances=1)
    r = env.chat("heap")
    assert r.status_code == 200
    node = r.headers["x-ember-worker"]
    loaded = _frozen(env, node)
    assert loaded > before[node]  # the model's objects joined the frozen ones
    assert httpx.delete(f"{env.url}/v1/functions/heap", headers=admin_headers(), timeout=60).status_code in (200, 204)
    assert _until(lambda: all(i["function"] != "heap" for i in env.held(node)["instances"].values()), 20), \
        env.held(node)
    after = _frozen(env, node)
    assert after < loaded  # the dropped model's objects were released, not kept frozen
    # ... by their last reference: nothing (a /metrics scrape's collector was one) held the model in
    # a reference cycle, so the drop did not need a full collection
    log = env.workers[node].log.read_bytes()[logged[node]:].decode()
    assert "unloaded" in log and "outlived it" not in log, log


def test_a_client_gone_before_a_whole_answer_frees_its_slot(env: Env) -> None:
    """A non-streaming request whose client gives up before the answer (its worker paused): its
    slot is released (by the invoker's own task, not the cancelled request) and, the worker back,
    the next request is served warm."""
    env.deploy("gone", max_instances=1, target_concurrency=1)
    r = env.chat("gone")
    assert r.status_code == 200
    worker = env.workers[r.headers["x-ember-worker"]].proc
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        with pytest.raises(httpx.TimeoutException):
            env.chat("gone", timeout=0.5)  # the client goes away while the worker says nothing
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert _until(lambda: all(i["outstanding"] == 0 for i in env.instances("gone")), 10), env.instances("gone")
    r = env.chat("gone", timeout=60)
    assert r.status_code == 200 and r.headers["x-ember-cold-start"] == "false"


def test_a_release_wakes_waiting_requests_and_publishes_nothing_without_them(env: Env) -> None:
    """A finished request publishes a wake-up on its function's channel only while some request of
    it waits (every gateway reads every message on that channel: one per request anywhere in the
    cluster, before). A request that waited for the slot is woken by that message."""
    from ember.platform.state import Keys

    env.deploy("wake", max_instances=1, target_concurrency=1)
    assert env.chat("wake").status_code == 200
    sub = env.r.pubsub()
    sub.subscribe(Keys.wake("wake"))
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    env.r.delete(Keys.waiting("wake"))  # the cold start waited; as if its marker had lapsed
    for _ in range(3):
        assert env.chat("wake").status_code == 200
    assert sub.get_message(timeout=1) is None  # nobody waited: nothing published

    # The worker paused: the first request holds the only slot (its answer cannot come) and the
    # second must wait for it; then the worker goes on and the first request's release wakes it.
    worker = env.workers[env.instances("wake")[0]["node"]].proc
    held: list[httpx.Response] = []
    waited: list[httpx.Response] = []
    first = threading.Thread(target=lambda: held.append(env.chat("wake", timeout=30)))
    second = threading.Thread(target=lambda: waited.append(env.chat("wake", timeout=30)))
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        first.start()
        assert _until(lambda: env.instances("wake")[0]["outstanding"] == 1, 5)
        second.start()
        assert _until(lambda: env.r.exists(Keys.waiting("wake")) == 1, 5)  # it waits, and says so
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    msg = sub.get_message(timeout=5)
    while msg is not None and msg["type"] != "message":
        msg = sub.get_message(timeout=5)
    assert msg is not None and msg["channel"] == Keys.wake("wake") and msg["data"] == "slot"
    first.join(30)
    second.join(30)
    sub.close()
    assert held and held[0].status_code == 200
    assert waited and waited[0].status_code == 200 and waited[0].headers["x-ember-cold-start"] == "false"


def test_reregistration_publishes_the_real_state(env: Env) -> None:
    """After Redis forgets the ephemeral state (a restart without persistence), workers register
    again with what they hold: the instance comes back ready, never stuck "loading"."""
    env.deploy("rereg", max_instances=1)
    assert env.chat("rereg").status_code == 200
    (inst,) = env.instances("rereg")
    for pattern in ("ember:node*", "ember:instance*", "ember:function:*", "ember:device*", "ember:holders:*"):
        keys = list(env.r.scan_iter(pattern))
        if keys:
            env.r.delete(*keys)
    assert _until(lambda: [i["state"] for i in env.instances("rereg")] == ["ready"], 15), env.instances("rereg")
    assert env.instances("rereg")[0]["id"] == inst["id"]
    # both workers are back (the other one held nothing, it registers again all the same)
    assert _until(lambda: httpx.get(f"{env.url}/readyz").json().get("workers") == 2, 15)
    r = env.chat("rereg", timeout=60)
    assert r.status_code == 200 and r.headers["x-ember-cold-start"] == "false"


def test_every_claim_matches_an_instance_a_worker_holds(env: Env) -> None:
    """A claim never loaded (its gateway died) is reaped; a load the gateway gave up on is dropped
    by the worker; a load for a claim that is gone is refused."""
    c = RedisCluster(redis.Redis.from_url(env.redis_url, decode_responses=True), heartbeat_ttl_s=2,
                     claim_timeout_s=1.0)

    class OnW0:
        name = "on_w0"

        def place(self, request, view):
            d = next(d for n in view.all_nodes() if n.node_id == "w0" for d in n.devices)
            return StartupEstimate("w0", d.device_id, "remote", 0.1)

    def claims_match_instances() -> bool:
        """Every device books exactly what its instances hold: each checkpoint's weights once per
        device (instances share them) plus each instance's KV budget (claim.lua)."""
        booked: dict[str, int] = {}
        weights: dict[tuple[str, str], int] = {}
        for i in c.instances():
            key = f"{i.node_id}/{i.device_id}"
            booked[key] = booked.get(key, 0) + i.kv_bytes
            weights[(key, i.checkpoint)] = i.nbytes
        for (key, _), nbytes in weights.items():
            booked[key] = booked.get(key, 0) + nbytes
        return all(d.memory_bytes - d.free_bytes == booked.get(d.key, 0) for d in c.node("w0").devices)

    assert _until(lambda: (n := c.node("w0")) is not None and bool(n.devices), 15)  # registered (again)
    orphan = c.place(PlacementRequest(function="orphan", checkpoint="tiny", nbytes=1 << 20), OnW0())
    assert orphan is not None and c.instance(orphan.instance_id).state == "claimed"
    assert _until(lambda: c.instance(orphan.instance_id) is None, 10)  # reaped past its deadline
    assert _until(claims_match_instances, 10), (c.instances(), c.node("w0").devices)  # its claim was freed with it

    headers = {"x-ember-cluster-token": CLUSTER_TOKEN}
    gone = c.place(PlacementRequest(function="gone", checkpoint="tiny", nbytes=1 << 20), OnW0())
    c.remove_instance(gone.instance_id)
    r = httpx.post(f"{env.workers['w0'].url}/internal/instances", headers=headers, timeout=30,
                   json={"instance_id": gone.instance_id, "function": "gone", "checkpoint": "tiny"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "instance_gone"

    late = RedisCluster(redis.Redis.from_url(env.redis_url, decode_responses=True), claim_timeout_s=30).place(
        PlacementRequest(function="late", checkpoint="tiny", nbytes=1 << 20), OnW0())
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        f"{env.workers['w0'].url}/internal/instances", headers=headers, timeout=60,
        json={"instance_id": late.instance_id, "function": "late", "checkpoint": "tiny"})))
    t.start()
    c.remove_instance(late.instance_id)  # the gateway gave up while (or before) the worker loads
    t.join(60)
    assert result["r"].status_code in (200, 409)
    assert _until(lambda: late.instance_id not in env.held("w0")["instances"], 10)
    assert c.instance(late.instance_id) is None


def _load_held_on_a_fifo(env: Env, name: str) -> tuple[Path, bytes, threading.Thread, dict]:
    """Deploy `name` on checkpoint `name` (max_instances 1) with one of its model files in the store
    turned into a FIFO nobody writes, and invoke it from a thread: returns once its load is blocked
    reading the FIFO ("loading"). Returns (the FIFO, the file's bytes, the thread, its result)."""
    fifo = Path(env.store_url.removeprefix("file://")) / name / "files" / "tokenizer_config.json"
    data = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    r = httpx.put(f"{env.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                  json={"checkpoint": name, "scaling": {"keep_alive_s": 300, "max_instances": 1}})
    assert r.status_code == 201, r.text
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=env.chat(name, timeout=90)))
    t.start()
    assert _until(lambda: [i["state"] for i in env.instances(name)] == ["loading"], 20), env.instances(name)
    return fifo, data, t, result


def test_a_hung_load_does_not_hold_its_device_for_ever(env: Env) -> None:
    """A load that never finishes (here: a model file in the store is a FIFO nobody writes, so the
    read blocks) stops being reported after EMBER_MAX_LOAD_S: its claim lapses and is reaped (the
    gateway may try another, which hangs the same way), the waiting request gets a clear error, and
    a load that finishes at last finds its claim gone and is dropped."""
    fifo, data, t, result = _load_held_on_a_fifo(env, "hang")
    t.join(60)  # the gateway's SLO timeout (20 s): a clear error, not a hang
    assert result["r"].status_code in (502, 503, 504), result["r"].text
    # no longer reported after 6 s, reaped 8 s later (EMBER_CLAIM_TIMEOUT_S): nothing holds a device
    assert _until(lambda: env.instances("hang") == [], 40), env.instances("hang")
    assert any("no longer reported" in w.log.read_text() for w in env.workers.values())
    released = 0
    while released < 10:  # let every blocked read go on: those loads find their claims gone
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it any more
            break
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        released += 1
        time.sleep(0.2)
    assert released >= 1

    def nothing_of_hang_held() -> bool:
        for n in env.workers:
            held = env.held(n)
            if held["loading"] or any(h["function"] == "hang" for h in held["instances"].values()):
                return False
        return True

    assert _until(nothing_of_hang_held, 20)
    httpx.delete(f"{env.url}/v1/functions/hang", headers=admin_headers(), timeout=30)


def test_a_load_that_ends_while_redis_refuses_writes_holds_nothing(env: Env, tiny_model_dir: Path) -> None:
    """Redis refuses writes (READONLY: an old primary after a failover; MISCONF and OOM answer alike)
    at the moment a worker finishes a load: the worker cannot mark the instance ready, so it must
    not keep it. Before, the refusal was not taken for Redis being unavailable: the worker kept the
    instance as "loading" and every heartbeat pushed its deadline on, so it was never reaped and its
    function (max_instances 1) could never start another."""
    from ember.loader import open_store

    open_store(env.store_url).push(tiny_model_dir, "refuse")
    fifo, data, t, _ = _load_held_on_a_fifo(env, "refuse")
    (inst,) = env.instances("refuse")
    admin = redis.Redis.from_url(env.redis_url, decode_responses=True)
    admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # a replica of nobody: every write refused
    try:
        with open(fifo, "wb") as f:  # the load goes on and ends: mark_ready is refused
            f.write(data)
        time.sleep(3.0)  # the rest of the load (model build) and mark_ready happen meanwhile
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")
    t.join(90)
    fifo.unlink()
    fifo.write_bytes(data)
    # the worker let the instance go; Redis forgets its claim; the function starts again
    assert _until(lambda: all(h.get("function") != "refuse" for n in env.workers
                              for h in env.held(n)["instances"].values()), 20)
    assert _until(lambda: inst["id"] not in {i["id"] for i in env.instances("refuse")}, 30), env.instances("refuse")
    again = env.chat("refuse", timeout=90)
    assert again.status_code == 200, again.text
    httpx.delete(f"{env.url}/v1/functions/refuse", headers=admin_headers(), timeout=30)
    admin.close()


def test_stalled_worker_times_out_and_the_request_goes_elsewhere(env: Env) -> None:
    """A paused worker (SIGSTOP) must not hang clients: the gateway's first-byte timeout fires and
    the request, which had not reached the client yet, is served by the other worker."""
    env.deploy("stall", max_instances=2)
    r0 = env.chat("stall")
    assert r0.status_code == 200
    paused = r0.headers["x-ember-worker"]
    other = next(n for n in env.workers if n != paused)
    os.kill(env.workers[paused].proc.pid, signal.SIGSTOP)
    try:
        r = env.chat("stall", timeout=45)
        assert r.status_code == 200, r.text
        assert r.headers["x-ember-worker"] == other
    finally:
        os.kill(env.workers[paused].proc.pid, signal.SIGCONT)
    assert _until(lambda: httpx.get(f"{env.url}/readyz").json().get("workers") == 2, 20)


def test_sigterm_lets_streams_in_flight_finish(env: Env) -> None:
    """SIGTERM on a worker: the stream it is serving runs to its end (up to EMBER_DRAIN_GRACE_S),
    and new requests go to the other worker. Runs last: the worker does not come back."""
    env.deploy("term", max_instances=2)
    body = {"model": "term", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 300,
            "stream": True, "temperature": 0}
    chunks_after, done = 0, False
    with httpx.stream("POST", f"{env.url}/v1/chat/completions", headers=admin_headers(), json=body,
                      timeout=120) as resp:
        assert resp.status_code == 200
        node = resp.headers["x-ember-worker"]
        lines = resp.iter_lines()
        next(lines)
        env.workers[node].proc.send_signal(signal.SIGTERM)
        for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                assert "error" not in line, line
                chunks_after += 1
    assert done and chunks_after > 0
    r = env.chat("term", timeout=60)
    assert r.status_code == 200 and r.headers["x-ember-worker"] != node
    assert env.workers[node].proc.wait(30) in (0, -signal.SIGTERM)  # it exits once drained (uvicorn re-raises)


