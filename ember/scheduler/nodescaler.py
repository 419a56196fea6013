"""Node scaler: a pure step from (fleet facts, now) to node actions. It scales the machines under
the function instances, the way the autoscaler scales instances.

Rules:
- scale out when placements wait for room (requests no device could take, counted in Redis
  live and by the simulator), or when the awake fleet's claimed memory passes
  `target_memory_utilization` (headroom: a node takes `boot_s` to come up, so waiting for
  the first refusal would miss every SLO for that long). A draining node is taken back first
  (it is already up); new nodes are capped by the operator's power budget divided by the
  watts one node may draw (`node_power_w`), and by `max_nodes`;
- scale in a node that has served nothing for its functions' keep-alive plus a grace period,
  as long as the other awake nodes stay within `target_memory_utilization` without it. The grace is at least the break-even idle time: booting a replacement costs `boot_s` at
  `boot_power_w`, idling costs `idle_power_w - absent_power_w`, so a node idle for less than
  `boot_s * boot_power_w / (idle_power_w - absent_power_w)` is cheaper to keep;
- consolidate: placement spreads instances by checkpoint locality, so in a large fleet no node
  is ever wholly idle. While the awake fleet's claimed memory would stay below
  `consolidate_below` without it, the node with the least claimed memory (longest idle first) is
  drained too: its requests go to instances elsewhere, its instances unload once idle. The gap
  to `target_memory_utilization` is the hysteresis that keeps the two rules from fighting. Not
  before the caller has watched the fleet for the scale-in grace (`watched_s`, from
  `NodeActivity.watched_s`): a fleet that has just come up (or a new lease holder) has seen no
  demand yet, which is not the same as low demand;
- scale-in drains: `Drain` marks the node (nothing new is placed there, its idle instances
  unload), and `Terminate` follows once it holds no instance (the cloud group's desired
  capacity decremented with it).

Live, one gateway runs `step` under `RedisCluster.try_lease("nodescaler", ...)` and carries out
the actions through a `CloudBackend` (ember.platform.fleet); `ember sim --fleet` runs the same
object (ember.scheduler.fleet).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ember.errors import ConfigError

__all__ = ["DEFAULTS", "STEP_INTERVAL_S", "Drain", "FleetNode", "NodeAction", "NodeActivity", "NodeScaler", "NodeScalerConfig",
           "ScaleOut", "Terminate", "Undrain"]

# The defaults live (`ember.config.Settings.node_*`) and simulated (`ember.scheduler.fleet.FleetConfig`)
# alike, so that `ember sim --fleet` describes what a deployment with default settings does. 0.8 / 0.4
# measured on the README's hour (docs/fleet.md, 2026-12-02): the SLO attainment there follows how far
# consolidation packs the fleet (0.4: -0.0031, 0.42: -0.0041, 0.45: -0.0057, against the 0.005 the fleet
# issue allows), not the memory rule's target: a node booted while the rest still have room holds no
# checkpoint, so placement (by locality) sends it nothing and it only idles (0.6 / 0.4 and 0.7 / 0.4
# served every request alike, at 111.4 and 107.1 node-hours). 0.85 with no consolidation saved nothing
# (a large fleet is never wholly idle).
STEP_INTERVAL_S = 10.0  # between node scaler steps (a boot takes minutes)


@dataclass(frozen=True)
class NodeScalerConfig:
    """Fleet limits and the power/time figures the scale-in rule weighs (units: watts, seconds)."""

    min_nodes: int = 0
    max_nodes: int = 100
    node_power_w: float = 5600.0  # the most one node may draw (budget cap: budget_w // node_power_w nodes)
    idle_power_w: float = 860.0  # an awake node with nothing to do (8 GPUs x 70 W + host)
    absent_power_w: float = 0.0  # a stopped or terminated node
    boot_power_w: float = 860.0  # while a node boots
    boot_s: float = 180.0  # from scale-out to a registered worker
    grace_s: float = 60.0  # idle beyond the functions' keep-alive before a node is drained
    target_memory_utilization: float = 0.8  # claimed / memory of awake nodes above this: add a node
    consolidate_below: float = 0.4  # (0: off) ... and drain the emptiest node while the rest would stay below this
    requests_per_node: int = 8  # waiting placements one new node is expected to absorb
    max_scale_in_per_step: int = 4

    def __post_init__(self) -> None:
        if self.min_nodes < 0 or self.max_nodes < max(1, self.min_nodes):
            raise ConfigError("node scaler: need 0 <= min_nodes <= max_nodes and max_nodes >= 1")
        if self.node_power_w <= 0 or self.idle_power_w < 0 or self.absent_power_w < 0 or self.boot_power_w < 0:
            raise ConfigError("node scaler: node_power_w must be > 0 and the other watts >= 0")
        if self.boot_s < 0 or self.grace_s < 0:
            raise ConfigError("node scaler: boot_s and grace_s must be >= 0")
        if not 0 < self.target_memory_utilization <= 1:
            raise ConfigError("node scaler: target_memory_utilization must be in (0, 1]")
        if not 0 <= self.consolidate_below < self.target_memory_utilization:
            raise ConfigError("node scaler: consolidate_below must be in [0, target_memory_utilization)")
        if self.requests_per_node < 1 or self.max_scale_in_per_step < 1:
            raise ConfigError("node scaler: requests_per_node and max_scale_in_per_step must be >= 1")

    @property
    def breakeven_idle_s(self) -> float:
        """Idle seconds whose energy equals one boot's: below it, keeping the node is cheaper."""
        saved_w = self.idle_power_w - self.absent_power_w
        return math.inf if saved_w <= 0 else self.boot_s * self.boot_power_w / saved_w

    @property
    def scale_in_grace_s(self) -> float:
        return max(self.grace_s, self.breakeven_idle_s)


DEFAULTS = NodeScalerConfig()  # what `ember.config.Settings`, `ember sim --fleet` and its CLI default to


@dataclass(frozen=True)
class FleetNode:
    """One registered node as the node scaler sees it."""

    node_id: str
    instances: int  # resident instances (loading or ready)
    busy: bool  # an instance is loading or serving a request
    last_active_s: float  # when it last served (or was registered): see NodeActivity
    keep_alive_s: float  # the longest keep-alive among functions it ran
    draining: bool = False
    cloud_id: str = ""  # the cloud's instance id ("i-0abc...", "local-3"); "" when unknown
    memory_bytes: int = 0
    claimed_bytes: int = 0
    leaving: bool = False  # the cloud is terminating it (held by the lifecycle hook): drained, never taken back


@dataclass(frozen=True)
class ScaleOut:
    """Raise the group's desired capacity by `count` (to `desired`)."""

    count: int
    desired: int
    reason: str  # "waiting" | "memory" | "min_nodes"


@dataclass(frozen=True)
class Undrain:
    """Waiting placements: take a draining node back instead of booting one."""

    node_id: str


@dataclass(frozen=True)
class Drain:
    node_id: str
    cloud_id: str
    idle_s: float


@dataclass(frozen=True)
class Terminate:
    """The drained node holds nothing: terminate it and decrement the desired capacity."""

    node_id: str
    cloud_id: str


NodeAction = ScaleOut | Undrain | Drain | Terminate


class NodeScaler:
    """Stateless between steps (the caller keeps `NodeActivity`), so any gateway can take over."""

    def __init__(self, config: NodeScalerConfig | None = None) -> None:
        self.config = config or NodeScalerConfig()

    def capacity(self, budget_w: float | None) -> int:
        """The most nodes the power budget and `max_nodes` allow; never below `min_nodes`, the
        floor the operator set (a budget under one node's watts stopped even that node)."""
        cap = self.config.max_nodes
        if budget_w is not None and budget_w > 0:
            cap = min(cap, int(budget_w // self.config.node_power_w))
        return max(cap, self.config.min_nodes)

    def step(self, nodes: Sequence[FleetNode], now: float, *, waiting: int, booting: int,
             budget_w: float | None = None, watched_s: float = math.inf) -> list[NodeAction]:
        """Actions for this step. `waiting`: placements that found no room since the last step (or
        now); `booting`: nodes asked for that have not registered yet; `watched_s`: how long the
        caller has watched the fleet (`NodeActivity.watched_s`): consolidation waits for the
        scale-in grace."""
        cfg = self.config
        actions: list[NodeAction] = []
        draining = [n for n in nodes if n.draining or n.leaving]
        active = [n for n in nodes if not (n.draining or n.leaving)]
        for n in draining:
            if n.instances == 0 and not n.busy:
                actions.append(Terminate(n.node_id, n.cloud_id))
        terminating = len(actions)
        cap = self.capacity(budget_w)
        total = len(active) + booting
        want = 0
        reason = ""
        if waiting > 0:
            want = max(0, math.ceil(waiting / cfg.requests_per_node) - booting)
            reason = "waiting"
        else:
            want = self._memory_shortfall(active, booting)
            reason = "memory" if want else ""
        if total < cfg.min_nodes:
            want, reason = max(want, cfg.min_nodes - total), reason or "min_nodes"
        if want > 0:
            # A draining node is already up: taking it back is faster than any boot (not one the
            # cloud is terminating: it goes whatever we do, so new work there would be cut).
            for n in sorted((n for n in draining if not n.leaving), key=lambda n: -n.instances):
                if want == 0 or total >= cap:
                    break
                actions = [a for a in actions if not (isinstance(a, Terminate) and a.node_id == n.node_id)]
                actions.append(Undrain(n.node_id))
                want -= 1
                total += 1
            count = min(want, max(0, cap - total))
            if count > 0:
                actions.append(ScaleOut(count, total + count, reason))
            return actions
        if booting or waiting:
            return actions
        grace = cfg.scale_in_grace_s
        idle = sorted(((now - n.last_active_s, n) for n in active
                       if not n.busy and now - n.last_active_s >= n.keep_alive_s + grace),
                      key=lambda p: (-p[0], p[1].node_id))
        room = min(len(active) - cfg.min_nodes, cfg.max_scale_in_per_step)
        # A drain must leave the rest within `target_memory_utilization`: else the next step's memory
        # rule takes the node back at once, and the two rules would flap every step.
        memory = sum(n.memory_bytes for n in active)
        claimed = sum(n.claimed_bytes for n in active)
        for idle_s, n in idle:
            if room <= 0:
                break
            rest = memory - n.memory_bytes
            if memory > 0 and claimed > cfg.target_memory_utilization * rest:
                continue
            memory = rest
            actions.append(Drain(n.node_id, n.cloud_id, idle_s))
            room -= 1
        room -= terminating  # consolidation: the nodes that leave this step count too
        if room > 0 and watched_s >= cfg.scale_in_grace_s:
            chosen = {a.node_id for a in actions if isinstance(a, Drain)}
            kept = [n for n in active if n.node_id not in chosen]
            for victim in self._consolidation_victims(kept, room, memory, claimed):
                actions.append(Drain(victim.node_id, victim.cloud_id, now - victim.last_active_s))
        return actions

    def _consolidation_victims(self, active: Sequence[FleetNode], limit: int, memory: int,
                               claimed: int) -> list[FleetNode]:
        """The emptiest of `active` (whose memory is `memory`), as long as the others would hold every
        claim (`claimed`, the fleet's: those of drained nodes move to the rest) below `consolidate_below`."""
        if len(active) < 2 or self.config.consolidate_below <= 0:
            return []
        out: list[FleetNode] = []
        for victim in sorted(active, key=lambda n: (n.claimed_bytes, n.last_active_s, n.node_id)):
            if len(out) >= limit or len(out) >= len(active) - 1:
                break
            rest = memory - victim.memory_bytes
            if rest <= 0 or claimed / rest > self.config.consolidate_below:
                break
            memory = rest
            out.append(victim)
        return out

    def _memory_shortfall(self, active: Sequence[FleetNode], booting: int) -> int:
        """Nodes to add so claimed memory fits `target_memory_utilization` of the awake and
        booting nodes (a booting node is counted as the average awake one)."""
        memory = sum(n.memory_bytes for n in active)
        if memory <= 0 or not active:
            return 0
        per_node = memory / len(active)
        claimed = sum(n.claimed_bytes for n in active)
        if claimed <= self.config.target_memory_utilization * (memory + booting * per_node):
            return 0
        needed = math.ceil(claimed / (self.config.target_memory_utilization * per_node))
        return max(1, needed - len(active) - booting)


@dataclass
class NodeActivity:
    """When each node last served, folded from what the caller sees at each step (instances come and
    go between steps; a node's idle time must survive its instances being unloaded). A new lease
    holder starts from `first_seen` = now: it may scale in later than needed, never earlier."""

    default_keep_alive_s: float = 60.0
    last_active_s: dict[str, float] = field(default_factory=dict)
    keep_alive_s: dict[str, float] = field(default_factory=dict)
    watched_since: float | None = None  # this holder's first step

    def observe(self, node_id: str, now: float, *, last_used_s: Iterable[float] = (), busy: bool = False,
                keep_alive_s: Iterable[float] = ()) -> tuple[float, float]:
        """Fold one step's view of a node; returns (last_active_s, keep_alive_s)."""
        last = self.last_active_s.get(node_id, now)  # first sight: as if it served just now
        for t in last_used_s:
            last = max(last, min(t, now))
        if busy:
            last = now
        self.last_active_s[node_id] = last
        seen = list(keep_alive_s)
        if seen:  # the longest keep-alive of the functions it ran (remembered once they unload)
            self.keep_alive_s[node_id] = max(self.keep_alive_s.get(node_id, 0.0), *seen)
        return last, self.keep_alive_s.get(node_id, self.default_keep_alive_s)

    def watched_s(self, now: float) -> float:
        """Seconds since this holder's first step (0 at the first): how long it has seen the fleet."""
        if self.watched_since is None:
            self.watched_since = now
        return now - self.watched_since

    def forget(self, live: Iterable[str]) -> None:
        keep = set(live)
        for table in (self.last_active_s, self.keep_alive_s):
            for k in [k for k in table if k not in keep]:
                del table[k]
