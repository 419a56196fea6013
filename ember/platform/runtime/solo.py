"""The request-at-a-time loop: one sequence, its own cache, its own decode loop in the caller's
thread. The reference the batching engine must equal (greedy, token for token) and the
`sequential` engine of `ember bench engine`. Device-correct like the engine (same sampler,
same detokenizer, logits for the last position only)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

from ember.platform.runtime import kvcache
from ember.platform.runtime.events import GenerationDone, TokenDelta
from ember.platform.runtime.sequence import Sequence, sample, unsampled


def run_alone(model: Any, seq: Sequence, listener: Any = None, device_id: str = "cpu:0",
              function: str = "", model_bytes: int = 0) -> Iterator[TokenDelta | GenerationDone]:
    import torch

    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    cache_kw = "cache" if "cache" in params else "past_key_values"
    dev = model.device
    cache = kvcache.make_cache(model.config, seq.need)
    step = torch.tensor([seq.ids], device=dev)
    pos = torch.arange(len(seq.ids), device=dev)[None, :]
    phase = "prefill"
    try:
        with torch.inference_mode():
            while True:
                if seq.cancelled.is_set():
                    seq.finish = "cancelled"
                    break
                if listener is not None:
                    listener.phase_starts(device_id, phase)
                t0 = time.perf_counter()
                extra = {"position_ids": pos} if "position_ids" in params else {}
                logits = model(input_ids=step, **{cache_kw: cache}, **extra, **kw).logits[:, -1]
                tok = sample(logits, [seq])[0]
                if tok is None:
                    raise unsampled(seq)
                if listener is not None:
                    from ember.energy.steps import EngineStep

                    listener.step_done(EngineStep(device_id, phase, int(step.shape[1]), 1, time.perf_counter() - t0,
                                                  function, kvcache.cache_len(cache), model_bytes))
                if seq.take(tok):
                    break
                while not seq.events.empty():
                    yield seq.events.get()
                n = kvcache.cache_len(cache)
                step = torch.tensor([[tok]], device=dev)
                pos = torch.tensor([[n]], device=dev)
                phase = "decode"
        seq.end()
    finally:
        cache = None
    while not seq.events.empty():
        yield seq.events.get()
