"""The simulator books device memory as live does: a checkpoint's weights once per device, plus each
instance's KV budget, derived for a simulated function by the rule a live worker applies to a
deployed function's model config."""

from __future__ import annotations

import pytest

from ember.errors import ConfigError
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation, build_trace
from ember.scheduler.simconfig import function_kv_bytes

ONE_GPU = dict(nodes=1, gpus_per_node=1, functions=3, duration_s=60.0, seed=3, ssd_replicas=1)


def test_a_functions_kv_budget_is_the_live_rule_for_its_models_config() -> None:
    """A function of 29.4 GB of bf16 weights (14.7B parameters) has Qwen2.5-14B's shape (48 layers,
    8 KV heads of 128): 8,192 tokens (EMBER_KV_BUDGET_TOKENS' default) of K and V in bf16; a set
    EMBER_KV_BUDGET_BYTES replaces it, as on a worker."""
    cfg = SimConfig()
    assert function_kv_bytes(cfg, 29_400_000_000) == 8192 * 48 * 8 * 128 * 2 * 2
    assert function_kv_bytes(SimConfig(kv_budget_tokens=1024), 29_400_000_000) == 1024 * 48 * 8 * 128 * 2 * 2
    assert function_kv_bytes(SimConfig(kv_budget_bytes=3 * 10**9), 29_400_000_000) == 3 * 10**9
    sizes = [10**9, 5 * 10**9, 20 * 10**9, 70 * 10**9]
    assert [function_kv_bytes(cfg, b) for b in sizes] == sorted(function_kv_bytes(cfg, b) for b in sizes)


def test_a_model_whose_weights_and_kv_budget_fit_no_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="kv_budget_tokens"):
        SimConfig(max_model_bytes=80 * 2**30, kv_budget_tokens=65536).check()


def test_a_second_instance_shares_its_devices_copy_of_the_weights() -> None:
    """60 GB of weights on an 80 GiB GPU: a second instance fits only beside the first one's
    weights (its KV budget alone), where the gateway's `place` puts it when the policy finds no
    room; no byte moves, and the device books the weights once."""
    cfg = SimConfig(**ONE_GPU, min_model_bytes=60 * 10**9, max_model_bytes=60 * 10**9).check()
    sim = _Simulation(cfg, build_trace(cfg), get_policy("ember"), Autoscaler())
    first = sim._cold_start(0, 0.0)
    assert first is not None and first.load_tier != "gpu"
    second = sim._cold_start(0, 0.0)
    assert second is not None and second.device is first.device
    assert second.load_tier == "gpu" and second.load_s == 0.0
    dev = first.device
    kv = sim.kv_bytes[0]
    assert kv > 0 and dev.free == dev.memory - sim.nbytes[0] - 2 * kv
    assert sim._cold_start(1, 0.0) is None  # another function's weights fit nowhere (nothing idle)
    sim.cluster.remove(second)
    assert dev.free == dev.memory - sim.nbytes[0] - kv  # its KV budget goes, the weights stay
    sim.cluster.remove(first)
    assert dev.free == dev.memory
