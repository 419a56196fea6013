"""Warm routing and scale-out, as pure rules the gateway and the simulator share.

Warm: the ready instance with the fewest outstanding requests, if it is below
`target_concurrency`; ties go to the lowest instance id (string order). The live path applies
the same rule atomically in Redis (`RedisCluster.acquire_warm`, a Lua script that also takes
the slot; only instances on live nodes count), and a test checks both choose the same instance
on the same state. Otherwise the request queues for the earliest free slot, and the
function scales out when that predicted wait would break the TTFT SLO and a new instance
would plausibly be ready sooner (`should_start`). A baseline with a published scale-out rule of
its own carries it as its policy's `should_start` (`scale_out_rule` picks it, for the gateway and
the simulator alike): ServerlessLLM's is `should_start_on_demand`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar


class RoutableInstance(Protocol):
    instance_id: str
    state: str
    outstanding: int


I = TypeVar("I", bound=RoutableInstance)  # noqa: E741


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
    `should_start_on_demand`, not by this one); `predicted_wait_s` is the wait for the earliest
    slot (a loading instance's slot frees when its load ends). Start another instance when there
    is none; when only loading ones exist and they cannot take every waiting request; otherwise
    by `should_scale_out` (queueing would break the TTFT SLO and a cold start, estimated at
    `cold_start_s`, would be ready sooner)."""
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


def predicted_wait_s(slot_free_s: Iterable[float], now_s: float) -> float:
    """Seconds until the earliest of the given slot-free times (0 if one is free now)."""
    earliest = min(slot_free_s, default=None)
    if earliest is None:
        return float("inf")
    return max(0.0, earliest - now_s)
