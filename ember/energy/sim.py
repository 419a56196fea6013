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

The load model (functions, scenario, one device's interval) is ember/energy/simload.py; the
`zeus_static` baseline is ember/energy/zeus_static.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ember.energy.agent import NodeEnergyAgent
from ember.energy.simload import (
    _DEVICE_LOCK,
    SimConfig,
    _bursts,
    _DeviceState,
    _simulate_interval,
)
from ember.energy.simulated import SimulatedGpu
from ember.energy.zeus_static import _ZeusStatic

__all__ = ["CONTROLLERS", "ControllerResult", "SimConfig", "plot_energy_sim", "run_energy_sim"]

CONTROLLERS = ("max_power", "zeus_static", "ember", "ember_one_clock")


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
