"""One model instance in a worker process: tokenizer + model built from loader tensors, and a
streaming generation loop that can be cancelled between tokens.

Concurrency: each request runs its own decode loop in its own thread over the shared, read-only
weights (KV caches are per request). On CPU with tiny models this keeps per-token latency low;
continuous batching would pay off with larger models on GPUs and is not done here.

Phase signal: around every forward pass the instance calls its `StepListener` (the node's energy
agent, ember.energy.steps): `phase_starts` before, `step_done` after; the first forward of a
request is its prefill, the rest are decode steps (one sequence each).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ember.energy.steps import EngineStep, StepListener
from ember.errors import BadRequest
from ember.platform.gateway.protocol import GenerateRequest


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


class ModelInstance:
    """A model ready to serve: built on the meta device and given the loader's tensors."""

    def __init__(self, instance_id: str, function: str, model: Any, tokenizer: Any, loaded: Any = None, *,
                 device_id: str = "", step_listener: StepListener | None = None) -> None:
        self.instance_id = instance_id
        self.function = function
        self.model = model
        self.tokenizer = tokenizer
        self.loaded = loaded
        self.device_id = device_id  # the worker's device id ("cpu:0", "cuda:1"), for the phase signal
        self.step_listener = step_listener
        self.model_bytes = int(getattr(loaded, "nbytes", 0) or 0) or sum(
            p.numel() * p.element_size() for p in model.parameters())
        self.active = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "cancelled": 0}
        self._lock = threading.Lock()
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        # transformers 5 renamed the KV-cache argument from past_key_values to cache
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_loaded(cls, instance_id: str, function: str, loaded: Any, device: str = "cpu", *,
                    device_id: str = "", step_listener: StepListener | None = None) -> ModelInstance:
        """Build from a loader `LoadedCheckpoint` (no random init, no second copy of the weights)."""
        from transformers import AutoTokenizer

        from ember.loader import build_model

        model = build_model(loaded.model_files, loaded.state_dict, device=device)
        tokenizer = AutoTokenizer.from_pretrained(str(loaded.model_files))
        return cls(instance_id, function, model, tokenizer, loaded, device_id=device_id or device,
                   step_listener=step_listener)

    def close(self) -> None:
        """Drop the model; the loader keeps the checkpoint bytes in its DRAM tier."""
        self.model = None
        if self.loaded is not None:
            self.loaded.release()
            self.loaded = None

    # --- tokens ------------------------------------------------------------------------------
    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            enc = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
        else:
            ids = self.tokenizer(req.prompt or "", add_special_tokens=False)["input_ids"]
        ids = list(ids)
        if not ids:
            ids = [self.tokenizer.bos_token_id or 0]
        if len(ids) + req.max_tokens > self.max_positions:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                f"context of {self.max_positions} tokens",
                code="context_length_exceeded",
            )
        return ids

    def generate(self, req: GenerateRequest, cancelled: threading.Event | None = None,
                 ids: list[int] | None = None) -> Iterator[TokenDelta | GenerationDone]:
        """Yield text deltas, then one GenerationDone. Stops early when `cancelled` is set.
        `ids`: the prompt already tokenized by `prompt_ids` (else it is done here)."""
        import torch

        cancelled = cancelled or threading.Event()
        ids = ids if ids is not None else self.prompt_ids(req)
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        stops = [s for s in req.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        t0 = time.perf_counter()
        t_first = None
        out_ids: list[int] = []
        emitted = 0
        text = ""
        finish = "length"
        with self._lock:
            self.active += 1
        try:
            with torch.inference_mode():
                past = None
                step_input = torch.tensor([ids])
                for _ in range(req.max_tokens):
                    if cancelled.is_set():
                        finish = "cancelled"
                        break
                    phase = "prefill" if past is None else "decode"
                    listener = self.step_listener
                    if listener is not None:
                        listener.phase_starts(self.device_id, phase)
                    t_step = time.perf_counter()
                    out = self.model(input_ids=step_input, use_cache=True, **{self._cache_kw: past})
                    past = out.get("cache", None) if self._cache_kw == "cache" else out.past_key_values
                    if listener is not None:
                        listener.step_done(EngineStep(
                            self.device_id, phase, tokens=int(step_input.shape[1]), batch_size=1,
                            seconds=time.perf_counter() - t_step, function=self.function,
                            kv_tokens=len(ids) + len(out_ids), model_bytes=self.model_bytes))
                    tok = _sample(out.logits[0, -1].float(), req.temperature, req.top_p, gen)
                    if t_first is None:
                        t_first = time.perf_counter()
                    if tok in self.eos_ids:
                        finish = "stop"
                        break
                    out_ids.append(tok)
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    cut = _first_stop(text, stops)
                    if cut is not None:
                        text = text[:cut]
                        finish = "stop"
                        break
                    # hold back an incomplete UTF-8 sequence and a possible stop-string prefix
                    safe = len(text) - hold
                    if text.endswith("\ufffd"):
                        safe = min(safe, len(text) - 1)
                    if safe > emitted:
                        yield TokenDelta(text[emitted:safe])
                        emitted = safe
                    step_input = torch.tensor([[tok]])
            text = text.rstrip("\ufffd") if finish != "length" else text
            if len(text) > emitted:
                yield TokenDelta(text[emitted:])
        finally:
            with self._lock:
                self.active -= 1
        t_end = time.perf_counter()
        t_first = t_first or t_end
        with self._lock:
            self.finished[finish] += 1
        yield GenerationDone(
            finish_reason=finish,
            prompt_tokens=len(ids),
            completion_tokens=len(out_ids),
            ttft_s=t_first - t0,
            decode_s=t_end - t_first,
        )


def _sample(logits: Any, temperature: float, top_p: float, gen: Any) -> int:
    import torch

    if temperature <= 1e-5:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[idx[keep]] = sorted_p[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
