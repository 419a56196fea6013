"""What an engine tells the energy side about each forward pass: the phase signal.

The serving engine (ember.platform.runtime) calls a `StepListener` around every forward pass
of an instance: `phase_starts` just before (so per-phase SM clocks can be applied live), and
`step_done` just after, with what ran and for how long. The node's energy agent implements it
(clock switching on real or simulated GPUs; emulated GPUs charge the step's energy and may
block for the extra time a lower clock or cap would cost, so the controller sees the latency
effect of its own decisions). Listeners are called on the engine's loop thread: they must be
quick, except for that deliberate emulated wait.

Units: seconds, tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class EngineStep:
    """One forward pass of one instance's engine."""

    device_id: str  # the worker's device id ("cuda:0", "cpu:1")
    phase: Phase
    tokens: int  # tokens computed in the pass: prompt tokens for prefill, one per sequence for decode
    batch_size: int  # sequences in the pass
    seconds: float  # wall time of the pass, measured by the engine
    function: str = ""
    kv_tokens: int = 0  # tokens held in the instance's KV cache during the pass (decode reads them)
    model_bytes: int = 0  # weight bytes of the model (decode reads them once per pass)


class StepListener(Protocol):
    """Receives the engine's phase signal. Both calls happen on the engine's loop thread."""

    def phase_starts(self, device_id: str, phase: Phase) -> None:
        """A forward pass of `phase` is about to run on `device_id`."""

    def step_done(self, step: EngineStep) -> None:
        """A forward pass finished; may block to emulate a slower device."""
