"""What an OpenAI request asks of a worker: the checks pydantic cannot make (each a 400 naming
the parameter at fault in `param`, as OpenAI's errors do) and the GenerateRequest they become.

An omitted max_tokens is never a reason to refuse: chat generates until EOS or until the context
(or the instance's KV budget) is full, at most the gateway's `max_tokens_limit`; completions at
most OpenAI's default of 16, likewise cut to what the context leaves. The worker does the cutting
(`GenerateRequest.fit_max_tokens`): only it knows the prompt's tokens and the instance's budget.
"""

from __future__ import annotations

from typing import Any

from ember.errors import BadRequest
from ember.platform.gateway.protocol import (
    SEED_RANGE,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    _Sampling,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# an omitted max_tokens is charged this many completion tokens up front by the per-key token limit
# (then corrected with the real usage), not its ceiling: a client is not refused for what it did not ask
UPFRONT_COMPLETION_TOKENS = 128


class InvalidParameter(BadRequest):
    """A 400 about one parameter of the request, named in the error's `param` (OpenAI's field)."""

    def __init__(self, message: str, *, param: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as the model's chat template takes it; a message Ember could only pass on
    by dropping part of it (a tool call or result, a name, a non-text part) or one without
    content is a 400 naming the field."""
    messages = []
    for i, m in enumerate(body.messages):
        field = m.unsupported()
        if field is not None:
            what = f"role {m.role!r}" if field == "role" else f"field {field!r}"
            why = "" if field in ("name", "audio", "refusal") else " (no tool calling)"
            raise InvalidParameter(f"messages[{i}]: {what} is not supported by Ember{why}",
                                   param=f"messages[{i}].{field}", code="unsupported_parameter")
        kind = m.non_text_part()
        if kind is not None:
            raise InvalidParameter(f"messages[].content parts of type {kind!r} are not supported (text only)",
                                   param=f"messages[{i}].content", code="unsupported_parameter")
        if m.content is None:
            raise InvalidParameter(f"messages[{i}] has no content", param=f"messages[{i}].content",
                                   code="invalid_messages")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
    return messages


def generate_request(body: _Sampling, max_tokens_limit: int, **kw: Any) -> GenerateRequest:
    """The worker's request for `body` (`kw`: its prompt or messages), after `check_input`."""
    check_input(body)
    if body.stream_options is not None and not body.stream:
        raise InvalidParameter("stream_options is only allowed with stream: true", param="stream_options",
                               code="invalid_stream_options")
    asked = body.requested_max_tokens()
    if asked is not None and asked > max_tokens_limit:
        param = "max_completion_tokens" if isinstance(body, ChatCompletionRequest) and \
            body.max_completion_tokens else "max_tokens"
        raise InvalidParameter(f"{param} {asked} exceeds this gateway's limit of {max_tokens_limit}", param=param,
                               code="invalid_max_tokens")
    if asked is None:  # a ceiling the worker cuts to what the context and the KV budget leave
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if isinstance(body, CompletionRequest) else max_tokens_limit
    else:
        max_tokens = asked
    temperature, top_p = body.temperature, body.top_p
    if top_p == 0.0:  # the smallest nucleus holds the most likely token alone: greedy
        temperature, top_p = 0.0, 1.0
    return GenerateRequest(max_tokens=max_tokens, fit_max_tokens=asked is None, temperature=temperature,
                           top_p=top_p, stop=body.stop_list(), seed=body.seed, **kw)


def upfront_completion_tokens(gen: GenerateRequest) -> int:
    """Completion tokens the per-key token limit charges before the request runs."""
    return min(gen.max_tokens, UPFRONT_COMPLETION_TOKENS) if gen.fit_max_tokens else gen.max_tokens


def check_input(body: _Sampling) -> None:
    """What pydantic lets through but generation cannot take: a 400 naming it (never a 500)."""
    name = body.unsupported()
    if name == "max_completion_tokens":  # OpenAI's chat parameter; completions have max_tokens only
        raise InvalidParameter("max_completion_tokens is not a parameter of /v1/completions (use max_tokens)",
                               param=name, code="unsupported_parameter")
    if name is not None:
        raise InvalidParameter(f"parameter {name!r} is not supported by Ember", param=name,
                               code="unsupported_parameter")
    if body.seed is not None and not SEED_RANGE[0] <= body.seed <= SEED_RANGE[1]:
        raise InvalidParameter(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}", param="seed",
                               code="invalid_seed")
    bad = _not_utf8(body.model_dump(exclude_none=True))
    if bad is not None:
        raise InvalidParameter(f"{bad} is not valid Unicode text (a lone surrogate?)", param=bad,
                               code="invalid_unicode")


def _not_utf8(value: Any, where: str = "body") -> str | None:
    """Where a string that cannot be encoded as UTF-8 sits in a parsed body, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        if isinstance(k, str) and _not_utf8(k) is not None:
            return f"{where} key"
        found = _not_utf8(v, f"{where}.{k}" if where != "body" else str(k))
        if found is not None:
            return found
    return None
