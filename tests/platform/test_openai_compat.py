"""The official `openai` client against a real gateway and worker: what it sends, Ember takes as
OpenAI does. A client that gives up stops its generations; an omitted max_tokens is never a
refusal; null means the default; message fields Ember cannot honour are named; errors a retry
cannot fix say so (`x-should-retry: false`), so the client does not send them three times."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from ember.platform.redis_server import RedisServerProcess
from ember.platform.state import Keys
from tests.platform.conftest import (
    ADMIN_KEY,
    CLUSTER_TOKEN,
    Proc,
    admin_headers,
    base_env,
    start_gateway,
    start_worker,
    until,
)

WORKER = {"x-ember-cluster-token": CLUSTER_TOKEN}
HELLO = [{"role": "user", "content": "Hello"}]
CONTEXT = 2048  # the tiny model's max_position_embeddings
SMALL_KV_TOKENS = 1024  # the KV budget of function `smallkv`, below the context
KV_BYTES_PER_TOKEN = 512  # tiny: 2 layers x 2 KV heads x head dim 16 x (K, V) x 4 bytes


@dataclass
class Cluster:
    gateway: Proc
    worker: Proc
    r: redis.Redis
    tokenizer: Any
    store_url: str

    def client(self, **kw: Any):  # -> openai.OpenAI
        from openai import OpenAI

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return OpenAI(base_url=f"{self.gateway.url}/v1", api_key=ADMIN_KEY, **kw)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.gateway.url}{path}", headers=admin_headers(), json=body, timeout=120)

    def engine(self, function: str) -> dict[str, Any]:
        """The worker's view of the function's instance: {"active", "finished": {reason: n}}."""
        rows = httpx.get(f"{self.worker.url}/internal/healthz", headers=WORKER, timeout=10).json()["instances"]
        (row,) = [v for v in rows.values() if v["function"] == function]
        return row

    def outstanding(self, function: str) -> int:
        stats = httpx.get(f"{self.gateway.url}/v1/stats/functions", headers=admin_headers(), timeout=10).json()
        (row,) = [f for f in stats["functions"] if f["name"] == function]
        return int(row["outstanding"])

    def prompt_of(self, tokens: int) -> str:
        """A completion prompt of exactly `tokens` tokens."""
        ids = self.tokenizer("hello world " * tokens, add_special_tokens=False)["input_ids"][:tokens]
        text = self.tokenizer.decode(ids)
        assert len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens
        return text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    """A gateway and a worker; functions `tiny` (the worker's KV budget, 8192 tokens: more than the
    context) and `smallkv` (its spec's KV budget cut to 1024 tokens: less than the context)."""
    from transformers import AutoTokenizer

    from ember.loader import open_store

    tmp = tmp_path_factory.mktemp("openai-compat")
    store = open_store(f"file://{tmp / 'store'}")
    store.push(tiny_model_dir, "tiny")
    server = RedisServerProcess(tmp / "redis", persistent=False).start()
    env = base_env(server.url, store.uri, EMBER_SLO_TIMEOUT_S="20")
    procs: list[Proc] = []
    r = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        procs.append(start_gateway(tmp, env))
        procs.append(start_worker(tmp, env, "w0"))
        g = procs[0]
        assert until(lambda: httpx.get(f"{g.url}/readyz").json().get("workers") == 1, 20)
        for name in ("tiny", "smallkv"):
            resp = httpx.put(f"{g.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                             json={"checkpoint": "tiny", "scaling": {"max_instances": 1, "target_concurrency": 4}})
            assert resp.status_code == 201, resp.text
        spec = json.loads(r.hget(Keys.functions, "smallkv"))
        spec["kv_bytes"] = SMALL_KV_TOKENS * KV_BYTES_PER_TOKEN  # what its instance is loaded with
        r.hset(Keys.functions, "smallkv", json.dumps(spec))
        yield Cluster(g, procs[1], r, AutoTokenizer.from_pretrained(tiny_model_dir), store.uri)
    finally:
        r.close()
        for p in procs:
            p.stop()
        server.stop()


# --- 1. a client that leaves ------------------------------------------------------------------
def test_a_non_streamed_request_whose_client_gives_up_stops_generating(cluster: Cluster) -> None:
    """The client times out on a long non-streamed generation and retries twice (the openai
    client's default): each attempt's generation is cancelled on the worker as its connection goes
    and its slot is freed. Before, each ran to max_tokens with nobody waiting for it: one call cost
    three full generations at once."""
    import openai

    warm = cluster.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, temperature=0)
    assert warm.choices[0].finish_reason in ("stop", "length")
    before = cluster.engine("tiny")["finished"]
    impatient = cluster.client(timeout=0.5, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2000, temperature=0)
    assert until(lambda: cluster.engine("tiny")["active"] == 0, 10), cluster.engine("tiny")
    after = cluster.engine("tiny")["finished"]
    ran = {k: after[k] - before.get(k, 0) for k in after}
    assert ran["length"] == 0 and ran["stop"] == 0, ran  # none ran to its end
    assert ran["cancelled"] == 3, ran  # the first attempt and both retries, each cancelled
    assert until(lambda: cluster.outstanding("tiny") == 0, 10)  # every slot freed
    # the same through FastAPI's own route (a chunked body does not take the fast path)
    body = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 2000, "temperature": 0}).encode()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.gateway.url}/v1/chat/completions", content=iter([body]), timeout=0.5,
                   headers={**admin_headers(), "content-type": "application/json"})
    assert until(lambda: cluster.engine("tiny")["active"] == 0, 10), cluster.engine("tiny")
    again = cluster.engine("tiny")["finished"]
    assert again["cancelled"] == after["cancelled"] + 1 and again["length"] == after["length"], again
    assert until(lambda: cluster.outstanding("tiny") == 0, 10)


# --- 5. a deploy no device can hold ----------------------------------------------------------
def test_a_deploy_whose_weights_and_kv_budget_fit_no_device_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """Weights that fit a device (64 MiB here) with a KV budget that does not (a Llama-7B shape:
    1 MiB per token, 8192 tokens) could never be placed: the deploy was a 201 and every call
    then waited 20 s for a 503. Now the deploy is a 400 model_too_large, as weights alone are."""
    import torch
    from safetensors.torch import save_file

    from ember.loader import open_store

    model = tmp_path / "kv-heavy"
    model.mkdir()
    save_file({"w": torch.zeros(1 << 18, dtype=torch.float32)}, model / "model.safetensors")  # 1 MiB
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    open_store(cluster.store_url).push(model, "kvheavy")
    r = httpx.put(f"{cluster.gateway.url}/v1/functions/kvheavy", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "kvheavy"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "model_too_large" and "KV" in r.json()["error"]["message"]


# --- 6. errors a retry cannot fix ------------------------------------------------------------
def test_errors_a_retry_cannot_fix_are_not_retried_by_the_client(cluster: Cluster) -> None:
    """The openai client retries 409 and 5xx twice unless told `x-should-retry: false`: an
    unreadable function (409) or a prompt no KV budget can hold (503) was sent three times."""
    sent: list[str] = []
    counting = httpx.Client(event_hooks={"request": [lambda req: sent.append(str(req.url))]}, timeout=120)
    client = cluster.client(max_retries=2, http_client=counting)
    cluster.r.hset(Keys.functions, "broken", '{"name": "broken", "checkpoint": 5}')
    try:
        err = _status_error(lambda: client.chat.completions.create(model="broken", messages=HELLO, max_tokens=2))
    finally:
        cluster.r.hdel(Keys.functions, "broken")
    assert err.status_code == 409 and err.body["code"] == "function_unreadable"
    assert err.response.headers["x-should-retry"] == "false" and len(sent) == 1, sent
    sent.clear()
    err = _status_error(lambda: client.completions.create(model="smallkv", prompt=cluster.prompt_of(1100),
                                                          max_tokens=4))
    assert err.status_code == 503 and err.body["code"] == "exceeds_kv_budget", err.body
    assert err.response.headers["x-should-retry"] == "false" and len(sent) == 1, sent
    assert "w0" not in err.body["message"]  # the worker's node id stays in the gateway's log
    err = _status_error(lambda: client.completions.create(model="tiny", prompt="Hello", max_tokens=CONTEXT))
    assert err.status_code == 400 and err.body["code"] == "context_length_exceeded"
    assert err.response.headers["x-should-retry"] == "false" and "w0" not in err.body["message"]


def _status_error(call):  # -> openai.APIStatusError
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value
