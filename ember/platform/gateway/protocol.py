"""Request and response bodies at the HTTP edge (OpenAI-compatible plus Ember's admin API)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

# the worker's wire bodies live in ember.platform.wire (the worker never imports the gateway)
from ember.platform.wire import (  # noqa: F401
    SEED_RANGE,
    EmberModel,
    GenerateRequest,
    LoadRequest,
    LoadResult,
    PrefetchRequest,
)


# --- functions -----------------------------------------------------------------------------
class SLO(EmberModel):
    ttft_ms: float = Field(1000.0, gt=0)
    tpot_ms: float = Field(200.0, gt=0)


class Scaling(EmberModel):
    min_instances: int = Field(0, ge=0, le=1024)
    max_instances: int = Field(4, ge=1, le=1024)
    keep_alive_s: float = Field(60.0, ge=0, le=7 * 86400)  # at most a week: idle instances do go
    target_concurrency: int = Field(4, ge=1, le=1024)


class EnergyPrefs(EmberModel):
    eta: float = Field(0.5, ge=0.0, le=1.0)


class FunctionDeploy(EmberModel):
    """Body of PUT /v1/functions/{name}."""

    checkpoint: str = Field(..., min_length=1, max_length=1024)
    slo: SLO = Field(default_factory=SLO)
    scaling: Scaling = Field(default_factory=Scaling)
    energy: EnergyPrefs = Field(default_factory=EnergyPrefs)
    placement_policy: str | None = None


class FunctionSpec(FunctionDeploy):
    """What the registry stores and returns."""

    name: str
    owner: str = "admin"
    nbytes: int = 0
    kv_bytes: int = 0  # each instance's KV-cache budget, claimed on its device beyond the weights
    checkpoint_id: str = ""  # the pinned identity STORE/NAME#MANIFEST_DIGEST ("" until a worker told it)
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)

    @property
    def checkpoint_ref(self) -> str:
        """What workers load and holdings are published under: the pinned identity when known."""
        return self.checkpoint_id or self.checkpoint


class StoreAllow(EmberModel):
    """Body of PUT /v1/stores: a checkpoint store deploys may name."""

    uri: str = Field(..., min_length=1, max_length=1024)


class CheckpointGrant(EmberModel):
    """Body of PUT /v1/checkpoints/{name}: who may deploy a checkpoint besides admins."""

    store: str | None = Field(None, max_length=1024)  # default: the cluster's store
    owner: str | None = Field(None, max_length=64)  # an API key id
    shared: bool = False


# --- keys ------------------------------------------------------------------------------------
Role = Literal["admin", "operator", "developer", "invoker"]


class KeyCreate(EmberModel):
    role: Role
    name: str = Field("", max_length=128)
    rpm: int | None = Field(None, ge=0, le=10**9)  # requests per minute (0: unlimited; absent: the default)
    tpm: int | None = Field(None, ge=0, le=10**12)  # tokens per minute


class KeyLimitsUpdate(EmberModel):
    """Body of PATCH /v1/keys/{id}: change a key's per-minute limits (0: unlimited)."""

    rpm: int | None = Field(None, ge=0, le=10**9)
    tpm: int | None = Field(None, ge=0, le=10**12)


class KeyInfo(EmberModel):
    id: str
    role: Role
    name: str
    created: float
    rpm: int | None = None
    tpm: int | None = None


class KeyCreated(KeyInfo):
    key: str


# --- OpenAI ----------------------------------------------------------------------------------
class StreamOptions(EmberModel):
    include_usage: bool = False


# OpenAI parameters Ember does not implement: a request that sets one (to anything but its
# neutral value) gets a 400 naming it, never a silently different answer.
UNSUPPORTED_PARAMETERS = (
    "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
    "response_format", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "best_of",
    "suffix", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "min_p", "top_k",
)
_NEUTRAL: tuple[object, ...] = (None, False, 0, 0.0, [], {}, "")


class _Sampling(EmberModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)  # extras are checked, then ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def unsupported(self) -> str | None:
        """The first OpenAI parameter this request sets that Ember does not implement, if any."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED_PARAMETERS:
            value = extra.get(name)
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name == "best_of" and value == 1:
                continue
            if any(value is v or (type(value) is type(v) and value == v) for v in _NEUTRAL):
                continue
            return name
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatMessage(EmberModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = ""

    @field_validator("content")
    @classmethod
    def _text_parts_are_text(cls, v: str | list[dict] | None) -> str | list[dict] | None:
        if isinstance(v, list):
            for i, p in enumerate(v):
                if p.get("type", "text") == "text" and not isinstance(p.get("text"), str):
                    raise ValueError(f"content part {i} is of type text and needs a string `text`")
        return v

    def non_text_part(self) -> str | None:
        """The type of the first content part that is not text (images, audio, files), if any."""
        if isinstance(self.content, list):
            for p in self.content:
                kind = p.get("type", "text") if isinstance(p, dict) else type(p).__name__
                if kind != "text":
                    return str(kind)
        return None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict))
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    def unsupported(self) -> str | None:
        # here `logprobs` is a count, and 0 still asks for the sampled tokens' log probabilities
        if (self.model_extra or {}).get("logprobs") is not None:
            return "logprobs"
        return super().unsupported()

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("exactly one prompt per request")
            return self.prompt[0]
        return self.prompt
