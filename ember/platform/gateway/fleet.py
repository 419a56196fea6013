"""The fleet as operators read it: nodes, their devices, what each tier holds, energy, budget.

Read-only views over Redis for GET /v1/nodes and GET /v1/stats/functions (the console reads
these) and the Prometheus families `ember_node_up`, the budgets and today's energy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily, Metric

from ember.platform.cluster import InstanceRecord, RedisCluster
from ember.platform.energy_state import device_snapshots, energy_used_today_j, load_budget
from ember.platform.gateway.protocol import FunctionSpec
from ember.platform.gateway.stats import InvocationStats
from ember.platform.state import Keys

J_PER_KWH = 3.6e6
ENERGY_FIELDS = ("device", "power_w", "limit_w", "cap_w", "sm_clock_mhz", "energy_j", "j_per_token",
                 "slo_attainment", "mode")


def checkpoint_name(ref: str) -> str:
    """The checkpoint's name in a ref or pinned identity (`STORE/NAME#DIGEST` -> `NAME`)."""
    return ref.split("#", 1)[0].rstrip("/").rpartition("/")[2] or ref


def registered_nodes(client: redis.Redis) -> list[str]:
    """Every node id that registered and was not deregistered or reaped (live or not)."""
    return sorted(client.smembers(Keys.nodes))  # type: ignore[arg-type]


def nodes_view(cluster: RedisCluster, client: redis.Redis) -> dict[str, Any]:
    """GET /v1/nodes: live nodes with devices, instances, tier holdings and energy; nodes whose
    heartbeat lapsed are listed with `up: false` until they are reaped."""
    live = {n.node_id: n for n in cluster.all_nodes()}
    by_node: dict[str, list[InstanceRecord]] = {}
    for inst in cluster.instances():
        by_node.setdefault(inst.node_id, []).append(inst)
    snaps = device_snapshots(client)
    budget = load_budget(client)
    out = []
    for node_id in sorted(set(live) | set(registered_nodes(client))):
        node = live.get(node_id)
        if node is None:
            out.append({"node": node_id, "up": False, "devices": [], "tiers": {}, "energy": []})
            continue
        insts = by_node.get(node_id, [])
        devices = []
        for d in node.devices:
            devices.append({
                "device": d.device_id, "memory_bytes": d.memory_bytes, "free_bytes": d.free_bytes,
                "claimed_bytes": d.memory_bytes - d.free_bytes, "awake": d.awake,
                "instances": [{"id": i.instance_id, "function": i.function,
                               "checkpoint": checkpoint_name(i.checkpoint), "checkpoint_ref": i.checkpoint,
                               "state": i.state, "outstanding": i.outstanding}
                              for i in insts if i.device_id == d.device_id],
            })
        tiers: dict[str, list[str]] = {"device": sorted({checkpoint_name(i.checkpoint) for i in insts}),
                                       "dram": [], "ssd": []}
        for ck, tier in sorted(node.holdings.items()):
            tiers.setdefault(tier, []).append(checkpoint_name(ck))
        energy = [{f: s.get(f) for f in ENERGY_FIELDS} for s in snaps if s.get("node") == node_id]
        out.append({
            "node": node_id, "up": True, "devices": devices, "tiers": tiers,
            "bandwidth_bytes_per_s": node.bandwidth_bps, "energy": energy,
            "power_w": round(sum(float(e.get("power_w") or 0.0) for e in energy), 3),
            "power_budget_w": budget.node_watts.get(node_id),
        })
    return {"nodes": out, "at_s": time.time()}


def functions_view(specs: Sequence[FunctionSpec], cluster: RedisCluster, client: redis.Redis,
                   stats: InvocationStats) -> dict[str, Any]:
    """GET /v1/stats/functions: each function's instances (state, tier, outstanding), this
    gateway's latency/SLO/cold-start statistics, and J/token from the energy monitors."""
    by_fn: dict[str, list[InstanceRecord]] = {}
    for inst in cluster.instances():
        by_fn.setdefault(inst.function, []).append(inst)
    j_per_token: dict[str, list[float]] = {}
    for s in device_snapshots(client):
        for fn, f in (s.get("functions") or {}).items():
            if f.get("j_per_token"):
                j_per_token.setdefault(fn, []).append(float(f["j_per_token"]))
    others = stats.others()  # the other gateway processes' windows, when there are any
    out = []
    for spec in specs:
        insts = by_fn.get(spec.name, [])
        states: dict[str, int] = {}
        for i in insts:
            states[i.state] = states.get(i.state, 0) + 1
        jt = j_per_token.get(spec.name)
        out.append({
            "name": spec.name, "checkpoint": spec.checkpoint, "owner": spec.owner,
            "slo": spec.slo.model_dump(), "scaling": spec.scaling.model_dump(),
            "instances": [{"id": i.instance_id, "node": i.node_id, "device": i.device_id, "state": i.state,
                           "tier": i.tier, "outstanding": i.outstanding} for i in insts],
            "instance_states": states, "outstanding": sum(i.outstanding for i in insts),
            "j_per_token": (sum(jt) / len(jt)) if jt else None,
            **stats.summary(spec.name, others, generation=spec.created),
        })
    return {"functions": out, "at_s": time.time()}


class FleetCollector:
    """Scrape-time families: `ember_node_up{node}`, `ember_power_budget_watts`,
    `ember_node_power_budget_watts{node}`, `ember_energy_budget_kwh_per_day` and
    `ember_energy_used_kwh_today`. A budget family is empty while no such budget is set."""

    def __init__(self, client: Callable[[], redis.Redis], cluster: Callable[[], RedisCluster]) -> None:
        self.client = client
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ember_node_up", "1 while a registered node heartbeats, 0 after it lapsed",
                               labels=["node"])
        cluster_w = GaugeMetricFamily("ember_power_budget_watts", "Operator power budget for the cluster")
        node_w = GaugeMetricFamily("ember_node_power_budget_watts", "Operator power budget per node",
                                   labels=["node"])
        day_kwh = GaugeMetricFamily("ember_energy_budget_kwh_per_day", "Operator energy budget per day (UTC)")
        used_kwh = GaugeMetricFamily("ember_energy_used_kwh_today", "GPU energy drawn since midnight UTC")
        try:  # a scrape must not fail because Redis is away: the families stay empty
            client, cluster = self.client(), self.cluster()
            live = set(cluster.live_nodes())
            for node in sorted(live | set(registered_nodes(client))):
                up.add_metric([node], 1.0 if node in live else 0.0)
            budget = load_budget(client)
            if budget.cluster_watts is not None:
                cluster_w.add_metric([], float(budget.cluster_watts))
            for node, watts in sorted(budget.node_watts.items()):
                node_w.add_metric([node], float(watts))
            if budget.energy_kwh_per_day is not None:
                day_kwh.add_metric([], float(budget.energy_kwh_per_day))
            used_kwh.add_metric([], energy_used_today_j(client) / J_PER_KWH)
        except Exception:  # noqa: BLE001 - see above
            pass
        yield from (up, cluster_w, node_w, day_kwh, used_kwh)
