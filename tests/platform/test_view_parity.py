"""One cluster view, two backends: the same cluster state built in Redis (`RedisCluster` with
`LoadQueues`) and in the simulator's `MemCluster` shows every field a policy, the autoscaler,
eviction or the estimator reads identically; warm routing and eviction choose alike."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from ember.platform.cluster import DecisionView, DeviceSpec, RedisCluster
from ember.platform.gateway.coldstart import publish_load_end
from ember.platform.loadqueues import LoadQueues
from ember.platform.state import Keys
from ember.platform.wire import LoadResult
from ember.platform.worker.node import load_result
from ember.scheduler.estimator import ewma_bandwidth_bps
from ember.scheduler.memcluster import MemCluster
from ember.scheduler.policies import EmberPolicy
from ember.scheduler.routing import pick_warm
from ember.scheduler.view import NodeState, PlacementRequest, StartupEstimate
from tests.platform.recorded_loads import recorded_platform

GB = 10**9
MEM = 80 * GB
BW = {
    "n1": {"gpu": 200e9, "dram": 24e9, "ssd": 7e9, "remote": 1.1e9},
    "n2": {"gpu": 190e9, "dram": 26e9, "ssd": 9e9, "remote": 1.3e9},
    "n3": {"dram": 20e9, "ssd": 6e9, "remote": 1.0e9},
}


class Fixed:
    """A test policy: the device and estimate it is told (the view is what is under test)."""

    name = "fixed"

    def __init__(self, node: str, device: str, tier: str, seconds: float) -> None:
        self.est = StartupEstimate(node, device, tier, seconds)

    def place(self, request, view):
        return self.est


class Twin:
    """Applies each operation to Redis and to a MemCluster at the same instant."""

    def __init__(self, url: str) -> None:
        self.live = RedisCluster(redis.Redis.from_url(url, decode_responses=True), heartbeat_ttl_s=300.0)
        self.queues = LoadQueues(self.live.r)
        self.mem = MemCluster(gpu_memory_bytes=MEM, dram_cache_bytes=200 * GB, ssd_bytes=1000 * GB)
        self.ids: dict[str, str] = {}  # mem instance id -> live instance id
        self.placements: dict[str, object] = {}  # mem instance id -> the live placement
        self.fn = 0
        # what each live worker's tiers hold and report at its heartbeat (DRAM before SSD), kept
        # here as the worker keeps it, not copied from the simulator's view
        self.worker_tiers: dict[str, dict[str, set[str]]] = {}

    def add_node(self, node: str, gpus: int = 2) -> None:
        bw = BW.get(node, BW["n1"])
        self.live.register_node(node, f"http://{node}", [DeviceSpec(f"cuda:{i}", MEM) for i in range(gpus)], bw)
        self.mem.add_node(node, [(f"cuda:{i}", MEM) for i in range(gpus)], bw)

    def heartbeat(self) -> None:
        """Workers report what their tiers hold (`worker_tiers`); the simulator derives its
        holdings from its own tiers, and `assert_same` compares the two."""
        for n in self.mem.node_list:
            tiers = self.worker_tiers.get(n.node_id, {})
            held = {ck: "ssd" for ck in tiers.get("ssd", ())}
            held.update({ck: "dram" for ck in tiers.get("dram", ())})
            self.live.heartbeat(n.node_id, held)

    def _worker_holds(self, node: str, ck: str, tier: str) -> None:
        self.worker_tiers.setdefault(node, {}).setdefault(tier, set()).add(ck)

    def cache(self, node: str, ck: str, nbytes: int, tier: str) -> None:
        n = self.mem.nodes_by_id[node]
        (self.mem.dram_put if tier == "dram" else self.mem.ssd_put)(n, ck, nbytes)
        self._worker_holds(node, ck, tier)
        self.heartbeat()

    def claim(self, fn: str, node: str, device: str, nbytes: int, seconds: float, kv_bytes: int = 0):
        """Place an instance of `fn` (checkpoint "ck-<fn>": `nbytes` of weights, a KV budget of
        `kv_bytes`) on the device: live by the gateway's `place`, in memory as the simulator's
        cold start does (room made for what the claim takes there, then the claim)."""
        n = self.mem.nodes_by_id[node]
        ck = f"ck-{fn}"
        tier = n.holdings.get(ck, "remote")
        evicted: list = []
        now = time.time()
        request = PlacementRequest(fn, ck, nbytes, kv_bytes=kv_bytes)
        placed = self.live.place(request, Fixed(node, device, tier, seconds), evicted)
        assert placed is not None
        dev = next(d for d in n.devices if d.device_id == device)
        gone = self.mem.evict([dev], request.claim_bytes(ck in dev.weights), fn)
        self.mem.now = now
        inst = self.mem.claim(self.fn, fn, ck, dev, nbytes, tier, seconds, now, kv_bytes)
        self.fn += 1
        inst.ready_s = inst.last_used_s = float("inf")  # loading until marked ready
        self.ids[inst.instance_id] = placed.instance_id
        self.placements[inst.instance_id] = placed
        self.heartbeat()
        return inst, sorted(self.ids[g.instance_id] for g in gone), sorted(e.instance_id for e in evicted)

    def ready(self, inst) -> None:
        now = time.time()
        self.live.mark_ready(self.ids[inst.instance_id])
        inst.ready_s = inst.last_used_s = now

    def load_done(self, inst, seconds: float, tier: str | None = None, build_s: float = 0.5) -> None:
        """The load ends: its bytes took `seconds` from `tier` (default: the tier claimed), then the
        instance took `build_s` to build. Live as a worker and the gateway do it: the worker's
        answer (`load_result`, over the wire) reaches the gateway's `publish_load_end`; the
        simulator's `load_done` learns from the same load."""
        now = time.time()
        loaded = SimpleNamespace(tier=tier or inst.tier, seconds=seconds, nbytes=inst.nbytes)
        answer = load_result(self.ids[inst.instance_id], loaded, (seconds + build_s) * 1000)
        assert publish_load_end(self.queues, self.placements[inst.instance_id],
                                LoadResult.model_validate_json(answer.model_dump_json()), now=now)
        inst.load_tier, inst.load_s = loaded.tier, seconds
        self.mem.load_done(inst, now)
        # the worker's load filled its DRAM entry (and, from remote, its SSD entry) as it went and
        # commits them now: reported at its next heartbeat
        if inst.load_tier == "remote":
            self._worker_holds(inst.node_id, inst.checkpoint, "ssd")
        if inst.load_tier != "gpu":
            self._worker_holds(inst.node_id, inst.checkpoint, "dram")
        self.heartbeat()

    def take_request(self, inst) -> None:
        """A request holds a slot on `inst` (live: the warm-routing script; here: a busy instance)."""
        live = self.live.acquire_warm(inst.function, 8)
        assert live is not None and live.instance_id == self.ids[inst.instance_id]
        inst.last_used_s = float("inf")

    def prefetch(self, node: str, ck: str, nbytes: int, sent_s_ago: float = 0.0) -> str | None:
        """The gateway sends a prefetch (`sent_s_ago` seconds ago): both backends take it, or
        refuse it, alike; returns its source tier (None: refused)."""
        now = time.time() - sent_s_ago
        sent = self.queues.send_prefetch(node, ck, nbytes, now=now)
        src = self.mem.send_prefetch(self.mem.nodes_by_id[node], ck, nbytes, now)
        assert (sent.tier if sent else None) == src
        return src

    def prefetch_landed(self, node: str, ck: str, nbytes: int) -> None:
        """The copy is in the node's DRAM: the worker publishes it (a beat), then ends the record."""
        self.mem.dram_put(self.mem.nodes_by_id[node], ck, nbytes)
        self.mem.prefetch_landed(self.mem.nodes_by_id[node], ck)
        self._worker_holds(node, ck, "dram")
        self.heartbeat()
        self.queues.prefetch_landed(node, ck)

    def assert_same(self) -> None:
        self.mem.now = time.time()
        live = {n.node_id: n for n in self.live.all_nodes()}
        mem = {n.node_id: n for n in self.mem.all_nodes()}
        assert set(live) == set(mem)
        for node_id in mem:
            _same_node(live[node_id], mem[node_id])
        for nbytes in (10 * GB, 50 * GB, 79 * GB):
            for spread in (False, True):
                a = self.live.devices_with_room(nbytes, 16, spread)
                b = self.mem.devices_with_room(nbytes, 16, spread)
                assert [d.key for d in a] == [d.key for d in b], (nbytes, spread)
                for x, y in zip(a, b, strict=True):
                    _same_device(x, y)
        for ck in {ck for n in self.mem.node_list for ck in n.holdings}:
            assert [n.node_id for n in self.live.nodes_holding(ck)] == [n.node_id for n in self.mem.nodes_holding(ck)]
        for ck in {ck for n in self.mem.node_list for ck in n.holdings} | set(self.mem.in_flight):
            assert self.live.prefetching(ck) == self.mem.prefetching(ck), ck


def _same_device(a, b) -> None:
    assert (a.node_id, a.device_id, a.memory_bytes, a.free_bytes, a.instances, a.awake, a.idle_bytes) == \
        (b.node_id, b.device_id, b.memory_bytes, b.free_bytes, b.instances, b.awake, b.idle_bytes)
    assert a.queue_s == pytest.approx(b.queue_s, abs=0.5)


def _same_node(a: NodeState, b: NodeState) -> None:
    assert a.holdings == b.holdings
    assert a.bandwidth_bps == pytest.approx(b.bandwidth_bps, rel=1e-9)
    assert set(a.tier_queue_s) == set(b.tier_queue_s)
    for tier, q in b.tier_queue_s.items():
        assert a.tier_queue_s[tier] == pytest.approx(q, abs=0.5)
    assert len(a.devices) == len(b.devices)
    for x, y in zip(a.devices, b.devices, strict=True):
        _same_device(x, y)


def test_redis_and_memory_views_agree(redis_url: str) -> None:
    t = Twin(redis_url)
    for n in ("n1", "n2", "n3"):
        t.add_node(n)
    t.cache("n1", "ck-a", 20 * GB, "dram")
    t.cache("n2", "ck-a", 20 * GB, "ssd")
    t.cache("n3", "ck-b", 30 * GB, "ssd")
    t.assert_same()
    # loads claimed: device and tier queues take them until their estimated end
    a1, _, _ = t.claim("a", "n1", "cuda:0", 20 * GB, seconds=40.0)
    b1, _, _ = t.claim("b", "n3", "cuda:1", 30 * GB, seconds=60.0)
    c1, _, _ = t.claim("c", "n1", "cuda:0", 30 * GB, seconds=100.0)  # queued behind a1 on cuda:0
    t.assert_same()
    # a load ends early: both queues shift back; the tier bandwidth learns from it
    t.load_done(a1, seconds=1.5)
    t.ready(a1)
    t.assert_same()
    # busy and idle instances: only idle ready ones count as evictable bytes
    t.load_done(b1, seconds=4.0)
    t.ready(b1)
    t.take_request(b1)
    t.load_done(c1, seconds=90.0)
    t.ready(c1)
    assert t.prefetch("n2", "ck-a", 20 * GB) == "ssd"
    assert t.prefetch("n3", "ck-z", 10 * GB) == "remote"
    t.assert_same()
    # a placement onto a full device by its idle bytes: the same victims (the shared rule)
    t.claim("d", "n1", "cuda:1", 40 * GB, seconds=5.0)
    _, mem_gone, live_gone = t.claim("e", "n1", "cuda:0", 60 * GB, seconds=5.0)
    assert mem_gone == live_gone == sorted(t.ids[i.instance_id] for i in (a1, c1))[:len(live_gone)]
    assert live_gone
    t.assert_same()


def test_instances_sharing_a_checkpoints_weights_are_booked_alike(redis_url: str) -> None:
    """Two instances of one checkpoint on one device claim its weights once and a KV budget each,
    in Redis and in the simulator: the same free bytes, the same evictable (idle) bytes (the weights
    only when every instance sharing them is idle), the same victims, the same bytes freed."""
    t = Twin(redis_url)
    t.add_node("n1", gpus=2)
    a1, _, _ = t.claim("a", "n1", "cuda:0", 30 * GB, seconds=3.0, kv_bytes=2 * GB)
    a2, _, _ = t.claim("a", "n1", "cuda:0", 30 * GB, seconds=3.0, kv_bytes=2 * GB)
    c1, _, _ = t.claim("c", "n1", "cuda:1", 20 * GB, seconds=3.0, kv_bytes=1 * GB)
    c2, _, _ = t.claim("c", "n1", "cuda:1", 20 * GB, seconds=3.0, kv_bytes=1 * GB)
    t.assert_same()

    def device(dev_id: str):
        (node,) = t.live.all_nodes()
        return next(d for d in node.devices if d.device_id == dev_id)

    assert device("cuda:0").free_bytes == MEM - 30 * GB - 2 * 2 * GB
    assert device("cuda:1").free_bytes == MEM - 20 * GB - 2 * 1 * GB
    for inst in (a1, c1, c2):
        t.load_done(inst, seconds=1.0)
        t.ready(inst)
    t.take_request(a1)  # busy: a2 (loading) and a1 hold the weights
    t.load_done(a2, seconds=1.0)
    t.ready(a2)
    t.assert_same()
    assert device("cuda:0").idle_bytes == 2 * GB  # a2's KV budget: a1 still uses the weights
    assert device("cuda:1").idle_bytes == 20 * GB + 2 * 1 * GB  # both idle: the weights go with the last
    # room for 45 + 2 GB on cuda:0 (46 free): evicting a2 frees its KV budget alone, enough
    _, mem_gone, live_gone = t.claim("b", "n1", "cuda:0", 45 * GB, seconds=1.0, kv_bytes=2 * GB)
    assert mem_gone == live_gone == [t.ids[a2.instance_id]]
    assert device("cuda:0").free_bytes == MEM - 30 * GB - 2 * GB - 47 * GB
    # 70 GB on cuda:1 (58 free): both instances of c go, and their weights with the last
    _, mem_gone, live_gone = t.claim("d", "n1", "cuda:1", 70 * GB, seconds=1.0)
    assert mem_gone == live_gone == sorted(t.ids[i.instance_id] for i in (c1, c2))
    assert device("cuda:1").free_bytes == MEM - 70 * GB
    t.assert_same()


def test_room_beside_the_weights_is_made_for_the_kv_budget_alone(redis_url: str) -> None:
    """Another instance on a device that holds its checkpoint's weights claims a KV budget only, so
    only that much room is made: the least recently used idle instance goes, in both backends
    (before, the gateway asked for weights + KV budget, found no victims enough and placed nothing)."""
    t = Twin(redis_url)
    t.add_node("n1", gpus=1)
    a1, _, _ = t.claim("a", "n1", "cuda:0", 40 * GB, seconds=1.0, kv_bytes=2 * GB)
    others = [t.claim(fn, "n1", "cuda:0", nb, seconds=1.0)[0]
              for fn, nb in (("e", 15 * GB), ("g", 15 * GB), ("h", 7 * GB + GB // 2))]
    for inst in (a1, *others):
        t.load_done(inst, seconds=1.0)
        t.ready(inst)
    t.take_request(a1)
    t.assert_same()
    _, mem_gone, live_gone = t.claim("a", "n1", "cuda:0", 40 * GB, seconds=1.0, kv_bytes=2 * GB)
    assert mem_gone == live_gone == [t.ids[others[0].instance_id]]
    (node,) = t.live.all_nodes()
    assert node.devices[0].free_bytes == MEM - 40 * GB - 2 * 2 * GB - 15 * GB - 7 * GB - GB // 2
    t.assert_same()


def test_warm_routing_script_and_pick_warm_agree(redis_url: str) -> None:
    """`pick_warm` on the records Redis holds chooses what the Lua script then takes."""
    t = Twin(redis_url)
    t.add_node("n1", gpus=2)
    t.add_node("n2", gpus=2)
    insts = [t.claim("f", n, d, 5 * GB, seconds=1.0)[0] for n in ("n1", "n2") for d in ("cuda:0", "cuda:1")]
    for inst in insts[:3]:  # the last one stays loading
        t.ready(inst)
    target = 3
    for _ in range(3 * target + 2):
        records = t.live.instances("f")
        expected = pick_warm(records, target)
        got = t.live.acquire_warm("f", target)
        assert (got.instance_id if got else None) == (expected.instance_id if expected else None)
        if got is not None and len(records) % 2 == 0:
            t.live.release_request(got.instance_id)  # some finish, so outstanding counts differ


def test_devices_with_room_same_candidates_on_a_large_cluster(redis_url: str) -> None:
    """More devices than any candidate window, ties in free bytes and in free-memory buckets, claims
    made out of name order: both backends (and a decision's snapshot) read the same window and
    order it alike, so the same policy places alike."""
    t = Twin(redis_url)
    nodes = [f"m{k:02d}" for k in range(12)]
    for n in reversed(nodes):  # registered out of name order
        t.add_node(n, gpus=4)
    # exact ties (same free bytes, different queues), near ties (same GiB bucket), idle devices
    for k, n in enumerate(nodes[::-1][:8]):
        t.claim(f"f{k}", n, "cuda:1", 40 * GB, seconds=5.0 * (k % 3))
        t.claim(f"g{k}", n, "cuda:2", 40 * GB + (k % 2) * 200 * 10**6, seconds=30.0 - k)
    for k, n in enumerate(nodes[3:7]):
        inst, _, _ = t.claim(f"h{k}", n, "cuda:3", 70 * GB, seconds=1.0)
        t.load_done(inst, 1.0)
    t.mem.now = time.time()
    assert len(t.mem.devices) > 2 * 16
    for nbytes in (5 * GB, 10 * GB, 39 * GB + 500 * 10**6, 41 * GB):
        for limit in (1, 2, 3, 6, 16, 20):
            for spread in (False, True):
                live = t.live.devices_with_room(nbytes, limit, spread)
                mem = t.mem.devices_with_room(nbytes, limit, spread)
                assert [d.key for d in live] == [d.key for d in mem], (nbytes, limit, spread)
                for x, y in zip(live, mem, strict=True):
                    _same_device(x, y)
                decision = DecisionView(t.live, PlacementRequest("x", "ck-x", nbytes)).devices_with_room(
                    nbytes, limit, spread)
                assert [d.key for d in decision] == [d.key for d in live], (nbytes, limit, spread)
    for nbytes in (5 * GB, 39 * GB + 500 * 10**6):
        req = PlacementRequest("new", "ck-new", nbytes)
        live_choice, mem_choice = EmberPolicy().place(req, t.live), EmberPolicy().place(req, t.mem)
        assert live_choice is not None and mem_choice is not None
        assert (live_choice.node_id, live_choice.device_id) == (mem_choice.node_id, mem_choice.device_id)


def test_a_finished_load_teaches_both_backends_the_same_bandwidth(redis_url: str) -> None:
    """One fold per load, of the transfer seconds (never the instance's build), into the tier the
    bytes really came from, while the queues corrected are the ones the placement claimed."""
    t = Twin(redis_url)
    t.add_node("n1")
    t.cache("n1", "ck-a", 20 * GB, "dram")
    a, _, _ = t.claim("a", "n1", "cuda:0", 20 * GB, seconds=5.0)
    assert a.tier == "dram"
    t.load_done(a, seconds=2.0, tier="ssd", build_s=3.0)  # its DRAM entry was gone: read from the SSD
    t.ready(a)
    t.assert_same()
    bw = next(n for n in t.live.all_nodes() if n.node_id == "n1").bandwidth_bps
    assert bw["ssd"] == pytest.approx(ewma_bandwidth_bps(BW["n1"]["ssd"], 20 * GB, 2.0), rel=1e-9)
    assert bw["dram"] == BW["n1"]["dram"]  # the tier claimed learned nothing
    b, _, _ = t.claim("a", "n1", "cuda:1", 20 * GB, seconds=5.0)  # a second instance, from the DRAM entry
    assert b.tier == "dram"
    t.load_done(b, seconds=0.8, build_s=1.0)
    t.assert_same()
    bw = next(n for n in t.live.all_nodes() if n.node_id == "n1").bandwidth_bps
    assert bw["dram"] == pytest.approx(ewma_bandwidth_bps(BW["n1"]["dram"], 20 * GB, 0.8), rel=1e-9)


@pytest.mark.slow
def test_a_real_cold_start_and_the_simulator_learn_the_same_bandwidth(redis_url: str, tmp_path: Path,
                                                                       tiny_model_dir: Path) -> None:
    """A real gateway and worker (everything either writes at a load's end) against the
    simulator's `load_done` for the same load: where its bytes came from, how long they took."""
    with recorded_platform(redis_url, tmp_path, tiny_model_dir) as p:
        before = p.bandwidths()
        load = p.cold_start("f", "ck")
        live = p.bandwidths()
    mem = MemCluster(gpu_memory_bytes=MEM, dram_cache_bytes=200 * GB, ssd_bytes=1000 * GB)
    node = mem.add_node("w0", [("cpu:0", MEM)], before)
    inst = mem.claim(0, "f", "ck", node.devices[0], load["nbytes"], load["tier"], 1.0, 0.0)
    inst.load_tier, inst.load_s = load["tier"], load["transfer_s"]
    mem.load_done(inst, load["startup_ms"] / 1000)
    mem.now = load["startup_ms"] / 1000
    (sim,) = mem.all_nodes()
    assert live == pytest.approx(sim.bandwidth_bps, rel=1e-9)
    assert live != before


def test_prefetches_in_flight_read_alike(redis_url: str) -> None:
    """A prefetch is in flight from when it is sent until it lands or expires, in both backends:
    a second one to the same node is refused by both (its queue time is charged once), one to a
    node holding the checkpoint in DRAM is never recorded, and each answers `prefetching` alike."""
    t = Twin(redis_url)
    for n in ("n1", "n2", "n3"):
        t.add_node(n)
    t.cache("n1", "ck-a", 20 * GB, "ssd")
    t.cache("n3", "ck-a", 20 * GB, "dram")
    assert t.prefetch("n1", "ck-a", 20 * GB) == "ssd"
    assert t.prefetch("n2", "ck-a", 20 * GB) == "remote"
    t.assert_same()
    assert t.mem.prefetching("ck-a") == {"n1", "n2"}

    def queues() -> tuple:  # busy-until of every tier queue, as each backend keeps it
        live = {n: {k: v for k, v in t.live.r.hgetall(Keys.node(n)).items() if k.startswith("tq:")}
                for n in ("n1", "n2", "n3")}
        return live, {n.node_id: dict(n.tier_until) for n in t.mem.node_list}

    before = queues()
    assert t.prefetch("n1", "ck-a", 20 * GB) is None  # in flight there: nothing sent, no queue pushed
    assert t.prefetch("n3", "ck-a", 20 * GB) is None  # already in its DRAM
    t.assert_same()
    assert queues() == before
    assert t.mem.prefetching("ck-a") == {"n1", "n2"}
    t.prefetch_landed("n1", "ck-a", 20 * GB)  # landed: a DRAM copy now, no longer in flight
    t.assert_same()
    assert t.mem.prefetching("ck-a") == {"n2"}
    # sent long ago (past its estimated end and margin): expired in both, so it may be sent again
    assert t.prefetch("n3", "ck-b", 10 * GB, sent_s_ago=600.0) == "remote"
    t.assert_same()
    assert t.mem.prefetching("ck-b") == set()
    assert t.prefetch("n3", "ck-b", 10 * GB) == "remote"
    t.assert_same()
    assert t.mem.prefetching("ck-b") == {"n3"}

