"""Warm routing and scale-out, as pure rules the gateway and the simulator share.

Warm: the ready instance with the fewest outstanding requests, if it is below
`target_concurrency`; ties go to the lowest instance id (string order). The live path applies
the same rule atomically in Redis (`RedisCluster.acquire_warm`, a Lua script that also takes
the slot; only instances on live nodes count), and a test checks both choose the same instance
on the same state. Otherwise the request queues for the earliest free slot, and the
function scales out when that predicted wait would break the TTFT SLO and a new instance
would plausibly be ready sooner. Both judge that from estimates only (`should_start_estimated`):
what the instances' states and claim times say, how many requests wait, and the times the gateway
learned (EWMAs of a request's time holding a slot, of its prefill and of a cold start). A
baseline with a published scale-out rule of its own carries it as its policy's `should_start`
(`scale_out_rule` picks it, for the gateway and the simulator alike): ServerlessLLM's is
`should_start_on_demand`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar


class RoutableInstance(Protocol):
    instance_id: str
    state: str
    outstanding: int


class ScaleOutInstance(Protocol):
    """What the scale-out estimate reads of an instance (InstanceRecord and SimInstance have it)."""

    state: str  # "claimed" | "loading" | "ready" | "draining"
    created_s: float  # when it was claimed (placed), on the caller's clock
    outstanding: int  # requests holding a slot of it


I = TypeVar("I", bound=RoutableInstance)  # noqa: E741
STARTING_STATES = ("claimed", "loading")


def pick_warm(instances: Iterable[I], target_concurrency: int) -> I | None:
    """The ready instance with the fewest outstanding requests below `target_concurrency`
    (ties: lowest instance id), or None: the request must queue or trigger a cold start."""
    best: I | None = None
    for inst in instances:
        if inst.state != "ready" or inst.outstanding >= target_concurrency:
            continue
        if best is None or (inst.outstanding, inst.instance_id) < (best.outstanding, best.instance_id):
            best = inst
    return best


def should_scale_out(predicted_wait_s: float, prefill_s: float, ttft_slo_s: float, *,
                     instances: int, max_instances: int, cold_start_s: float = 0.0) -> bool:
    """Start another instance when queueing would break the TTFT SLO (wait + prefill > SLO),
    the function is below `max_instances`, and a cold start (`cold_start_s`, an estimate) would
    finish before the queue drains."""
    if instances >= max_instances:
        return False
    if predicted_wait_s + prefill_s <= ttft_slo_s:
        return False
    return cold_start_s < predicted_wait_s


ScaleOutRule = Callable[..., bool]  # keyword arguments as `should_start`'s


def scale_out_rule(policy: Any) -> ScaleOutRule:
    """The scale-out rule a placement policy runs under (the gateway's `Invoker` and the simulator
    both ask this): the policy's own `should_start` where it has one (a baseline's published
    autoscaler), else Ember's `should_start`."""
    return getattr(policy, "should_start", None) or should_start


def should_start(*, instances: int, loading: int, waiting: int, in_flight: int, target_concurrency: int,
                 max_instances: int, predicted_wait_s: float, prefill_s: float, ttft_slo_s: float,
                 cold_start_s: float) -> bool:
    """Ember's scale-out rule for a request that found no free slot. `instances` of the function
    exist, `loading` of them still load, `waiting` requests (this one included) wait for a slot,
    `in_flight` requests (this one included) hold or wait for one (read by demand rules such as
    `should_start_on_demand`, not by this one); `predicted_wait_s` is the estimated wait for a
    slot (`estimated_wait_s`: both callers go through `should_start_estimated`). Start another
    instance when there is none; when only loading ones exist and they cannot take every waiting
    request; otherwise by `should_scale_out` (queueing would break the TTFT SLO and a cold start,
    estimated at `cold_start_s`, would be ready sooner)."""
    if instances >= max_instances:
        return False
    if instances == 0:
        return True
    if instances == loading and waiting > loading * target_concurrency:
        return True
    return should_scale_out(predicted_wait_s, prefill_s, ttft_slo_s, instances=instances,
                            max_instances=max_instances, cold_start_s=cold_start_s)


def should_start_on_demand(*, instances: int, in_flight: int, target_concurrency: int, max_instances: int,
                           **_: Any) -> bool:
    """A demand-driven rule (ServerlessLLM's `auto_scaler`): the function wants
    ceil(in_flight / target_concurrency) instances, at most `max_instances`, and starting or loading
    ones count; start one when it has fewer. No SLO, wait or load-time estimate enters it."""
    desired = min(max_instances, -(-in_flight // target_concurrency))
    return desired > instances


def estimated_wait_s(starting_created_s: Sequence[float], instances: int, *, waiting: int,
                     target_concurrency: int, service_s: float, startup_s: float, now_s: float) -> float:
    """The wait for a slot as the gateway can estimate it. With a ready instance, the queue drains
    at `instances * target_concurrency` slots per `service_s` (the learned time a request holds a
    slot; 0 before any request ended); with only starting ones, the earliest expected end of their
    loads: the learned cold start `startup_s` after each was claimed (`starting_created_s`). Before
    any request ended, how fast the queue drains is unknown: unbounded while more requests wait than
    the starting instances will take, else none (as with only starting instances)."""
    if instances and len(starting_created_s) == instances:
        return min(max(0.0, startup_s - (now_s - c)) for c in starting_created_s)
    if service_s <= 0.0:
        return math.inf if waiting > len(starting_created_s) * target_concurrency else 0.0
    return service_s * waiting / max(1, instances * target_concurrency)


def should_start_estimated(instances: Iterable[ScaleOutInstance], *, waiting: int, target_concurrency: int,
                           max_instances: int, ttft_slo_s: float, service_s: float, prefill_s: float,
                           startup_s: float, now_s: float, rule: ScaleOutRule = should_start) -> bool:
    """`should_start` on what the gateway knows, the one call of the live gateway
    (`Invoker._should_start`) and the simulator: the function's `instances` (draining ones do not
    count; claimed and loading ones are starting), `waiting` requests (the asking one included), and
    the learned EWMAs (0 when nothing was learned yet): `service_s` per request holding a slot,
    `prefill_s` (the workers' time to first token) and `startup_s` (a cold start, also the
    estimate `cold_start_s`). `now_s` is on the clock of the instances' `created_s`. `rule`: the
    function's policy's scale-out rule (`scale_out_rule`); requests in flight are the waiting ones
    and those holding a slot."""
    counted = in_flight = 0
    starting: list[float] = []
    for inst in instances:
        if inst.state == "draining":
            continue
        counted += 1
        in_flight += inst.outstanding
        if inst.state in STARTING_STATES:
            starting.append(inst.created_s)
    wait_s = estimated_wait_s(starting, counted, waiting=waiting, target_concurrency=target_concurrency,
                              service_s=service_s, startup_s=startup_s, now_s=now_s)
    return rule(instances=counted, loading=len(starting), waiting=waiting, in_flight=in_flight + waiting,
                target_concurrency=target_concurrency, max_instances=max_instances,
                predicted_wait_s=wait_s, prefill_s=prefill_s, ttft_slo_s=ttft_slo_s, cold_start_s=startup_s)
