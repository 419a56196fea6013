"""One request inside an engine: its prompt, sampling parameters, generator, detokenizer, and the
queue its events go to. Shared by the batching engine and the request-at-a-time loop."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from ember.errors import BadRequest, EmberError
from ember.platform.runtime.detok import Detokenizer
from ember.platform.runtime.events import GenerationDone, TokenDelta
from ember.platform.wire import GenerateRequest

GREEDY_T = 1e-5


class Sequence:
    def __init__(self, ids: list[int], req: GenerateRequest, tokenizer: Any, eos_ids: set[int], device: Any) -> None:
        import torch

        if req.max_tokens < 1:  # the wire refuses it too; `need` and `take` count on at least one
            raise BadRequest(f"max_tokens must be at least 1, got {req.max_tokens}", code="invalid_max_tokens")
        self.ids = ids
        self.req = req
        self.eos_ids = eos_ids
        self.max_tokens = req.max_tokens
        self.need = len(ids) + req.max_tokens  # KV tokens it can ever hold
        self.greedy = req.temperature <= GREEDY_T
        # a generator on the model's device: same seed, same device -> same text
        self.gen = torch.Generator(device=device).manual_seed(req.seed) if req.seed is not None else None
        self.detok = Detokenizer(tokenizer, ids, req.stop)
        self.out: list[int] = []
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sink: Any = None  # set by `attach`: events go to it instead of `events`
        self._sink_lock = threading.Lock()
        self.cancelled = threading.Event()
        self.t0 = time.perf_counter()
        self.t_first: float | None = None  # when the first token was sampled (EOS included)
        self.t_last: float | None = None  # when the last token of `out` was sampled
        self.finish: str | None = None
        self.last = ids[-1]
        self.on_end: Any = None  # called with the finish reason when the sequence ends

    # --- engine side ---------------------------------------------------------------------------
    def take(self, token: int) -> bool:
        """Record a sampled token; True when the sequence is finished."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        if token in self.eos_ids:
            self.finish = "stop"
            return True
        self.out.append(token)
        self.t_last = now
        self.last = token
        text = self.detok.add(token)
        if text:
            self._emit(TokenDelta(text))
        if self.detok.stopped:
            self.finish = "stop"
        elif len(self.out) >= self.max_tokens:
            self.finish = "length"
        elif self.cancelled.is_set():
            self.finish = "cancelled"
        return self.finish is not None

    def end(self, finish: str | None = None) -> None:
        """Flush the text and report the end (idempotent enough: called once by the engine)."""
        self.finish = finish or self.finish or "cancelled"
        if self.finish != "cancelled":
            rest = self.detok.flush()
            if rest:
                self._emit(TokenDelta(rest))
            if self.detok.stopped:  # the flushed tail held a stop string
                self.finish = "stop"
        t_first = self.t_first or time.perf_counter()
        # decode time spans the tokens counted in completion_tokens: an EOS step's time is not a token's
        t_last = self.t_last or t_first
        self._emit(GenerationDone(self.finish, len(self.ids), len(self.out), t_first - self.t0, t_last - t_first))
        if self.on_end is not None:
            self.on_end(self.finish)

    def fail(self, err: EmberError) -> None:
        """End with `err` (raised by `stream`), counted like any other end."""
        self.finish = "error"
        self._emit(err)
        if self.on_end is not None:
            self.on_end(self.finish)

    def _emit(self, ev: Any) -> None:
        with self._sink_lock:
            sink = self._sink
            if sink is None:
                self.events.put(ev)
                return
        sink(ev)

    # --- request side ---------------------------------------------------------------------------
    def attach(self, sink: Any) -> None:
        """Deliver every event (those already queued first, in order) to `sink` instead of the
        queue `stream` reads: it is called on the engine's thread and must not block (an event
        loop's call_soon_threadsafe: no thread per request to relay them)."""
        with self._sink_lock:
            while True:
                try:
                    sink(self.events.get_nowait())
                except queue.Empty:
                    break
            self._sink = sink

    def stream(self) -> Iterator[TokenDelta | GenerationDone]:
        """The events, ending with GenerationDone; an EmberError from the engine is raised."""
        while True:
            ev = self.events.get()
            if isinstance(ev, EmberError):
                raise ev
            yield ev
            if isinstance(ev, GenerationDone):
                return


def sample(logits: Any, seqs: list[Sequence]) -> list[int | None]:
    """One token per row of `logits` [B, vocab]: argmax for greedy rows, else temperature/top-p
    sampling with each sequence's own generator. One device->host transfer for the batch. A row
    that cannot be sampled (NaN or +inf logits, none finite, or probabilities that are not a
    distribution) gets None: its sequence fails, the other rows do not."""
    import torch

    # amax is NaN with a NaN in the row, inf with a +inf, -inf with nothing finite (-inf alone is a mask)
    ok = torch.isfinite(logits.amax(-1))
    if all(s.greedy for s in seqs):
        out = logits.argmax(-1)
    else:
        out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [i for i, s in enumerate(seqs) if s.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            out[idx] = logits.index_select(0, idx).argmax(-1)
        for i, s in enumerate(seqs):
            if not s.greedy:
                out[i], valid = _draw(logits[i], s)
                ok[i] &= valid
    tokens, usable = torch.stack([out, ok.long()]).tolist()
    return [t if good else None for t, good in zip(tokens, usable, strict=True)]


def unsampled(seq: Sequence) -> EmberError:
    """The error a sequence whose logits row `sample` could not use ends with."""
    return EmberError(f"generation failed: the model's logits for this request were NaN or infinite after "
                      f"{len(seq.out)} tokens", code="invalid_logits")


def _draw(row: Any, s: Sequence) -> tuple[Any, Any]:
    """A token sampled from one row, and whether its probabilities were a distribution (both on
    the device: no transfer per row)."""
    import torch

    probs = torch.softmax(row.float() / s.req.temperature, dim=-1)
    if s.req.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < s.req.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    valid = torch.isfinite(probs).all() & (probs.sum() > 0)
    # multinomial must never see NaN: on a GPU that is a device-side assert, which ends the process's
    # CUDA context (every instance on the device), not this request only
    probs = torch.where(valid, probs, torch.ones_like(probs))
    return torch.multinomial(probs, 1, generator=s.gen)[0], valid
