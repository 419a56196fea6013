"""Requests the batching engine cannot serve fail alone: a request that fails in its first step
(its prefill or first sample) leaves the running batch and its cache alone; a request whose logits
row turns NaN or inf in a decode step fails alone and the batch goes on; a request the wire would
refuse (max_tokens <= 0) is refused by the engine too, with a 400."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ember.errors import BadRequest, EmberError
from ember.platform.runtime.events import TokenDelta
from ember.platform.wire import GenerateRequest
from tests.platform.engine_helpers import collect as _collect
from tests.platform.engine_helpers import make_instance as _instance


def test_a_request_failing_in_its_first_step_fails_alone(model_and_tokenizer: tuple[Any, Any]) -> None:
    """Three greedy requests are decoding when one whose sampling cannot work (NaN temperature, built
    past the wire's validation) joins: it gets an error (counted in the instance's finished counts),
    the three run to the end with the text they have alone, and the instance keeps serving."""
    inst = _instance(model_and_tokenizer)
    inst.eos_ids = set()  # every sequence runs to max_tokens
    try:
        good = [GenerateRequest(prompt=p, max_tokens=200, temperature=0) for p in ("one two three", "Hello", "x")]
        alone = [_collect(inst.generate_alone(r))[0] for r in good]
        seqs = [inst.submit(r) for r in good]
        stream0 = seqs[0].stream()
        first = next(stream0)
        while inst.stats()["batch_size"] < 3:  # all three are decoding (the bad one joins alone)
            threading.Event().wait(0.002)
        bad_req = GenerateRequest.model_construct(**{**GenerateRequest(prompt="hi", max_tokens=5).model_dump(),
                                                     "temperature": float("nan")})
        bad = inst.submit(bad_req)
        with pytest.raises(EmberError) as failed:
            _collect(bad.stream())
        assert failed.value.status_code == 500 and bad.finish == "error"
        assert all(s.finish is None for s in seqs)  # it failed while the three were running
        out: list[Any] = [None] * 3

        def drain(i: int) -> None:
            out[i] = _collect(seqs[i].stream())

        threads = [threading.Thread(target=drain, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        out[0] = _collect(stream0)
        out[0] = (first.text if isinstance(first, TokenDelta) else "") + out[0][0], out[0][1]
        for t in threads:
            t.join(60)
        for i in range(3):
            text, done = out[i]
            assert done and done[0].finish_reason == "length" and done[0].completion_tokens == 200, i
            assert text == alone[i], i
        after = _collect(inst.generate(GenerateRequest(prompt="Hello", max_tokens=4, temperature=0)))
        assert after[1][0].completion_tokens == 4
        assert inst.finished["error"] == 1  # the failure is counted like any other end
    finally:
        inst.close()


@pytest.mark.parametrize("temperature,poison", [(1.0, float("nan")), (0.0, float("nan")), (0.7, float("inf"))])
def test_a_bad_logits_row_in_decode_fails_that_request_alone(model_and_tokenizer: tuple[Any, Any], temperature: float,
                                                             poison: float) -> None:
    """Three requests decode together when the model's logits row of one of them turns NaN or inf
    (a fault injected into the real forward once it has three tokens): that request gets an error
    event, the other two run to the end with the text they have alone, and the failure is counted
    in the instance's finished counts."""
    model, _ = model_and_tokenizer
    inst = _instance(model_and_tokenizer)
    inst.eos_ids = set()  # every sequence runs to max_tokens
    good = [GenerateRequest(prompt=p, max_tokens=40, temperature=0) for p in ("one two three", "Hello")]
    bad_req = GenerateRequest(prompt="x", max_tokens=40, temperature=temperature, seed=3)
    bad: list[Any] = []

    def poison_row(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        rows = inst.engine.running
        if bad and kwargs["input_ids"].shape[1] == 1 and bad[0] in rows and len(bad[0].out) >= 3:
            output.logits[rows.index(bad[0]), -1, 5] = poison
        return output

    hook = model.register_forward_hook(poison_row, with_kwargs=True)
    try:
        alone = [_collect(inst.generate_alone(r))[0] for r in good]
        seqs = [inst.submit(r) for r in good]
        bad.append(inst.submit(bad_req))
        with pytest.raises(EmberError) as failed:
            _collect(bad[0].stream())
        assert failed.value.status_code == 500 and failed.value.code == "invalid_logits" and bad[0].finish == "error"
        assert len(bad[0].out) == 3
        for seq, text in zip(seqs, alone, strict=True):
            got, done = _collect(seq.stream())
            assert done and done[0].finish_reason == "length" and done[0].completion_tokens == 40
            assert got == text
        assert inst.finished["error"] == 1 and inst.finished["length"] == 4  # the two run alone, then batched
        assert inst.stats()["batch_size"] == 0
    finally:
        hook.remove()
        inst.close()


def test_non_positive_max_tokens_are_refused_not_served(model_and_tokenizer: tuple[Any, Any]) -> None:
    """The wire refuses max_tokens < 1 (422); a request built past it gets a 400 from the engine,
    on both loops, instead of a token from max_tokens=0 or a negative `need` that let ten 193-token
    prompts into a 100-token budget."""
    from pydantic import ValidationError

    for bad in ('{"prompt": "hi", "max_tokens": 0}', '{"prompt": "hi", "max_tokens": -5}',
                '{"prompt": "hi", "temperature": 2.5}', '{"prompt": "hi", "top_p": 0}', '{"messages": []}',
                '{"prompt": "hi", "seed": 18446744073709551616}'):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate_json(bad)
    inst = _instance(model_and_tokenizer, kv_budget_tokens=100)
    try:
        for max_tokens in (0, -183):
            req = GenerateRequest.model_construct(**{**GenerateRequest(prompt="one two " * 40).model_dump(),
                                                     "max_tokens": max_tokens})
            for run in (inst.submit, lambda r: list(inst.generate_alone(r))):
                with pytest.raises(BadRequest) as refused:
                    run(req)
                assert refused.value.status_code == 400 and refused.value.code == "invalid_max_tokens"
        assert inst.stats()["batch_size"] == 0 and inst.stats()["queue_depth"] == 0
    finally:
        inst.close()
