"""The gateway <-> worker wire protocol: the bodies of the worker's internal API and the cluster
token header. Both sides import it from here, so the worker never imports the gateway."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CLUSTER_TOKEN_HEADER = "x-ember-cluster-token"


class EmberModel(BaseModel):
    """Shared base: unknown fields are ignored (OpenAI clients send extras), types are strict enough,
    and no float is infinite or NaN (JSON's `1e999` parses as infinity, which a stored spec would
    write back as `null` and never read again)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


class LoadRequest(EmberModel):
    instance_id: str
    function: str
    checkpoint: str
    kv_budget_bytes: int = 0  # what the placement claimed for the KV cache (0: the worker's setting)


class LoadResult(EmberModel):
    instance_id: str
    tier: str
    startup_ms: float
    nbytes: int


class PrefetchRequest(EmberModel):
    checkpoint: str
    tier: Literal["dram", "ssd"] = "dram"


class GenerateRequest(EmberModel):
    """What the gateway asks a worker's instance to generate (tokens never travel through Redis)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    # the function's SLO and energy preference, for the worker's energy accounting and controller
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.2
    eta: float = 0.5
