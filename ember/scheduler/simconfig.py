"""The simulator's inputs and outputs: the cluster/workload config (validated), one policy's
result with the JSON fields `ember sim` writes, and the trace a config asks for."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ember.config import Settings
from ember.errors import ConfigError
from ember.loader.model import kv_bytes_per_token
from ember.scheduler.memory import claim_bytes, kv_budget_bytes
from ember.scheduler.trace import Trace, synthetic_trace

__all__ = ["GiB", "SimConfig", "SimResult", "build_trace", "function_kv_bytes", "function_model_config"]

GiB = 1 << 30
# The simulated functions' models: the published configs (Hugging Face Qwen/Qwen2.5-{0.5,1.5,3,7,14,32,
# 72}B, config.json) of a dense GQA family covering the simulated sizes, as (parameters, config fields).
MODEL_SHAPES: tuple[tuple[float, dict[str, int]], ...] = tuple(
    (params, dict(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  hidden_size=hidden))
    for params, layers, heads, kv_heads, hidden in (
        (0.49e9, 24, 14, 2, 896), (1.54e9, 28, 12, 2, 1536), (3.09e9, 36, 16, 2, 2048),
        (7.61e9, 28, 28, 4, 3584), (14.7e9, 48, 40, 8, 5120), (32.5e9, 64, 40, 8, 5120),
        (72.7e9, 80, 64, 8, 8192)))


@dataclass
class SimConfig:
    """Cluster, workload and scaling knobs. Validated by `check()` (errors name the field)."""

    nodes: int = 16
    gpus_per_node: int = 8
    functions: int = 1000
    duration_s: float = 600.0
    seed: int = 0
    rate_per_function_s: float = 0.03  # mean invocations per second per function (synthetic trace)
    gpu_memory_bytes: int = 80 * GiB
    dram_cache_bytes: int = 512 * GiB
    ssd_bytes: int = 4096 * GiB
    gpu_peer_bps: float = 200e9  # another GPU on the node already holds it (NVLink copy)
    dram_bps: float = 25e9
    ssd_bps: float = 8e9
    remote_bps: float = 1.25e9
    bandwidth_spread: float = 0.15  # true per-node bandwidths vary by this much (log-normal sigma)
    measurement_error: float = 0.3  # start-up measurement error (log-normal sigma), corrected online
    ssd_replicas: int = 2
    min_model_bytes: int = 1 * 10**9
    max_model_bytes: int = 70 * 10**9
    prompt_tokens: int = 512
    output_tokens: int = 128
    slo_base_s: float = 1.0  # TTFT SLO = slo_base_s + model bytes / slo_bytes_per_s
    slo_bytes_per_s: float = 10e9
    keep_alive_s: float = 60.0
    target_concurrency: int = 4
    max_instances: int = 8
    autoscaler_interval_s: float = Settings.model_fields["autoscaler_interval_s"].default  # the gateway's
    prefetch: bool = True
    # each instance's KV budget, by the live rule (`function_kv_bytes`); the live settings' defaults
    kv_budget_tokens: int = Settings.model_fields["kv_budget_tokens"].default
    kv_budget_bytes: int = Settings.model_fields["kv_budget_bytes"].default

    def check(self) -> SimConfig:
        """Raise ConfigError naming the first impossible field."""
        positive = ("nodes", "gpus_per_node", "functions", "duration_s", "rate_per_function_s",
                    "gpu_memory_bytes", "dram_bps", "ssd_bps", "remote_bps", "gpu_peer_bps",
                    "min_model_bytes", "max_model_bytes", "target_concurrency", "max_instances",
                    "autoscaler_interval_s", "slo_bytes_per_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"cluster config: {name} must be > 0, got {getattr(self, name)}")
        for name in ("dram_cache_bytes", "ssd_bytes", "ssd_replicas", "prompt_tokens", "output_tokens",
                     "keep_alive_s", "bandwidth_spread", "measurement_error", "slo_base_s", "kv_budget_tokens",
                     "kv_budget_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster config: {name} must be >= 0, got {getattr(self, name)}")
        if self.min_model_bytes > self.max_model_bytes:
            raise ConfigError("cluster config: min_model_bytes is larger than max_model_bytes")
        if self.max_model_bytes > self.gpu_memory_bytes:
            raise ConfigError(
                f"cluster config: max_model_bytes ({self.max_model_bytes}) does not fit gpu_memory_bytes "
                f"({self.gpu_memory_bytes}); functions spanning several GPUs are not simulated"
            )
        largest = claim_bytes(self.max_model_bytes, function_kv_bytes(self, self.max_model_bytes), False)
        if largest > self.gpu_memory_bytes:  # what deploy refuses live (ModelTooLarge)
            raise ConfigError(
                f"cluster config: kv_budget_tokens: the largest model's weights and KV budget ({largest}) do not "
                f"fit gpu_memory_bytes ({self.gpu_memory_bytes})")
        if self.ssd_replicas > self.nodes:
            raise ConfigError(f"cluster config: ssd_replicas ({self.ssd_replicas}) exceeds nodes ({self.nodes})")
        if self.ssd_replicas and self.ssd_bytes < self.max_model_bytes:
            raise ConfigError("cluster config: ssd_bytes cannot hold the largest model")
        return self


@dataclass
class SimResult:
    """One policy's outcome on one trace."""

    policy: str
    startup_s: np.ndarray
    cold: np.ndarray
    slo_met: np.ndarray
    gpu_energy_j: float
    decisions: int
    decision_s: float
    unplaced: int
    wall_s: float
    loads: int = 0  # instances loaded (cold starts)
    output_tokens: int = 0  # generated tokens served (counted with a serving model, ember sim --energy)
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int]:
        """The issue's JSON fields (plus a few diagnostics)."""
        s = self.startup_s
        cold = s[self.cold]
        return {
            "mean_startup_s": _r(float(s.mean()) if s.size else 0.0),
            "p50_startup_s": _r(float(np.percentile(s, 50)) if s.size else 0.0),
            "p99_startup_s": _r(float(np.percentile(s, 99)) if s.size else 0.0),
            "p99_cold_startup_s": _r(float(np.percentile(cold, 99)) if cold.size else 0.0),
            "slo_attainment": _r(float(self.slo_met.mean()) if s.size else 1.0, 6),
            "cold_starts": self.loads,  # loads: instances started
            "invocations_waiting_on_load": int(self.cold.sum()),  # invocations that waited on a loading instance
            "gpu_energy_kwh": _r(self.gpu_energy_j / 3.6e6, 4),
            "decisions_per_s": _r(self.decisions / self.decision_s if self.decision_s > 0 else 0.0, 1),
            "decisions": self.decisions,
            "unplaced": self.unplaced,
            "wall_s": _r(self.wall_s, 2),
            **{k: _r(v) for k, v in self.extra.items()},
        }


def function_model_config(nbytes: int) -> SimpleNamespace:
    """The architecture of a simulated function of `nbytes` weights: bf16 (`nbytes / 2` parameters),
    shaped as the `MODEL_SHAPES` model nearest in parameters (log scale)."""
    params = nbytes / 2
    _, fields = min(MODEL_SHAPES, key=lambda m: abs(math.log(m[0] / params)))
    return SimpleNamespace(**fields)


def function_kv_bytes(cfg: SimConfig, nbytes: int) -> int:
    """The KV budget each instance of a simulated function claims, by the rule live uses for a
    deployed function's spec (the worker sizes it with `kv_budget_bytes` from the model config's
    `kv_bytes_per_token`, bf16): `cfg.kv_budget_bytes` when set, else `cfg.kv_budget_tokens` tokens.
    Like live, it does not depend on target_concurrency or the requests' tokens: the default 8,192
    tokens hold target_concurrency (4) requests of the synthetic trace's 512 + 128 tokens, so KV
    admission never queues a request the simulator routes (not modelled)."""
    return kv_budget_bytes(kv_bytes_per_token(function_model_config(nbytes), 2), cfg.kv_budget_tokens,
                           cfg.kv_budget_bytes)


def build_trace(cfg: SimConfig, trace_csv: str | None = None) -> Trace:
    """The synthetic trace for `cfg`, or an Azure CSV: the Functions 2019 format (its functions
    replace cfg.functions) or the LLM inference format (token-level; cfg.functions functions)."""
    if trace_csv:
        from ember.scheduler.trace import read_trace_csv

        return read_trace_csv(trace_csv, duration_s=cfg.duration_s, seed=cfg.seed, functions=cfg.functions)
    return synthetic_trace(cfg.functions, cfg.duration_s, seed=cfg.seed, rate_per_function_s=cfg.rate_per_function_s)


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)
