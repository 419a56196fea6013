"""What the engine tests share: an instance over the tiny model, and a generation's events folded
into (text, done events). The model itself is the `model_and_tokenizer` fixture (conftest)."""

from __future__ import annotations

from typing import Any

from ember.platform.runtime.events import GenerationDone, TokenDelta


def make_instance(mt: tuple[Any, Any], **kw: Any) -> Any:
    from ember.platform.runtime.engine import ModelInstance

    return ModelInstance("i", "f", mt[0], mt[1], **kw)


def collect(events: Any) -> tuple[str, list[GenerationDone]]:
    evs = list(events)
    return "".join(e.text for e in evs if isinstance(e, TokenDelta)), [e for e in evs if isinstance(e, GenerationDone)]
