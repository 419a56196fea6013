"""Every causal LM through the platform: models built from transformers' config classes (random
weights, tiny sizes, `save_pretrained`), pushed, deployed and invoked greedily through a real
gateway and worker; the text equals transformers' own `generate`. An architecture that cannot be
served is refused at deploy (400). The same platform checks the engine's admission: a full
instance queue answers 429 with Retry-After, a request no KV budget can hold 503.
One platform (Redis, gateway, worker) for the whole module."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.platform.redis_server import RedisServerProcess
from tests.platform.conftest import Proc, admin_headers, base_env, start_gateway, start_worker

PROMPT = "Hello there, what is the capital of France?"
MAX_TOKENS = 10


def _configs(tok: Any) -> dict[str, Any]:
    from transformers import (
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
    )

    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512, **ids}
    return {
        "llama": LlamaConfig(**small),
        "qwen2": Qwen2Config(**small),
        "mistral": MistralConfig(**small, sliding_window=256),
        "gemma": GemmaConfig(**small, head_dim=16),
        "phi3": Phi3Config(**small),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids),
        "mixtral": MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """name -> (model dir, transformers' greedy text for PROMPT)."""
    import torch
    from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

    from ember.tinymodel import build_tokenizer

    root = tmp_path_factory.mktemp("archs")
    tok = build_tokenizer()
    out = {}
    for name, config in _configs(tok).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)  # larger than default: the text varies with the prompt
        model.eval()
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                    do_sample=False)
        out[name] = (d, tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    # for the admission test: greedy never picks EOS (its output row is zero while the other 500+
    # logits are random), so a request runs exactly max_tokens
    torch.manual_seed(1)
    nostop = AutoModelForCausalLM.from_config(_configs(tok)["llama"].__class__(
        **{**_configs(tok)["llama"].to_dict(), "max_position_embeddings": 2048}))
    with torch.no_grad():
        for p in nostop.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
        nostop.lm_head.weight[tok.eos_token_id] = 0.0
    nostop.save_pretrained(root / "nostop")
    tok.save_pretrained(root / "nostop")
    out["nostop"] = (root / "nostop", "")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                             d_kv=16, decoder_start_token_id=0))
    t5.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    out["t5"] = (root / "t5", "")
    return out


class Platform:
    """Started in the background (worker and gateway boot while the models are built); `ready()`
    waits for both, once."""

    def __init__(self, tmp: Path, env: dict[str, str], store_url: str) -> None:
        self.store_url = store_url
        self.procs: dict[str, Proc] = {}
        self.errors: list[BaseException] = []

        def start(name: str) -> None:
            try:
                self.procs[name] = start_worker(tmp, env, "w0") if name == "worker" else start_gateway(tmp, env)
            except BaseException as e:  # raised by ready()
                self.errors.append(e)

        self.threads = [threading.Thread(target=start, args=(n,)) for n in ("worker", "gateway")]
        for t in self.threads:
            t.start()
        self.pushed: set[str] = set()

    def ready(self, models: dict[str, tuple[Path, str]]) -> Platform:
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]
        from ember.loader import open_store

        store = open_store(self.store_url)
        for name, (d, _) in models.items():
            if name not in self.pushed:
                store.push(d, name)
                self.pushed.add(name)
        deadline = time.monotonic() + 30
        while httpx.get(f"{self.url}/readyz").json().get("workers") != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    @property
    def gateway(self) -> Proc:
        return self.procs["gateway"]

    @property
    def worker(self) -> Proc:
        return self.procs["worker"]

    @property
    def url(self) -> str:
        return self.gateway.url

    def deploy(self, name: str, checkpoint: str, **scaling: Any) -> httpx.Response:
        return httpx.put(f"{self.url}/v1/functions/{name}", headers=admin_headers(), timeout=120,
                         json={"checkpoint": checkpoint, "scaling": {"keep_alive_s": 300, **scaling}})

    def complete(self, model: str, max_tokens: int = MAX_TOKENS, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/completions", headers=admin_headers(), timeout=120,
                          json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **kw})


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Platform]:
    from ember.loader import open_store

    tmp = tmp_path_factory.mktemp("archs-platform")
    store_url = f"file://{tmp / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    redis = RedisServerProcess(tmp / "redis", persistent=False).start()
    # a small KV budget and queue bound, so the admission test below can fill them
    env = base_env(redis.url, store_url, EMBER_SLO_TIMEOUT_S="60", EMBER_KV_BUDGET_TOKENS="1000",
                   EMBER_ENGINE_MAX_QUEUE="1", EMBER_DRAM_CAPACITY_BYTES=str(256 << 20))
    plat = Platform(tmp, env, store_url)
    try:
        yield plat
    finally:
        for t in plat.threads:
            t.join()
        for p in plat.procs.values():
            p.stop()
        redis.stop()


ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "mixtral"]


def test_every_causal_lm_serves_transformers_greedy_text(platform: Platform,
                                                         models: dict[str, tuple[Path, str]]) -> None:
    platform.ready(models)
    for name in ARCHS:
        r = platform.deploy(name, name)
        assert r.status_code == 201, (name, r.text)
        assert r.json()["kv_bytes"] > 0  # the instance's KV budget, claimed with the weights
        r = platform.complete(name)
        assert r.status_code == 200, (name, r.text)
        assert r.json()["choices"][0]["text"] == models[name][1], name


def test_unservable_architecture_refused_at_deploy(platform: Platform, models: dict[str, tuple[Path, str]]) -> None:
    r = platform.ready(models).deploy("t5", "t5")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_architecture" and "encoder-decoder" in err["message"]


def test_full_queue_answers_429_and_too_big_503(platform: Platform, models: dict[str, tuple[Path, str]]) -> None:
    """Worker: KV budget 1000 tokens, queue bound 1. A ~990-token request runs (its model never
    picks EOS), the next one
    queues, a third is refused with 429 + Retry-After; a request no instance could hold gets 503."""
    assert platform.ready(models).deploy("q", "nostop", max_instances=1, target_concurrency=8).status_code == 201
    r = platform.complete("q", max_tokens=1200)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "exceeds_kv_budget"
    statuses: list[tuple[int, str | None]] = []
    started = threading.Event()

    def long(stream: bool) -> None:
        body = {"model": "q", "prompt": PROMPT, "max_tokens": 980, "temperature": 0, "stream": stream}
        with httpx.stream("POST", f"{platform.url}/v1/completions", headers=admin_headers(), json=body,
                          timeout=120) as resp:
            statuses.append((resp.status_code, resp.headers.get("retry-after")))
            for line in resp.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                    started.set()

    first = threading.Thread(target=long, args=(True,))
    first.start()
    assert started.wait(60)  # the first one is generating
    others = [threading.Thread(target=long, args=(False,)) for _ in range(2)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join()
    codes = sorted(s for s, _ in statuses)
    assert codes == [200, 200, 429], statuses
    assert all(int(ra) >= 1 for s, ra in statuses if s == 429 and ra is not None)
    assert [ra for s, ra in statuses if s == 429][0] is not None
    metrics = httpx.get(f"{platform.worker.url}/metrics").text  # Prometheus, per function and instance
    for family in ("ember_engine_kv_cache_usage_ratio", "ember_engine_batch_size", "ember_engine_queue_depth",
                   "ember_engine_preemptions_total", "ember_engine_kv_budget_tokens"):
        assert f'{family}{{function="q",instance=' in metrics, family
    assert 'ember_engine_kv_budget_tokens{function="q"' in metrics and " 1000.0" in metrics
