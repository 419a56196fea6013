"""The DRAM tier's retention in the simulator: the live tier's victim rule (`retention.victim`:
the lowest keep, then least recently used) on the in-memory cluster, and the keep a cold start
asks for decided by the shared rule (`caching.dram_keep`) of the function's policy."""

from __future__ import annotations

from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.caching import KEEP_SLO, dram_keep
from ember.scheduler.memcluster import MemCluster
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation, build_trace

GB = 10**9


def _cluster(dram_bytes: int) -> MemCluster:
    mem = MemCluster(gpu_memory_bytes=80 * GB, dram_cache_bytes=dram_bytes, ssd_bytes=1000 * GB)
    mem.add_node("n0", [("cuda:0", 80 * GB)], {"dram": 25e9, "ssd": 8e9, "remote": 1e9},
                 {"dram": 25e9, "ssd": 8e9, "remote": 1e9})
    return mem


def test_a_kept_copy_outlives_more_recent_copies_that_the_ssd_loads_in_time() -> None:
    mem = _cluster(30 * GB)
    node = mem.node_list[0]
    mem.now = 0.0
    mem.dram_put(node, "big", 10 * GB, keep=KEEP_SLO)
    for t, ck in ((1.0, "a"), (2.0, "b")):
        mem.now = t
        mem.dram_put(node, ck, 10 * GB)
    mem.now = 3.0
    mem.dram_put(node, "c", 10 * GB)  # full: the least recent keep-0 copy goes, not the older kept one
    assert set(node.dram) == {"big", "b", "c"} and node.dram_used == 30 * GB
    assert node.holdings.get("a") is None and node.holdings["big"] == "dram"
    mem.now = 4.0
    mem.dram_put(node, "d", 20 * GB)  # two keep-0 copies go before the kept one
    assert set(node.dram) == {"big", "d"}
    mem.now = 5.0
    mem.dram_put(node, "big", 10 * GB, keep=0)  # the latest use sets the keep: plain LRU again
    mem.now = 6.0
    mem.dram_put(node, "e", 10 * GB, keep=KEEP_SLO)
    assert set(node.dram) == {"big", "e"}  # "d" was the least recently used keep-0 copy


def test_a_cold_start_asks_the_keep_of_its_policy() -> None:
    cfg = SimConfig(nodes=4, gpus_per_node=4, functions=150, duration_s=300.0, seed=1, slo_base_s=0.1,
                    measurement_error=0.0, bandwidth_spread=0.0).check()  # every node reads SSD at 8 GB/s
    trace = build_trace(cfg)
    for name, aware in (("ember", True), ("serverlessllm", False)):
        sim = _Simulation(cfg, trace, get_policy(name), Autoscaler())
        assert all(s.slo_aware_cache is aware for s in sim.specs.values())
        by_size = sorted(range(len(sim.nbytes)), key=lambda f: sim.nbytes[f])
        got = []
        for f in by_size[-3:] + by_size[:3]:  # the largest (their SSD load misses the SLO) and smallest
            inst = sim._cold_start(f, 0.0)
            assert inst is not None
            node = inst.device.node
            assert inst.dram_keep == dram_keep(aware, sim.nbytes[f], sim.slo_s[f], node.measured_bw["ssd"])
            sim.cluster.advance(inst.ready_s)
            if inst.load_tier != "gpu":
                assert node.dram[sim.ckpt[f]][1] == inst.dram_keep  # the copy its load left keeps it
            got.append(inst.dram_keep)
        assert got == ([KEEP_SLO] * 3 if aware else [0] * 3) + [0] * 3, (name, got)


def test_dram_keep_is_the_slo_rule_on_the_nodes_ssd_bandwidth() -> None:
    assert dram_keep(True, 70 * GB, 8.0, 8e9) == KEEP_SLO  # 8.75 s from SSD misses an 8 s SLO
    assert dram_keep(True, 70 * GB, 8.0, 10e9) == 0  # a faster SSD loads it in time
    assert dram_keep(False, 70 * GB, 8.0, 8e9) == 0  # a policy without the SLO-aware cache: LRU
    assert dram_keep(True, 70 * GB, 8.0, None) == dram_keep(True, 70 * GB, 8.0, 0.0) == KEEP_SLO  # default bw
    assert dram_keep(True, 0, 0.001, 8e9) == 0


def test_the_simulated_tier_evicts_what_the_live_rule_chooses_over_the_whole_index() -> None:
    """`SimDram` asks `retention.victim` only about the front entries of the lowest keep; over
    random uses (ties in time included), some of them touches (an instance letting go: used now,
    keep unchanged), every eviction is what the rule picks over every entry."""
    import random

    from ember.loader.retention import victim
    from ember.scheduler.simdram import SimDram

    rng = random.Random(7)
    tier = SimDram(100)
    now = 0.0
    for _ in range(3000):
        now += rng.choice((0.0, 0.0, 1.0, 2.5))  # several uses at one time: ties go by name
        ck = f"ck{rng.randrange(40)}"
        nb, keep = rng.randrange(1, 40), rng.choice((0, 0, 1, 2))
        if rng.random() < 0.2:
            held = list(tier.entries.get(ck) or ())  # a copy: touch changes the entry in place
            tier.touch(ck, now)
            assert tier.entries.get(ck) == ([held[0], held[1], now] if held else None)
            continue
        before = {k: tuple(e) for k, e in tier.entries.items()}
        gone = tier.put(ck, nb, keep, now)
        if ck in before:
            assert gone == [] and tier[ck][1:] == [keep, now]
            continue
        assert gone is not None
        left = dict(before)
        used = sum(e[0] for e in left.values()) + nb
        want = []
        while used > 100:  # the live tier: the rule over every entry but the one being added
            v = victim((k, e[1], e[2]) for k, e in left.items())
            assert v is not None
            used -= left.pop(v)[0]
            want.append(v)
        assert gone == want
        assert tier.used == used <= 100 and set(tier) == set(left) | {ck}
