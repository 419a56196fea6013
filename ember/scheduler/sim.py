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
  decode time from the energy model's H100 cost model; more requests wait in the gateway's
  queue (below).
- GPU power follows ember.energy.simulated (the calibrated SimulatedGpu): every GPU draws idle
  power for the whole run, 110 W for a second after work and while loading, prefill/decode
  power while serving; overlapping requests on one GPU are charged once (they share it), which
  is what makes packing onto awake GPUs save energy. Interference between co-located
  instances is not modelled (optimistic for packing).
Startup of an invocation = arrival until an instance is ready to serve it (queueing included).
Counted separately: `cold_starts` = loads (instances started), `invocations_waiting_on_load` =
invocations that waited on a loading instance (`p99_cold_startup_s` is over those).

The engine (`_Simulation`) keeps only the clock and the event queue; the cluster state is a
`MemCluster` (memcluster.py), the in-memory twin of the live `RedisCluster`.
What the gateway does to it (cold starts, evictions, autoscaling, prefetches) is
`ControlPlane` (simcontrol.py); how its requests wait and when they scale a function out is
`GatewayWaits` (simwait.py, the twin of `Invoker.acquire`), the engine's base classes. Events:
arrivals (the trace), autoscaler steps every `autoscaler_interval_s` (the gateway's default, 1 s),
and the wake-ups of each function's waiting head (a slot frees, a load ends, its timeout).

Scale-out as live: only the head of a function's queue evaluates `routing.should_start_estimated`
(the gateway's own call), with at most one cold start of its own in flight, on estimates the
gateway has: instance states and claim times, the queue's length, and EWMAs learned when requests
end (time holding a slot, prefill) and when loads end (claim to ready). What remains approximate:
- the head's 1 s timeout is simulated only when it can change the decision: a request joined the
  queue since the head last woke, or its last placement found no room (the other inputs change
  only at wake-ups, except when `ember sim --fleet` drains a node, and the passing time only
  shortens the estimated wait on loading instances, which never turns a "no" into a "yes");
- one gateway: live, each gateway has its own queues, heads and EWMAs;
- no `slo_timeout_s`: a request waits until served (at most `DRAIN_LIMIT_S` past the trace's
  end, else it counts as never served); live it gets a 503 after 30 s;
- a request holds its slot for exactly its modelled prefill and decode, and the prefill learned
  is that prefill (live: the worker's ttft_s; network and streaming add to both); the cold start
  learned runs from the claim to ready (live: from the worker's load request, a round trip later).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from heapq import heappop, heappush

import numpy as np

from ember.energy import simulated as gpu_model
from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler, ScalingSpec, takes_prefetches
from ember.scheduler.caching import slo_aware_cache
from ember.scheduler.demand import DemandMeter
from ember.scheduler.memcluster import MemCluster
from ember.scheduler.policies import POLICY_NAMES, get_policy
from ember.scheduler.routing import pick_warm
from ember.scheduler.serving import ServingModel
from ember.scheduler.simconfig import SimConfig, SimResult, build_trace, function_kv_bytes
from ember.scheduler.simrecords import SimDevice, SimInstance, SimNode, refresh
from ember.scheduler.simwait import GatewayWaits
from ember.scheduler.trace import Trace
from ember.scheduler.view import PlacementPolicy

__all__ = ["SimConfig", "SimResult", "run_simulation", "simulate_policy", "build_trace"]

DRAIN_LIMIT_S = 3600.0  # past the trace's end, requests still waiting are served for this long at most


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
class _Simulation(GatewayWaits):
    """The event engine: arrivals, the autoscaler's ticks and load ends over a `MemCluster`
    (the in-memory `ClusterView` the policies read). It differs from the live gateway in its
    clock, its event queue and that in-memory view, and in what the module docstring lists as
    approximate; every decision is a shared function."""

    def __init__(self, cfg: SimConfig, trace: Trace, policy: PlacementPolicy, autoscaler: Autoscaler,
                 serving: ServingModel | None = None) -> None:
        self.cfg = cfg
        self.serving = serving
        # DRAM prefetches at all (cfg.prefetch); per function, its spec says whether its policy
        # takes them (`takes_prefetches`, as the gateway's `scaling_spec`)
        self.prefetch = cfg.prefetch
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
                           target_concurrency=cfg.target_concurrency, ttft_slo_s=self.slo_s[i],
                           prefetch=takes_prefetches(policy), slo_aware_cache=slo_aware_cache(policy))
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
        self.changing: set[SimInstance] = set()
        self.loads_ending: list[list[tuple[float, float]]] = [[] for _ in range(nf)]
        self.warm_w = gpu_model.WARM_IDLE_POWER_W - gpu_model.IDLE_POWER_W
        self.pre_w = gpu_model.phase_power_w("prefill") - gpu_model.IDLE_POWER_W
        self.dec_w = gpu_model.phase_power_w("decode") - gpu_model.IDLE_POWER_W
        self.pending_prefetch: list[tuple[float, int, str, str, int]] = []
        self.prefetches = 0
        self.decisions = 0
        self.decision_s = 0.0
        self.unplaced = 0
        self.evictions = 0
        self.loads = 0
        self.tier_loads: dict[str, int] = {"gpu": 0, "dram": 0, "ssd": 0, "remote": 0}
        self.peak_instances = 0

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
    def start_run(self) -> None:
        """The run's state at time 0 (`run` calls it; tests drive the engine from here)."""
        n = len(self.trace)
        self.startup = np.zeros(n, dtype=np.float64)
        self.cold = np.zeros(n, dtype=bool)
        self.met = np.zeros(n, dtype=bool)
        self.counts: dict[int, int] = {}
        self.demand = DemandMeter(now=0.0)  # the gateway's meter, at the simulation's clock
        self.next_step = self.cfg.autoscaler_interval_s
        self.t_list: list[float] = self.trace.arrival_s.tolist()
        self.prefill_req, self.exec_req = self._request_costs()
        self.tokens = 0
        if self.serving is not None:
            self.step_fn = [gpu_model.decode_step_full_clock_s(b / 2e9) for b in self.nbytes]
            self.out_tok = (self.trace.output_tokens.tolist() if self.trace.output_tokens is not None
                            else [self.cfg.output_tokens] * n)
        self._init_waits(len(self.names))

    def run(self, progress: Callable[[str, float], None] | None) -> SimResult:
        wall0 = time.perf_counter()
        cfg = self.cfg
        cluster = self.cluster
        n = len(self.trace)
        self.start_run()
        tc = cfg.target_concurrency
        fn_instances = self.fn_instances
        queues, wakes, counts = self.queues, self.wakes, self.counts
        report_every = max(1, n // 50)
        t_list = self.t_list
        f_list = self.trace.function_idx.tolist()
        pending_loads = cluster.pending_loads
        for i in range(n):
            t = t_list[i]
            f = f_list[i]
            if t >= self.next_step or (wakes and wakes[0][0] <= t):
                self._run_events(t)
            if pending_loads and pending_loads[0][0] <= t:
                cluster.advance(t)
            else:
                cluster.now = t
            counts[f] = counts.get(f, 0) + 1
            chosen = None
            if f not in queues:  # others wait: never jump the queue
                insts = fn_instances[f]
                refresh(insts, t)
                chosen = pick_warm(insts, tc)
            if chosen is None:
                self._join(i, f, t)
            else:
                self._serve(i, chosen, t)
            if progress is not None and i % report_every == 0:
                progress(self.policy.name, i / n)
        limit = self.trace.duration_s + DRAIN_LIMIT_S
        self._run_events(limit, drain=True)
        for q in self.queues.values():  # never served: counted with what they waited at least
            for i in q:
                self.unplaced += 1
                self.startup[i] = limit - t_list[i]
                self.cold[i] = True
        cluster.advance(max(cluster.now, self.trace.duration_s))
        return self._result(wall0, progress)

    def _run_events(self, until: float, drain: bool = False) -> None:
        """Autoscaler steps and the waiting heads' wake-ups due by `until`, in time order (with
        `drain`: only while requests wait)."""
        wakes, wake_at, cluster = self.wakes, self.wake_at, self.cluster
        interval = self.cfg.autoscaler_interval_s
        while not drain or self.queues:
            w = wakes[0][0] if wakes else math.inf
            if self.next_step <= until and self.next_step <= w:
                cluster.advance(self.next_step)
                self._autoscale(self.demand, self.counts)
                self.next_step += interval
            elif w <= until:
                at, f = heappop(wakes)
                if wake_at.get(f) == at:
                    cluster.advance(max(at, cluster.now))
                    self._wake(f, cluster.now)
            else:
                break

    def _serve(self, i: int, inst: SimInstance, start: float) -> None:
        """Request `i` takes a slot of `inst` at `start`: its startup, SLO and energy are counted,
        and what the gateway learns when it ends is recorded for then."""
        t = self.t_list[i]
        f = inst.fn
        if self.serving is None:
            pf, held = self.prefill_req[i], self.exec_req[i]
            pw, dw = self.pre_w, self.dec_w
        else:  # batching and the governor (ember sim --energy)
            batch = 1 + sum(1 for e in inst.ends if e > start)
            c = self.serving.cost(self.prefill_req[i], self.step_fn[f], self.out_tok[i], batch, start - t,
                                  self.slo_s[f])
            pf, held, pw, dw = c.prefill_s, c.held_s, c.prefill_w, c.decode_w
            self.tokens += self.out_tok[i]
        end = start + held
        heappush(inst.ends, end)
        self.changing.add(inst)
        inst.outstanding = len(inst.ends)
        if end > inst.last_used_s:
            inst.last_used_s = end
        dev = inst.device
        dev.node.version += 1
        st = start - t
        self.startup[i] = st
        self.cold[i] = inst.ready_s > t
        self.met[i] = st + pf <= self.slo_s[f]
        self._request_ended_later(f, end, held, pf, start)
        # Energy: charge the part of [start, end] this GPU was not already busy for.
        bu = dev.busy_until
        if start >= bu:
            dev.extra_j += self.warm_w * min(gpu_model.WARM_IDLE_S, start - bu) if bu > 0 else 0.0
            from_s = start
        else:
            from_s = bu
        if end > from_s:
            pf_end = start + pf
            cov_pf = pf_end - from_s if pf_end > from_s else 0.0
            dev.extra_j += pw * cov_pf + dw * (end - from_s - cov_pf)
            dev.busy_until = end

    def _result(self, wall0: float, progress: Callable[[str, float], None] | None) -> SimResult:
        duration = self.trace.duration_s
        energy = gpu_model.IDLE_POWER_W * len(self.devices) * duration
        for dev in self.devices:
            energy += dev.extra_j
            if dev.busy_until > 0:
                energy += self.warm_w * max(0.0, min(gpu_model.WARM_IDLE_S, duration - dev.busy_until))
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
