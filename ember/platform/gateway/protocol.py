"""Request and response bodies at the HTTP edge (OpenAI-compatible plus Ember's admin API)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

# the worker's wire bodies live in ember.platform.wire (the worker never imports the gateway)
from ember.platform.wire import (  # noqa: F401
    SEED_RANGE,
    EmberModel,
    GenerateRequest,
    LoadRequest,
    LoadResult,
    PrefetchRequest,
)


class AdminBody(EmberModel):
    """Base of the admin API's request bodies (functions, keys, stores, grants). Unlike an OpenAI
    body, an unknown field is a 422 naming it (a typo such as `min_instance` deployed the default
    and said 201), and numbers, booleans and strings are taken as their JSON types only (`true`
    is no count, `"5"` no number)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, allow_inf_nan=False)


# --- functions -----------------------------------------------------------------------------
class SLO(AdminBody):
    ttft_ms: float = Field(1000.0, gt=0)
    tpot_ms: float = Field(200.0, gt=0)


class Scaling(AdminBody):
    min_instances: int = Field(0, ge=0, le=1024)
    max_instances: int = Field(4, ge=1, le=1024)
    keep_alive_s: float = Field(60.0, ge=0, le=7 * 86400)  # at most a week: idle instances do go
    target_concurrency: int = Field(4, ge=1, le=1024)


class EnergyPrefs(AdminBody):
    eta: float = Field(0.5, ge=0.0, le=1.0)


class FunctionDeploy(AdminBody):
    """Body of PUT /v1/functions/{name}."""

    checkpoint: str = Field(..., min_length=1, max_length=1024)
    slo: SLO = Field(default_factory=SLO)
    scaling: Scaling = Field(default_factory=Scaling)
    energy: EnergyPrefs = Field(default_factory=EnergyPrefs)
    placement_policy: str | None = None


class FunctionSpec(FunctionDeploy):
    """What the registry stores and returns. Its own fields are read back leniently (stored JSON,
    not a request body: a top-level field this version does not know is ignored); `slo`, `scaling`
    and `energy` are as written by `model_dump_json`."""

    model_config = ConfigDict(extra="ignore", strict=False, populate_by_name=True, allow_inf_nan=False)

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


class StoreAllow(AdminBody):
    """Body of PUT /v1/stores: a checkpoint store deploys may name."""

    uri: str = Field(..., min_length=1, max_length=1024)


class CheckpointGrant(AdminBody):
    """Body of PUT /v1/checkpoints/{name}: who may deploy a checkpoint besides admins."""

    store: str | None = Field(None, max_length=1024)  # default: the cluster's store
    owner: str | None = Field(None, max_length=64)  # an API key id
    shared: bool = False


# --- keys ------------------------------------------------------------------------------------
Role = Literal["admin", "operator", "developer", "invoker"]


class KeyCreate(AdminBody):
    role: Role
    name: str = Field("", max_length=128)
    rpm: int | None = Field(None, ge=0, le=10**9)  # requests per minute (0: unlimited; absent: the default)
    tpm: int | None = Field(None, ge=0, le=10**12)  # tokens per minute


class KeyLimitsUpdate(AdminBody):
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
class _OpenAIBody(EmberModel):
    """An OpenAI request object: JSON null for an optional parameter is its default, as in OpenAI
    (the openai clients send `null` for a parameter given as None)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            required = {n for n, f in cls.model_fields.items() if f.is_required()}
            return {k: v for k, v in data.items() if v is not None or k in required}
        return data


class StreamOptions(_OpenAIBody):
    include_usage: bool = False


# OpenAI parameters Ember does not implement: a request that sets one (to anything but its
# neutral value) gets a 400 naming it, never a silently different answer.
UNSUPPORTED_PARAMETERS = (
    "logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
    "response_format", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "best_of",
    "suffix", "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "min_p", "top_k",
)
_NEUTRAL: tuple[object, ...] = (None, False, 0, 0.0, [], {}, "")


def _is_neutral(value: object) -> bool:
    return any(value is v or (type(value) is type(v) and value == v) for v in _NEUTRAL)


class _Sampling(_OpenAIBody):
    model_config = ConfigDict(extra="allow", populate_by_name=True)  # extras are checked, then ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: the smallest nucleus, the most likely token alone
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

    def requested_max_tokens(self) -> int | None:
        """The client's max_tokens (None: not sent)."""
        return self.max_tokens

    def unsupported(self) -> str | None:
        """The first OpenAI parameter this request sets that Ember does not implement, if any."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED_PARAMETERS:
            value = extra.get(name)
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name == "best_of" and value == 1:
                continue
            if _is_neutral(value):
                continue
            return name
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


# fields of a chat message Ember does not implement (a tool call, a tool's result, a participant
# name): refused by name when set, never dropped (the model would answer another conversation)
UNSUPPORTED_MESSAGE_FIELDS = ("tool_calls", "function_call", "tool_call_id", "name", "audio", "refusal")


class ChatMessage(EmberModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)  # extras are checked, then ignored

    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_are_text(cls, v: str | list[dict] | None) -> str | list[dict] | None:
        if isinstance(v, list):
            for i, p in enumerate(v):
                if p.get("type", "text") == "text" and not isinstance(p.get("text"), str):
                    raise ValueError(f"content part {i} is of type text and needs a string `text`")
        return v

    def unsupported(self) -> str | None:
        """The first field of this message Ember would have to drop (`role` for tool and function
        results), if any."""
        if self.role in ("tool", "function"):
            return "role"
        extra = self.model_extra or {}
        return next((name for name in UNSUPPORTED_MESSAGE_FIELDS if not _is_neutral(extra.get(name))), None)

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
    max_completion_tokens: int | None = Field(None, ge=1)  # chat's newer name for max_tokens; it wins

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    def unsupported(self) -> str | None:
        # here `logprobs` is a count, and 0 still asks for the sampled tokens' log probabilities
        extra = self.model_extra or {}
        if extra.get("logprobs") is not None:
            return "logprobs"
        if extra.get("max_completion_tokens") is not None:  # a chat parameter: /v1/completions has max_tokens
            return "max_completion_tokens"
        return super().unsupported()

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("exactly one prompt per request")
            return self.prompt[0]
        return self.prompt
