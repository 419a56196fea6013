"""The simulated control plane: what the live gateway does to the cluster, applied to a
`MemCluster` at the simulation's clock. Cold starts (placement by the policy, eviction when nothing
has room, the load's true timing and its idle-power cost), unloads, the autoscaler's actions and
DRAM prefetches. The event engine (`_Simulation` in sim.py) sets up the state read here and
calls these from its arrival loop and autoscaler ticks."""

from __future__ import annotations

import heapq
import math
import time

from ember.energy import simulated as gpu_model
from ember.scheduler.autoscaler import Autoscaler, EnsureInstances, Prefetch, ScalingSpec, Unload
from ember.scheduler.caching import dram_keep, slo_aware_cache
from ember.scheduler.demand import DemandMeter
from ember.scheduler.estimator import EVICTION_S, beside_weights
from ember.scheduler.eviction import makes_room
from ember.scheduler.memcluster import MemCluster
from ember.scheduler.simconfig import SimConfig
from ember.scheduler.simrecords import SimDevice, SimInstance, refresh
from ember.scheduler.view import PlacementPolicy, PlacementRequest, Tier


class ControlPlane:
    """Cold starts, evictions, unloads, autoscaling and prefetches over `self.cluster`; the
    state it reads and counts is set up by the engine (`_Simulation.__init__`)."""

    cfg: SimConfig
    cluster: MemCluster
    policy: PlacementPolicy
    autoscaler: Autoscaler
    prefetch: bool
    specs: dict[str, ScalingSpec]
    names: list[str]
    ckpt: list[str]
    nbytes: list[int]
    kv_bytes: list[int]
    slo_s: list[float]
    fn_index: dict[str, int]
    fn_instances: list[list[SimInstance]]
    changing: set[SimInstance]  # loading, or with requests since the last autoscaler step
    loads_ending: list[list[tuple[float, float]]]  # per function, heap of (ready, claim to ready)
    pending_prefetch: list[tuple[float, int, str, str, int, int]]  # (lands, seq, node, checkpoint, bytes, keep)
    prefetches: int
    decisions: int
    decision_s: float
    evictions: int
    loads: int
    tier_loads: dict[str, int]
    peak_instances: int

    @property
    def now(self) -> float:
        return self.cluster.now

    def _relieve_pressure(self, nbytes: int, function: str) -> bool:
        """Nothing has room for `nbytes` (the request's weights and KV budget): the gateway's
        eviction rule over the whole cluster (`_make_room`); True if it evicted."""
        gone = self.cluster.evict(self.cluster.devices, nbytes, function)
        self._forget(gone)
        return bool(gone)

    # --- cold starts -------------------------------------------------------------------------
    def _cold_start(self, f: int, t: float) -> SimInstance | None:
        """Place and start loading an instance of function `f` at time `t`; None if nothing fits.
        Memory as the gateway's `place` books it: the request asks for weights + KV budget, the
        device chosen is made room on for what its claim takes (`claim_bytes`: no weights where
        the device already holds them)."""
        self._apply_prefetches(t)
        cluster = self.cluster
        nb = self.nbytes[f]
        name = self.names[f]
        req = PlacementRequest(function=name, checkpoint=self.ckpt[f], nbytes=nb, ttft_slo_s=self.slo_s[f],
                               kv_bytes=self.kv_bytes[f])
        est = self._decide(req)
        if est is None and makes_room(self.policy) and self._relieve_pressure(req.room_bytes, name):
            est = self._decide(req)  # then decide again
        if est is None:
            return None
        dev = self._device(est.node_id, est.device_id)
        node = dev.node
        ck = req.checkpoint
        need = req.claim_bytes(ck in dev.weights)
        evicted = cluster.evict([dev], need, name)
        self._forget(evicted)
        if dev.free < need:
            return None
        tier: Tier = node.holdings.get(ck, "remote") if getattr(self.policy, "local_copies", True) else "remote"
        if ck in dev.weights:
            tier = "gpu"  # the worker builds the instance from the device's copy: no bytes move (as live)
        # What really happens (the published queues follow the estimate until the load ends).
        poll = getattr(self.policy, "poll_interval_s", 0.0)
        dispatch = math.ceil(t / poll) * poll if poll > 0 else t
        transfer = 0.0 if tier == "gpu" else nb / node.true_bw[tier]
        start = max(dispatch, dev.true_until, node.true_tier_until[tier])
        ready = start + transfer + (EVICTION_S if evicted else 0.0)
        dev.true_until = ready
        node.true_tier_until[tier] = start + transfer
        self.tier_loads[tier] += 1
        self.loads += 1
        heapq.heappush(self.loads_ending[f], (ready, ready - t))  # learned when the load ends, as live
        dev.extra_j += (gpu_model.WARM_IDLE_POWER_W - gpu_model.IDLE_POWER_W) * (ready - start)
        inst = cluster.claim(f, name, ck, dev, nb, est.tier, est.seconds, t, req.kv_bytes)  # published: the estimate
        inst.load_tier = tier
        # what the gateway asks the worker's DRAM tier to keep: by the node's learned SSD bandwidth
        inst.dram_keep = dram_keep(slo_aware_cache(self.policy), nb, self.slo_s[f], node.measured_bw.get("ssd"))
        inst.ready_s = inst.last_used_s = ready
        inst.load_s = transfer
        cluster.schedule_load_end(inst)
        self.fn_instances[f].append(inst)
        self.changing.add(inst)
        self.peak_instances = max(self.peak_instances, len(cluster.instances))
        if tier == "dram":
            cluster.dram_put(node, ck, nb, inst.dram_keep)  # the entry is used now; new copies land at the load's end
        return inst

    def _device(self, node_id: str, device_id: str) -> SimDevice:
        return next(d for d in self.cluster.nodes_by_id[node_id].devices if d.device_id == device_id)

    def _forget(self, gone: list[SimInstance]) -> None:
        for inst in gone:
            self.fn_instances[inst.fn].remove(inst)
            self.changing.discard(inst)
            self.evictions += 1

    def _decide(self, req: PlacementRequest):
        """The policy's choice, else a device beside the checkpoint's weights (as the gateway's `place`)."""
        t0 = time.perf_counter()
        cluster = self.cluster
        est = self.policy.place(req, cluster) or beside_weights(
            req, cluster, lambda d: req.checkpoint in self._device(d.node_id, d.device_id).weights)
        self.decision_s += time.perf_counter() - t0
        self.decisions += 1
        return est

    def _remove(self, inst: SimInstance) -> None:
        self.cluster.remove(inst)
        self.fn_instances[inst.fn].remove(inst)
        self.changing.discard(inst)

    # --- autoscaler ---------------------------------------------------------------------------
    def _autoscale(self, demand: DemandMeter, counts: dict[int, int]) -> None:
        """One autoscaler step at the simulation's clock: the requests routed since the last step
        go into the demand meter the gateway keeps (`DemandMeter`, its 60 s window), then the
        shared `Autoscaler.step`, then its actions."""
        now = self.now
        names = self.names
        for f, c in counts.items():
            demand.count(names[f], c)
        counts.clear()
        rates = demand.rates_per_s(now)
        self._apply_prefetches(now)
        instances = self.cluster.instances
        # The instances' state and outstanding requests at `now`: only those loading or serving
        # since the last step can differ from ready and idle (the others are, and stay, until a
        # request or a new ready time puts them back in `changing`)
        changing = list(self.changing)
        refresh(changing, now)
        self.changing.difference_update([i for i in changing if i.state == "ready" and not i.ends])
        actions = self.autoscaler.step(self.specs, list(instances.values()), now,
                                       view=self.cluster if self.prefetch else None, demand_per_s=rates)
        for a in actions:
            if isinstance(a, Unload):
                inst = instances.get(a.instance_id)
                if inst is not None:
                    self._remove(inst)
            elif isinstance(a, EnsureInstances):
                f = self.fn_index[a.function]
                for _ in range(a.count - a.current):
                    self._cold_start(f, now)
            elif isinstance(a, Prefetch):
                self._start_prefetch(a, now)

    def _start_prefetch(self, a: Prefetch, now: float) -> None:
        node = self.cluster.nodes_by_id.get(a.node_id)
        if node is None:
            return
        # The gateway records it in flight with its source tier's queue time, as live
        # (LoadQueues.send_prefetch), and sends nothing to a node that holds it in DRAM or
        # already fetches it. The queue's estimate stands (no end corrects it); the record ends
        # when the copy lands in DRAM (`_apply_prefetches`, as the worker ends it) or expires.
        src = self.cluster.send_prefetch(node, a.checkpoint, a.nbytes, now)
        if src is None:
            return
        if any(p[2] == node.node_id and p[3] == a.checkpoint for p in self.pending_prefetch):
            return  # its record expired before the copy landed: the worker ignores the repeat
        nb = a.nbytes
        start = max(now, node.true_tier_until[src])
        # Into DRAM, not a GPU: bounded by the source link, not PCIe to the device.
        done = start + nb / node.true_bw[src]
        node.true_tier_until[src] = done
        self.prefetches += 1
        heapq.heappush(self.pending_prefetch, (done, self.prefetches, node.node_id, a.checkpoint, nb, a.keep))

    def _apply_prefetches(self, now: float) -> None:
        pending = self.pending_prefetch
        cluster = self.cluster
        while pending and pending[0][0] <= now:
            _, _, node_id, ck, nb, keep = heapq.heappop(pending)
            node = cluster.nodes_by_id[node_id]
            if ck not in node.ssd:
                cluster.ssd_put(node, ck, nb)
            cluster.dram_put(node, ck, nb, keep)
            cluster.set_tier(node, ck)
            if ck in node.dram:  # published in DRAM: the worker ends the record (else it expires)
                cluster.prefetch_landed(node, ck)
