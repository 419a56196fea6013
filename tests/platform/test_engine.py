"""The batching engine in-process on CPU: greedy output equal to the request-at-a-time loop token for
token while sequences join and leave the batch, seeded sampling that repeats, stop strings,
cancellation, admission against the KV budget (queue, 429, 503), and the phase signal."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from ember.errors import Overloaded, ServiceUnavailable
from ember.platform.runtime.events import GenerationDone, TokenDelta
from ember.platform.wire import GenerateRequest
from tests.platform.engine_helpers import collect as _collect
from tests.platform.engine_helpers import make_instance as _instance

PROMPTS = ["Hello there", "What is the capital of France? Paris is", "one two three four five six seven eight",
           "Tell me a story about a cat and a dog who", "x", "Good morning, good evening, good night. Please"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def phase_starts(self, device_id: str, phase: str) -> None:
        self.calls.append(("start", (device_id, phase)))

    def step_done(self, step: Any) -> None:
        self.calls.append(("done", step))


def test_batched_greedy_equals_one_request_at_a_time(model_and_tokenizer: tuple[Any, Any]) -> None:
    """Sequences of different lengths arrive while others decode, finish at different steps (some
    at EOS, some at max_tokens), and every text equals its request run alone, and transformers'."""
    import torch

    listener = Recorder()
    inst = _instance(model_and_tokenizer, listener=listener, device_id="cpu:7")
    reqs = [GenerateRequest(prompt=p, max_tokens=6 + 5 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    try:
        alone = [_collect(inst.generate_alone(r))[0] for r in reqs]
        out: list[str | None] = [None] * len(reqs)
        seqs = [inst.submit(reqs[0])]
        stream0 = seqs[0].stream()
        first = next(stream0)  # the first sequence is running: the others join its batch
        seqs += [inst.submit(r) for r in reqs[1:]]

        def drain(i: int) -> None:
            out[i] = _collect(seqs[i].stream())[0]

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(1, len(reqs))]
        for t in threads:
            t.start()
        out[0] = (first.text if isinstance(first, TokenDelta) else "") + _collect(stream0)[0]
        for t in threads:
            t.join()
        model, tok = model_and_tokenizer
        for i, r in enumerate(reqs):
            ids = tok(r.prompt, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=r.max_tokens, do_sample=False)
            reference = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            assert out[i] == alone[i] == reference, (i, out[i], alone[i], reference)
        assert max(s.batch_size for kind, s in listener.calls if kind == "done") > 1  # really batched
    finally:
        inst.close()
    # the phase signal: a start before every step, on the engine's device id, both phases seen
    kinds = [k for k, _ in listener.calls]
    assert kinds[0::2] == ["start"] * (len(kinds) // 2) and kinds[1::2] == ["done"] * (len(kinds) // 2)
    steps = [s for k, s in listener.calls if k == "done"]
    assert {s.phase for s in steps} == {"prefill", "decode"} and all(s.device_id == "cpu:7" for s in steps)
    assert all(s.tokens >= s.batch_size >= 1 and s.seconds >= 0 and s.model_bytes > 0 for s in steps)


def test_seeded_sampling_repeats_and_stops(model_and_tokenizer: tuple[Any, Any]) -> None:
    inst = _instance(model_and_tokenizer)
    try:
        req = GenerateRequest(prompt="Hello", max_tokens=24, temperature=1.0, top_p=0.9, seed=11)
        a = _collect(inst.generate(req))[0]
        b = _collect(inst.generate(req))[0]
        c = _collect(inst.generate_alone(req))[0]
        other = _collect(inst.generate(req.model_copy(update={"seed": 12})))[0]
        assert a == b == c and a != other
        greedy = _collect(inst.generate(GenerateRequest(prompt="Hello", max_tokens=24, temperature=0)))[0]
        stop = greedy[3:6]
        text, done = _collect(inst.generate(GenerateRequest(prompt="Hello", max_tokens=24, temperature=0, stop=[stop])))
        assert text == greedy[:greedy.find(stop)] and done[0].finish_reason == "stop"
    finally:
        inst.close()


def test_cancel_drops_the_sequence_and_budget_admission(model_and_tokenizer: tuple[Any, Any]) -> None:
    """KV budget 300 tokens: a 250-token sequence runs, the next waits in the queue (bound 1), a
    third is refused with 429 and Retry-After, one that could never fit gets 503; cancelling the
    first lets the queued one in. A listener that blocks holds the engine between steps."""
    gate = threading.Event()

    class Gate(Recorder):
        def step_done(self, step: Any) -> None:
            gate.wait(30)

    inst = _instance(model_and_tokenizer, kv_budget_tokens=300, max_queue=1, listener=Gate())
    inst.eos_ids = set()  # every sequence runs to max_tokens
    try:
        with pytest.raises(ServiceUnavailable) as never:
            inst.submit(GenerateRequest(prompt="Hello", max_tokens=320, temperature=0))
        assert never.value.status_code == 503 and never.value.code == "exceeds_kv_budget"
        long = GenerateRequest(prompt="Hello", max_tokens=248, temperature=0)
        first = inst.submit(long)
        while inst.stats()["batch_size"] == 0:  # the engine took it (and waits at the gate)
            threading.Event().wait(0.01)
        second = inst.submit(long)
        with pytest.raises(Overloaded) as full:
            inst.submit(long)
        assert full.value.status_code == 429 and full.value.retry_after_s >= 1
        stats = inst.stats()
        assert stats["queue_depth"] == 1 and stats["batch_size"] == 1 and 0.5 < stats["kv_usage_ratio"] <= 1
        inst.engine.cancel(first)  # the client went away
        gate.set()
        _, done1 = _collect(inst.stream(first))
        text, done2 = _collect(inst.stream(second))
        assert done1[0].finish_reason == "cancelled" and done1[0].completion_tokens <= 2
        assert done2[0].finish_reason == "length" and done2[0].completion_tokens == 248
        assert inst.finished["cancelled"] == 1 and inst.stats()["preemptions"] == 0
    finally:
        gate.set()
        inst.close()


def test_kv_bytes_per_token_from_config() -> None:
    from transformers import GPT2Config, LlamaConfig

    from ember.loader.model import kv_bytes_per_token

    llama8b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_bytes_per_token(llama8b, 2) == 32 * 8 * 128 * 2 * 2  # 128 KiB per token
    assert kv_bytes_per_token(GPT2Config(n_embd=64, n_layer=2, n_head=4), 4) == 2 * 4 * 16 * 2 * 4


def test_gpus_are_divided_between_workers_and_matched_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.errors import ConfigError, DevicePermissionError
    from ember.platform.devices import (
        GpuInfo,
        match_nvml,
        refuse_power_control,
        select_devices,
        split_devices,
    )

    assert split_devices(["GPU-a", "GPU-b", "GPU-c", "GPU-d", "GPU-e"], 2) == ["GPU-a,GPU-b,GPU-c", "GPU-d,GPU-e"]
    assert split_devices([], 3) == [None, None, None]
    with pytest.raises(ConfigError, match="only 1 GPUs"):
        split_devices(["GPU-a"], 2)
    shares = split_devices([f"GPU-{i}" for i in range(8)], 3)
    owned = [set(s.split(",")) for s in shares if s]
    assert sum(len(o) for o in owned) == 8 and not set.intersection(*owned)  # no GPU in two workers
    visible = [GpuInfo(0, "GPU-x", 80), GpuInfo(1, "GPU-y", 80), GpuInfo(2, "MIG-z", 10)]
    assert [d.index for d in select_devices(visible, "GPU-y,0")] == [1, 0]
    assert select_devices(visible, None) == visible
    with pytest.raises(ConfigError, match="does not see"):
        select_devices(visible, "GPU-q")
    # NVML lists them in another order: matched by UUID, not position
    assert match_nvml(visible, ["MIG-z", "GPU-y", "GPU-x"]) == {0: 2, 1: 1, 2: 0}
    with pytest.raises(ConfigError):
        match_nvml(visible, ["GPU-x"])
    from ember.platform.devices import visible_gpu_ids

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")  # workers inherit the mask: indices into it
    assert split_devices(visible_gpu_ids(), 2) == ["0,1", "2"]
    refuse_power_control(visible[0])
    with pytest.raises(DevicePermissionError, match="MIG instance"):
        refuse_power_control(visible[2])


def test_device_claim_counts_shared_weights_once(redis_url: str) -> None:
    """Two instances of one checkpoint on one device claim the weights once and a KV budget each;
    removing them gives back exactly what was claimed."""
    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.scheduler.policies import get_policy
    from ember.scheduler.view import PlacementRequest

    c = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=30)
    c.register_node("n", "http://127.0.0.1:9", [DeviceSpec("cuda:0", 1000, "GPU-x")], {"dram": 1e10})
    req = PlacementRequest(function="f", checkpoint="ck", nbytes=600, kv_bytes=100)

    def claimed() -> int:
        return int(c.r.hget(next(k for k in c.r.scan_iter("*device:n/cuda:0")), "claimed_bytes") or 0)

    a = c.place(req, get_policy("ember"))
    b = c.place(req, get_policy("ember"))
    assert a and b and claimed() == 600 + 2 * 100
    other = PlacementRequest(function="g", checkpoint="other", nbytes=300, kv_bytes=100)
    assert c.place(other, get_policy("ember")) is None  # 800 + 300 + 100 > 1000: no overcommit
    c.remove_instance(a.instance_id)
    assert claimed() == 700  # the weights stay while b uses them
    c.remove_instance(b.instance_id)
    assert claimed() == 0


def test_watch_delivers_every_event_to_a_sink_in_order_and_stop_cancels(model_and_tokenizer: tuple[Any, Any]) -> None:
    """The worker's relay without a thread per request: events already queued when the sink is
    attached come first, the text equals `stream`'s, and stopping before the end cancels the sequence
    and leaves no request counted active."""
    inst = _instance(model_and_tokenizer)
    try:
        req = GenerateRequest(prompt=PROMPTS[1], max_tokens=12, temperature=0)
        reference, _ = _collect(inst.generate(req))
        got: list[Any] = []
        finished = threading.Event()

        def sink(ev: Any) -> None:  # the engine's thread
            got.append(ev)
            if isinstance(ev, GenerationDone):
                finished.set()

        seq = inst.submit(req)
        while not seq.out and seq.finish is None:  # some events are queued before anyone listens
            threading.Event().wait(0.002)
        stop = inst.watch(seq, sink)
        assert finished.wait(30)
        stop()
        stop()  # idempotent
        text, done = _collect(got)
        assert text == reference and len(done) == 1 and done[0].completion_tokens == len(seq.out)
        assert inst.active == 0

        inst.eos_ids = set()  # runs to max_tokens unless cancelled
        long = inst.submit(GenerateRequest(prompt=PROMPTS[0], max_tokens=200, temperature=0))
        stop = inst.watch(long, lambda ev: None)
        assert inst.active == 1
        stop()  # the listener went away mid-way
        deadline = threading.Event()
        for _ in range(500):
            if long.finish is not None:
                break
            deadline.wait(0.01)
        assert long.finish == "cancelled" and len(long.out) < 200 and inst.active == 0
    finally:
        inst.close()


def test_a_stop_string_completed_by_the_flushed_tail_is_cut(model_and_tokenizer: tuple[Any, Any]) -> None:
    """A generation that ends mid-character (max_tokens reached on a lone UTF-8 lead byte) flushes
    its incomplete tail as U+FFFD; a stop string that tail completes was sent to the client."""
    inst = _instance(model_and_tokenizer)
    tok = model_and_tokenizer[1]
    lead = tok.encode("é", add_special_tokens=False)[0]  # the byte 0xC3 alone
    word = tok.encode(" hello", add_special_tokens=False)
    try:
        for stop, expect in (("\ufffd", " hello"), ("o\ufffd", " hell"), ("zz", " hello\ufffd")):
            seq = inst.new_sequence(GenerateRequest(prompt="Hello", max_tokens=len(word) + 1, stop=[stop]))
            assert [seq.take(t) for t in word + [lead]] == [False] * len(word) + [True]
            seq.end()
            text, done = _collect(seq.stream())
            assert text == expect, stop
            assert done[0].finish_reason == ("length" if stop == "zz" else "stop"), stop
    finally:
        inst.close()


def test_tpot_spans_the_counted_tokens_not_the_eos_step(model_and_tokenizer: tuple[Any, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence that ends at EOS: completion_tokens excludes the EOS token, so its step's time is
    not a gap between tokens. A clock that moves one second per engine step gives TPOT exactly 1 s."""
    from ember.platform.runtime import sequence

    clock = [0.0]
    monkeypatch.setattr(sequence, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class Tick(Recorder):
        def step_done(self, step: Any) -> None:  # after each forward, before its tokens are taken
            clock[0] += 1.0

    inst = _instance(model_and_tokenizer, listener=Tick())
    try:
        req = GenerateRequest(prompt=PROMPTS[2], max_tokens=12, temperature=0)
        inst.eos_ids = set()
        seq = inst.submit(req)
        _collect(seq.stream())
        k = next(i for i in range(3, 12) if seq.out[i] not in seq.out[:i])
        inst.eos_ids = {seq.out[k]}  # the same run now ends at EOS after k tokens
        _, done = _collect(inst.generate(req))
        assert done[0].finish_reason == "stop" and done[0].completion_tokens == k
        assert done[0].ttft_s == 1.0 and done[0].tpot_s == 1.0, done[0]
    finally:
        inst.close()
