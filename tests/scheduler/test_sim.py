"""The simulator (same policy and autoscaler objects as live) and the `ember sim` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation, build_trace, run_simulation

FIELDS = {"mean_startup_s", "p50_startup_s", "p99_startup_s", "p99_cold_startup_s", "slo_attainment",
          "cold_starts", "gpu_energy_kwh", "decisions_per_s"}
SMALL = dict(nodes=4, gpus_per_node=4, functions=150, duration_s=300.0, seed=1)


def _strip(doc):
    for r in doc["policies"].values():
        r.pop("decisions_per_s")
        r.pop("wall_s")
    return doc


def test_all_policies_report_the_issue_fields_deterministically() -> None:
    doc = run_simulation(SimConfig(**SMALL))
    results = doc.pop("_results")
    assert set(doc["policies"]) == {"ember", "serverlessllm", "keepalive", "least_loaded", "random", "round_robin"}
    assert doc["invocations"] == len(results["ember"].startup_s) > 100
    for name, r in doc["policies"].items():
        assert FIELDS <= set(r), name
        assert 0.0 <= r["slo_attainment"] <= 1.0
        assert r["cold_starts"] > 0 and r["gpu_energy_kwh"] > 0
        assert r["p50_startup_s"] <= r["p99_startup_s"]
    again = run_simulation(SimConfig(**SMALL))
    again.pop("_results")
    assert _strip(again) == _strip(doc)


def test_ember_beats_locality_blind_baselines_on_cold_starts() -> None:
    doc = run_simulation(SimConfig(**SMALL), ["ember", "least_loaded", "serverlessllm"])
    p = doc["policies"]
    assert p["ember"]["p99_cold_startup_s"] < p["least_loaded"]["p99_cold_startup_s"]
    assert p["ember"]["slo_attainment"] >= p["least_loaded"]["slo_attainment"]


def test_device_memory_is_never_overclaimed() -> None:
    cfg = SimConfig(**{**SMALL, "gpus_per_node": 1, "functions": 300}).check()
    tr = build_trace(cfg)
    sim = _Simulation(cfg, tr, get_policy("ember"), Autoscaler())
    sim.run(None)
    assert sim.decisions > 0
    for dev in sim.devices:  # as live: each checkpoint's weights once per device, each instance's KV budget
        weights = {i.checkpoint: i.nbytes for i in dev.instances}
        assert 0 <= dev.free == dev.memory - sum(weights.values()) - sum(i.kv_bytes for i in dev.instances)
        assert all(i.kv_bytes == sim.kv_bytes[i.fn] > 0 for i in dev.instances)
    for node in sim.node_list:
        assert node.dram_used <= cfg.dram_cache_bytes and node.ssd_used <= cfg.ssd_bytes


def test_a_cold_starts_copies_land_when_its_load_ends_and_no_gpu_tier_is_published() -> None:
    """As live: a worker commits the DRAM entry (and a remote load's SSD entry) it fills when the
    load ends, and publishes DRAM/SSD holdings only. Before, the simulator published the copies
    (and a "gpu" holding no live worker reports) at the claim, so a second cold start elsewhere
    read the checkpoint at DRAM or peer-copy speed before a byte had moved."""
    cfg = SimConfig(**SMALL).check()
    sim = _Simulation(cfg, build_trace(cfg), get_policy("ember"), Autoscaler())
    f = max(range(len(sim.nbytes)), key=lambda i: sim.nbytes[i])  # a long load
    ck = sim.ckpt[f]
    inst = sim._cold_start(f, 0.0)
    assert inst is not None and inst.ready_s > 0.0
    node = inst.device.node
    assert inst.load_tier == "ssd" and ck not in node.dram  # loading: nothing new published yet
    assert all(n.holdings.get(ck) != "gpu" for n in sim.node_list)
    assert node.holdings.get(ck) == "ssd"
    sim.cluster.advance(inst.ready_s)
    assert ck in node.dram and node.holdings[ck] == "dram"
    again = sim._cold_start(f, inst.ready_s)  # a second instance on the same device reuses its copy
    if again is not None and again.device is inst.device:
        assert again.load_tier == "gpu" and again.load_s == 0.0


@pytest.mark.parametrize("change, field", [
    ({"nodes": 0}, "nodes"),
    ({"max_model_bytes": 100 * 10**9}, "max_model_bytes"),
    ({"ssd_replicas": 9}, "ssd_replicas"),
    ({"duration_s": -1}, "duration_s"),
])
def test_impossible_cluster_config_names_the_field(change, field) -> None:
    with pytest.raises(ConfigError, match=field):
        SimConfig(**{**SMALL, **change}).check()


def test_unknown_policy_fails_before_work() -> None:
    with pytest.raises(ConfigError, match="'greedy'"):
        run_simulation(SimConfig(**SMALL), ["ember", "greedy"])


def test_ssd_too_small_for_replicas() -> None:
    with pytest.raises(ConfigError, match="ssd_bytes"):
        run_simulation(SimConfig(**{**SMALL, "ssd_bytes": 80 * 2**30}), ["ember"])


def test_sim_command_writes_json_and_plot(tmp_path) -> None:
    out, png = tmp_path / "sim.json", tmp_path / "cdf.png"
    res = CliRunner().invoke(app, ["sim", "--json", str(out), "--plot", str(png), "--nodes", "2",
                                   "--gpus-per-node", "2", "--functions", "40", "--duration-s", "120",
                                   "--seed", "2", "--policies", "ember,random"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"ember", "random"}
    assert doc["config"]["nodes"] == 2 and doc["config"]["seed"] == 2
    assert png.stat().st_size > 10_000


def test_sim_command_bad_input(tmp_path) -> None:
    res = CliRunner().invoke(app, ["sim", "--json", str(tmp_path / "x.json"), "--policies", "ember,nope"])
    assert res.exit_code == 2 and "nope" in res.output
    trace = tmp_path / "azure.csv"
    trace.write_text("HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f,http,1,2\no,a,g,http,1,?\n")
    res = CliRunner().invoke(app, ["sim", "--json", str(tmp_path / "x.json"), "--trace", str(trace)])
    assert res.exit_code == 2 and "azure.csv:3" in res.output


def test_sim_on_azure_trace(tmp_path) -> None:
    trace = tmp_path / "azure.csv"
    rows = [f"o,a,f{i},http," + ",".join(str((i * 7 + m) % 5) for m in range(10)) for i in range(30)]
    trace.write_text("HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(m) for m in range(1, 11)) + "\n"
                     + "\n".join(rows) + "\n")
    out = tmp_path / "sim.json"
    res = CliRunner().invoke(app, ["sim", "--json", str(out), "--trace", str(trace), "--nodes", "2",
                                   "--gpus-per-node", "2", "--duration-s", "600", "--policies", "ember"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["invocations"] == sum((i * 7 + m) % 5 for i in range(30) for m in range(10))
    assert doc["config"]["trace_functions"] == 30


def _two_node_sim(policy, arrivals: list[tuple[float, int]], *, nbytes: int, target: int = 4) -> _Simulation:
    """Two nodes of one GPU, two functions ("a", "b") of `nbytes` each, both checkpoints on node 0's
    SSD only, no keep-alive; `arrivals`: (time, function index)."""
    from ember.scheduler.trace import Trace

    cfg = SimConfig(nodes=2, gpus_per_node=1, functions=2, duration_s=120.0, seed=0, ssd_replicas=0,
                    min_model_bytes=nbytes, max_model_bytes=nbytes, keep_alive_s=0.0,
                    target_concurrency=target).check()
    times = np.array([t for t, _ in arrivals])
    fns = np.array([f for _, f in arrivals], dtype=np.int32)
    sim = _Simulation(cfg, Trace(["a", "b"], times, fns, 120.0), policy, Autoscaler())
    for f in (0, 1):
        sim.cluster.ssd_put(sim.node_list[0], sim.ckpt[f], sim.nbytes[f])
    return sim


def test_serverlessllm_waits_for_a_device_on_a_node_with_a_copy() -> None:
    """ServerlessLLM's storage-aware scheduler only places on nodes holding a local copy and never
    evicts (migration off, as published by default): b, whose only holder is busy with a, waits in
    the loading queue until a's instance is unloaded (keep-alive, at an autoscaler step), then
    loads there. Before, it loaded from remote storage on the other node."""
    sim = _two_node_sim(get_policy("serverlessllm"), [(1.0, 0), (2.0, 1)], nbytes=60 * 10**9)
    res = sim.run(None)
    assert res.unplaced == 0 and res.loads == 2  # served within the run, not censored
    assert res.extra["loads_remote"] == 0 and res.extra["evictions"] == 0
    assert sim.node_list[1].devices[0].busy_until < 0  # the node without a copy never ran anything
    # b (arrived at 2 s) is placed only once a's instance, ready at 1 + startup[0], served and was
    # unloaded: its own 60 GB SSD load (> 5 s at the simulated bandwidths) comes after that
    assert res.cold[1] and 2.0 + res.startup_s[1] > 1.0 + res.startup_s[0] + 5.0


def test_the_simulator_gives_the_scale_out_rule_the_requests_in_flight() -> None:
    """Requests queued for a slot behind others count as in flight (ServerlessLLM's request_count),
    as the live gateway counts its waiting queue and the slots held."""
    from ember.scheduler.policies import ServerlessLLMPolicy

    seen: list[int] = []

    class Recording(ServerlessLLMPolicy):
        def should_start(self, **kw) -> bool:  # type: ignore[override]
            seen.append(kw["in_flight"])
            return kw["instances"] == 0

    sim = _two_node_sim(Recording(), [(1.0, 0), (1.1, 0), (1.2, 0), (1.3, 0)], nbytes=10 * 10**9, target=1)
    res = sim.run(None)
    # the first asks alone and starts the one load; at each later wake of the queue's head (target 1:
    # one request holds the slot) the rule sees the waiting requests plus the one holding the slot
    assert seen == [1, 4, 3, 2] and res.loads == 1


def test_node_states_built_on_first_read_give_what_eager_ones_give(monkeypatch) -> None:
    """`MemCluster` builds a node state's devices when first read (the autoscaler's prefetch check
    never reads them); every invocation's startup, cold flag and SLO outcome equal those of a run
    whose states build their devices at once, and no state is read after its node changed."""
    from ember.scheduler.memcluster import MemCluster

    cfg = SimConfig(**{**SMALL, "functions": 300}).check()
    trace = build_trace(cfg)

    def run() -> tuple[object, _Simulation]:
        sim = _Simulation(cfg, trace, get_policy("ember"), Autoscaler())
        return sim.run(None), sim

    lazy, sim = run()
    assert sim.cluster.late_reads == 0
    built = MemCluster._node_state

    def eager(self, n):  # noqa: ANN001, ANN202
        state = built(self, n)
        state.devices  # noqa: B018 - built now
        return state

    monkeypatch.setattr(MemCluster, "_node_state", eager)
    now, _ = run()
    for field in ("startup_s", "cold", "slo_met"):
        assert np.array_equal(getattr(lazy, field), getattr(now, field)), field
    assert lazy.loads == now.loads and lazy.gpu_energy_j == now.gpu_energy_j
