"""Autoscaler: a pure step from (scaling specs, instances, now) to actions.

Rules, per function:
- retire instances of a checkpoint the function no longer names (a redeploy), busy or not;
- unload instances idle (ready, nothing outstanding) for `keep_alive_s`, least recently used
  first, down to `min_instances` (0: scale to zero); instances beyond `max_instances` that are
  idle go first, whatever their idle time;
- ensure `min_instances` instances exist;
- prefetch: a popular function (demand at least `prefetch_min_rate_per_s`) whose cold start from
  SSD or remote would miss its TTFT SLO gets its checkpoint copied into the DRAM tier of more
  nodes (up to `prefetch_copies`), chosen among nodes with device room, preferring ones that
  already hold it on SSD. A prefetch in flight (`ClusterView.prefetching`: sent, not landed) counts
  as a copy in DRAM, and no node is sent one it is already fetching.

Live, one gateway runs `step` under `RedisCluster.try_lease("autoscaler", ...)` and executes the
actions (Unload: tell the worker, then `remove_instance`; EnsureInstances: place that many cold
starts; Prefetch: ask the node's worker to pull the checkpoint into the tier). The simulator
runs the same object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ember.scheduler.caching import dram_keep
from ember.scheduler.estimator import tier_bandwidth_bps
from ember.scheduler.view import ClusterView, Tier

__all__ = ["Action", "Autoscaler", "EnsureInstances", "Prefetch", "ScalingSpec", "Unload", "of_another_checkpoint"]


@dataclass(frozen=True)
class ScalingSpec:
    """How one function scales."""

    function: str
    checkpoint: str = ""
    nbytes: int = 0
    min_instances: int = 0
    max_instances: int = 4
    keep_alive_s: float = 60.0
    target_concurrency: int = 4
    ttft_slo_s: float = 1.0
    prefetch: bool = True  # its placement policy takes proactive DRAM copies (a baseline may not)
    slo_aware_cache: bool = False  # its policy asks DRAM tiers to keep SLO-saving copies first (`caching`)

    def __post_init__(self) -> None:
        from ember.errors import ConfigError

        if self.min_instances < 0 or self.max_instances < max(1, self.min_instances):
            raise ConfigError(f"{self.function}: need 0 <= min_instances <= max_instances and max_instances >= 1")
        if self.target_concurrency < 1:
            raise ConfigError(f"{self.function}: target_concurrency must be >= 1")
        if self.keep_alive_s < 0:
            raise ConfigError(f"{self.function}: keep_alive_s must be >= 0")


def takes_prefetches(policy: Any) -> bool:
    """Whether functions placed by `policy` get DRAM prefetches (`ScalingSpec.prefetch`; the
    gateway's `scaling_spec` and the simulator both ask): not under a baseline whose published
    system has none (`prefetch = False`)."""
    return bool(getattr(policy, "prefetch", True))


class ScalableInstance(Protocol):
    """What the autoscaler reads of an instance (InstanceRecord satisfies it)."""

    instance_id: str
    function: str
    checkpoint: str
    node_id: str
    state: str
    outstanding: int
    last_used_s: float


InstT = TypeVar("InstT", bound=ScalableInstance)


@dataclass(frozen=True)
class Unload:
    instance_id: str
    function: str
    node_id: str
    reason: str  # "keep_alive" | "over_max" | "unknown_function" | "checkpoint_changed"

    @property
    def graceful(self) -> bool:
        """Retire even while it serves (no new requests; in-flight ones finish within the drain
        grace), rather than only when idle: it holds a checkpoint its function no longer uses."""
        return self.reason == "checkpoint_changed"


@dataclass(frozen=True)
class EnsureInstances:
    """Start cold instances until the function has `count` (the executor places count - current)."""

    function: str
    count: int
    current: int


@dataclass(frozen=True)
class Prefetch:
    checkpoint: str
    node_id: str
    tier: Tier
    nbytes: int = 0  # what the copy moves: the executor charges it to the node's source tier
    keep: int = 0  # the copy's retention priority in the node's DRAM tier (`caching.dram_keep`)


Action = Unload | EnsureInstances | Prefetch


def of_another_checkpoint(checkpoint: str, instances: Iterable[InstT]) -> list[InstT]:
    """The instances holding another checkpoint than the one their function names now (it was
    deployed again): they are retired. The deploy route asks at once, the autoscaler at every step."""
    if not checkpoint:
        return []
    return [i for i in instances if i.checkpoint and i.checkpoint != checkpoint]


class Autoscaler:
    """Stateless between steps apart from its settings, so any gateway can take over the lease."""

    def __init__(self, *, prefetch_min_rate_per_s: float = 0.05, prefetch_copies: int = 1,
                 max_prefetch_per_step: int = 16, unload_unknown: bool = False) -> None:
        self.prefetch_min_rate_per_s = prefetch_min_rate_per_s
        self.prefetch_copies = prefetch_copies
        self.max_prefetch_per_step = max_prefetch_per_step
        self.unload_unknown = unload_unknown
        # (the specs mapping itself, held so that its id cannot be reused; its length; the specs with a minimum)
        self._min_cache: tuple[Mapping[str, ScalingSpec], int, list[tuple[str, ScalingSpec]]] | None = None

    def step(self, specs: Mapping[str, ScalingSpec], instances: Iterable[ScalableInstance], now: float, *,
             view: ClusterView | None = None, demand_per_s: Mapping[str, float] | None = None) -> list[Action]:
        """The actions that bring the cluster in line with `specs` at time `now`."""
        by_fn: dict[str, list[ScalableInstance]] = {}
        for inst in instances:
            insts = by_fn.get(inst.function)
            if insts is None:
                by_fn[inst.function] = [inst]
            else:
                insts.append(inst)
        actions: list[Action] = []
        for fn, insts in by_fn.items():
            spec = specs.get(fn)
            if spec is None:
                if self.unload_unknown:
                    actions += [Unload(i.instance_id, fn, i.node_id, "unknown_function") for i in insts
                                if i.state == "ready" and i.outstanding == 0]
                continue
            # Plain loops, not calls, decide whether there is anything to do: a step sees thousands
            # of functions (a simulated hour steps 3,600 times), nearly all with nothing to do.
            ck = spec.checkpoint
            for i in insts:
                if ck and i.checkpoint and i.checkpoint != ck:
                    # redeployed on another checkpoint: the old instances retire, busy or not, and do
                    # not count towards the function's instances any more
                    stale = of_another_checkpoint(ck, insts)
                    actions += [Unload(i.instance_id, fn, i.node_id, "checkpoint_changed") for i in stale
                                if i.state == "ready"]
                    insts = by_fn[fn] = [i for i in insts if i not in stale]
                    break
            if len(insts) <= spec.max_instances:  # then only an idle instance past keep-alive can go
                keep_alive_s = spec.keep_alive_s
                for i in insts:
                    if now - i.last_used_s >= keep_alive_s and i.state == "ready" and i.outstanding == 0:
                        break
                else:
                    continue
            actions += self._unloads(spec, insts, now)
        for fn, spec in self._with_minimum(specs):
            current = len(by_fn.get(fn, ()))
            if current < spec.min_instances:
                actions.append(EnsureInstances(fn, spec.min_instances, current))
        if view is not None and demand_per_s:
            actions += self._prefetches(specs, view, demand_per_s)
        return actions

    def _with_minimum(self, specs: Mapping[str, ScalingSpec]) -> list[tuple[str, ScalingSpec]]:
        """Specs with min_instances > 0, cached per specs mapping (simulations pass the same one of
        thousands every step). The cache holds the mapping, so that another mapping can never take
        its id (the live loop builds a new one each step: a reused id once returned last step's
        minimums)."""
        cached = self._min_cache
        if cached is None or cached[0] is not specs or cached[1] != len(specs):
            cached = self._min_cache = (specs, len(specs), [(fn, s) for fn, s in specs.items() if s.min_instances > 0])
        return cached[2]

    def _unloads(self, spec: ScalingSpec, insts: list[ScalableInstance], now: float) -> list[Action]:
        keep_alive_s = spec.keep_alive_s
        if len(insts) <= spec.max_instances:  # the common case: only idle ones past keep-alive may go
            if len(insts) <= spec.min_instances:
                return []
            idle = [i for i in insts
                    if i.state == "ready" and i.outstanding == 0 and now - i.last_used_s >= keep_alive_s]
        else:
            idle = [i for i in insts if i.state == "ready" and i.outstanding == 0]
        if not idle:
            return []
        idle.sort(key=lambda i: (i.last_used_s, i.instance_id))  # least recently used first
        out: list[Action] = []
        remaining = len(insts)
        for inst in idle:
            if remaining > spec.max_instances:
                out.append(Unload(inst.instance_id, spec.function, inst.node_id, "over_max"))
            elif remaining > spec.min_instances and now - inst.last_used_s >= keep_alive_s:
                out.append(Unload(inst.instance_id, spec.function, inst.node_id, "keep_alive"))
            else:
                continue
            remaining -= 1
        return out

    def _prefetches(self, specs: Mapping[str, ScalingSpec], view: ClusterView,
                    demand_per_s: Mapping[str, float]) -> list[Action]:
        out: list[Action] = []
        min_rate = self.prefetch_min_rate_per_s
        popular = [(r, fn) for fn, r in demand_per_s.items() if r >= min_rate]
        popular.sort()
        for _, fn in reversed(popular):
            if len(out) >= self.max_prefetch_per_step:
                break
            spec = specs.get(fn)
            if spec is None or not spec.checkpoint or spec.nbytes <= 0 or not spec.prefetch:
                continue
            holders = view.nodes_holding(spec.checkpoint, limit=self.prefetch_copies + 2)
            # A cold start from the nearest copy outside DRAM meets the SLO: nothing to do (checked
            # before counting the near copies, which costs another read, with the same outcome)
            slow = [n for n in holders if n.holdings.get(spec.checkpoint) == "ssd"]
            if slow and spec.nbytes / tier_bandwidth_bps(slow[0], "ssd") <= spec.ttft_slo_s:
                continue
            # copies in DRAM (or on a device), and those on their way there
            near = {n.node_id for n in holders if n.holdings.get(spec.checkpoint) in ("gpu", "dram")}
            near |= view.prefetching(spec.checkpoint)
            if len(near) >= self.prefetch_copies:
                continue
            targets = [n for n in slow if n.node_id not in near]
            if len(targets) + len(near) < self.prefetch_copies:
                seen = {n.node_id for n in holders} | near
                for d in view.devices_with_room(spec.nbytes, limit=8):
                    if d.node_id not in seen:
                        seen.add(d.node_id)
                        node = view.node(d.node_id)
                        if node is not None:
                            targets.append(node)
            for node in targets[: self.prefetch_copies - len(near)]:
                keep = dram_keep(spec.slo_aware_cache, spec.nbytes, spec.ttft_slo_s, node.bandwidth_bps.get("ssd"))
                out.append(Prefetch(spec.checkpoint, node.node_id, "dram", spec.nbytes, keep))
        return out
