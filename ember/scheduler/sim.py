"""A discrete-event simulator of a GPU cluster that runs Ember's own placement policies, warm
routing rules and autoscaler (the SAME objects the gateway runs) against an invocation trace.

Model (units: bytes, seconds, watts, joules):
- nodes with `gpus_per_node` GPUs of `gpu_memory_bytes`, a DRAM checkpoint cache and an SSD
  (both LRU), and a link to remote storage. True tier bandwidths are per node; what the
  scheduler sees is a start-up measurement with error, corrected from every observed load
  (the estimator's EWMA), as live.
- a device books a checkpoint's weights once for all its instances of it, plus each instance's
  KV budget (`function_kv_bytes`: the live rule, for a model shaped as the published config
  nearest in size), as live (`ember.scheduler.memory`).
- every checkpoint starts on the SSD of `ssd_replicas` nodes; a load from remote also lands
  on that node's SSD, and every load leaves a copy in the node's DRAM cache.
- loads onto one GPU run one after another; loads from one tier of one node share its link
  (one after another). Evicting idle instances to make room costs EVICTION_S.
- an instance serves `target_concurrency` requests at once; a request takes prefill plus
  decode time from the energy model's H100 cost model; more requests queue for a slot.
- GPU power follows ember.energy.simulated (the calibrated SimulatedGpu): every GPU draws idle
  power for the whole run, 110 W for a second after work and while loading, prefill/decode
  power while serving; overlapping requests on one GPU are charged once (they share it), which
  is what makes packing onto awake GPUs save energy. Interference between co-located
  instances is not modelled (optimistic for packing).
- a request that finds no instance of its function and no device for one waits for a placement
  (as live: the gateway's head of queue retries its cold start): it is tried again after each
  autoscaler step (whose unloads are what frees devices), the functions in the order their
  first waiting request arrived; one still waiting at the end of the run is censored.
Startup of an invocation = arrival until an instance is ready to serve it (queueing included).
Counted separately: `cold_starts` = loads (instances started), `invocations_waiting_on_load` =
invocations that waited on a loading instance (`p99_cold_startup_s` is over those).

The engine (`_Simulation`) keeps only the clock and the event queue; the cluster state is a
`MemCluster` (memcluster.py), the in-memory twin of the live `RedisCluster`.
What the gateway does to it (cold starts, evictions, autoscaling, prefetches) is
`ControlPlane` (simcontrol.py), the engine's base class.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

from ember.energy import simulated as gpu_model
from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler, ScalingSpec
from ember.scheduler.demand import DemandMeter
from ember.scheduler.memcluster import MemCluster, SimDevice, SimInstance, SimNode
from ember.scheduler.policies import POLICY_NAMES, get_policy
from ember.scheduler.routing import pick_warm, scale_out_rule
from ember.scheduler.serving import ServingModel
from ember.scheduler.simconfig import SimConfig, SimResult, build_trace, function_kv_bytes
from ember.scheduler.simcontrol import ControlPlane
from ember.scheduler.trace import Trace
from ember.scheduler.view import PlacementPolicy

__all__ = ["SimConfig", "SimResult", "run_simulation", "simulate_policy", "build_trace"]

_WARM_W = gpu_model.WARM_IDLE_POWER_W - gpu_model.IDLE_POWER_W  # above idle: warm, prefill, decode
_PREFILL_W = gpu_model.phase_power_w("prefill") - gpu_model.IDLE_POWER_W
_DECODE_W = gpu_model.phase_power_w("decode") - gpu_model.IDLE_POWER_W



def run_simulation(cfg: SimConfig, policies: Sequence[str] = POLICY_NAMES, *, trace: Trace | None = None,
                   progress: Callable[[str, float], None] | None = None) -> dict:
    """Run each policy on the same trace and seed; the issue's JSON document."""
    cfg.check()
    for name in policies:
        get_policy(name)  # unknown names fail before any work
    trace = trace if trace is not None else build_trace(cfg)
    out: dict[str, dict] = {}
    results: dict[str, SimResult] = {}
    for name in policies:
        res = simulate_policy(cfg, trace, name, progress=progress)
        results[name] = res
        out[name] = res.summary()
    return {
        "invocations": len(trace),
        "policies": out,
        "config": {**asdict(cfg), "gpus": cfg.nodes * cfg.gpus_per_node, "trace_functions": len(trace.functions)},
        "_results": results,
    }


def simulate_policy(cfg: SimConfig, trace: Trace, policy_name: str, *,
                    progress: Callable[[str, float], None] | None = None) -> SimResult:
    """Simulate one policy (a fresh policy and autoscaler object) over `trace`."""
    policy = get_policy(policy_name, seed=cfg.seed)
    return _Simulation(cfg, trace, policy, Autoscaler()).run(progress)


# --- the simulation ---------------------------------------------------------------------------
class _Simulation(ControlPlane):
    """The event engine: arrivals, the autoscaler's ticks and load ends over a `MemCluster`
    (the in-memory `ClusterView` the policies read). It differs from the live gateway only in its
    clock, its event queue and that in-memory view; every decision is a shared function."""

    def __init__(self, cfg: SimConfig, trace: Trace, policy: PlacementPolicy, autoscaler: Autoscaler,
                 serving: ServingModel | None = None) -> None:
        self.cfg = cfg
        self.serving = serving
        # Prefetching popular checkpoints into DRAM is Ember's; a baseline without it (its
        # published system has none) says so with `prefetch = False`.
        self.prefetch = cfg.prefetch and getattr(policy, "prefetch", True)
        self.trace = trace
        self.policy = policy
        self.autoscaler = autoscaler
        rng = np.random.default_rng(cfg.seed + 1)
        nf = len(trace.functions)
        # Functions: sizes log-uniform in [min, max], SLO from size, serving cost from the GPU model.
        lo, hi = math.log(cfg.min_model_bytes), math.log(cfg.max_model_bytes)
        self.nbytes = np.exp(rng.uniform(lo, hi, nf)).astype(np.int64).tolist()
        self.kv_bytes = [function_kv_bytes(cfg, b) for b in self.nbytes]  # each instance's KV budget, as live
        params_b = [b / 2e9 for b in self.nbytes]  # bf16
        self.prefill_s = [gpu_model.prefill_full_clock_s(cfg.prompt_tokens, p) for p in params_b]
        self.exec_s = [pf + cfg.output_tokens * gpu_model.decode_step_full_clock_s(p)
                       for pf, p in zip(self.prefill_s, params_b, strict=True)]
        self.slo_s = [cfg.slo_base_s + b / cfg.slo_bytes_per_s for b in self.nbytes]
        self.names = trace.functions
        self.ckpt = [f"ck-{n}" for n in trace.functions]
        self.specs = {
            n: ScalingSpec(function=n, checkpoint=self.ckpt[i], nbytes=self.nbytes[i], min_instances=0,
                           max_instances=cfg.max_instances, keep_alive_s=cfg.keep_alive_s,
                           target_concurrency=cfg.target_concurrency, ttft_slo_s=self.slo_s[i])
            for i, n in enumerate(trace.functions)
        }
        self.fn_index = {n: i for i, n in enumerate(trace.functions)}
        # Nodes and devices.
        self.cluster = self._make_cluster(cfg)
        base = {"gpu": cfg.gpu_peer_bps, "dram": cfg.dram_bps, "ssd": cfg.ssd_bps, "remote": cfg.remote_bps}
        for k in range(cfg.nodes):
            true_bw = {t: bw * float(rng.lognormal(0.0, cfg.bandwidth_spread)) for t, bw in base.items()}
            measured = {t: bw * float(rng.lognormal(0.0, cfg.measurement_error)) for t, bw in true_bw.items()}
            self.cluster.add_node(f"node-{k:04d}", [(f"cuda:{g}", cfg.gpu_memory_bytes)
                                                    for g in range(cfg.gpus_per_node)], measured, true_bw)
        if cfg.ssd_replicas:
            if sum(self.nbytes) * cfg.ssd_replicas > cfg.nodes * cfg.ssd_bytes:
                raise ConfigError(
                    "cluster config: ssd_bytes too small for ssd_replicas copies of every checkpoint "
                    f"({sum(self.nbytes) * cfg.ssd_replicas / 1e12:.1f} TB > {cfg.nodes * cfg.ssd_bytes / 1e12:.1f} TB)"
                )
            picks = rng.random((nf, cfg.nodes)).argsort(axis=1)[:, : cfg.ssd_replicas]
            for i in range(nf):
                for k in picks[i]:
                    self.cluster.ssd_put(self.cluster.node_list[int(k)], self.ckpt[i], self.nbytes[i])
        self.fn_instances: list[list[SimInstance]] = [[] for _ in range(nf)]
        self.cold_s: list[float | None] = [None] * nf  # EWMA of observed cold starts (as the gateway keeps)
        self.pending_prefetch: list[tuple[float, int, str, str, int]] = []
        self.prefetches = 0
        self.decisions = 0
        self.decision_s = 0.0
        self.unplaced = 0
        self.evictions = 0
        self.loads = 0
        self.tier_loads: dict[str, int] = {"gpu": 0, "dram": 0, "ssd": 0, "remote": 0}
        self.peak_instances = 0
        self.should_start = scale_out_rule(policy)  # Ember's scale-out rule, or the baseline's own
        self.awaiting: dict[int, deque[int]] = {}  # function -> its requests waiting for a placement
        self.no_room_for = math.inf
        self.tokens = 0

    def _make_cluster(self, cfg: SimConfig) -> MemCluster:
        return MemCluster(gpu_memory_bytes=cfg.gpu_memory_bytes, dram_cache_bytes=cfg.dram_cache_bytes,
                          ssd_bytes=cfg.ssd_bytes)

    @property
    def devices(self) -> list[SimDevice]:
        return self.cluster.devices

    @property
    def node_list(self) -> list[SimNode]:
        return self.cluster.node_list

    # --- the run -------------------------------------------------------------------------
    def run(self, progress: Callable[[str, float], None] | None) -> SimResult:
        wall0 = time.perf_counter()
        cfg = self.cfg
        cluster = self.cluster
        times = self.trace.arrival_s
        n = len(times)
        self.startup = np.zeros(n, dtype=np.float64)
        self.cold = np.zeros(n, dtype=bool)
        self.met = np.zeros(n, dtype=bool)
        counts: dict[int, int] = {}
        demand = DemandMeter(now=0.0)  # the gateway's meter, at the simulation's clock
        next_step = cfg.autoscaler_interval_s
        self.prefill_req, self.exec_req = self._request_costs()
        if self.serving is not None:
            self.step_fn = [gpu_model.decode_step_full_clock_s(b / 2e9) for b in self.nbytes]
            self.out_tok = (self.trace.output_tokens.tolist() if self.trace.output_tokens is not None
                            else [cfg.output_tokens] * n)
        report_every = max(1, n // 50)
        self.t_list = t_list = times.tolist()
        f_list = self.trace.function_idx.tolist()
        pending_loads = cluster.pending_loads
        awaiting = self.awaiting
        route = self._route
        for i in range(n):
            t = t_list[i]
            f = f_list[i]
            if t >= next_step:
                while t >= next_step:
                    cluster.advance(next_step)
                    self._autoscale(demand, counts)
                    if awaiting:
                        self._place_awaiting()
                    next_step += cfg.autoscaler_interval_s
                if progress is not None:
                    progress(self.policy.name, i / n)
            if pending_loads and pending_loads[0][0] <= t:
                cluster.advance(t)
            else:
                cluster.now = t
            counts[f] = counts.get(f, 0) + 1
            if f in awaiting:  # requests of it already wait for a placement: never jump the queue
                awaiting[f].append(i)
            elif not route(i, f, t):
                awaiting[f] = deque((i,))
            if progress is not None and i % report_every == 0:
                progress(self.policy.name, i / n)
        duration = self.trace.duration_s
        while awaiting and next_step <= duration:  # the steps after the last arrival still place them
            cluster.advance(next_step)
            self._autoscale(demand, counts)
            self._place_awaiting()
            next_step += cfg.autoscaler_interval_s
        for f, waiting in awaiting.items():  # censored: never served in the run
            for i in waiting:
                self.unplaced += 1
                self.startup[i] = cfg.duration_s - t_list[i] + self.slo_s[f]
                self.cold[i] = True
        cluster.advance(duration)
        warm_w = gpu_model.WARM_IDLE_POWER_W - gpu_model.IDLE_POWER_W
        energy = gpu_model.IDLE_POWER_W * len(self.devices) * duration
        for dev in self.devices:
            energy += dev.extra_j
            if dev.busy_until > 0:
                energy += warm_w * max(0.0, min(gpu_model.WARM_IDLE_S, duration - dev.busy_until))
        if progress is not None:
            progress(self.policy.name, 1.0)
        return SimResult(
            policy=self.policy.name, startup_s=self.startup, cold=self.cold, slo_met=self.met, gpu_energy_j=energy,
            decisions=self.decisions, decision_s=self.decision_s, unplaced=self.unplaced,
            wall_s=time.perf_counter() - wall0, loads=self.loads, output_tokens=self.tokens,
            extra={"evictions": self.evictions, "prefetches": self.prefetches,
                   "peak_instances": self.peak_instances,
                   **{f"loads_{k}": v for k, v in self.tier_loads.items()}},
        )

    def _place_awaiting(self) -> None:
        """After an autoscaler step (its unloads are what frees devices): the requests that found no
        instance and no device for one try again, each function's in arrival order, the functions
        in the order their first one arrived (live, the head of a function's queue retries its
        cold start every second until it is placed)."""
        now = self.cluster.now
        awaiting = self.awaiting
        self.no_room_for = math.inf
        for f in list(awaiting):
            if self.nbytes[f] + self.kv_bytes[f] >= self.no_room_for:
                continue  # a smaller one found no device and nothing to evict (it has no instance either)
            waiting = awaiting[f]
            while waiting:
                i = waiting.popleft()
                if not self._route(i, f, now):
                    waiting.appendleft(i)
                    break
            if not waiting:
                del awaiting[f]

    def _route(self, i: int, f: int, now: float) -> bool:
        """Serve request `i` of function `f` at `now` (its arrival, or a retry after it waited for a
        placement): a warm slot, else the earliest slot or load of its instances, and a cold start
        when the policy's scale-out rule says so. False when it has no instance and none could be
        placed: it waits for a placement (`awaiting`)."""
        heappop = heapq.heappop
        t = self.t_list[i]
        tc = self.cfg.target_concurrency
        insts = self.fn_instances[f]
        loading = 0
        queued = 1  # this request
        waiting = self.awaiting.get(f)
        in_flight = 1 + (len(waiting) if waiting else 0)
        for inst in insts:
            ends = inst.ends
            while ends and ends[0] <= now:
                heappop(ends)
            waits = inst.waits
            while waits and waits[0] <= now:
                heappop(waits)
            in_flight += len(ends) + len(waits)
            inst.outstanding = len(ends)
            if inst.ready_s <= now:
                inst.state = "ready"
            else:
                inst.state = "loading"
                loading += 1
                queued += len(ends)
        chosen = pick_warm(insts, tc)
        is_cold = now > t  # it waited for a placement
        if chosen is not None:
            start = now
        else:
            # Queue on the instance whose slot (or load) frees first.
            start = math.inf
            for inst in insts:
                ends = inst.ends
                s = inst.ready_s if len(ends) < tc else max(ends[0], inst.ready_s)
                if s < start:
                    start, chosen = s, inst
            cs = self.cold_s[f]
            if self.should_start(instances=len(insts), loading=loading, waiting=queued, in_flight=in_flight,
                                 target_concurrency=tc, max_instances=self.cfg.max_instances,
                                 predicted_wait_s=start - now, prefill_s=self.prefill_req[i],
                                 ttft_slo_s=self.slo_s[f], cold_start_s=0.0 if cs is None else cs):
                new = self._cold_start(f, now)
                if new is not None and new.ready_s < start:
                    chosen, start = new, new.ready_s
            if chosen is None:
                return False
            is_cold = is_cold or chosen.ready_s > t
            if start < now:
                start = now
        self._serve(i, f, chosen, start, is_cold)
        return True

    def _serve(self, i: int, f: int, chosen: SimInstance, start: float, is_cold: bool) -> None:
        """Request `i` holds a slot of `chosen` from `start`: its startup, SLO and GPU energy."""
        t = self.t_list[i]
        slo = self.slo_s[f]
        serving = self.serving
        if serving is None:
            pf, end, pw, dw = self.prefill_req[i], start + self.exec_req[i], _PREFILL_W, _DECODE_W
        else:  # batching and the governor (ember sim --energy)
            batch = 1
            for e in chosen.ends:
                if e > start:
                    batch += 1
            c = serving.cost(self.prefill_req[i], self.step_fn[f], self.out_tok[i], batch, start - t, slo)
            pf, end, pw, dw = c.prefill_s, start + c.held_s, c.prefill_w, c.decode_w
            self.tokens += self.out_tok[i]
        ends = chosen.ends
        if len(ends) < self.cfg.target_concurrency:
            heapq.heappush(ends, end)
        else:  # it takes the slot the earliest of them frees (`start`): that one is in flight until then
            heapq.heapreplace(ends, end)
            heapq.heappush(chosen.waits, start)
        if end > chosen.last_used_s:
            chosen.last_used_s = end
        chosen.device.node.version += 1
        st = start - t
        self.startup[i] = st
        self.cold[i] = is_cold
        self.met[i] = st + pf <= slo
        # Energy: charge the part of [start, end] this GPU was not already busy for.
        dev = chosen.device
        bu = dev.busy_until
        if start >= bu:
            dev.extra_j += _WARM_W * min(gpu_model.WARM_IDLE_S, start - bu) if bu > 0 else 0.0
            from_s = start
        else:
            from_s = bu
        if end > from_s:
            pf_end = start + pf
            cov_pf = pf_end - from_s if pf_end > from_s else 0.0
            dev.extra_j += pw * cov_pf + dw * (end - from_s - cov_pf)
            dev.busy_until = end

    def _request_costs(self) -> tuple[list[float], list[float]]:
        """Per request: prefill seconds and seconds holding a slot (prefill + decode), from the
        trace's token counts when it has them, else the config's."""
        fns = self.trace.function_idx
        if self.trace.prompt_tokens is None or self.trace.output_tokens is None:
            pf = np.asarray(self.prefill_s)[fns]
            ex = np.asarray(self.exec_s)[fns]
            return pf.tolist(), ex.tolist()
        params_b = np.asarray(self.nbytes, dtype=np.float64)[fns] / 2e9
        pf = self.trace.prompt_tokens * np.array([gpu_model.prefill_full_clock_s(1, 1.0)]) * params_b
        step = np.array([gpu_model.decode_step_full_clock_s(1.0)]) * params_b
        return pf.tolist(), (pf + self.trace.output_tokens * step).tolist()
