"""The load model of `ember energy sim`: the simulated functions and the run's scenario
(`SimFunction`, `SimConfig`), and one device advanced by one interval.

Per device, fluid per `interval_s` with per-request sampling: Poisson arrivals with a diurnal
rate (trough 04:00, peak 16:00) and random bursts; lognormal prompt and output lengths. Prefill
is compute-bound and served first (M/G/1 queueing); decode runs as continuous batches per
function (Little's law gives the batch); functions sharing a GPU time-slice it. Busy time and
energy come from SimulatedGpu (calibration table), idle time is paid at 70/110 W for every
controller. Latencies get 5% lognormal noise, drawn identically for every controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ember.energy.simulated import (
    SimulatedGpu,
    decode_step_full_clock_s,
    phase_time_factor,
    prefill_full_clock_s,
)
from ember.errors import ConfigError

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
class _DeviceState:
    gpu: SimulatedGpu
    functions: tuple[SimFunction, ...]
    carry_tokens: float = 0.0
    backlog_s: float = 0.0


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
