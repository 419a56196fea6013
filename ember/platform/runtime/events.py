"""What a generation yields: text deltas, then one GenerationDone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenDelta:
    """Text produced since the previous event."""

    text: str


@dataclass
class GenerationDone:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_s: float

    @property
    def tpot_s(self) -> float:
        return self.decode_s / max(1, self.completion_tokens - 1)
