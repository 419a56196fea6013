"""Warm routing rules and the autoscaler."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler, EnsureInstances, Prefetch, ScalingSpec, Unload
from ember.scheduler.routing import pick_warm, should_scale_out
from tests.scheduler.sched_helpers import GB, StaticView, make_node


@dataclass
class Inst:
    instance_id: str
    function: str = "f"
    node_id: str = "n"
    state: str = "ready"
    outstanding: int = 0
    last_used_s: float = 0.0
    checkpoint: str = ""


def test_pick_warm_least_outstanding_below_target() -> None:
    insts = [Inst("a", outstanding=2), Inst("b", outstanding=1), Inst("c", state="loading"), Inst("d", outstanding=1)]
    assert pick_warm(insts, 4).instance_id == "b"
    assert pick_warm(insts, 1) is None
    assert pick_warm([], 4) is None


def test_scale_out_only_when_the_wait_breaks_the_slo() -> None:
    assert not should_scale_out(0.2, 0.1, 1.0, instances=1, max_instances=4)
    assert should_scale_out(2.0, 0.1, 1.0, instances=1, max_instances=4, cold_start_s=0.5)
    assert not should_scale_out(2.0, 0.1, 1.0, instances=4, max_instances=4)
    assert not should_scale_out(2.0, 0.1, 1.0, instances=1, max_instances=4, cold_start_s=5.0)


def test_serverlessllm_scales_to_its_in_flight_requests_counting_starting_instances() -> None:
    """ServerlessLLM's `auto_scaler` (RoundRobinRouter): ceil(request_count / target) instances, at
    most max_instances, starting ones counted; it ignores SLOs and predicted waits. Ember's rule
    waits when the queue drains within the SLO."""
    from ember.scheduler.policies import get_policy
    from ember.scheduler.routing import scale_out_rule, should_start

    rule = scale_out_rule(get_policy("serverlessllm"))
    assert scale_out_rule(get_policy("ember")) is should_start and scale_out_rule(None) is should_start
    common = dict(target_concurrency=4, max_instances=8, predicted_wait_s=0.1, prefill_s=0.1, ttft_slo_s=5.0,
                  cold_start_s=2.0)
    # One ready instance full (4 in flight) and one more request: it wants 2, Ember's rule waits.
    assert rule(instances=1, loading=0, waiting=1, in_flight=5, **common)
    assert not should_start(instances=1, loading=0, waiting=1, in_flight=5, **common)
    # Two instances still loading cover 8 requests: the ninth starts a third, not the eighth.
    assert not rule(instances=2, loading=2, waiting=8, in_flight=8, **common)
    assert rule(instances=2, loading=2, waiting=9, in_flight=9, **common)
    assert not rule(instances=8, loading=0, waiting=50, in_flight=82, **common)  # max_instances
    assert rule(instances=0, loading=0, waiting=1, in_flight=1, **common)


def test_keep_alive_unload_and_scale_to_zero() -> None:
    spec = ScalingSpec("f", keep_alive_s=60, max_instances=4)
    insts = [Inst("old", last_used_s=0), Inst("recent", last_used_s=50), Inst("busy", outstanding=1),
             Inst("loading", state="loading")]
    actions = Autoscaler().step({"f": spec}, insts, now=100.0)
    assert actions == [Unload("old", "f", "n", "keep_alive")]
    actions = Autoscaler().step({"f": spec}, [Inst("a", last_used_s=0), Inst("b", last_used_s=1)], now=1000.0)
    assert {a.instance_id for a in actions} == {"a", "b"}  # scale to zero


def test_a_redeploy_on_another_checkpoint_retires_the_old_instances_busy_or_not() -> None:
    """Instances of the checkpoint a function named before its redeploy are retired gracefully (busy
    ones too: under steady traffic an old instance is never idle, and kept serving the old model),
    and they no longer count towards its minimum."""
    spec = ScalingSpec("f", checkpoint="store/new#2", min_instances=1, keep_alive_s=600)
    insts = [Inst("old-busy", checkpoint="store/old#1", outstanding=3, last_used_s=99),
             Inst("old-idle", checkpoint="store/old#1", last_used_s=99),
             Inst("old-loading", checkpoint="store/old#1", state="loading"),
             Inst("new", checkpoint="store/new#2", outstanding=1, last_used_s=99)]
    actions = Autoscaler().step({"f": spec}, insts, now=100.0)
    assert actions == [Unload("old-busy", "f", "n", "checkpoint_changed"),
                       Unload("old-idle", "f", "n", "checkpoint_changed")]
    assert all(a.graceful for a in actions) and not Unload("x", "f", "n", "keep_alive").graceful
    only_old = [i for i in insts if i.instance_id != "new"]
    assert Autoscaler().step({"f": spec}, only_old, now=100.0)[-1] == EnsureInstances("f", 1, 0)


def test_minimums_follow_each_steps_specs_whatever_their_ids() -> None:
    """The live loop builds a new specs mapping every step; CPython may give it the id of the last
    one. A minimum lowered from 2 to 0 must stop being ensured at the next step (it was not: the
    cache keyed by id and length returned the old minimums)."""
    scaler = Autoscaler()
    for step in range(50):
        specs = {"chat": ScalingSpec("chat", min_instances=2 if step % 2 == 0 else 0, max_instances=4)}
        want = [EnsureInstances("chat", 2, 0)] if step % 2 == 0 else []
        assert scaler.step(specs, [], now=float(step)) == want, step
        del specs  # freed: the next mapping may take its address


def test_min_and_max_instances() -> None:
    spec = ScalingSpec("f", min_instances=2, max_instances=2, keep_alive_s=10)
    idle = [Inst("a", last_used_s=0), Inst("b", last_used_s=5)]
    assert Autoscaler().step({"f": spec}, idle, now=100.0) == []  # never below min
    assert Autoscaler().step({"f": spec, "g": ScalingSpec("g")}, [Inst("a")], now=1.0) == [
        EnsureInstances("f", 2, 1)]
    over = idle + [Inst("c", last_used_s=99)]
    assert Autoscaler().step({"f": spec}, over, now=100.0) == [Unload("a", "f", "n", "over_max")]
    assert Autoscaler().step({}, [Inst("x", function="gone")], now=0.0) == []
    assert Autoscaler(unload_unknown=True).step({}, [Inst("x", function="gone")], now=0.0)[0].reason == "unknown_function"


def test_scaling_spec_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError):
        ScalingSpec("f", min_instances=3, max_instances=2)
    with pytest.raises(ConfigError):
        ScalingSpec("f", target_concurrency=0)


def test_prefetch_popular_checkpoint_whose_ssd_cold_start_misses_the_slo() -> None:
    spec = ScalingSpec("f", checkpoint="ck", nbytes=40 * GB, ttft_slo_s=2.0)
    view = StaticView([
        make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"}),
        make_node("empty", free=[80 * GB]),
        make_node("full", free=[GB]),
    ])
    auto = Autoscaler(prefetch_copies=2, prefetch_min_rate_per_s=0.1)
    actions = auto.step({"f": spec}, [], now=0.0, view=view, demand_per_s={"f": 1.0})
    assert actions == [Prefetch("ck", "ssd", "dram", 40 * GB), Prefetch("ck", "empty", "dram", 40 * GB)]
    assert auto.step({"f": spec}, [], now=0.0, view=view, demand_per_s={"f": 0.01}) == []  # not popular
    small = ScalingSpec("f", checkpoint="ck", nbytes=GB, ttft_slo_s=2.0)
    assert auto.step({"f": small}, [], now=0.0, view=view, demand_per_s={"f": 1.0}) == []  # SSD is fast enough
    two = StaticView([make_node("a", free=[80 * GB], holdings={"ck": "dram"}),
                      make_node("b", free=[80 * GB], holdings={"ck": "gpu"})])
    assert auto.step({"f": spec}, [], now=0.0, view=two, demand_per_s={"f": 1.0}) == []  # enough copies


def test_a_function_whose_policy_takes_no_prefetches_gets_none_live_or_simulated() -> None:
    """ServerlessLLM has no proactive DRAM copies: a function placed by that baseline gets no
    prefetch from the autoscaler, live (the gateway's `scaling_spec` from the function's policy) as
    in the simulator (its specs, from the same policy attribute). Before, only the simulator knew."""
    from ember.platform.gateway.autoscaling import scaling_spec
    from ember.platform.gateway.protocol import FunctionDeploy, FunctionSpec
    from ember.scheduler.policies import get_policy

    fn = FunctionSpec(name="f", **FunctionDeploy(checkpoint="ck", slo={"ttft_ms": 2000}).model_dump())
    view = StaticView([make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"}),
                       make_node("empty", free=[80 * GB])])
    auto = Autoscaler(prefetch_copies=2, prefetch_min_rate_per_s=0.1)
    for policy, prefetches in (("ember", 2), ("serverlessllm", 0)):
        spec = dataclasses.replace(scaling_spec(fn, get_policy(policy)), nbytes=40 * GB)
        actions = auto.step({"f": spec}, [], now=0.0, view=view, demand_per_s={"f": 1.0})
        assert sum(isinstance(a, Prefetch) for a in actions) == prefetches, policy
        # ember's copies are kept first by the worker's DRAM tier: a 40 GB SSD load misses a 2 s SLO
        assert spec.slo_aware_cache is (policy == "ember")
        assert all(a.keep == 1 for a in actions if isinstance(a, Prefetch)), actions


def test_a_prefetch_in_flight_counts_as_a_copy_and_is_never_sent_again() -> None:
    """A node the checkpoint is on its way to (`ClusterView.prefetching`) is a near copy: with
    prefetch_copies=2 and one in flight, one more node is asked, never the one already fetching."""
    spec = ScalingSpec("f", checkpoint="ck", nbytes=40 * GB, ttft_slo_s=2.0)
    nodes = [make_node("ssd", free=[80 * GB], holdings={"ck": "ssd"}), make_node("empty", free=[80 * GB]),
             make_node("other", free=[70 * GB])]
    auto = Autoscaler(prefetch_copies=2, prefetch_min_rate_per_s=0.1)

    def step(in_flight: set[str]) -> list:
        view = StaticView(nodes, prefetching={"ck": in_flight})
        return auto.step({"f": spec}, [], now=0.0, view=view, demand_per_s={"f": 1.0})

    assert step({"ssd"}) == [Prefetch("ck", "other", "dram", 40 * GB)]  # packing: the fuller device first
    assert step({"empty"}) == [Prefetch("ck", "ssd", "dram", 40 * GB)]
    assert step({"ssd", "empty"}) == []  # both copies on their way
    assert step({"other", "empty"}) == []
