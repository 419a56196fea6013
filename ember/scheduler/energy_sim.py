"""`ember sim --energy`: placement, autoscaling, batching and the GPU governor together on one
trace, for Ember against the baselines at the default governor.

Every GPU draws idle power for the whole run (consolidation leaves GPUs idle, not off); busy
GPUs draw what their governor sets (ember.scheduler.serving); requests on one instance batch,
with step time growing with the batch. Entries (the JSON `policies` map, as `ember sim`):
`ember` (Ember's placement and its energy controller, one clock per request for both phases),
`serverlessllm+max_power` and `keepalive+max_power` (those placements at the GPU's default
governor: 700 W, clocks unlocked). Each reports `gpu_energy_kwh`, `joules_per_token` (GPU
energy over generated tokens served) and `slo_attainment`, besides the `ember sim` fields, and
`gpu_energy_above_idle_kwh` (what placement and the governor can act on: the idle floor of
every GPU is the same for all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from ember.energy import simulated as gpu_model
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.policies import get_policy
from ember.scheduler.serving import ServingModel
from ember.scheduler.sim import SimConfig, SimResult, _Simulation, build_trace
from ember.scheduler.trace import Trace

__all__ = ["ENERGY_ENTRIES", "run_energy_simulation"]

# entry name -> (placement policy, governor)
ENERGY_ENTRIES: dict[str, tuple[str, str]] = {
    "ember": ("ember", "ember"),
    "serverlessllm+max_power": ("serverlessllm", "max_power"),
    "keepalive+max_power": ("keepalive", "max_power"),
}


def run_energy_simulation(cfg: SimConfig, *, trace: Trace | None = None, entries: list[str] | None = None,
                          progress: Callable[[str, float], None] | None = None) -> dict:
    """Each entry on the same trace and seed; the JSON document (plus "_results")."""
    cfg.check()
    names = entries or list(ENERGY_ENTRIES)
    trace = trace if trace is not None else build_trace(cfg)
    out: dict[str, dict] = {}
    results: dict[str, SimResult] = {}
    for name in names:
        policy_name, governor = ENERGY_ENTRIES[name]
        serving = ServingModel(governor)
        sim = _Simulation(cfg, trace, get_policy(policy_name, seed=cfg.seed), Autoscaler(), serving)
        res = sim.run(None if progress is None else (lambda _p, frac, name=name: progress(name, frac)))
        res.policy = name
        results[name] = res
        summary = res.summary()
        summary["joules_per_token"] = round(res.gpu_energy_j / res.output_tokens, 3) if res.output_tokens else 0.0
        summary["output_tokens"] = res.output_tokens
        idle_j = gpu_model.IDLE_POWER_W * len(sim.devices) * trace.duration_s  # every GPU, all run long
        summary["gpu_energy_above_idle_kwh"] = round((res.gpu_energy_j - idle_j) / 3.6e6, 4)
        summary["governor"] = governor
        total = sum(serving.clock_choices.values()) or 1
        summary["sm_clock_share"] = {f"{f:.2f}": round(c / total, 4) for f, c in sorted(serving.clock_choices.items())}
        out[name] = summary
    doc: dict = {
        "invocations": len(trace),
        "policies": out,
        "config": {**asdict(cfg), "gpus": cfg.nodes * cfg.gpus_per_node, "trace_functions": len(trace.functions),
                   "energy": True},
        "_results": results,
    }
    base = out.get("serverlessllm+max_power")
    if base and base["gpu_energy_kwh"] > 0:
        doc["savings_vs_serverlessllm+max_power"] = {
            n: round(1 - r["gpu_energy_kwh"] / base["gpu_energy_kwh"], 4) for n, r in out.items()}
    return doc
