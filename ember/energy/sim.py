"""`ember energy sim`: simulated H100s under a diurnal, bursty load of several functions with
different SLOs, comparing power controllers in one run on the same arrivals.

Controllers:
- `max_power`: the GPU's default governor (700 W, clocks unlocked);
- `zeus_static`: Zeus-style: profile power limits once at the start (each limit for a few
  intervals, from the top), keep the one with the lowest ZeusCost (eta 0.5) per device; then,
  with the same clock knob Ember has, profile static SM clock locks at that limit and keep the best;
- `ember`: NodeEnergyAgent in `actuate` mode (the real PowerLimitController, SLO feedback,
  clock locking, re-profiling on mix change) with `phase_clocks`: the simulated engine runs each
  interval's prefills at the controller's prefill clock and decode at the device's lock, as live
  workers' engines do (the switch itself is taken as free);
- `ember_one_clock`: the same with one clock per device (an engine that cannot switch per phase).

Load model (per device, fluid per `interval_s` with per-request sampling): Poisson arrivals with
a diurnal rate (trough 04:00, peak 16:00) and random bursts; lognormal prompt and output
lengths. Prefill is compute-bound and served first (M/G/1 queueing); decode runs as continuous
batches per function (Little's law gives the batch); functions sharing a GPU time-slice it.
Busy time and energy come from SimulatedGpu (calibration table), idle time is paid at 70/110 W
for every controller. Latencies get 5% lognormal noise, drawn identically for every controller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ember.energy.agent import NodeEnergyAgent
from ember.energy.simulated import (
    SimulatedGpu,
    decode_step_full_clock_s,
    phase_time_factor,
    prefill_full_clock_s,
)
from ember.errors import ConfigError

CONTROLLERS = ("max_power", "zeus_static", "ember", "ember_one_clock")
_DEVICE_LOCK = object()  # prefill runs under the device's own clock lock


@dataclass(frozen=True)
class SimFunction:
    """A function in the simulation: model size, request shape, SLOs, load."""

    name: str
    params_b: float
    prompt_tokens: int  # median
    output_tokens: int  # median
    ttft_slo_s: float
    tpot_slo_s: float
    peak_rps: float  # arrivals per second at the diurnal peak
    eta: float = 0.5


@dataclass(frozen=True)
class SimConfig:
    hours: float = 24.0
    seed: int = 0
    interval_s: float = 5.0
    start_hour: float = 0.0
    functions: tuple[SimFunction, ...] = (
        SimFunction("chat-8b", 8, 800, 250, ttft_slo_s=1.0, tpot_slo_s=0.040, peak_rps=3.0),
        SimFunction("code-13b", 13, 2000, 300, ttft_slo_s=2.0, tpot_slo_s=0.060, peak_rps=1.2),
        SimFunction("summarize-8b", 8, 4000, 150, ttft_slo_s=3.0, tpot_slo_s=0.050, peak_rps=0.8, eta=0.8),
        SimFunction("agent-8b", 8, 1200, 120, ttft_slo_s=1.2, tpot_slo_s=0.035, peak_rps=2.0),
    )
    # device -> functions it serves
    placement: tuple[tuple[str, ...], ...] = (
        ("chat-8b",),
        ("code-13b",),
        ("summarize-8b", "chat-8b"),
        ("agent-8b", "summarize-8b"),
    )
    trough_fraction: float = 0.3  # rate at the trough relative to the peak
    bursts_per_hour: float = 0.5
    burst_factor: tuple[float, float] = (1.3, 1.8)
    burst_minutes: tuple[float, float] = (2.0, 10.0)
    timeline_bucket_s: float = 300.0

    def __post_init__(self) -> None:
        """ConfigError naming the first impossible field (an empty or NaN run reports nothing true)."""
        for name in ("hours", "interval_s", "timeline_bucket_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"energy sim: {name} must be a finite number > 0, got {getattr(self, name)}")
        if self.hours * 3600 < self.interval_s:
            raise ConfigError(f"energy sim: hours ({self.hours}) is shorter than one interval ({self.interval_s} s)")
        if not math.isfinite(self.start_hour) or self.seed < 0 or not 0 <= self.trough_fraction <= 1:
            raise ConfigError("energy sim: start_hour must be finite, seed >= 0, trough_fraction in [0, 1]")
        known = {f.name for f in self.functions}
        if unknown := {n for names in self.placement for n in names} - known:
            raise ConfigError(f"energy sim: placement names unknown functions {sorted(unknown)}")


@dataclass
class ControllerResult:
    energy_j: float = 0.0
    slo_attainment: float = 0.0
    p99_ttft_s: float = 0.0
    p99_tpot_s: float = 0.0
    requests: int = 0
    functions: dict[str, dict[str, float]] = field(default_factory=dict)
    timeline_power_w: list[float] = field(default_factory=list)
    timeline_attainment: list[float] = field(default_factory=list)
    decisions: int = 0


def run_energy_sim(
    config: SimConfig | None = None,
    controllers: tuple[str, ...] = CONTROLLERS,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, object]:
    """Run every controller on the same load; returns the JSON-able result."""
    config = config or SimConfig()
    results: dict[str, ControllerResult] = {}
    for name in controllers:
        results[name] = _run_one(config, name, progress)
    out: dict[str, object] = {
        "controllers": {
            name: {
                "energy_j": round(r.energy_j, 1),
                "slo_attainment": round(r.slo_attainment, 5),
                "p99_ttft_s": round(r.p99_ttft_s, 4),
                "p99_tpot_s": round(r.p99_tpot_s, 5),
                "requests": r.requests,
                "decisions": r.decisions,
                "functions": r.functions,
            }
            for name, r in results.items()
        },
        "config": {
            "hours": config.hours,
            "seed": config.seed,
            "interval_s": config.interval_s,
            "devices": len(config.placement),
            "placement": [list(p) for p in config.placement],
            "functions": [asdict(f) for f in config.functions],
        },
        "timeline": {
            "bucket_s": config.timeline_bucket_s,
            **{
                name: {"power_w": r.timeline_power_w, "slo_attainment": r.timeline_attainment}
                for name, r in results.items()
            },
        },
    }
    if "max_power" in results:
        base = results["max_power"].energy_j
        out["savings_vs_max_power"] = {
            name: round(1 - r.energy_j / base, 4) if base else 0.0 for name, r in results.items()
        }
    return out


def plot_energy_sim(result: dict[str, object], png_path: str) -> None:
    """Power and SLO attainment over time, one line per controller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    assert isinstance(timeline, dict)
    bucket_h = float(timeline["bucket_s"]) / 3600.0
    fig, (ax_p, ax_s) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name, series in timeline.items():
        if name == "bucket_s":
            continue
        hours = [i * bucket_h for i in range(len(series["power_w"]))]
        ax_p.plot(hours, series["power_w"], label=name, lw=1)
        ax_s.plot(hours, series["slo_attainment"], label=name, lw=1)
    ax_p.set_ylabel("cluster power (W)")
    ax_p.legend(loc="upper left")
    ax_s.set_ylabel("SLO attainment")
    ax_s.set_xlabel("hour")
    lowest = min(
        (min(v["slo_attainment"], default=1.0) for k, v in timeline.items() if k != "bucket_s"), default=1.0
    )
    ax_s.set_ylim(min(0.98, lowest - 0.002), 1.001)
    controllers = result["controllers"]
    assert isinstance(controllers, dict)
    ax_p.set_title(
        "  ".join(
            f"{n}: {c['energy_j'] / 3.6e6:.2f} kWh, {c['slo_attainment']:.5f}" for n, c in controllers.items()
        ),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# --- one controller -------------------------------------------------------------------------
@dataclass
class _DeviceState:
    gpu: SimulatedGpu
    functions: tuple[SimFunction, ...]
    carry_tokens: float = 0.0
    backlog_s: float = 0.0


def _run_one(
    config: SimConfig, controller: str, progress: Callable[[str, float], None] | None
) -> ControllerResult:
    by_name = {f.name: f for f in config.functions}
    devices = [
        _DeviceState(SimulatedGpu(f"sim:{i}"), tuple(by_name[n] for n in names))
        for i, names in enumerate(config.placement)
    ]
    load_rng = np.random.default_rng(config.seed)
    noise_rng = np.random.default_rng(config.seed + 1_000_003)
    bursts = _bursts(config, np.random.default_rng(config.seed + 7))
    agent = None
    zeus = None
    if controller == "ember":
        # the simulated engine switches the SM clock per phase as the controller asks (as live workers do)
        agent = NodeEnergyAgent("sim", [d.gpu for d in devices], mode="actuate", phase_clocks=True)
    elif controller == "ember_one_clock":  # one clock per device (an engine without per-phase switching)
        agent = NodeEnergyAgent("sim", [d.gpu for d in devices], mode="actuate", phase_clocks=False)
    elif controller == "zeus_static":
        zeus = _ZeusStatic([d.gpu for d in devices], config.interval_s)
    elif controller != "max_power":
        raise ValueError(f"unknown controller {controller!r}")

    steps = int(round(config.hours * 3600 / config.interval_s))
    ttfts: list[np.ndarray] = []
    tpots: list[np.ndarray] = []
    met_all: list[np.ndarray] = []
    per_fn: dict[str, list[int]] = {f.name: [0, 0] for f in config.functions}
    bucket_steps = max(1, int(round(config.timeline_bucket_s / config.interval_s)))
    bucket_e0 = sum(d.gpu.energy_j() for d in devices)
    bucket_met = bucket_n = 0
    result = ControllerResult()
    for step in range(steps):
        t_s = step * config.interval_s
        hour = config.start_hour + t_s / 3600.0
        for dev in devices:
            prefill_lock: object = _DEVICE_LOCK
            if agent is not None:
                ctrl = agent.controllers[dev.gpu.device_id]
                if ctrl.mode == "actuate" and ctrl.phase_clocks:
                    prefill_lock = ctrl.setting.prefill_sm_clock_mhz
            records = _simulate_interval(config, dev, hour, bursts, load_rng, noise_rng, prefill_lock)
            for fn, _prompt, output, ttft, tpot in records:
                met = (ttft <= fn.ttft_slo_s) & (tpot <= fn.tpot_slo_s)
                ttfts.append(ttft)
                tpots.append(tpot)
                met_all.append(met)
                per_fn[fn.name][0] += int(met.sum())
                per_fn[fn.name][1] += len(met)
                bucket_met += int(met.sum())
                bucket_n += len(met)
                if agent is not None:
                    for i in range(len(output)):
                        agent.record_request(
                            fn.name,
                            dev.gpu.device_id,
                            int(output[i]),
                            float(ttft[i]),
                            float(tpot[i]),
                            fn.ttft_slo_s,
                            fn.tpot_slo_s,
                            fn.eta,
                        )
                if zeus is not None:
                    zeus.observe(dev.gpu.device_id, output, ttft, tpot)
        if agent is not None:
            _, decisions = agent.tick()
            result.decisions += len(decisions)
        if zeus is not None:
            result.decisions += zeus.step()
        if (step + 1) % bucket_steps == 0 or step == steps - 1:
            e1 = sum(d.gpu.energy_j() for d in devices)
            n_steps = (step % bucket_steps) + 1
            result.timeline_power_w.append(round((e1 - bucket_e0) / (n_steps * config.interval_s), 1))
            result.timeline_attainment.append(round(bucket_met / bucket_n, 5) if bucket_n else 1.0)
            bucket_e0, bucket_met, bucket_n = e1, 0, 0
        if progress is not None and step % 200 == 0:
            progress(controller, step / steps)
    if progress is not None:
        progress(controller, 1.0)
    result.energy_j = sum(d.gpu.energy_j() for d in devices)
    if met_all:
        met = np.concatenate(met_all)
        result.requests = int(len(met))
        result.slo_attainment = float(met.mean())
        result.p99_ttft_s = float(np.quantile(np.concatenate(ttfts), 0.99))
        result.p99_tpot_s = float(np.quantile(np.concatenate(tpots), 0.99))
    else:
        result.slo_attainment = 1.0
    result.functions = {
        name: {"requests": n, "slo_attainment": round(m / n, 5) if n else 1.0}
        for name, (m, n) in per_fn.items()
    }
    return result


def _rate_rps(
    config: SimConfig, fn: SimFunction, hour: float, bursts: dict[str, list[tuple[float, float, float]]]
) -> float:
    """Diurnal rate with a trough at 04:00 and a peak at 16:00, times any burst in progress."""
    day = 0.5 - 0.5 * math.cos(2 * math.pi * ((hour - 4.0) % 24.0) / 24.0)
    rate = fn.peak_rps * (config.trough_fraction + (1 - config.trough_fraction) * day)
    for start_h, end_h, factor in bursts.get(fn.name, ()):
        if start_h <= hour < end_h:
            rate *= factor
    return rate


def _bursts(config: SimConfig, rng: np.random.Generator) -> dict[str, list[tuple[float, float, float]]]:
    out: dict[str, list[tuple[float, float, float]]] = {}
    n = rng.poisson(config.bursts_per_hour * config.hours)
    for _ in range(n):
        fn = config.functions[int(rng.integers(len(config.functions)))]
        start = config.start_hour + float(rng.uniform(0, config.hours))
        length_h = float(rng.uniform(*config.burst_minutes)) / 60.0
        out.setdefault(fn.name, []).append(
            (start, start + length_h, float(rng.uniform(*config.burst_factor)))
        )
    return out


def _simulate_interval(
    config: SimConfig,
    dev: _DeviceState,
    hour: float,
    bursts: dict[str, list[tuple[float, float, float]]],
    load_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    prefill_lock_mhz: object = None,
) -> list[tuple[SimFunction, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Advance one device by one interval; returns (function, prompts, outputs, ttft_s, tpot_s)
    per function. `prefill_lock_mhz`: the SM clock the engine switches to while a prefill runs
    (None: unlocked), or `_DEVICE_LOCK` (the default): prefill runs under the device's lock."""
    dt = config.interval_s
    gpu = dev.gpu
    limit_w, lock = gpu.power_limit_w(), gpu.locked_sm_clock_mhz()
    if prefill_lock_mhz is _DEVICE_LOCK:
        prefill_lock_mhz = lock
    assert prefill_lock_mhz is None or isinstance(prefill_lock_mhz, float | int)
    fac_p = phase_time_factor("prefill", limit_w, prefill_lock_mhz)
    fac_d = phase_time_factor("decode", limit_w, lock)

    arrivals = []
    for fn in dev.functions:
        k = int(load_rng.poisson(_rate_rps(config, fn, hour, bursts) * dt))
        prompt = np.maximum(16, load_rng.lognormal(math.log(fn.prompt_tokens), 0.5, k)).astype(np.int64)
        output = np.maximum(4, load_rng.lognormal(math.log(fn.output_tokens), 0.5, k)).astype(np.int64)
        arrivals.append((fn, prompt, output))

    # prefill: M/G/1, served before decode
    service = [prompt * prefill_full_clock_s(1, fn.params_b) * fac_p for fn, prompt, _ in arrivals]
    all_service = np.concatenate(service) if service else np.zeros(0)
    prefill_busy_s = float(all_service.sum()) + dev.backlog_s
    u_p = prefill_busy_s / dt
    lam = len(all_service) / dt
    rho = min(u_p, 0.95)
    wq_s = lam * float((all_service**2).mean()) / (2 * (1 - rho)) if len(all_service) else 0.0
    dev.backlog_s = max(0.0, prefill_busy_s - 0.95 * dt)

    # decode: the device's functions share one base model size and decode in one continuous
    # batch (e.g. adapters of one model); prefill steals time from it
    params_b = dev.functions[0].params_b
    rate_tps = (float(sum(float(o.sum()) for _, _, o in arrivals)) + dev.carry_tokens) / dt
    free = max(0.05, 1.0 - min(u_p, 0.95))
    batch = 1.0
    tpot_s = decode_step_full_clock_s(params_b) * fac_d / free
    for _ in range(8):
        step_s = decode_step_full_clock_s(params_b, batch) * fac_d
        tpot_s = step_s / free
        # sequences in flight ~ Poisson(rate * tpot): busy when >= 1, batch = mean given busy
        in_flight = rate_tps * tpot_s
        busy_p = -math.expm1(-in_flight) if in_flight > 0 else 0.0
        batch = in_flight / busy_p if busy_p > 1e-9 else 1.0
    full_step_s = decode_step_full_clock_s(params_b, batch)
    tokens = rate_tps * dt
    u_d = tokens / batch * full_step_s * fac_d / dt
    room = max(0.0, 1.0 - min(u_p, 1.0))
    served = 1.0 if u_d <= room else room / u_d
    decode_full_s = tokens * served / batch * full_step_s
    dev.carry_tokens = tokens * (1 - served)
    if served < 1.0:  # overloaded: queued tokens wait a whole interval
        tpot_s *= 1.0 + (1 - served) * dt / max(tpot_s * batch, 1e-3)

    # energy: busy phases on the simulated GPU, the rest idle (paid by every controller)
    if prefill_lock_mhz != lock:
        gpu.lock_sm_clock_mhz(prefill_lock_mhz)  # the engine's per-phase switch
    busy = gpu.run("prefill", min(prefill_busy_s, dt) / fac_p)
    if prefill_lock_mhz != lock:
        gpu.lock_sm_clock_mhz(lock)
    busy += gpu.run("decode", decode_full_s)
    gaps = max(1, int(len(all_service) * max(0.0, 1 - busy / dt)))
    gpu.idle(max(0.0, dt - busy), gaps=gaps)

    out = []
    for (fn, prompt, output), svc in zip(arrivals, service, strict=True):
        k = len(prompt)
        if k == 0:
            continue
        queued = noise_rng.random(k) < rho
        wait = np.where(queued, noise_rng.exponential(wq_s / rho if rho > 0 else 0.0, k), 0.0)
        wait += dev.backlog_s + noise_rng.random(k) * decode_step_full_clock_s(params_b, batch) * fac_d
        ttft = (wait + svc) * noise_rng.lognormal(0.0, 0.05, k)
        tp = tpot_s * noise_rng.lognormal(0.0, 0.05, k)
        out.append((fn, prompt, output, ttft, tp))
    return out


class _ZeusStatic:
    """Zeus's power-limit optimizer, run once: each limit from the top for `windows_per_limit`
    intervals, the lowest ZeusCost (eta 0.5, per device) kept; then, with the same clock knob
    Ember gets, each static SM clock lock (from the top) at that limit, the lowest cost kept for
    the rest of the run. (Zeus itself profiles power limits only:
    github.com/ml-energy/zeus, `zeus.optimizer.power_limit.GlobalPowerLimitOptimizer`.)"""

    CLOCKS_MHZ = (None, 1800.0, 1600.0, 1400.0, 1200.0, 1000.0)  # None: unlocked

    def __init__(
        self, gpus: list[SimulatedGpu], interval_s: float, windows_per_limit: int = 6, eta: float = 0.5
    ) -> None:
        self.gpus = {g.device_id: g for g in gpus}
        self.eta = eta
        self.windows_per_limit = windows_per_limit
        lo, hi = gpus[0].power_limit_range_w()
        self.limits = [float(w) for w in np.arange(hi, lo - 1, -50.0)]
        self.index = 0
        self.windows = 0
        self.done = False
        self.marks = {d: g.energy_j() for d, g in self.gpus.items()}
        self.tokens: dict[str, float] = dict.fromkeys(self.gpus, 0.0)
        self.latency: dict[str, float] = dict.fromkeys(self.gpus, 0.0)
        self.profile: dict[str, dict[float, list[float]]] = {d: {} for d in self.gpus}
        self.clock_index = -1  # -1: still sweeping limits
        self.clock_profile: dict[str, dict[float | None, float]] = {d: {} for d in self.gpus}

    def observe(self, device_id: str, output: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> None:
        if self.done:
            return
        self.tokens[device_id] += float(output.sum())
        self.latency[device_id] += float((ttft + tpot * np.maximum(output - 1, 0)).sum())

    def step(self) -> int:
        """End one interval; returns the number of setting changes made."""
        if self.done:
            return 0
        self.windows += 1
        if self.windows < self.windows_per_limit:
            return 0
        sweeping_clocks = self.clock_index >= 0
        for d, g in self.gpus.items():
            energy = g.energy_j() - self.marks[d]
            self.marks[d] = g.energy_j()
            if self.tokens[d] > 0:
                j_tok = energy / self.tokens[d]
                s_tok = self.latency[d] / self.tokens[d]
                cost = self.eta * j_tok + (1 - self.eta) * g.power_limit_range_w()[1] * s_tok
                if sweeping_clocks:
                    self.clock_profile[d][self.CLOCKS_MHZ[self.clock_index]] = cost
                else:
                    self.profile[d][self.limits[self.index]] = [cost]
            self.tokens[d] = self.latency[d] = 0.0
        self.windows = 0
        if sweeping_clocks:
            return self._next_clock()
        self.index += 1
        if self.index < len(self.limits):
            for g in self.gpus.values():
                g.set_power_limit_w(self.limits[self.index])
            return len(self.gpus)
        for d, g in self.gpus.items():
            costs = self.profile[d]
            best = min(costs, key=lambda w: costs[w][0]) if costs else g.default_power_limit_w()
            g.set_power_limit_w(best)
            if costs:
                self.clock_profile[d][None] = costs[best][0]  # unlocked at the best limit: profiled already
        self.clock_index = 0
        return self._next_clock()

    def _next_clock(self) -> int:
        """Lock the next static clock to profile; after the last, keep the cheapest per device."""
        self.clock_index += 1
        if self.clock_index < len(self.CLOCKS_MHZ):
            for g in self.gpus.values():
                g.lock_sm_clock_mhz(self.CLOCKS_MHZ[self.clock_index])
            return len(self.gpus)
        self.done = True
        for d, g in self.gpus.items():
            costs = self.clock_profile[d]
            g.lock_sm_clock_mhz(min(costs, key=lambda c: costs[c]) if costs else None)
        return len(self.gpus)
