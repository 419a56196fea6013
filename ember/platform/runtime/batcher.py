"""Iteration-level batching for one instance: one loop thread, many sequences per forward pass.

Each turn of the loop: drop cancelled sequences; admit waiting ones (FIFO) that fit the KV budget
and prefill them together (left-padded, logits for the last position only); then one decode step
for every running sequence; finished ones leave the batch at once. Tokens stream to each
request through its own queue. A new group is prefilled in a cache of its own before it joins,
so a failure in its first step (forward or sampling) fails that group only; a row the sampler
cannot use (NaN or inf logits, in any step) fails its own sequence only, and the others go on; any
other failure in a pass over the running batch (decode, or the merge) fails the batch.

Admission policy (no preemption, so `preemptions` stays 0): the cache is padded (rows are
right-aligned), so its size is bounded by rows x the longest prompt + max_tokens among them
(the cache allocates no column beyond that bound, spare ones included: see kvcache); a sequence
is admitted only while that bound, with it included, fits the instance's KV budget (in tokens). Waiting sequences queue up to `max_queue`; beyond it `submit` raises Overloaded
(429 + Retry-After); a sequence that could never fit the budget alone gets 503.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError, Overloaded, ServiceUnavailable
from ember.platform.runtime import kvcache
from ember.platform.runtime.sequence import Sequence, sample, unsampled

log = logging.getLogger(__name__)


@dataclass
class EngineLimits:
    kv_budget_tokens: int
    max_batch: int = 64
    max_queue: int = 256
    max_prefill_tokens: int = 4096  # padded prompt tokens in one prefill pass (bounds activations)


class BatchingEngine:
    def __init__(self, model: Any, limits: EngineLimits, *, device_id: str = "cpu:0", function: str = "",
                 listener: Any = None, model_bytes: int = 0, pad_id: int = 0) -> None:
        self.model = model
        self.limits = limits
        self.device_id = device_id
        self.function = function
        self.listener = listener
        self.model_bytes = model_bytes
        self.pad_id = pad_id
        params = inspect.signature(model.forward).parameters
        self._keep_kw = "logits_to_keep" in params
        self._pos_kw = "position_ids" in params
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: Any = None
        self.pads: Any = None  # left pad columns per running row (tensor on the model's device)
        self.preemptions = 0
        self.steps = 0
        self._cond = threading.Condition()
        self._stop = False
        self._service_s = 1.0  # EWMA of a sequence's time in the batch, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"engine-{function}", daemon=True)
        self._thread.start()

    # --- request side ---------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        if seq.need > self.limits.kv_budget_tokens:
            raise ServiceUnavailable(
                f"prompt + max_tokens ({seq.need} tokens) exceeds this instance's KV-cache budget of "
                f"{self.limits.kv_budget_tokens} tokens", code="exceeds_kv_budget")
        with self._cond:
            if self._stop:
                raise ServiceUnavailable("instance is shutting down", code="instance_stopping")
            if len(self.waiting) >= self.limits.max_queue:
                raise Overloaded(f"instance queue is full ({len(self.waiting)} waiting)",
                                 retry_after_s=self.retry_after_s())
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled.set()
        with self._cond:
            self._cond.notify()

    def retry_after_s(self) -> float:
        slots = max(1, len(self.running))
        return max(1.0, self._service_s * (1 + len(self.waiting) / slots))

    def stats(self) -> dict[str, float]:
        with self._cond:
            waiting = len(self.waiting)
        running = list(self.running)
        return {"batch_size": len(running), "queue_depth": waiting,
                "kv_tokens_reserved": self._footprint(running), "kv_budget_tokens": self.limits.kv_budget_tokens,
                "kv_usage_ratio": self._footprint(running) / max(1, self.limits.kv_budget_tokens),
                "preemptions": self.preemptions, "steps": self.steps}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        err = ServiceUnavailable("instance unloaded", code="instance_unloaded")
        for seq in list(self.waiting) + list(self.running):
            seq.fail(err)
        self.waiting.clear()
        self.running = []
        self.cache = None

    # --- loop -----------------------------------------------------------------------------------
    @staticmethod
    def _footprint(seqs: list[Sequence]) -> int:
        return len(seqs) * max((s.need for s in seqs), default=0)

    def _admit(self) -> list[Sequence]:
        """Waiting sequences that fit now, FIFO (a sequence that does not fit blocks the ones behind
        it, so a long request is not starved by short ones). Called with the lock held."""
        group: list[Sequence] = []
        for seq in [s for s in self.waiting if s.cancelled.is_set()]:  # gone before their turn
            self.waiting.remove(seq)
            seq.end("cancelled")
        while self.waiting:
            seq = self.waiting[0]
            if seq.cancelled.is_set():
                self.waiting.popleft()
                seq.end("cancelled")
                continue
            rows = self.running + group + [seq]
            longest = max(len(s.ids) for s in group + [seq])
            if (len(rows) > self.limits.max_batch or self._footprint(rows) > self.limits.kv_budget_tokens
                    or (group and longest * (len(group) + 1) > self.limits.max_prefill_tokens)):
                break
            group.append(self.waiting.popleft())
        return group

    def _loop(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._stop and not self.waiting and not self.running:
                    self._cond.wait()
                if self._stop:
                    return
                group = self._admit()
            joining = None
            if group:
                try:  # the new group's own pass: a failure here fails the group, never the running batch
                    with torch.inference_mode():
                        joining = self._prefill(group)
                except Exception as e:
                    self._fail(group, e)
            try:
                with torch.inference_mode():
                    if joining is not None:
                        self._join(group, *joining)
                    self._drop([s for s in self.running if s.cancelled.is_set()], "cancelled")
                    if self.running:
                        self._decode()
            except Exception as e:  # a failed pass over the batch (or a half-done merge) fails the batch
                self._fail(self.running + [s for s in group if s not in self.running], e)
                self.running, self.cache, self.pads = [], None, None

    def _fail(self, seqs: list[Sequence], e: Exception) -> None:
        """End `seqs` with the error (an EmberError as it is, anything else as a 500); never the loop."""
        log.error("engine step failed on %s (%d sequences)", self.function, len(seqs), exc_info=e)
        err = e if isinstance(e, EmberError) else EmberError(f"generation failed: {e.__class__.__name__}")
        for seq in seqs:
            if seq.finish is None:
                seq.fail(err)

    def _forward(self, phase: str, input_ids: Any, mask: Any, pos: Any, cache: Any, tokens: int, batch: int) -> Any:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True,
                              self._cache_kw: cache}
        if self._pos_kw:
            kw["position_ids"] = pos
        if self._keep_kw:
            kw["logits_to_keep"] = 1
        self._notify_start(phase)
        t0 = time.perf_counter()
        logits = self.model(**kw).logits[:, -1]
        ids = logits  # the caller samples; the step ends when the sampled ids reach the host
        self._pending = (phase, tokens, batch, t0)
        return ids

    def _step_done(self) -> None:
        phase, tokens, batch, t0 = self._pending
        self.steps += 1
        if self.listener is None:
            return
        from ember.energy.steps import EngineStep

        try:
            self.listener.step_done(EngineStep(
                device_id=self.device_id, phase=phase, tokens=tokens, batch_size=batch,
                seconds=time.perf_counter() - t0, function=self.function,
                kv_tokens=kvcache.cache_len(self.cache) * len(self.running), model_bytes=self.model_bytes))
        except Exception:
            log.exception("step listener failed")

    def _notify_start(self, phase: str) -> None:
        if self.listener is not None:
            try:
                self.listener.phase_starts(self.device_id, phase)
            except Exception:
                log.exception("step listener failed")

    def _prefill(self, group: list[Sequence]) -> tuple[Any, Any, list[int | None]]:
        """The group's forward over its prompts in a cache of its own, and its first tokens (the
        running batch and its cache are not touched)."""
        import torch

        dev = self.model.device
        longest = max(len(s.ids) for s in group)
        rows = [[self.pad_id] * (longest - len(s.ids)) + s.ids for s in group]
        input_ids = torch.tensor(rows, device=dev)
        pads = torch.tensor([longest - len(s.ids) for s in group], device=dev)
        mask = (torch.arange(longest, device=dev)[None, :] >= pads[:, None]).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = kvcache.make_cache(self.model.config, max(s.need for s in group))
        logits = self._forward("prefill", input_ids, mask, pos, cache, sum(len(s.ids) for s in group), len(group))
        return cache, pads, sample(logits, group)

    def _join(self, group: list[Sequence], cache: Any, pads: Any, tokens: list[int | None]) -> None:
        """The prefilled group joins the running batch: both sides right-aligned to the longer length."""
        import torch

        if self.cache is None:
            self.cache, self.pads = cache, pads
        else:
            n_old, n_new = kvcache.cache_len(self.cache), kvcache.cache_len(cache)
            n = max(n_old, n_new)
            kvcache.cache_merge(self.cache, cache, max(s.need for s in self.running + group))
            self.pads = torch.cat([self.pads + (n - n_old), pads + (n - n_new)])
        self.running.extend(group)
        self._step_done()
        self._take(group, tokens)

    def _decode(self) -> None:
        import torch

        dev = self.model.device
        n = kvcache.cache_len(self.cache)
        input_ids = torch.tensor([[s.last] for s in self.running], device=dev)
        mask = (torch.arange(n + 1, device=dev)[None, :] >= self.pads[:, None]).long()
        pos = (n - self.pads)[:, None]
        batch = list(self.running)
        logits = self._forward("decode", input_ids, mask, pos, self.cache, len(batch), len(batch))
        tokens = sample(logits, batch)
        self._step_done()
        self._take(batch, tokens)

    def _take(self, seqs: list[Sequence], tokens: list[int | None]) -> None:
        """Each sequence takes its token; a row that could not be sampled fails its sequence alone.
        Finished and failed rows leave the batch (one copy of the cache for both)."""
        bad = [s for s, t in zip(seqs, tokens, strict=True) if t is None]
        for s in bad:
            log.error("engine %s: a sequence's logits were NaN or infinite after %d tokens; it fails alone",
                      self.function, len(s.out))
            s.fail(unsampled(s))
        done = [s for s, t in zip(seqs, tokens, strict=True) if t is not None and s.take(t)]
        self._end(done, None)
        self._remove(done + bad)

    def _drop(self, seqs: list[Sequence], finish: str | None) -> None:
        """End cancelled sequences and remove their rows."""
        self._end(seqs, finish)
        self._remove(seqs)

    def _end(self, seqs: list[Sequence], finish: str | None) -> None:
        """End sequences (their text flushed, GenerationDone sent); their time feeds Retry-After."""
        now = time.perf_counter()
        for s in seqs:
            self._service_s = 0.8 * self._service_s + 0.2 * (now - s.t0)
            s.end(finish)

    def _remove(self, seqs: list[Sequence]) -> None:
        """Remove rows from the batch and the cache (and all-pad columns)."""
        if not seqs:
            return
        import torch

        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self.running) if id(s) not in gone]
        if not keep:
            self.running, self.cache, self.pads = [], None, None
            return
        idx = torch.tensor(keep, device=self.pads.device)
        pads = self.pads.index_select(0, idx)
        drop_left = int(pads.min())
        self.running = [self.running[i] for i in keep]
        kvcache.cache_select(self.cache, idx, drop_left, max(s.need for s in self.running))
        self.pads = pads - drop_left
