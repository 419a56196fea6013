"""Estimator and placement policies on a static cluster view."""

from __future__ import annotations

import pytest

from ember.errors import ConfigError
from ember.scheduler.estimator import (
    DEFAULT_BANDWIDTH_BPS,
    EVICTION_S,
    estimate_startup,
    ewma_bandwidth_bps,
)
from ember.scheduler.policies import POLICY_NAMES, get_policy
from ember.scheduler.view import PlacementRequest
from tests.scheduler.sched_helpers import GB, StaticView, make_node

REQ = PlacementRequest(function="f", checkpoint="ck", nbytes=20 * GB, ttft_slo_s=3.0)


def test_estimate_uses_node_bandwidth_queue_and_eviction() -> None:
    node = make_node("n", free=[80 * GB, 10 * GB], idle=[0, 30 * GB], queue=[2.0, 0.0],
                     bw={"dram": 10e9, "ssd": 5e9, "remote": 1e9})
    est = estimate_startup(20 * GB, node, node.devices[0], "dram")
    assert est.seconds == pytest.approx(2.0 + 2.0)
    assert estimate_startup(20 * GB, node, node.devices[1], "remote").seconds == pytest.approx(EVICTION_S + 20.0)
    # A tier the node did not report falls back to the default, and a node-level tier queue counts.
    bare = make_node("m", free=[80 * GB], bw={"ssd": 5e9})
    assert estimate_startup(GB, bare, bare.devices[0], "gpu").seconds == pytest.approx(GB / DEFAULT_BANDWIDTH_BPS["gpu"])
    bare.tier_queue_s["ssd"] = 3.0
    assert estimate_startup(5 * GB, bare, bare.devices[0], "ssd").seconds == pytest.approx(4.0)


def test_ewma_moves_towards_observations() -> None:
    bw = 10e9
    for _ in range(30):
        bw = ewma_bandwidth_bps(bw, 4 * GB, 1.0)
    assert bw == pytest.approx(4e9, rel=1e-3)
    assert ewma_bandwidth_bps(None, 10, 2.0) == 5.0


def test_unknown_policy_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="'fastest'"):
        get_policy("fastest")
    assert set(POLICY_NAMES) == {"ember", "serverlessllm", "keepalive", "least_loaded", "random", "round_robin"}
    for name in POLICY_NAMES:
        assert get_policy(name).name == name


def test_ember_prefers_dram_copy_over_ssd_and_remote() -> None:
    view = StaticView([
        make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"}),
        make_node("dram", free=[80 * GB], holdings={"ck": "dram"}),
        make_node("empty", free=[80 * GB], awake=[True]),
    ])
    est = get_policy("ember").place(REQ, view)
    assert (est.node_id, est.tier) == ("dram", "dram")
    assert est.seconds == pytest.approx(20 * GB / 25e9)


def test_ember_fetches_remote_when_holders_are_full_and_considers_queues() -> None:
    view = StaticView([
        make_node("dram", free=[5 * GB], holdings={"ck": "dram"}),
        make_node("empty", free=[80 * GB]),
    ])
    est = get_policy("ember").place(REQ, view)
    assert (est.node_id, est.tier) == ("empty", "remote")
    # A long load queue on the DRAM holder makes its SSD neighbour the better choice.
    view = StaticView([
        make_node("dram", free=[80 * GB], holdings={"ck": "dram"}, queue=[30.0]),
        make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"}),
    ])
    assert get_policy("ember").place(REQ, view).node_id == "ssd"


def test_ember_among_near_equal_prefers_awake_packed_and_no_eviction() -> None:
    view = StaticView([
        make_node("a", free=[80 * GB, 30 * GB, 60 * GB], awake=[False, True, True], holdings={"ck": "dram"}),
    ])
    est = get_policy("ember").place(REQ, view)
    assert est.device_id == "cuda:1"  # awake and tightest fit
    view = StaticView([
        make_node("a", free=[10 * GB, 80 * GB], idle=[70 * GB, 0], awake=[True, False], holdings={"ck": "dram"}),
    ])
    assert get_policy("ember").place(REQ, view).device_id == "cuda:1"  # keeps the warm instance
    view = StaticView([make_node("a", free=[10 * GB], idle=[70 * GB], awake=[True], holdings={"ck": "dram"})])
    est = get_policy("ember").place(REQ, view)
    assert est.device_id == "cuda:0" and est.seconds == pytest.approx(EVICTION_S + 0.8)


def test_nothing_fits_gives_none() -> None:
    view = StaticView([make_node("a", free=[GB])])
    for name in POLICY_NAMES:
        assert get_policy(name).place(REQ, view) is None, name


def test_serverlessllm_estimates_pinned_memory_at_pcie_and_disk_at_its_probe() -> None:
    """ServerlessLLM's `_get_model_loading_time`: a checkpoint in host memory loads at the
    hard-coded 25 GB/s, one on disk after the node's disk queue at the probe's bandwidth (the mean
    of a buffered write and read of 100 MiB: a few GB/s, not page-cache speed), so a DRAM copy wins."""
    view = StaticView([
        make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"}),
        make_node("dram", free=[80 * GB], holdings={"ck": "dram"}, awake=[True]),
        make_node("empty", free=[80 * GB]),
    ])
    policy = get_policy("serverlessllm")
    est = policy.place(REQ, view)
    assert (est.node_id, est.tier) == ("dram", "dram")
    assert est.seconds == pytest.approx(20 * GB / 25e9)
    assert policy.poll_interval_s == 1.0
    view = StaticView([make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"})])
    view.by_id["ssd"].tier_queue_s["ssd"] = 3.0
    assert policy.place(REQ, view).seconds == pytest.approx(3.0 + 20 * GB / 4e9)


def test_serverlessllm_waits_while_every_node_with_a_copy_is_full() -> None:
    """`StorageAwareScheduler.schedule` skips nodes without a local copy and, migration being off,
    those without free GPUs: with no option the request stays in the loading queue. Before, the
    baseline loaded from remote storage on another node."""
    view = StaticView([make_node("full", free=[GB], holdings={"ck": "dram"}, idle=[79 * GB]),
                       make_node("empty", free=[80 * GB])])
    assert get_policy("serverlessllm").place(REQ, view) is None
    # No node holds a copy at all: registering it downloads it to one worker (here the least loaded).
    view = StaticView([make_node("busy", free=[30 * GB]), make_node("empty", free=[80 * GB])])
    est = get_policy("serverlessllm").place(REQ, view)
    assert (est.node_id, est.tier) == ("empty", "remote")


def test_only_serverlessllm_waits_instead_of_evicting() -> None:
    from ember.scheduler.eviction import makes_room

    assert not makes_room(get_policy("serverlessllm"))
    assert makes_room(get_policy("ember")) and makes_room(None)


def test_locality_blind_baselines() -> None:
    nodes = [make_node(f"n{i}", free=[(40 + 10 * i) * GB, 30 * GB]) for i in range(4)]
    nodes.append(make_node("dram", free=[25 * GB], holdings={"ck": "dram"}))
    view = StaticView(nodes)
    assert get_policy("least_loaded").place(REQ, view).node_id == "n3"
    picks = [get_policy("random", seed=7).place(REQ, view).node_id for _ in range(3)]
    assert len(set(picks)) == 1  # seeded
    rr = get_policy("round_robin")
    assert [rr.place(REQ, view).node_id for _ in range(6)] == ["dram", "n0", "n1", "n2", "n3", "dram"]


def test_policy_chooser_per_deployment_override() -> None:
    from ember.scheduler.policies import PolicyChooser

    chooser = PolicyChooser("least_loaded")
    assert chooser.for_request(REQ).name == "least_loaded"
    own = PlacementRequest("f", "ck", GB, policy="round_robin")
    assert chooser.for_request(own) is chooser.for_request(own)  # built once: keeps its cursor
    with pytest.raises(ConfigError, match="'bogus'"):
        chooser.for_request(PlacementRequest("f", "ck", GB, policy="bogus"))
    with pytest.raises(ConfigError):
        PolicyChooser("bogus")


def test_room_counts_the_kv_budget_as_the_claim_does() -> None:
    """A device with room for the weights but not for weights + KV budget is not chosen: the claim
    (weights + KV, claim.lua) would fail there every time."""
    view = StaticView([make_node("tight", free=[10 * GB]), make_node("roomy", free=[14 * GB])])
    req = PlacementRequest("f", "ck", 10 * GB, kv_bytes=3 * GB)
    assert req.room_bytes == 13 * GB
    for name in ("ember", "serverlessllm", "least_loaded", "random", "round_robin", "keepalive"):
        est = get_policy(name, seed=0).place(req, view)
        assert est is not None and est.node_id == "roomy", name
    assert get_policy("ember", seed=0).place(PlacementRequest("f", "ck", 10 * GB, kv_bytes=5 * GB), view) is None
