"""Typed settings (prefix EMBER_). Built by factories (`Settings()` inside create_app, the CLI),
never at import time.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ember.errors import ConfigError
from ember.scheduler import nodescaler

_NODE = nodescaler.DEFAULTS  # the node scaler's defaults, the same as `ember sim --fleet`'s

_DEV_ADMIN_KEY = "ember-dev-admin-key"
# durations that pace a loop or expire shared state: zero would spin or expire at once
_POSITIVE_DURATIONS = frozenset({
    "slo_timeout_s", "autoscaler_interval_s", "lease_ttl_s", "claim_timeout_s", "slot_ttl_s",
    "worker_connect_timeout_s", "worker_read_timeout_s", "heartbeat_interval_s", "heartbeat_ttl_s",
    "node_scaler_interval_s", "max_load_s", "body_timeout_s",
})


class Settings(BaseSettings):
    """Every knob of a gateway or worker process. Environment: EMBER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="EMBER_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path("data")
    redis_url: str | None = None
    store_url: str | None = None  # default: file://<data_dir>/store

    # gateway
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str | None = None
    cluster_token: str | None = None
    metrics_require_key: bool = False
    access_log: bool = True  # the gateway's line per request (uvicorn's access log); ~3% of its CPU
    max_request_bytes: int = 1 << 20
    # what one developer key may hold (0: no limit): functions, and instances summed over their max_instances
    developer_max_functions: int = Field(default=64, ge=0)
    developer_max_instances: int = Field(default=64, ge=0)
    body_timeout_s: float = 30.0  # a client stalled this long in the middle of its request body gets a 408
    max_tokens_limit: int = 4096
    slo_timeout_s: float = 30.0
    placement_policy: str = "ember"
    autoscaler_interval_s: float = 1.0
    lease_ttl_s: float = 5.0
    allowed_stores: str = ""  # comma-separated store URIs deploys may name besides store_url
    default_rpm: int = 0  # requests per minute per API key when the key sets none (0: unlimited)
    default_tpm: int = 0  # tokens (prompt + max_tokens) per minute per API key (0: unlimited)
    # instance lifecycle and faults (ember/platform/cluster/records.py)
    claim_timeout_s: float = 60.0  # a claim the worker has not reported loading by then is reaped
    slot_ttl_s: float = 60.0  # a request slot's lease; the gateway holding it renews it
    worker_connect_timeout_s: float = 2.0
    worker_read_timeout_s: float = 30.0  # gateway -> worker: to the first byte and between chunks
    drain_grace_s: float = 30.0  # SIGTERM: streams in flight may finish within this
    expected_workers: int = 0  # set by `ember up`: /readyz says "degraded" (503) with fewer live workers
    # gateway processes sharing the port (SO_REUSEPORT): one Python process serves ~1,000 warm
    # requests/s on one core; more use more cores (metrics aggregate across them)
    gateway_processes: int = Field(default=1, ge=1, le=64)

    # worker
    node_id: str | None = None
    cpu_slots: int = 2
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    dram_capacity_bytes: int = 1 << 30
    ssd_capacity_bytes: int = 32 << 30
    energy_mode: Literal["observe", "recommend", "actuate"] = "recommend"
    dram_scrub_interval_s: float = 30.0  # verify the DRAM tier this often (0: only when attached)
    # a load still running after this long is no longer reported by heartbeats: its claim lapses
    # and is reaped (a hung read must not hold a device for ever); if it ever finishes it is dropped
    max_load_s: float = Field(default=900.0, gt=0.0)
    # torch's intra-op threads in a worker (0: torch's default, one per core). `ember up` sets it so
    # that its workers leave a core to the gateway and Redis beside them (README "Gateway overhead")
    torch_threads: int = Field(default=0, ge=0, le=1024)
    simulated_gpus: int = 0  # emulated GPUs driven by the engine's steps (CPU-only machines)
    # emulated GPUs charge every step as if the model had this many billion parameters (bf16);
    # 0: the model's own size
    simulated_params_b: float = Field(default=0.0, ge=0.0)
    # switch the SM clock per phase (prefill / decode) at the engine's phase signal, actuate mode
    energy_phase_clocks: bool = True
    cloud_instance_id: str = ""  # the machine's id in its cloud ("i-0abc...", "local-3"): the node scaler's handle

    # fleet: the node scaler (one gateway at a time) and the cloud backend it drives
    node_backend: Literal["none", "local", "aws"] = "none"
    node_min: int = 0
    node_max: int = 4
    node_scaler_interval_s: float = nodescaler.STEP_INTERVAL_S
    node_boot_s: float = _NODE.boot_s  # scale-out to a registered worker (the local backend: seconds)
    node_grace_s: float = _NODE.grace_s  # idle beyond the functions' keep-alive before a node is drained
    node_power_w: float = _NODE.node_power_w  # the most one node may draw: the power budget caps nodes at budget / this
    node_idle_power_w: float = _NODE.idle_power_w
    node_target_memory_utilization: float = _NODE.target_memory_utilization
    node_consolidate_below: float = _NODE.consolidate_below  # 0: drain only idle nodes (ember.scheduler.nodescaler)
    node_requests_per_node: int = _NODE.requests_per_node  # waiting placements one new node is expected to absorb
    node_max_scale_in_per_step: int = _NODE.max_scale_in_per_step  # drains (and terminations) a step at most
    aws_autoscaling_group: str | None = None
    aws_endpoint_url: str | None = None  # tests: moto_server
    cloudwatch_namespace: str = "Ember"
    # engine (issue 11): each instance's KV-cache budget (claimed on its device with the weights),
    # the per-device reserve (CUDA context, activations) kept out of claims on GPUs, batch and queue bounds
    kv_budget_tokens: int = 8192  # per instance; bytes = tokens x the model's KV bytes per token
    kv_budget_bytes: int = 0  # when set, overrides kv_budget_tokens
    device_reserve_bytes: int = 2 << 30
    engine_max_batch: int = 64
    engine_max_queue: int = 256
    devices: str | None = None  # GPUs this worker owns: CUDA indices or UUIDs, comma-separated (`ember up` sets it)


    demo_function: str = Field(default="tiny", description="function deployed by `ember up` on first start")

    @model_validator(mode="after")
    def _durations_are_durations(self) -> Settings:
        """Every `*_s` setting is a finite number of seconds, not negative; the periods and leases
        that pace a loop or expire state are more than zero (a negative drain grace or a zero
        heartbeat interval was taken as given)."""
        for name in type(self).model_fields:
            value = getattr(self, name)
            if not name.endswith("_s") or not isinstance(value, int | float):
                continue
            must_be_positive = name in _POSITIVE_DURATIONS
            if not math.isfinite(value) or value < 0 or (must_be_positive and value == 0):
                raise ConfigError(f"EMBER_{name.upper()}={value} must be a finite number of seconds "
                                  f"{'above' if must_be_positive else 'at least'} 0")
        return self

    @model_validator(mode="after")
    def _no_default_secrets_in_production(self) -> Settings:
        if self.env == "production":
            if not self.admin_key or self.admin_key == _DEV_ADMIN_KEY:
                raise ConfigError("EMBER_ADMIN_KEY must be set to a non-default secret in production")
            if not self.cluster_token:
                raise ConfigError("EMBER_CLUSTER_TOKEN must be set in production")
        return self

    @property
    def resolved_store_url(self) -> str:
        """The checkpoint store URI; defaults to a directory under the data dir."""
        return self.store_url or f"file://{(self.data_dir / 'store').resolve()}"

    def resolved_admin_key(self) -> str:
        return self.admin_key or _DEV_ADMIN_KEY

    def resolved_cluster_token(self) -> str:
        return self.cluster_token or _DEV_ADMIN_KEY + "-cluster"


def new_secret(nbytes: int = 24) -> str:
    """A URL-safe random secret (API keys, cluster tokens)."""
    return secrets.token_urlsafe(nbytes)
