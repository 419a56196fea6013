"""The gateway's scale-out decision (Invoker._should_start): pure logic over instance records,
and the same decision as the simulator's on the same state."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest

from ember.config import Settings
from ember.platform.gateway.invoke import Invoker
from ember.platform.gateway.metrics import GatewayMetrics
from ember.platform.gateway.protocol import FunctionDeploy, FunctionSpec
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation
from ember.scheduler.simrecords import SimInstance
from ember.scheduler.trace import Trace
from ember.scheduler.view import PlacementRequest


@dataclass
class Rec:
    state: str
    created_s: float = 0.0
    outstanding: int = 0


class Instances:
    def __init__(self, *states: str, ages_s: tuple[float, ...] = (), outstanding: int = 0) -> None:
        now = time.time()
        self.recs = [Rec(s, now - (ages_s[k] if k < len(ages_s) else 0.0), outstanding if s == "ready" else 0)
                     for k, s in enumerate(states)]

    def instances(self, function: str) -> list[Rec]:
        return self.recs


def _decide(states: tuple[str, ...], waiting: int, *, service_s: float = 0.0, startup_s: float = 0.0,
            prefill_s: float = 0.0, max_instances: int = 4, target: int = 1, ttft_ms: float = 1000,
            ages_s: tuple[float, ...] = (), outstanding: int = 0, policy: str | None = None) -> bool:
    spec = FunctionSpec(name="f", **FunctionDeploy(checkpoint="c", slo={"ttft_ms": ttft_ms}, scaling={
        "max_instances": max_instances, "target_concurrency": target}).model_dump())
    chosen = get_policy(policy) if policy else None
    inv = Invoker(Settings(), Instances(*states, ages_s=ages_s, outstanding=outstanding), None,  # type: ignore[arg-type]
                  GatewayMetrics(), lambda s: chosen)
    for _ in range(waiting):
        inv.queues.join("f")
    if service_s:
        inv.service_s["f"] = service_s
    if startup_s:
        inv.starter.startup_s["f"] = startup_s
    if prefill_s:
        inv.prefill_s["f"] = prefill_s
    return asyncio.run(inv._should_start(spec))


def test_first_request_and_uncovered_waiters_start_instances() -> None:
    assert _decide((), 1)
    assert not _decide(("loading",), 1)  # the loading instance will take it
    assert _decide(("loading",), 2)  # one more than the loading instance takes


def test_never_beyond_max_instances() -> None:
    assert not _decide(("ready", "ready"), 50, service_s=1.0, max_instances=2)


def test_scale_out_only_when_queueing_breaks_the_ttft_slo_and_a_cold_start_is_sooner() -> None:
    # one busy instance, 10 waiting, 0.5 s per request: ~5 s of queue > 1 s SLO; a cold start takes 0.2 s
    assert _decide(("ready",), 10, service_s=0.5, startup_s=0.2)
    # fast requests drain the queue within the SLO: wait instead
    assert not _decide(("ready",), 10, service_s=0.01, startup_s=0.2)
    # a cold start slower than the queue: wait instead
    assert not _decide(("ready",), 10, service_s=0.5, startup_s=30.0)
    # prefill counts against the SLO too
    assert _decide(("ready",), 2, service_s=0.4, startup_s=0.1, prefill_s=0.5)
    assert not _decide(("ready",), 2, service_s=0.4, startup_s=0.1)


def test_a_serverlessllm_function_scales_to_its_requests_in_flight() -> None:
    """The gateway runs the function's policy's own scale-out rule (ServerlessLLM's `auto_scaler`:
    ceil(in flight / target) instances, loading ones counted), on the requests holding a slot and
    those waiting here; Ember's rule waits for a queue that drains within the SLO."""
    # two ready instances with 2 requests each (target 2) and 1 waiting: 5 in flight want 3
    assert _decide(("ready", "ready"), 1, service_s=0.01, target=2, outstanding=2, policy="serverlessllm")
    assert not _decide(("ready", "ready"), 1, service_s=0.01, target=2, outstanding=2)
    # one loading instance (target 2) covers 2 waiting requests, not 3
    assert not _decide(("loading",), 2, target=2, policy="serverlessllm")
    assert _decide(("loading",), 3, target=2, policy="serverlessllm")


def test_a_serverlessllm_placement_that_finds_no_room_waits_instead_of_evicting() -> None:
    """ServerlessLLM never evicts to make room (its request waits in the loading queue); Ember's
    gateway evicts idle instances when no device has room."""
    from ember.platform.gateway.coldstart import InstanceStarter

    class Full:
        def place(self, request, policy, evicted):
            return None

    spec = FunctionSpec(name="f", **FunctionDeploy(checkpoint="c").model_dump())
    request = PlacementRequest(function="f", checkpoint="c", nbytes=10**9)
    tried: list[str] = []

    async def make_room(spec, request) -> bool:
        tried.append(spec.name)
        return False

    for name in ("serverlessllm", "ember"):
        starter = InstanceStarter(Settings(), Full(), None, GatewayMetrics(), lambda s: None)  # type: ignore[arg-type]
        starter._make_room = make_room  # type: ignore[method-assign]
        assert asyncio.run(starter._place(spec, request, get_policy(name))) is None
        assert tried == ([] if name == "serverlessllm" else ["f"])


# The simulator's side of the same decision: its waiting loop (GatewayWaits._should_start) on the
# same state: instances (states, claimed how long ago), waiting requests and learned EWMAs.
_SIM_NOW_S = 100.0


@functools.cache
def _one_function_sim(policy: str) -> _Simulation:
    cfg = SimConfig(nodes=2, gpus_per_node=1, functions=1, duration_s=10.0, seed=0).check()
    trace = Trace(["f"], np.zeros(1), np.zeros(1, dtype=np.int32), cfg.duration_s)
    return _Simulation(cfg, trace, get_policy(policy), Autoscaler())


def _sim_decides(states: tuple[str, ...], waiting: int, *, service_s: float, startup_s: float, prefill_s: float,
                 max_instances: int, target: int, ttft_ms: float, ages_s: tuple[float, ...], outstanding: int,
                 policy: str) -> bool:
    sim = _one_function_sim(policy)
    sim._init_waits(1)
    sim.fn_instances[0] = []
    name = sim.names[0]
    sim.specs[name] = dataclasses.replace(sim.specs[name], max_instances=max_instances, target_concurrency=target,
                                          ttft_slo_s=ttft_ms / 1000)
    dev = sim.devices[0]
    for k, state in enumerate(states):
        inst = SimInstance(f"i{k}", 0, name, sim.ckpt[0], dev, 1, _SIM_NOW_S - ages_s[k])
        inst.ready_s = _SIM_NOW_S - 1.0 if state == "ready" else _SIM_NOW_S + 1.0
        inst.state = "ready" if state == "ready" else "loading"
        inst.outstanding = outstanding if state == "ready" else 0
        sim.fn_instances[0].append(inst)
    sim.queues[0] = deque(range(waiting))
    for table, value in ((sim.ewma_service_s, service_s), (sim.ewma_startup_s, startup_s),
                         (sim.ewma_prefill_s, prefill_s)):
        table[0] = value or None  # 0: nothing learned yet
    return sim._should_start(0, _SIM_NOW_S)


_STATES = [(), ("loading",), ("loading", "loading"), ("ready",), ("ready", "loading"), ("ready", "ready")]


@pytest.mark.parametrize("policy", ["ember", "serverlessllm"])
@pytest.mark.parametrize("states", _STATES)
def test_the_simulator_decides_as_the_gateway_on_the_same_state(states, policy) -> None:
    """The same instances, waiting requests and learned times give the same decision live and in
    the simulator. Before, the simulator decided on what no gateway knows: the instances' real
    slot-end and ready times, the request's own prefill and a cold-start average updated when a
    load was claimed, not when it ended. A baseline's own rule (ServerlessLLM's, on the requests in
    flight) is asked the same way on both sides."""
    ages = (1.0, 6.0)[: len(states)]
    grid = itertools.product((1, 2, 3, 6), (0.0, 0.5, 3.0), (0.0, 2.0, 8.0), (0.0, 0.6), (1, 2), (3, 8), (0, 1))
    decisions = set()
    for waiting, service_s, startup_s, prefill_s, target, max_instances, outstanding in grid:
        kw = dict(service_s=service_s, startup_s=startup_s, prefill_s=prefill_s, max_instances=max_instances,
                  target=target, ttft_ms=1000.0, ages_s=ages, outstanding=outstanding, policy=policy)
        live = _decide(states, waiting, **kw)
        assert _sim_decides(states, waiting, **kw) == live, (states, waiting, kw)
        decisions.add(live)
    assert decisions == ({True} if not states else {True, False})  # both answers occur (none: always start)


def test_the_autoscaler_loop_survives_any_exception_a_step_throws() -> None:
    """A step that throws something no one expected (not a Redis or Ember error) is logged and the
    next step runs: autoscaling never ends for good."""
    from types import SimpleNamespace

    from ember.platform.gateway.autoscaling import AutoscalerLoop
    from ember.scheduler.demand import DemandMeter

    app = SimpleNamespace(state=SimpleNamespace(settings=Settings(autoscaler_interval_s=0.01), demand=DemandMeter()))
    loop = AutoscalerLoop(app, "gw-test")
    thrown = [ValueError("bad"), KeyError("k"), ZeroDivisionError(), RuntimeError("x")]
    steps: list[int] = []

    async def step() -> None:
        steps.append(len(steps))
        if thrown:
            raise thrown.pop(0)

    loop.step = step  # type: ignore[method-assign]

    async def run_a_while() -> bool:
        task = asyncio.ensure_future(loop.run())
        for _ in range(200):
            if len(steps) >= 6:
                break
            await asyncio.sleep(0.01)
        alive = not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return alive

    assert asyncio.run(run_a_while())
    assert len(steps) >= 6 and not thrown  # every exception thrown, and steps went on after them


def test_a_placement_that_found_no_room_is_tried_again_at_the_next_wake_not_at_once() -> None:
    """While no device has room, the waiting head places again when woken (a slot frees, an
    instance becomes ready) or after its 1 s timeout, as the simulator's waiting loop does; before,
    it placed again as soon as the failed placement returned, a Redis round trip after another."""
    from ember.errors import NoCapacity

    class Empty:
        def instances(self, function: str) -> list:
            return []

        def acquire_warm(self, function: str, target: int, exclude) -> None:
            return None

        def mark_waiting(self, function: str, ttl_s: float) -> None:
            pass

    spec = FunctionSpec(name="f", **FunctionDeploy(checkpoint="c").model_dump())
    inv = Invoker(Settings(slo_timeout_s=2.5), Empty(), None, GatewayMetrics(), lambda s: None)  # type: ignore[arg-type]
    placements: list[float] = []

    async def no_room(spec, placed) -> None:
        placements.append(time.monotonic())
        await asyncio.sleep(0.001)  # a placement's round trips
        return None

    inv.starter.cold_start = no_room  # type: ignore[method-assign]
    with pytest.raises(NoCapacity):
        asyncio.run(inv.acquire(spec))
    # at 0, 1, 2 s and at the deadline's last wake, 2.5 s (before: ~2,000 in the 2.5 s)
    assert 2 <= len(placements) <= 4
    assert min(b - a for a, b in zip(placements, placements[1:], strict=False)) >= 0.4


def test_a_fresh_function_scales_out_before_its_first_request_ends() -> None:
    """Before any request ended the gateway has no service time: requests waiting behind full ready
    instances beyond what the starting ones will take start another instance (before: the wait was
    estimated at 0 and a burst queued on one instance until its first request ended)."""
    assert _decide(("ready",), 1)
    assert not _decide(("ready", "loading"), 1)  # the loading instance will take it
    assert _decide(("ready", "loading"), 2)
    assert not _decide(("ready",), 3, service_s=0.01)  # once learned: the queue drains within the SLO
