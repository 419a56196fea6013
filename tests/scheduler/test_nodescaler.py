"""The node scaler's decisions (pure) and `ember sim --fleet` on a small cluster."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ember.errors import ConfigError
from ember.scheduler.nodescaler import (
    Drain,
    FleetNode,
    NodeActivity,
    NodeScaler,
    NodeScalerConfig,
    ScaleOut,
    Terminate,
    Undrain,
)

GB = 10**9


def node(nid: str, *, instances: int = 0, busy: bool = False, last: float = 0.0, keep: float = 60.0,
         draining: bool = False, claimed: int = 0) -> FleetNode:
    return FleetNode(nid, instances, busy, last, keep, draining, f"i-{nid}", 80 * GB, claimed)


def test_waiting_placements_scale_out_capped_by_the_power_budget() -> None:
    s = NodeScaler(NodeScalerConfig(max_nodes=10, node_power_w=1000, requests_per_node=2))
    nodes = [node("a", instances=1, busy=True, last=100)]
    assert s.step(nodes, 100, waiting=5, booting=0) == [ScaleOut(3, 4, "waiting")]
    assert s.step(nodes, 100, waiting=5, booting=0, budget_w=2500) == [ScaleOut(1, 2, "waiting")]
    assert s.step(nodes, 100, waiting=5, booting=3) == []  # already coming
    assert s.step(nodes, 100, waiting=0, booting=0) == []


def test_idle_node_drains_after_keep_alive_plus_grace_then_terminates() -> None:
    cfg = NodeScalerConfig(min_nodes=1, grace_s=30, boot_s=0, consolidate_below=0)  # the idle rule alone
    s = NodeScaler(cfg)
    nodes = [node("a", instances=1, busy=True, last=1000), node("b", last=900, keep=60)]
    assert s.step(nodes, 980, waiting=0, booting=0) == []  # 80 s idle < 60 + 30
    assert s.step(nodes, 1000, waiting=0, booting=0) == [Drain("b", "i-b", 100)]
    drained = [nodes[0], node("b", last=900, draining=True)]
    assert s.step(drained, 1001, waiting=0, booting=0) == [Terminate("b", "i-b")]
    still_busy = [nodes[0], node("b", instances=1, busy=True, draining=True)]
    assert s.step(still_busy, 1001, waiting=0, booting=0) == []
    # never below min_nodes
    assert s.step([node("b", last=0)], 1000, waiting=0, booting=0) == []


def test_grace_is_at_least_the_break_even_of_a_boot() -> None:
    cfg = NodeScalerConfig(grace_s=10, boot_s=300, boot_power_w=800, idle_power_w=800,
                           consolidate_below=0)  # the idle rule alone
    assert cfg.breakeven_idle_s == pytest.approx(300)
    s = NodeScaler(cfg)
    nodes = [node("a", instances=1, busy=True, last=0), node("b", last=0, keep=60)]
    assert s.step(nodes, 200, waiting=0, booting=0) == []  # 200 < 60 + 300
    assert s.step(nodes, 400, waiting=0, booting=0) == [Drain("b", "i-b", 400)]


def test_waiting_takes_a_draining_node_back_before_booting_one() -> None:
    s = NodeScaler(NodeScalerConfig(max_nodes=4))
    nodes = [node("a", instances=1, busy=True), node("b", draining=True)]
    assert s.step(nodes, 10, waiting=1, booting=0) == [Undrain("b")]


def test_min_nodes_hold_whatever_the_power_budget() -> None:
    """A budget under one node's watts allowed 0 nodes: not even `min_nodes` were started."""
    s = NodeScaler(NodeScalerConfig(min_nodes=1, max_nodes=4, node_power_w=5600))
    assert s.capacity(4000) == 1 and s.capacity(12000) == 2 and s.capacity(None) == 4
    assert s.step([], 0, waiting=0, booting=0, budget_w=4000) == [ScaleOut(1, 1, "min_nodes")]
    assert s.step([node("a", instances=1, busy=True)], 0, waiting=5, booting=0, budget_w=4000) == []


def test_a_node_the_cloud_is_terminating_is_never_taken_back() -> None:
    """A node held by the terminating lifecycle hook (an instance refresh, an operator) goes whatever
    Ember does: waiting placements boot a node instead of undraining it (new work there would be cut
    when the hook times out), and once it holds nothing its termination goes on."""
    s = NodeScaler(NodeScalerConfig(max_nodes=4))
    held = replace(node("b", instances=1, busy=True, draining=True), leaving=True)
    assert s.step([node("a", instances=1, busy=True), held], 10, waiting=1, booting=0) == [ScaleOut(1, 2, "waiting")]
    # held but not yet marked draining in Redis: counted as going all the same
    assert s.step([node("a", instances=1, busy=True), replace(held, draining=False)], 10, waiting=1,
                  booting=0) == [ScaleOut(1, 2, "waiting")]
    empty = replace(held, instances=0, busy=False)
    assert s.step([node("a", instances=1, busy=True), empty], 10, waiting=1,
                  booting=0) == [Terminate("b", "i-b"), ScaleOut(1, 2, "waiting")]


def test_memory_headroom_scales_out_and_low_use_consolidates() -> None:
    s = NodeScaler(NodeScalerConfig(max_nodes=8, target_memory_utilization=0.6, consolidate_below=0.3))
    full = [node("a", instances=3, busy=True, claimed=70 * GB), node("b", instances=2, busy=True, claimed=60 * GB)]
    assert s.step(full, 10, waiting=0, booting=0) == [ScaleOut(1, 3, "memory")]
    light = [node("a", instances=1, busy=True, last=10, claimed=15 * GB), node("b", instances=1, last=5, claimed=5 * GB)]
    assert s.step(light, 10, waiting=0, booting=0) == [Drain("b", "i-b", 5)]


def test_activity_remembers_use_after_instances_go() -> None:
    act = NodeActivity(default_keep_alive_s=60)
    assert act.observe("n", 100.0) == (100.0, 60)  # first sight counts as use
    assert act.observe("n", 150.0, last_used_s=[140.0], keep_alive_s=[120.0]) == (140.0, 120.0)
    assert act.observe("n", 200.0) == (140.0, 120.0)  # its instances unloaded: still idle since 140


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        NodeScalerConfig(min_nodes=5, max_nodes=2)
    with pytest.raises(ConfigError):
        NodeScalerConfig(consolidate_below=0.9, target_memory_utilization=0.5)


def test_sim_fleet_writes_fixed_and_scaled(tmp_path) -> None:
    from ember.commands.scheduler_cmds import run_sim_command

    out = tmp_path / "fleet.json"
    doc = run_sim_command(out, nodes=4, gpus_per_node=4, functions=60, duration_s=600, seed=1, fleet=True)
    written = json.loads(out.read_text())
    assert written == doc
    for kind in ("fixed", "scaled"):
        r = doc["fleet"][kind]
        for key in ("node_hours", "idle_energy_kwh", "gpu_energy_kwh", "slo_attainment", "p99_cold_startup_s"):
            assert key in r
        assert 0 <= r["slo_attainment"] <= 1
    fixed, scaled = doc["fleet"]["fixed"], doc["fleet"]["scaled"]
    assert fixed["node_hours"] == pytest.approx(4 * 600 / 3600, rel=1e-3)  # every node up all the time
    assert scaled["node_hours"] < fixed["node_hours"]  # a lightly used fleet shrinks
    assert scaled["idle_energy_kwh"] < fixed["idle_energy_kwh"]


def test_the_simulated_fleet_runs_the_node_scaler_a_default_deployment_runs() -> None:
    """`ember sim --fleet` describes live defaults: the node scaler the gateway builds from a
    deployment's settings (`scaler_config(Settings(...))`: defaults, and the fleet's bounds) equals the simulator's for a fleet of the same size, node
    power and idle watts, and both step at the same interval. (Before: the simulator used 0.55 /
    0.35 and 10 s steps, live 0.85 / no consolidation and 5 s.)"""
    from ember.config import Settings
    from ember.platform.gateway.nodescaling import scaler_config
    from ember.scheduler.fleet import FleetConfig
    from ember.scheduler.sim import SimConfig

    settings = Settings(node_min=1, node_max=16)  # as terraform's defaults set them for 16 workers
    live = scaler_config(settings)
    simulated = FleetConfig().scaler_config(SimConfig(nodes=16, gpus_per_node=8))
    assert simulated == live
    assert FleetConfig().interval_s == settings.node_scaler_interval_s
    assert live.consolidate_below > 0  # large fleets are never wholly idle: consolidation is on by default
    # every field of the node scaler is a live setting (EMBER_NODE_*), not only the simulator's
    tuned = scaler_config(Settings(node_min=1, node_max=16, node_requests_per_node=2, node_max_scale_in_per_step=1))
    assert (tuned.requests_per_node, tuned.max_scale_in_per_step) == (2, 1)
    sim_tuned = FleetConfig(requests_per_node=2, max_scale_in_per_step=1).scaler_config(SimConfig(nodes=16))
    assert (sim_tuned.requests_per_node, sim_tuned.max_scale_in_per_step) == (2, 1)


def test_an_idle_node_stays_while_the_rest_would_pass_the_target_without_it() -> None:
    """The memory rule would take it back the next step: drain and take-back flapped every step
    (seen live: `ember up` with one tiny instance per worker, 0.75 of a worker claimed)."""
    nodes = [node("a", instances=1, busy=True, last=1000, claimed=60 * GB), node("b", last=0, keep=1)]
    tight = NodeScaler(NodeScalerConfig(grace_s=1, boot_s=0, target_memory_utilization=0.55))
    assert tight.step(nodes, 1000, waiting=0, booting=0) == []
    loose = NodeScaler(NodeScalerConfig(grace_s=1, boot_s=0, target_memory_utilization=0.9))
    assert loose.step(nodes, 1000, waiting=0, booting=0) == [Drain("b", "i-b", 1000)]
    # nothing claimed anywhere: the fleet may go to zero
    assert loose.step([node("b", last=0, keep=1)], 1000, waiting=0, booting=0) == [Drain("b", "i-b", 1000)]


def test_what_a_step_drains_the_next_step_never_takes_back() -> None:
    import random

    drains = 0
    for seed in range(200):
        rng = random.Random(seed)
        cfg = NodeScalerConfig(max_nodes=64, grace_s=rng.choice([0, 5, 60]), boot_s=0,
                               target_memory_utilization=rng.choice([0.55, 0.7, 0.85]),
                               consolidate_below=rng.choice([0.0, 0.2, 0.35, 0.5]),
                               max_scale_in_per_step=rng.randint(1, 8))
        s = NodeScaler(cfg)
        nodes = []
        for k in range(rng.randint(2, 20)):
            busy = rng.random() < 0.4
            nodes.append(node(f"n{k}", instances=rng.randint(0, 3) if busy else rng.randint(0, 1), busy=busy,
                              last=rng.uniform(0, 1000), keep=rng.choice([1, 60, 300]),
                              claimed=int(rng.uniform(0, 0.9) * 80 * GB)))
        acted = s.step(nodes, 1000, waiting=0, booting=0)
        drained = {a.node_id for a in acted if isinstance(a, Drain)}
        if not drained:
            continue
        drains += 1
        after = [replace(n, draining=n.node_id in drained) for n in nodes]
        again = s.step(after, 1001, waiting=0, booting=0)
        assert not [a for a in again if isinstance(a, (Undrain, ScaleOut))], (seed, acted, again)
    assert drains >= 50  # the cases drain often enough to mean something


def test_consolidation_waits_until_the_fleet_was_watched_for_the_grace() -> None:
    """Consolidation drained nodes the moment claims were low: right after a fleet came up (nothing
    claimed yet, before any demand) it went down to one node at its first step."""
    cfg = NodeScalerConfig(max_nodes=8, grace_s=100, boot_s=0, target_memory_utilization=0.6, consolidate_below=0.3)
    s = NodeScaler(cfg)
    fleet = [node("a", instances=1, busy=True, last=0, claimed=5 * GB),
             node("b", instances=1, busy=True, last=0, claimed=5 * GB)]
    act = NodeActivity()
    assert act.watched_s(50.0) == 0.0  # the first step starts the watch
    assert act.watched_s(120.0) == 70.0 < cfg.scale_in_grace_s
    assert s.step(fleet, 120, waiting=0, booting=0, watched_s=70.0) == []
    assert act.watched_s(150.0) == cfg.scale_in_grace_s
    assert s.step(fleet, 150, waiting=0, booting=0, watched_s=100.0) == [Drain("a", "i-a", 150)]
    # the idle rule is not held back: a node idle past keep-alive + grace drains at once
    idle = [node("a", instances=1, busy=True, last=150, claimed=5 * GB), node("b", last=0, keep=1)]
    assert s.step(idle, 150, waiting=0, booting=0, watched_s=0.0) == [Drain("b", "i-b", 150)]


def test_an_instance_loading_on_a_node_that_drains_still_serves_its_waiting_requests() -> None:
    """Consolidation may drain a node while an instance loads there. The simulator parked it as
    loading until never, so the requests that had joined its load (and every later one of its
    function, which joined it too) waited until the simulation's cap, past the trace's end: 749
    requests of 4 functions on the README's hour at 0.65 / 0.45. Now it finishes loading, serves
    them, and is parked once loaded (live: the node goes only once it holds nothing)."""
    from ember.scheduler.fleet import FleetConfig, run_fleet
    from ember.scheduler.sim import SimConfig

    for seed in (0, 3):  # seeds whose fleets drained a node with a load in flight (4,271 s and 4,110 s waits)
        cfg = SimConfig(nodes=6, gpus_per_node=2, functions=120, duration_s=900, seed=seed)
        fl = FleetConfig(boot_s=30, grace_s=0, target_memory_utilization=0.9, consolidate_below=0.8, interval_s=5)
        doc = run_fleet(cfg, fl)
        scaled = doc["_results"]["scaled"]
        assert doc["fleet"]["scaled"]["scale_ins"] > 0
        assert float(scaled.startup_s.max()) < cfg.duration_s / 2, seed
        assert doc["fleet"]["scaled"]["node_hours"] <= doc["fleet"]["fixed"]["node_hours"]
