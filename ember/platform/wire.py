"""The gateway <-> worker wire protocol: the bodies of the worker's internal API and the cluster
token header. Both sides import it from here, so the worker never imports the gateway."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CLUSTER_TOKEN_HEADER = "x-ember-cluster-token"
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed takes


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
    # the DRAM entry's retention priority from this load on (ember.loader.retention): the scheduler
    # asks 1 where a cold start from the node's SSD would miss the function's TTFT SLO; 0 is plain LRU
    dram_keep: int = Field(default=0, ge=0, le=9)


class LoadResult(EmberModel):
    """A worker's answer to a load: where the bytes came from and how long it took. `transfer_s`
    (the tiers' load alone, as the worker measured it) is the load's one bandwidth sample, folded
    into the node's learned `bw:<tier>` by the gateway's end of load; `startup_ms` adds building
    the instance and is never a bandwidth. 0 (a worker that does not report it): nothing learned."""

    instance_id: str
    tier: str  # the tier the bytes really came from: gpu | dram | ssd | remote
    startup_ms: float  # from the load request to a ready instance
    nbytes: int
    transfer_s: float = Field(default=0.0, ge=0.0)


class PrefetchRequest(EmberModel):
    checkpoint: str
    tier: Literal["dram", "ssd"] = "dram"
    dram_keep: int = Field(default=0, ge=0, le=9)  # as LoadRequest.dram_keep, for the prefetched entry


class GenerateRequest(EmberModel):
    """What the gateway asks a worker's instance to generate (tokens never travel through Redis).
    Bounds as the gateway's OpenAI models have them, so a body out of range is a 422 from the
    worker, never a failure inside the engine."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = Field(None, min_length=1)
    max_tokens: int = Field(16, ge=1)
    # the client set no max_tokens: `max_tokens` is a ceiling, cut to what the model's context and the
    # instance's KV budget leave after the prompt (OpenAI's "until EOS or the context is full"), so a
    # value the client never sent is never the reason for a refusal
    fit_max_tokens: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    # the function's SLO and energy preference, for the worker's energy accounting and controller
    ttft_slo_s: float = Field(1.0, gt=0.0)
    tpot_slo_s: float = Field(0.2, gt=0.0)
    eta: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        """Exactly one of them (a body with neither generated from the BOS token alone)."""
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt and messages")
        return self
