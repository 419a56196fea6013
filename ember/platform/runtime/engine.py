"""One model instance in a worker process: tokenizer + model built from loader tensors, served by
one batching engine (ember.platform.runtime.batcher) with a KV-cache budget.

`submit` admits a request into the engine's queue (429 when the queue is full, 503 when the
request could never fit the budget) and returns its Sequence; `Sequence.stream()` yields text
deltas, then one GenerationDone; `cancel` stops it between steps. `generate` does both (and is
what tests and benches call); `generate_alone` runs the request-at-a-time loop instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from ember.errors import BadRequest, ServiceUnavailable
from ember.platform.runtime import kvcache
from ember.platform.runtime.batcher import BatchingEngine, EngineLimits
from ember.platform.runtime.events import GenerationDone, TokenDelta
from ember.platform.runtime.sequence import Sequence
from ember.platform.runtime.solo import run_alone
from ember.platform.wire import GenerateRequest

__all__ = ["ModelInstance", "TokenDelta", "GenerationDone", "EngineLimits"]

DEFAULT_KV_BUDGET_TOKENS = 8192


class ModelInstance:
    """A model ready to serve, with its batching engine."""

    def __init__(self, instance_id: str, function: str, model: Any, tokenizer: Any, loaded: Any = None, *,
                 kv_budget_bytes: int = 0, kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS, max_batch: int = 64, max_queue: int = 256,
                 device_id: str | None = None, listener: Any = None, step_listener: Any = None) -> None:
        import torch

        self.instance_id = instance_id
        self.function = function
        self.model = model
        self.tokenizer = tokenizer
        self.loaded = loaded
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self._lock = threading.Lock()
        self._active = 0
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_positions = int(getattr(model.config, "max_position_embeddings", None)
                                 or getattr(model.config, "n_positions", 2048))
        self.device = model.device
        dtype_bytes = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
        self.kv_bytes_per_token = kvcache.kv_bytes_per_token(model.config, dtype_bytes)
        self.model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        budget_tokens = max(1, kv_budget_bytes // self.kv_bytes_per_token) if kv_budget_bytes else kv_budget_tokens
        self.kv_budget_bytes = budget_tokens * self.kv_bytes_per_token
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos_ids, default=0))
        self.device_id = device_id or str(self.device)
        listener = listener if listener is not None else step_listener  # the phase signal (ember.energy.steps)
        self.listener = self.step_listener = listener
        self.engine = BatchingEngine(model, EngineLimits(budget_tokens, max_batch, max_queue),
                                     device_id=self.device_id, function=function, listener=listener,
                                     model_bytes=self.model_bytes, pad_id=int(pad))

    @classmethod
    def from_loaded(cls, instance_id: str, function: str, loaded: Any, device: str = "cpu", **kw: Any) -> ModelInstance:
        """Build from a loader `LoadedCheckpoint` (no random init, no second copy of the weights)."""
        from transformers import AutoTokenizer

        from ember.loader import build_model

        model = build_model(loaded.model_files, loaded.state_dict, device=device)
        tokenizer = AutoTokenizer.from_pretrained(str(loaded.model_files))
        return cls(instance_id, function, model, tokenizer, loaded, **kw)

    @property
    def active(self) -> int:
        """Requests in progress: queued or running in the engine, or still streaming out."""
        return max(self._active, len(self.engine.waiting) + len(self.engine.running))

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def close(self) -> None:
        """Stop the engine (its requests end with 503), drop the model; the loader keeps the bytes."""
        self.engine.close()
        on_cuda = getattr(self.device, "type", "cpu") == "cuda"
        self.model = None
        if self.loaded is not None:
            self.loaded.release()
            self.loaded = None
        if on_cuda:  # the engine's cache blocks go back to the device, not to this process's cache
            import torch

            torch.cuda.empty_cache()

    # --- tokens ------------------------------------------------------------------------------
    def prompt_ids(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            ids = self._chat_ids(req.messages)
        else:
            ids = self.tokenizer(req.prompt or "", add_special_tokens=False)["input_ids"]
        ids = list(ids)
        if not ids:
            ids = [self.tokenizer.bos_token_id or 0]
        if len(ids) >= self.max_positions:  # whatever max_tokens is: the prompt's own fault
            raise BadRequest(f"prompt ({len(ids)} tokens) leaves no room for a completion in the model's "
                             f"context of {self.max_positions} tokens", code="context_length_exceeded")
        if not req.fit_max_tokens and len(ids) + req.max_tokens > self.max_positions:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's "
                f"context of {self.max_positions} tokens",
                code="context_length_exceeded",
            )
        return ids

    def fitted_max_tokens(self, prompt_tokens: int, ceiling: int) -> int:
        """What an omitted max_tokens means here: up to `ceiling`, as many tokens as the context and
        the KV budget leave after the prompt (503 exceeds_kv_budget when the prompt fills the budget
        alone: no instance of this function could ever take it)."""
        budget = self.engine.limits.kv_budget_tokens
        room = min(self.max_positions, budget) - prompt_tokens
        if room < 1:
            raise ServiceUnavailable(f"the prompt ({prompt_tokens} tokens) leaves no room in this instance's "
                                     f"KV-cache budget of {budget} tokens", code="exceeds_kv_budget")
        return min(ceiling, room)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation through the model's chat template; one the template refuses (roles that
        do not alternate, a system role it does not take), an empty one, or a model without a chat
        template is the client's to fix: a 400 with the template's own message."""
        from jinja2 import TemplateError

        try:
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except (TemplateError, ValueError) as e:
            raise BadRequest(f"this model's chat template refuses the messages: {e}", code="invalid_messages") from e
        return list(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc)

    def new_sequence(self, req: GenerateRequest, ids: list[int] | None = None) -> Sequence:
        ids = ids if ids is not None else self.prompt_ids(req)
        if req.fit_max_tokens:
            req = req.model_copy(update={"max_tokens": self.fitted_max_tokens(len(ids), req.max_tokens),
                                         "fit_max_tokens": False})
        seq = Sequence(ids, req, self.tokenizer, self.eos_ids, self.device)
        seq.on_end = self._count
        return seq

    def _count(self, finish: str) -> None:
        with self._lock:
            self.finished[finish] = self.finished.get(finish, 0) + 1

    def submit(self, req: GenerateRequest, ids: list[int] | None = None) -> Sequence:
        """Queue a request in the engine (raises Overloaded / ServiceUnavailable right away)."""
        return self.engine.submit(self.new_sequence(req, ids))

    def stream(self, seq: Sequence, cancelled: threading.Event | None = None) -> Iterator[TokenDelta | GenerationDone]:
        """The events of a submitted sequence; setting `cancelled` (or closing the iterator) cancels it."""
        with self._lock:
            self._active += 1
        watcher = None
        if cancelled is not None:
            watcher = threading.Thread(target=_forward_cancel, args=(cancelled, seq, self.engine), daemon=True)
            watcher.start()
        try:
            yield from seq.stream()
        finally:
            self._stop_listening(seq)  # also ends the watcher

    def watch(self, seq: Sequence, sink: Callable[[Any], None]) -> Callable[[], None]:
        """`stream` without a thread to read it: the sequence's events go to `sink` (called on the
        engine's thread, must not block). Returns `stop`, to call once the caller stops listening
        (it cancels the sequence if unfinished); idempotent."""
        with self._lock:
            self._active += 1
        seq.attach(sink)
        stopped: list[bool] = []

        def stop() -> None:
            if not stopped:
                stopped.append(True)
                self._stop_listening(seq)

        return stop

    def _stop_listening(self, seq: Sequence) -> None:
        """The caller of `stream` or `watch` is gone: an unfinished sequence is cancelled."""
        if seq.finish is None:
            self.engine.cancel(seq)
        seq.cancelled.set()
        with self._lock:
            self._active -= 1

    def generate(self, req: GenerateRequest, cancelled: threading.Event | None = None,
                 ids: list[int] | None = None) -> Iterator[TokenDelta | GenerationDone]:
        """Submit and stream (the batching engine)."""
        seq = self.submit(req, ids)
        yield from self.stream(seq, cancelled)

    def generate_alone(self, req: GenerateRequest, ids: list[int] | None = None) -> Iterator[TokenDelta | GenerationDone]:
        """The request-at-a-time loop in the caller's thread (reference and benchmark baseline)."""
        yield from run_alone(self.model, self.new_sequence(req, ids), self.listener, self.device_id, self.function,
                             self.model_bytes)


def _forward_cancel(cancelled: threading.Event, seq: Sequence, engine: BatchingEngine) -> None:
    """Turn the caller's cancel event into an engine cancel (ends when either side is done)."""
    while not seq.cancelled.is_set() and seq.finish is None:
        if cancelled.wait(0.05):
            engine.cancel(seq)
            return
