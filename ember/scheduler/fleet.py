"""`ember sim --fleet`: the simulator with nodes that come and go under the node scaler.

The cluster of ember.scheduler.sim gains a power state per node (units: seconds, watts, joules):
- awake: placeable, drawing at least its idle power (every GPU's idle watts plus `host_idle_w`);
- booting: asked for by a scale-out, placeable `boot_s` later, drawing idle power meanwhile;
- draining: marked by the node scaler, nothing new is placed there, its idle instances unload;
- absent: terminated (or stopped in a warm pool), drawing `absent_w`. Its instance-store SSD and
  its DRAM come back empty (unless `ssd_kept_when_stopped`): checkpoints load from remote again.
The node scaler is the SAME `NodeScaler` object the gateway runs, fed the same facts: placements
that found no room since its last step, booting nodes, and per node its instances, last use,
keep-alive and claimed memory.

Two runs of the `ember` policy on one trace: a fleet fixed at its peak size (`cfg.nodes`, every
node awake all the time) and the scaled one (up to `cfg.nodes`, starting with all of them awake
and idle). Each reports node_hours, idle_energy_kwh (the floor paid for being up: idle GPU
watts plus host watts over awake node time, plus absent watts), gpu_energy_kwh (idle + work, as
`ember sim`), slo_attainment and p99_cold_startup_s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from ember.energy import simulated as gpu_model
from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.demand import DemandMeter
from ember.scheduler.memcluster import MemCluster
from ember.scheduler.nodescaler import (
    DEFAULTS,
    STEP_INTERVAL_S,
    Drain,
    FleetNode,
    NodeActivity,
    NodeScaler,
    NodeScalerConfig,
    ScaleOut,
    Terminate,
    Undrain,
)
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, SimResult, _Simulation, build_trace
from ember.scheduler.simrecords import SimDevice, SimInstance, SimNode
from ember.scheduler.trace import Trace
from ember.scheduler.view import NodeState

__all__ = ["FleetConfig", "run_fleet"]


@dataclass
class FleetConfig:
    """Node power states and the node scaler's knobs."""

    # The node scaler's settings default to the live ones (`NodeScalerConfig`, `STEP_INTERVAL_S`: what
    # `ember.config.Settings` takes), so a simulated fleet is one a default deployment would run.
    boot_s: float = DEFAULTS.boot_s
    host_idle_w: float = 300.0
    absent_w: float = DEFAULTS.absent_power_w
    grace_s: float = DEFAULTS.grace_s
    interval_s: float = STEP_INTERVAL_S
    min_nodes: int = 1  # as deployments keep (terraform's worker_min_nodes default; `ember up --workers`)
    target_memory_utilization: float = DEFAULTS.target_memory_utilization
    consolidate_below: float = DEFAULTS.consolidate_below
    requests_per_node: int = DEFAULTS.requests_per_node
    max_scale_in_per_step: int = DEFAULTS.max_scale_in_per_step
    budget_w: float | None = None
    ssd_kept_when_stopped: bool = False

    def check(self) -> FleetConfig:
        for name in ("boot_s", "host_idle_w", "absent_w", "grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"fleet config: {name} must be >= 0, got {getattr(self, name)}")
        if self.interval_s <= 0:
            raise ConfigError("fleet config: interval_s must be > 0")
        return self

    def scaler_config(self, cfg: SimConfig) -> NodeScalerConfig:
        idle_w = cfg.gpus_per_node * gpu_model.IDLE_POWER_W + self.host_idle_w
        return NodeScalerConfig(
            min_nodes=min(self.min_nodes, cfg.nodes), max_nodes=cfg.nodes,
            # the power budget is GPU watts, live and here (`Settings.node_power_w`)
            node_power_w=cfg.gpus_per_node * gpu_model.MAX_POWER_LIMIT_W,
            idle_power_w=idle_w, absent_power_w=self.absent_w, boot_power_w=idle_w, boot_s=self.boot_s,
            grace_s=self.grace_s, target_memory_utilization=self.target_memory_utilization,
            consolidate_below=self.consolidate_below,
            requests_per_node=self.requests_per_node, max_scale_in_per_step=self.max_scale_in_per_step)


def run_fleet(cfg: SimConfig, fleet: FleetConfig, *, trace: Trace | None = None, policy: str = "ember",
              progress: Callable[[str, float], None] | None = None) -> dict:
    """The `{"fleet": {"fixed": ..., "scaled": ...}}` document (plus config and savings)."""
    cfg.check()
    fleet.check()
    trace = trace if trace is not None else build_trace(cfg)
    out: dict[str, dict] = {}
    results: dict[str, SimResult] = {}
    for name, scaler in (("fixed", None), ("scaled", NodeScaler(fleet.scaler_config(cfg)))):
        sim = _FleetSimulation(cfg, trace, get_policy(policy, seed=cfg.seed), Autoscaler(), fleet, scaler)
        res = sim.run((lambda _, frac, n=name: progress(n, frac)) if progress else None)
        results[name] = res
        out[name] = sim.fleet_summary(res)
    fixed, scaled = out["fixed"], out["scaled"]
    savings = {
        "node_hours": _saving(fixed["node_hours"], scaled["node_hours"]),
        "idle_energy_kwh": _saving(fixed["idle_energy_kwh"], scaled["idle_energy_kwh"]),
        "gpu_energy_kwh": _saving(fixed["gpu_energy_kwh"], scaled["gpu_energy_kwh"]),
        "slo_attainment_delta": round(scaled["slo_attainment"] - fixed["slo_attainment"], 6),
    }
    return {
        "invocations": len(trace),
        "fleet": {"fixed": fixed, "scaled": scaled, "savings": savings},
        "config": {**asdict(cfg), "fleet": asdict(fleet), "policy": policy, "gpus": cfg.nodes * cfg.gpus_per_node},
        "_results": results,
    }


def _saving(fixed: float, scaled: float) -> float:
    return round(1.0 - scaled / fixed, 4) if fixed > 0 else 0.0


class _FleetCluster(MemCluster):
    """The in-memory cluster where absent, booting and draining nodes are not placeable."""

    def __init__(self, **kw) -> None:
        self.hidden: set[str] = set()  # absent, booting or draining: not placeable (read by _rebucket)
        super().__init__(**kw)
        self._visible_ids: list[str] = []

    def add_node(self, *args, **kw) -> SimNode:
        node = super().add_node(*args, **kw)
        self._visible_ids = [n for n in self._node_ids if n not in self.hidden]
        return node

    def _rebucket(self, dev: SimDevice) -> None:
        if dev.node.node_id in self.hidden:
            self._unbucket(dev)
            return
        super()._rebucket(dev)

    def node(self, node_id: str) -> NodeState | None:
        return None if node_id in self.hidden else super().node(node_id)

    def nodes_holding(self, checkpoint: str, limit: int | None = None) -> Sequence[NodeState]:
        found = [n for n in super().nodes_holding(checkpoint) if n.node_id not in self.hidden]
        return found if limit is None else found[:limit]

    def nodes(self, node_ids: Sequence[str]) -> Sequence[NodeState]:
        return super().nodes([n for n in node_ids if n not in self.hidden])

    def prefetching(self, checkpoint: str) -> set[str]:
        return super().prefetching(checkpoint) - self.hidden

    def node_ids(self) -> Sequence[str]:
        return self._visible_ids

    def all_nodes(self) -> Sequence[NodeState]:
        return [self._node_state(n) for n in self.node_list if n.node_id not in self.hidden]

    def set_hidden(self, node: SimNode, hidden: bool) -> None:
        (self.hidden.add if hidden else self.hidden.discard)(node.node_id)
        for dev in node.devices:
            self._rebucket(dev)
        self._visible_ids = [n for n in self._node_ids if n not in self.hidden]


class _FleetSimulation(_Simulation):
    """The in-memory cluster with node power states; a plain fixed fleet when `scaler` is None."""

    def __init__(self, cfg: SimConfig, trace: Trace, policy, autoscaler: Autoscaler, fleet: FleetConfig,
                 scaler: NodeScaler | None) -> None:
        super().__init__(cfg, trace, policy, autoscaler)
        self.fleet = fleet
        self.scaler = scaler
        self.absent: set[str] = set()
        self.draining: set[str] = set()
        self.booting: dict[str, float] = {}  # node id -> when it registers
        self.up_since: dict[str, float] = {n.node_id: 0.0 for n in self.node_list}
        self.up_s = 0.0  # node-seconds awake, booting or draining (closed intervals)
        self.parked: dict[str, float] = {}  # instance id -> ready time, while its node drains
        self.next_node_step = fleet.interval_s
        self.activity = NodeActivity(default_keep_alive_s=0.0)  # as live: a node that never ran anything
        self.scale_outs = self.scale_ins = 0
        self.min_up = self.peak_up = len(self.node_list)

    def _make_cluster(self, cfg: SimConfig) -> MemCluster:
        return _FleetCluster(gpu_memory_bytes=cfg.gpu_memory_bytes, dram_cache_bytes=cfg.dram_cache_bytes,
                             ssd_bytes=cfg.ssd_bytes)

    @property
    def nodes_by_id(self) -> dict[str, SimNode]:
        return self.cluster.nodes_by_id

    def _set_hidden(self, node: SimNode, hidden: bool) -> None:
        self.cluster.set_hidden(node, hidden)  # type: ignore[attr-defined]

    # --- the node scaler's inputs and actions ---------------------------------------------------
    def _autoscale(self, demand: DemandMeter, counts: dict[int, int]) -> None:
        super()._autoscale(demand, counts)
        # not past the trace: what the fleet does once no request can come is no statement about it
        if self.scaler is not None and self.now >= self.next_node_step and self.now <= self.trace.duration_s:
            while self.next_node_step <= self.now:
                self.next_node_step += self.fleet.interval_s
            self._node_step()

    def _node_step(self) -> None:
        now = self.now
        for nid, ready in list(self.booting.items()):
            if ready <= now:
                del self.booting[nid]
                self._set_hidden(self.nodes_by_id[nid], False)
        facts = []
        for node in self.node_list:
            nid = node.node_id
            if nid in self.absent or nid in self.booting:
                continue
            insts = [i for d in node.devices for i in d.instances]
            if nid in self.draining:  # its idle instances unload (the autoscaler's Unload, live)
                self._route_to(node, False)  # those that finished loading since the last step
                for inst in [i for i in insts if i.last_used_s <= now and self._loaded(i)]:
                    self._remove(inst)
                insts = [i for d in node.devices for i in d.instances]
            busy = any(not self._loaded(i) or i.last_used_s > now for i in insts)
            last, keep = self.activity.observe(nid, now, last_used_s=[i.last_used_s for i in insts], busy=busy,
                                               keep_alive_s=[self.cfg.keep_alive_s] if insts else ())
            memory = sum(d.memory for d in node.devices)
            facts.append(FleetNode(nid, len(insts), busy, last, keep, nid in self.draining, nid,
                                   memory, memory - sum(d.free for d in node.devices)))
        # Waiting for room: the functions whose head's last placement found no room (live, the gauge of
        # waiting requests whose cold start found no room: only a function's head starts one).
        scaler = self.scaler
        assert scaler is not None
        actions = scaler.step(facts, now, waiting=len(self.room_waits), booting=len(self.booting),
                              budget_w=self.fleet.budget_w, watched_s=self.activity.watched_s(now))
        for a in actions:
            if isinstance(a, ScaleOut):
                self._scale_out(a.count)
            elif isinstance(a, Undrain):
                self.draining.discard(a.node_id)
                self._route_to(self.nodes_by_id[a.node_id], True)
                self._set_hidden(self.nodes_by_id[a.node_id], False)
            elif isinstance(a, Drain):
                self.draining.add(a.node_id)
                self._route_to(self.nodes_by_id[a.node_id], False)
                self._set_hidden(self.nodes_by_id[a.node_id], True)
            elif isinstance(a, Terminate):
                self._power_off(self.nodes_by_id[a.node_id])
        up = len(self.node_list) - len(self.absent)
        self.min_up, self.peak_up = min(self.min_up, up), max(self.peak_up, up)

    def _remove(self, inst) -> None:
        super()._remove(inst)
        self.parked.pop(inst.instance_id, None)

    def _forget(self, gone: list[SimInstance]) -> None:
        super()._forget(gone)
        for inst in gone:
            self.parked.pop(inst.instance_id, None)

    def _loaded(self, inst) -> bool:
        return self.parked.get(inst.instance_id, inst.ready_s) <= self.now

    def _route_to(self, node: SimNode, routable: bool) -> None:
        """Warm routing skips a draining node's instances (live: acquire_warm skips draining nodes).
        The simulator's router only skips instances still loading, so a drained instance is parked
        as loading until never (its ready time kept aside for an undrain)."""
        for dev in node.devices:
            for inst in dev.instances:
                if routable and inst.instance_id in self.parked:
                    inst.ready_s = self.parked.pop(inst.instance_id)
                elif not routable and inst.instance_id not in self.parked and inst.ready_s <= self.now:
                    # an instance still loading finishes (the requests that joined its load wait for it,
                    # as live: the node goes only once it holds nothing); it is parked once loaded
                    self.parked[inst.instance_id] = inst.ready_s
                    inst.ready_s = math.inf
                self.changing.add(inst)  # its state is read again at the next autoscaler step

    def _scale_out(self, count: int) -> None:
        for node in self.node_list:
            if count <= 0:
                break
            if node.node_id in self.absent:
                self.absent.discard(node.node_id)
                self.booting[node.node_id] = self.now + self.fleet.boot_s
                self.up_since[node.node_id] = self.now
                self.scale_outs += 1
                count -= 1

    def _power_off(self, node: SimNode) -> None:
        nid = node.node_id
        self.draining.discard(nid)
        self.absent.add(nid)
        self.cluster.hidden.add(nid)  # type: ignore[attr-defined]
        self.up_s += self._up_for(self.up_since.pop(nid, self.now), self.now)
        self.scale_ins += 1
        self.activity.forget(n.node_id for n in self.node_list if n.node_id not in self.absent)
        node.dram.clear()
        if not self.fleet.ssd_kept_when_stopped:
            node.ssd.clear()
            node.ssd_used = 0
        for ck in list(node.holdings):
            self.cluster.set_tier(node, ck)
        self._set_hidden(node, True)

    # --- results --------------------------------------------------------------------------------
    def _up_for(self, since: float, until: float) -> float:
        """Seconds up between `since` and `until`, within the trace (the fixed fleet is counted so)."""
        end = min(until, self.trace.duration_s)
        return max(0.0, end - since)

    def fleet_summary(self, res: SimResult) -> dict:
        duration = self.trace.duration_s
        up_s = self.up_s + sum(self._up_for(t, duration) for t in self.up_since.values())
        absent_s = len(self.node_list) * duration - up_s
        gpus = self.cfg.gpus_per_node
        # The simulator charged every GPU idle power for the whole run: not while its node was absent.
        gpu_j = res.gpu_energy_j - gpu_model.IDLE_POWER_W * gpus * absent_s
        idle_j = (gpu_model.IDLE_POWER_W * gpus + self.fleet.host_idle_w) * up_s + self.fleet.absent_w * absent_s
        s = res.summary()
        return {
            "nodes": len(self.node_list),
            "node_hours": round(up_s / 3600, 3),
            "idle_energy_kwh": round(idle_j / 3.6e6, 4),
            "gpu_energy_kwh": round(gpu_j / 3.6e6, 4),
            "slo_attainment": s["slo_attainment"],
            "p99_cold_startup_s": s["p99_cold_startup_s"],
            "mean_startup_s": s["mean_startup_s"],
            "cold_starts": s["cold_starts"],
            "unplaced": s["unplaced"],
            "min_nodes_up": self.min_up,
            "peak_nodes_up": self.peak_up,
            "scale_outs": self.scale_outs,
            "scale_ins": self.scale_ins,
            "wall_s": s["wall_s"],
        }

