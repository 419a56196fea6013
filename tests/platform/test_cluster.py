"""RedisCluster against a real Redis server: registration, heartbeats, atomic claims, warm routing,
dead nodes, leases, and concurrent placements from several processes."""

from __future__ import annotations

import multiprocessing
import random
import time

import pytest
import redis

from ember.platform.cluster import DeviceSpec, RedisCluster
from ember.platform.state import Keys
from ember.scheduler.view import PlacementRequest, StartupEstimate

GB = 1 << 30


class FirstFit:
    """A test policy: the first device the free-memory index offers."""

    name = "first_fit"

    def place(self, request, view):
        devices = view.devices_with_room(request.nbytes, limit=16)
        if not devices:
            return None
        d = devices[0]
        return StartupEstimate(d.node_id, d.device_id, "remote", 1.0)


class Blind:
    """A test policy that ignores free memory: claims must still never over-book."""

    name = "blind"

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def place(self, request, view):
        devices = [d for n in view.all_nodes() for d in n.devices]
        d = self.rng.choice(devices)
        return StartupEstimate(d.node_id, d.device_id, "remote", 1.0)


def _cluster(url: str, ttl_s: float = 5.0) -> RedisCluster:
    return RedisCluster(redis.Redis.from_url(url, decode_responses=True), heartbeat_ttl_s=ttl_s)


def _register(c: RedisCluster, node: str, gpus: int = 2, mem: int = 10 * GB) -> None:
    c.register_node(node, f"http://{node}", [DeviceSpec(f"cuda:{i}", mem) for i in range(gpus)],
                    {"dram": 20e9, "ssd": 5e9, "remote": 1e9})


def _req(fn: str = "f", nbytes: int = 4 * GB) -> PlacementRequest:
    return PlacementRequest(function=fn, checkpoint=f"ck-{fn}", nbytes=nbytes)


def test_register_and_view(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n1")
    _register(c, "n1")  # idempotent
    assert c.live_nodes() == ["n1"]
    assert c.node_url("n1") == "http://n1"
    node = c.node("n1")
    assert node is not None
    assert [d.device_id for d in node.devices] == ["cuda:0", "cuda:1"]
    assert node.bandwidth_bps["ssd"] == 5e9
    assert all(d.free_bytes == 10 * GB and not d.awake for d in node.devices)
    assert len(c.devices_with_room(10 * GB)) == 2
    assert c.devices_with_room(11 * GB) == []
    assert c.node("nope") is None


def test_place_claims_memory_and_remove_frees_it(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n1", gpus=1)
    p1 = c.place(_req("a"), FirstFit())
    p2 = c.place(_req("b"), FirstFit())
    assert p1 and p2 and p1.instance_id != p2.instance_id
    assert p1.worker_url == "http://n1" and p1.tier == "remote"
    assert c.place(_req("c"), FirstFit()) is None  # 2 GB left, 4 GB asked
    dev = c.node("n1").devices[0]
    assert dev.free_bytes == 2 * GB and dev.instances == 2 and dev.awake and dev.queue_s > 0
    rec = c.instance(p1.instance_id)
    assert rec.state == "claimed" and rec.function == "a" and rec.nbytes == 4 * GB
    assert [r.instance_id for r in c.instances("a")] == [p1.instance_id]
    assert len(c.instances()) == 2
    c.remove_instance(p1.instance_id)
    c.remove_instance(p1.instance_id)  # idempotent
    assert c.node("n1").devices[0].free_bytes == 6 * GB
    assert c.instance(p1.instance_id) is None
    c.mark_ready(p1.instance_id)  # removed: not resurrected
    assert c.instance(p1.instance_id) is None
    assert c.place(_req("c"), FirstFit()) is not None


def test_script_keys_agree_with_key_schema(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n1", gpus=1)
    c.heartbeat("n1", {"ck-a": "dram"})
    p = c.place(_req("a"), FirstFit())
    r = c.r
    assert r.sismember(Keys.function_instances("a"), p.instance_id)
    assert r.sismember(Keys.node_instances("n1"), p.instance_id)
    assert r.sismember(Keys.instances, p.instance_id)
    assert r.sismember(Keys.holders("ck-a"), "n1")
    assert int(r.hget(Keys.device("n1", "cuda:0"), "claimed_bytes")) == 4 * GB
    c.remove_instance(p.instance_id)
    assert not r.exists(Keys.instance(p.instance_id))
    assert not r.sismember(Keys.function_instances("a"), p.instance_id)
    assert not r.sismember(Keys.node_instances("n1"), p.instance_id)
    c.deregister_node("n1")
    assert not r.exists(Keys.node("n1"), Keys.device("n1", "cuda:0"), Keys.node_holdings("n1"))
    assert not r.sismember(Keys.holders("ck-a"), "n1")
    assert r.zcard(Keys.devices_free) == 0


def test_warm_routing_least_outstanding_and_target(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n1")
    ids = [c.place(_req("f", GB), FirstFit()).instance_id for _ in range(2)]
    assert c.acquire_warm("f", 2) is None  # both still loading
    for i in ids:
        c.mark_ready(i)
    got = [c.acquire_warm("f", 2).instance_id for _ in range(4)]
    assert sorted(got) == sorted(ids * 2)  # spread: least outstanding first
    assert c.acquire_warm("f", 2) is None  # every instance at target concurrency
    c.release_request(got[0])
    again = c.acquire_warm("f", 2)
    assert again.instance_id == got[0] and again.outstanding == 2
    for _ in range(5):
        c.release_request(ids[1])
    assert c.instance(ids[1]).outstanding == 0  # never below zero
    assert c.instance(ids[1]).last_used_s > 0
    assert c.acquire_warm("other", 2) is None


def test_holdings_index_follows_heartbeats(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n1")
    _register(c, "n2")
    assert c.heartbeat("n1", {"ck-a": "dram", "ck-b": "ssd"})
    assert c.heartbeat("n2", {"ck-a": "ssd"})
    assert sorted(n.node_id for n in c.nodes_holding("ck-a")) == ["n1", "n2"]
    assert c.node("n1").holdings == {"ck-a": "dram", "ck-b": "ssd"}
    c.heartbeat("n1", {"ck-b": "gpu"})
    assert [n.node_id for n in c.nodes_holding("ck-a")] == ["n2"]
    assert c.node("n1").holdings == {"ck-b": "gpu"}
    assert not c.heartbeat("unknown", {})


def test_dead_node_is_never_chosen_and_reaped(redis_url: str) -> None:
    c = _cluster(redis_url, ttl_s=0.3)
    _register(c, "dead", gpus=1)
    c.heartbeat("dead", {"ck-f": "dram"})
    p = c.place(_req("f"), FirstFit())
    assert p and p.node_id == "dead"
    c.mark_ready(p.instance_id)
    _register(c, "live", gpus=1, mem=5 * GB)
    deadline = time.time() + 3
    while c.r.exists(Keys.node_alive("dead")) and time.time() < deadline:
        c.heartbeat("live", {})
        time.sleep(0.05)
    c.heartbeat("live", {})
    assert c.live_nodes() == ["live"]
    assert c.nodes_holding("ck-f") == []
    assert c.acquire_warm("f", 4) is None  # its instance is on a dead node
    assert all(d.node_id == "live" for d in c.devices_with_room(GB))
    assert c.place(_req("g"), Blind(0)).node_id == "live"  # even a blind policy cannot claim there
    assert c.reap_dead_nodes() == ["dead"]
    assert c.instance(p.instance_id) is None
    assert [r.node_id for r in c.instances()] == ["live"]
    assert not c.heartbeat("dead", {})  # it must register again
    assert c.reap_dead_nodes() == []


def test_reregister_after_redis_restart_and_restore(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n1", gpus=1)
    p = c.place(_req("f"), FirstFit())
    c.mark_ready(p.instance_id)
    rec = c.instance(p.instance_id)
    c.r.flushall()  # what a non-persistent Redis restart looks like
    assert not c.heartbeat("n1", {})
    _register(c, "n1", gpus=1)
    c.restore_instance(rec)
    c.restore_instance(rec)  # idempotent: claimed once
    assert c.node("n1").devices[0].free_bytes == 6 * GB
    assert c.acquire_warm("f", 1).instance_id == p.instance_id
    _register(c, "n1", gpus=1)  # re-registering keeps the claim
    assert c.node("n1").devices[0].free_bytes == 6 * GB


def test_a_restored_instance_keeps_the_slots_of_its_running_streams(redis_url: str) -> None:
    """The worker restores an instance with the slots its streams hold: they count as outstanding
    (restored at 0, the instance was over-admitted) and stay the gateways' leases, released, renewed
    or lapsing as before Redis forgot them."""
    c = _cluster(redis_url)
    _register(c, "n1", gpus=1)
    p = c.place(_req("f"), FirstFit())
    c.mark_ready(p.instance_id)
    held = [c.acquire_warm("f", 2), c.acquire_warm("f", 2)]
    rec = c.instance(p.instance_id)
    c.r.flushall()
    _register(c, "n1", gpus=1)
    assert c.restore_instance(rec, [h.slot_id for h in held], time.time() + 60) is True
    assert c.instance(p.instance_id).outstanding == 2
    assert c.acquire_warm("f", 2) is None  # at its target concurrency, as before the restart
    c.release_request(held[0])  # the gateway's release finds its slot
    assert c.instance(p.instance_id).outstanding == 1
    c.release_request(held[0])  # once
    assert c.instance(p.instance_id).outstanding == 1
    c.r.zadd(Keys.instance_slots(p.instance_id), {held[1].slot_id: time.time() - 1})  # its gateway died
    got = c.acquire_warm("f", 1)  # the lapsed lease is dropped first
    assert got is not None and c.instance(p.instance_id).outstanding == 1


def test_a_node_deregistered_while_it_registers_restores_nothing_unbooked(redis_url: str) -> None:
    """A gateway deregisters the node (a refused connection: node_gone) between the worker's
    register_node and its restore_instance: nothing is recorded then (before, the instance was
    recorded with no bytes booked, routable, and a later registration never booked it, so its device
    was overbooked for the instance's life); the worker's next registration restores and books it."""
    c = _cluster(redis_url)
    _register(c, "n1", gpus=1)
    p = c.place(_req("f"), FirstFit())
    c.mark_ready(p.instance_id)
    rec = c.instance(p.instance_id)
    c.r.flushall()
    _register(c, "n1", gpus=1)
    c.deregister_node("n1")  # the race
    assert c.restore_instance(rec) is False
    assert c.instance(p.instance_id) is None and c.acquire_warm("f", 1) is None
    assert not c.heartbeat("n1", {})  # the worker's next beat: unknown, it registers again
    _register(c, "n1", gpus=1)
    assert c.restore_instance(rec) is True
    assert c.node("n1").devices[0].free_bytes == 6 * GB  # booked
    assert c.acquire_warm("f", 1).instance_id == p.instance_id


def test_lease_acquire_renew_and_takeover(redis_url: str) -> None:
    c = _cluster(redis_url)
    assert c.try_lease("autoscaler", "g1", 0.3)
    assert c.try_lease("autoscaler", "g1", 0.3)  # renew
    assert not c.try_lease("autoscaler", "g2", 0.3)
    time.sleep(0.4)
    assert c.try_lease("autoscaler", "g2", 5)
    assert not c.try_lease("autoscaler", "g1", 5)


def _placer(url: str, seed: int, n: int, queue) -> None:
    c = _cluster(url)
    placed = 0
    for i in range(n):
        policy = Blind(seed * 1000 + i) if i % 2 else FirstFit()
        if c.place(_req(f"f{seed}-{i}", 3 * GB), policy) is not None:
            placed += 1
    queue.put(placed)


def test_concurrent_placements_from_processes_never_overclaim(redis_url: str) -> None:
    c = _cluster(redis_url)
    for n in ("n1", "n2"):
        _register(c, n, gpus=2, mem=10 * GB)  # 4 devices x 3 slots of 3 GB = 12 placements fit
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_placer, args=(redis_url, s, 8, queue)) for s in range(4)]
    for p in procs:
        p.start()
    placed = sum(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    records = c.instances()
    assert placed == len(records) <= 12
    for node in c.all_nodes():
        for d in node.devices:
            on_device = [r for r in records if (r.node_id, r.device_id) == (d.node_id, d.device_id)]
            claimed = d.memory_bytes - d.free_bytes
            assert claimed == sum(r.nbytes for r in on_device) <= d.memory_bytes
    assert placed >= 8  # first-fit placements keep succeeding while room is left


def test_live_path_runs_the_scheduler_policies_and_autoscaler(redis_url: str) -> None:
    from ember.scheduler.autoscaler import Autoscaler, ScalingSpec, Unload
    from ember.scheduler.policies import POLICY_NAMES, get_policy

    c = _cluster(redis_url)
    for n in ("a", "b", "c"):
        _register(c, n, gpus=2, mem=80 * GB)
    c.heartbeat("a", {"ck-f": "ssd"})
    c.heartbeat("b", {"ck-f": "dram", "ck-g": "ssd"})
    assert [n.node_id for n in c.nodes_holding("ck-f")] == ["b", "a"]  # nearest tier first
    assert [n.node_id for n in c.nodes_holding("ck-f", limit=1)] == ["b"]
    assert c.node("b").holdings == {"ck-f": "dram", "ck-g": "ssd"}
    assert [n.node_id for n in c.nodes(["c", "zz", "a"])] == ["c", "a"]
    p = c.place(_req("f", 20 * GB), get_policy("ember"))
    assert (p.node_id, p.tier) == ("b", "dram")
    assert p.estimate_s == pytest.approx(20 * GB / 20e9)
    for name in POLICY_NAMES:
        assert c.place(_req("f", 20 * GB), get_policy(name)) is not None, name
    c.mark_ready(p.instance_id)
    spec = ScalingSpec("f", keep_alive_s=0.0, max_instances=8)
    actions = Autoscaler().step({"f": spec}, c.instances("f"), time.time() + 1)
    assert Unload(p.instance_id, "f", "b", "keep_alive") in actions


def test_decision_snapshot_matches_direct_reads(redis_url: str) -> None:
    from ember.platform.cluster import _DecisionView

    c = _cluster(redis_url)
    for k in range(6):
        _register(c, f"n{k}", gpus=2, mem=80 * GB)
    c.heartbeat("n1", {"ck-f": "ssd", "ck-x": "dram"})
    c.heartbeat("n4", {"ck-f": "dram"})
    for k in range(5):
        c.place(_req(f"g{k}", (10 + 7 * k) * GB), FirstFit())
    req = _req("f", 20 * GB)
    view = _DecisionView(c, req)
    held = view.nodes_holding("ck-f")
    assert [n.node_id for n in held] == ["n4", "n1"]
    assert held[1].holdings == {"ck-f": "ssd"}  # only what this decision asks about
    direct = c.nodes_holding("ck-f")
    assert [(n.node_id, [(d.device_id, d.free_bytes) for d in n.devices]) for n in held] == \
        [(n.node_id, [(d.device_id, d.free_bytes) for d in n.devices]) for n in direct]
    assert [(d.node_id, d.device_id, d.free_bytes) for d in view.devices_with_room(20 * GB, limit=6)] == \
        [(d.node_id, d.device_id, d.free_bytes) for d in c.devices_with_room(20 * GB, limit=6)]
    assert [n.node_id for n in view.nodes(["n0", "n5", "gone"])] == ["n0", "n5"]
    assert view.node("n2").node_id == "n2"
    assert [d.node_id for d in view.devices_with_room(GB, spread=True)] == \
        [d.node_id for d in c.devices_with_room(GB, spread=True)]


def test_claim_enforces_max_instances_atomically(redis_url: str) -> None:
    """Concurrent placements of one function never exceed its max_instances."""
    import concurrent.futures

    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.scheduler.policies import get_policy
    from ember.scheduler.view import PlacementRequest

    cluster = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=30)
    for n in range(3):
        cluster.register_node(f"n{n}", f"http://127.0.0.1:{9000 + n}", [DeviceSpec(f"cpu:{d}", 1 << 30) for d in range(2)],
                              {"dram": 1e10, "ssd": 1e9, "remote": 1e8})
    req = PlacementRequest(function="f", checkpoint="c", nbytes=1 << 20, max_instances=2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        placed = [p for p in pool.map(lambda _: cluster.place(req, get_policy("ember")), range(8)) if p]
    assert len(placed) == 2
    assert len(cluster.instances("f")) == 2
    cluster.remove_instance(placed[0].instance_id)
    assert cluster.place(req, get_policy("ember")) is not None  # room again after one went away


def test_evict_if_idle_only_takes_ready_idle_instances(redis_url: str) -> None:
    c = _cluster(redis_url)
    _register(c, "n", gpus=1, mem=10 * GB)
    busy, idle, loading = (c.place(_req(fn, 3 * GB), FirstFit()) for fn in ("busy", "idle", "loading"))
    assert busy and idle and loading
    for p in (busy, idle):
        c.mark_ready(p.instance_id)
    assert c.acquire_warm("busy", 1) is not None  # serving a request now
    assert c.devices_with_room(2 * GB) == []
    assert not c.evict_if_idle(busy.instance_id)  # outstanding request: stays
    assert not c.evict_if_idle(loading.instance_id)  # still loading: stays
    assert c.evict_if_idle(idle.instance_id)
    assert not c.evict_if_idle(idle.instance_id)  # already gone
    assert c.instance(idle.instance_id) is None and c.instances("idle") == []
    assert [d.free_bytes for d in c.devices_with_room(GB)] == [4 * GB]  # its claim was freed
    assert c.acquire_warm("idle", 1) is None


def test_lifecycle_transitions_are_checked(redis_url: str) -> None:
    """claimed -> loading -> ready -> draining -> gone; each step refuses the wrong start state."""
    c = _cluster(redis_url)
    _register(c, "n", gpus=1, mem=10 * GB)
    p = c.place(_req("f", 3 * GB), FirstFit())
    assert c.instance(p.instance_id).state == "claimed" and c.instance(p.instance_id).deadline_s > time.time()
    assert c.drain(p.instance_id) == "claimed"  # not ready: nothing to drain
    assert c.begin_load(p.instance_id) and c.instance(p.instance_id).state == "loading"
    assert c.mark_ready(p.instance_id, "f") and c.instance(p.instance_id).state == "ready"
    assert not c.begin_load(p.instance_id)  # never back to loading
    held = c.acquire_warm("f", 2)
    assert held is not None and held.slot_id
    assert c.r.zscore(Keys.instance_slots(p.instance_id), held.slot_id) > time.time()  # a lease, in the schema's key
    assert c.drain(p.instance_id) == "busy"  # keep-alive never takes an instance a request just got
    assert c.instance(p.instance_id).state == "ready"
    sub = c.r.pubsub()
    sub.subscribe(Keys.wake("f"))
    assert sub.get_message(timeout=1)["type"] == "subscribe"
    other = c.acquire_warm("f", 2)
    c.release_request(other)
    assert sub.get_message(timeout=0.5) is None  # nobody waits: no gateway is sent a message
    c.mark_waiting("f", 5.0)
    c.release_request(held)
    assert sub.get_message(timeout=1)["channel"] == Keys.wake("f")  # a waiting request is woken
    sub.close()
    c.release_request(held)  # a second release changes nothing
    assert c.instance(p.instance_id).outstanding == 0
    assert c.drain(p.instance_id) == "draining"
    assert c.acquire_warm("f", 2) is None  # a draining instance takes no request
    assert not c.mark_ready(p.instance_id, "f")  # and is never resurrected
    assert c.devices_with_room(8 * GB) == []  # still booked until its worker drops it
    c.remove_instance(p.instance_id)
    assert c.instance(p.instance_id) is None and [d.free_bytes for d in c.devices_with_room(GB)] == [10 * GB]
    gone = c.place(_req("g", GB), FirstFit())
    c.remove_instance(gone.instance_id)
    assert not c.begin_load(gone.instance_id) and not c.mark_ready(gone.instance_id, "g")


def test_stuck_claims_are_reaped_and_slot_leases_lapse(redis_url: str) -> None:
    c = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True), claim_timeout_s=0.2, slot_ttl_s=0.2)
    _register(c, "n", gpus=1, mem=10 * GB)
    stuck = c.place(_req("s", 2 * GB), FirstFit())
    served = c.place(_req("f", 2 * GB), FirstFit())
    c.mark_ready(served.instance_id, "f")
    assert c.acquire_warm("f", 1) is not None
    assert c.acquire_warm("f", 1) is None  # at target concurrency
    time.sleep(0.3)
    assert c.reap_stuck() == [stuck.instance_id]
    assert c.instance(stuck.instance_id) is None
    assert c.acquire_warm("f", 1) is not None  # the first slot's lease lapsed (its gateway died)
    assert c.instance(served.instance_id).outstanding == 1


def test_heartbeat_reconciles_what_the_worker_holds(redis_url: str) -> None:
    c = RedisCluster(redis.Redis.from_url(redis_url, decode_responses=True), claim_timeout_s=30)
    _register(c, "n", gpus=1, mem=10 * GB)
    ready = c.place(_req("r", GB), FirstFit())
    c.mark_ready(ready.instance_id, "r")
    lost = c.place(_req("l", GB), FirstFit())  # ready in Redis, but the worker lost it
    c.mark_ready(lost.instance_id, "l")
    pending = c.place(_req("p", GB), FirstFit())  # claimed, on its way to the worker
    stale = c.place(_req("s", GB), FirstFit())
    c.begin_load(stale.instance_id)  # loading in Redis; the worker says ready (a missed mark_ready)
    drained = c.place(_req("d", GB), FirstFit())
    c.mark_ready(drained.instance_id, "d")
    c.drain(drained.instance_id)
    hb = c.heartbeat("n", {}, [(ready.instance_id, "ready"), (stale.instance_id, "ready"),
                               (drained.instance_id, "ready"), ("phantom", "ready")])
    assert hb.known and hb.unknown == ("phantom",) and hb.draining == (drained.instance_id,)
    assert hb.removed == (lost.instance_id,)
    assert c.instance(lost.instance_id) is None
    assert c.instance(pending.instance_id).state == "claimed"  # within its deadline
    assert c.instance(stale.instance_id).state == "ready"


def test_a_request_cancelled_while_taking_a_slot_leaks_none(redis_url: str) -> None:
    """The slot script has run in Redis but its reply is still on the way when the request that
    sent it is cancelled (a client gone): the slot it took is given back at once, not when its
    lease lapses. A proxy on loopback delays Redis's replies so the cancel lands in that window."""
    import asyncio
    from urllib.parse import urlparse

    import redis.asyncio as aredis

    from ember.platform.cluster import AsyncSlots

    c = _cluster(redis_url)
    _register(c, "n", gpus=1, mem=10 * GB)
    p = c.place(_req("cx", GB), FirstFit())
    c.mark_ready(p.instance_id, "cx")
    target = urlparse(redis_url)

    async def scenario() -> None:
        delay = {"s": 0.0}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delayed: bool) -> None:
            try:
                while data := await src.read(65536):
                    if delayed and delay["s"]:
                        await asyncio.sleep(delay["s"])
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            r2, w2 = await asyncio.open_connection(target.hostname, target.port)
            await asyncio.gather(pump(reader, w2, False), pump(r2, writer, True))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = redis_url.replace(f"{target.hostname}:{target.port}", f"127.0.0.1:{port}")
        client = aredis.Redis.from_url(url, decode_responses=True)
        slots = AsyncSlots(client, slot_ttl_s=60)
        assert await slots.acquire("nothing-here", 1) is None  # the script is loaded before the delay
        delay["s"] = 0.4  # the script runs at once; its reply arrives 0.4 s later
        task = asyncio.ensure_future(slots.acquire("cx", 1))
        await asyncio.sleep(0.15)
        assert c.instance(p.instance_id).outstanding == 1  # the script has run
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert slots.held == {}
        for _ in range(40):  # given back once the reply arrives (0.4 s), far sooner than the 60 s lease
            if c.instance(p.instance_id).outstanding == 0:
                break
            await asyncio.sleep(0.05)
        await client.aclose()
        server.close()

    asyncio.run(scenario())
    assert c.instance(p.instance_id).outstanding == 0
    assert c.acquire_warm("cx", 1) is not None


def test_a_decision_reads_the_devices_with_room_for_its_claim_from_its_snapshot(redis_url: str) -> None:
    """A placement asks for devices with room for weights + KV budget (`room_bytes`); the decision's
    one snapshot holds exactly those, so no second read goes to Redis (before, the snapshot held
    devices with room for the weights alone and every decision of a sized function read again)."""
    from ember.platform.cluster import _DecisionView

    c = _cluster(redis_url)
    for k in range(4):
        _register(c, f"n{k}", gpus=2, mem=80 * GB)
    for k in range(3):
        c.place(_req(f"g{k}", (30 + 10 * k) * GB), FirstFit())
    req = PlacementRequest(function="f", checkpoint="ck-f", nbytes=20 * GB, kv_bytes=6 * GB)
    live_reads: list[int] = []
    direct = c.devices_with_room
    c.devices_with_room = lambda nbytes, limit=16, spread=False: live_reads.append(nbytes) or direct(  # type: ignore[method-assign]
        nbytes, limit, spread)
    view = _DecisionView(c, req)
    got = view.devices_with_room(req.room_bytes, limit=6)
    assert live_reads == []
    assert [(d.node_id, d.device_id, d.free_bytes) for d in got] == \
        [(d.node_id, d.device_id, d.free_bytes) for d in direct(req.room_bytes, limit=6)]
    from ember.scheduler.policies import get_policy

    assert get_policy("ember").place(req, _DecisionView(c, req)) is not None and live_reads == []


class OnNode:
    """A test policy: the first device of one node."""

    name = "on_node"

    def __init__(self, node: str) -> None:
        self.node = node

    def place(self, request, view):
        d = next(d for n in view.all_nodes() if n.node_id == self.node for d in n.devices)
        return StartupEstimate(d.node_id, d.device_id, "remote", 1.0)


def test_a_device_whose_idle_bytes_cannot_be_freed_is_not_chosen_again(redis_url: str) -> None:
    """`ember` may choose a device for its idle bytes (here: the waiter's checkpoint is in node a's
    DRAM, 0.3 s, against 6 s from remote on b). When they cannot be freed (min_instances keeps the
    idle instance), the placement decides again without them and takes the device with room on b.
    Before: the same device on each of its tries (the view unchanged), and nothing placed while b
    had room: the request waited, a wake after another, for as long as the keeper lived."""
    from ember.platform.gateway.protocol import FunctionDeploy, FunctionSpec
    from ember.scheduler.policies import get_policy

    c = _cluster(redis_url)
    _register(c, "a", gpus=1, mem=10 * GB)
    _register(c, "b", gpus=1, mem=10 * GB)
    spec = FunctionSpec(name="keeper", **FunctionDeploy(checkpoint="ck-keeper", scaling={"min_instances": 1}).model_dump())
    c.r.hset(Keys.functions, "keeper", spec.model_dump_json())
    keeper = c.place(_req("keeper", 8 * GB), OnNode("a"))
    assert keeper is not None and keeper.node_id == "a"
    assert c.begin_load(keeper.instance_id) and c.mark_ready(keeper.instance_id, "keeper")
    c.heartbeat("a", {"ck-waiter": "dram"})
    c.heartbeat("b", {})
    a = next(n for n in c.all_nodes() if n.node_id == "a")
    assert a.devices[0].idle_bytes == 8 * GB  # published as evictable: min_instances is the gateway's rule
    placed = c.place(_req("waiter", 6 * GB), get_policy("ember"))
    assert placed is not None and placed.node_id == "b"
    assert [i.state for i in c.instances("keeper")] == ["ready"]  # never evicted below its minimum
