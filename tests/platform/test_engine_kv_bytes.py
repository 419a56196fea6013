"""The bytes the batching engine's KV cache allocates stay within the instance's KV budget (what
the placement books on the device) at every step, spare decode columns included, while
sequences of different lengths join and leave the batch; the text is unchanged."""

from __future__ import annotations

import random
import threading
from typing import Any

from ember.platform.runtime import kvcache
from ember.platform.wire import GenerateRequest
from tests.platform.engine_helpers import collect as _collect
from tests.platform.engine_helpers import make_instance

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


class CacheBytes:
    """After every engine step: the bytes the cache holds, and the largest seen."""

    def __init__(self) -> None:
        self.inst: Any = None
        self.peak = 0
        self.steps = 0

    def phase_starts(self, device_id: str, phase: str) -> None:
        pass

    def step_done(self, step: Any) -> None:  # on the engine's thread, the cache as the step left it
        self.steps += 1
        self.peak = max(self.peak, kvcache.cache_nbytes(self.inst.engine.cache))


def _instance(mt: tuple[Any, Any], budget_tokens: int, **kw: Any) -> tuple[Any, CacheBytes]:
    probe = CacheBytes()
    probe.inst = make_instance(mt, kv_budget_tokens=budget_tokens, listener=probe, **kw)
    return probe.inst, probe


def test_many_short_requests_never_allocate_past_the_budget(model_and_tokenizer: tuple[Any, Any]) -> None:
    """Budget 512 tokens; 32 requests of 18 tokens each fill it (28 rows admitted at once). The
    cache held 3.7-4.4x the budget when every layer added 64 spare columns per row."""
    inst, probe = _instance(model_and_tokenizer, 512)
    inst.eos_ids = set()  # every sequence runs to max_tokens, so the rows reach their whole need
    try:
        req = GenerateRequest(prompt="hi there", max_tokens=14, temperature=0)
        seqs = [inst.submit(req) for _ in range(32)]
        dones = [_collect(s.stream())[1][0] for s in seqs]
        assert seqs[0].need == 18 and all(d.completion_tokens == 14 for d in dones)
        assert probe.peak > 0 and probe.peak <= inst.kv_budget_bytes, (probe.peak, inst.kv_budget_bytes)
    finally:
        inst.close()


def test_mixed_arrivals_stay_within_budget_and_match_alone(model_and_tokenizer: tuple[Any, Any]) -> None:
    """Prompts of 1-25 words, max_tokens 1-60, arriving while others decode, some cancelled:
    allocated bytes stay within the budget at every step, greedy text equals the request run alone."""
    inst, probe = _instance(model_and_tokenizer, 300, max_batch=16)
    rng = random.Random(7)
    reqs = [GenerateRequest(prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))),
                            max_tokens=rng.randint(1, 60), temperature=0) for _ in range(40)]
    out: list[str | None] = [None] * len(reqs)
    cancelled: set[int] = set()

    def one(i: int) -> None:
        seq = inst.submit(reqs[i])
        if i % 7 == 3:
            threading.Event().wait(0.01)
            inst.engine.cancel(seq)
            cancelled.add(i)
        out[i] = _collect(seq.stream())[0]

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
            threading.Event().wait(0.004)
        for t in threads:
            t.join(120)
        assert probe.steps > len(reqs) and 0 < probe.peak <= inst.kv_budget_bytes, (probe.peak, inst.kv_budget_bytes)
        for i, r in enumerate(reqs):
            if i not in cancelled:
                assert out[i] == _collect(inst.generate_alone(r))[0], i
    finally:
        inst.close()
