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
    wait_healthy,
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
        procs.append(start_gateway(tmp, env, wait=False))  # both boot side by side
        procs.append(start_worker(tmp, env, "w0", wait=False))
        for p in procs:
            wait_healthy(p)
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


# --- 2. an omitted max_tokens ----------------------------------------------------------------
def test_an_omitted_max_tokens_is_what_the_context_leaves(cluster: Cluster) -> None:
    """A long prompt without max_tokens: the completion fills what the 2048-token context leaves
    (completions: at most OpenAI's default of 16), never a 400 about a max_tokens the client did not
    send (chat used 128, completions 16, both checked against the context as if asked for)."""
    client = cluster.client()
    done = client.completions.create(model="tiny", prompt=cluster.prompt_of(2040), temperature=0)
    assert done.usage.prompt_tokens == 2040
    assert 1 <= done.usage.completion_tokens <= CONTEXT - 2040
    chat = client.chat.completions.create(model="tiny", temperature=0,
                                          messages=[{"role": "user", "content": cluster.prompt_of(2000)}])
    assert chat.usage.prompt_tokens > 2000
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= CONTEXT
    # a chat without max_tokens is not cut at an invented default (it was 128)
    long = client.chat.completions.create(model="tiny", messages=HELLO, temperature=1, seed=3)
    assert long.choices[0].finish_reason == "stop" or long.usage.completion_tokens > 128, long.usage
    # a prompt that fills the context alone is the prompt's fault, and the message says so
    err = _status_error(lambda: client.completions.create(model="tiny", prompt=cluster.prompt_of(CONTEXT)))
    assert err.status_code == 400 and "max_tokens" not in err.body["message"], err.body


def test_an_omitted_max_tokens_is_what_the_kv_budget_leaves(cluster: Cluster) -> None:
    """`smallkv` holds 1024 tokens per request, less than the context: a long prompt without
    max_tokens gets what the budget leaves (it was a 503 exceeds_kv_budget about a prompt +
    max_tokens the client never chose)."""
    client = cluster.client()
    done = client.completions.create(model="smallkv", prompt=cluster.prompt_of(1015), temperature=0)
    assert done.usage.prompt_tokens == 1015 and 1 <= done.usage.completion_tokens <= SMALL_KV_TOKENS - 1015
    chat = client.chat.completions.create(model="smallkv", temperature=0,
                                          messages=[{"role": "user", "content": cluster.prompt_of(990)}])
    assert chat.usage.prompt_tokens > 990
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= SMALL_KV_TOKENS


def _status_error(call):  # -> openai.APIStatusError
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


# --- 3. null is the default ------------------------------------------------------------------
def test_null_means_the_default(cluster: Cluster) -> None:
    """Explicit JSON nulls for OpenAI's nullable parameters are their defaults (they were 422s)."""
    client = cluster.client()
    nulls: dict[str, Any] = dict(temperature=None, top_p=None, n=None, stop=None, user=None, max_tokens=None,
                                 max_completion_tokens=None, presence_penalty=None, frequency_penalty=None,
                                 logprobs=None, top_logprobs=None, logit_bias=None, response_format=None,
                                 tools=None, tool_choice=None, stream_options=None)
    seeded = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, seed=5, temperature=1)
    same = client.chat.completions.create(model="tiny", messages=HELLO, seed=5, **{**nulls, "max_tokens": 8})
    assert same.choices[0].message.content == seeded.choices[0].message.content  # null temperature: 1
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=None, temperature=None, top_p=None,
                                  n=None, stop=None, seed=None, echo=None, best_of=None, suffix=None, logprobs=None)
    assert r.usage.completion_tokens <= 16  # OpenAI's completions default
    raw = {"model": "tiny", "messages": HELLO, "max_tokens": 3, "stream": None, "seed": None, "user": None}
    resp = cluster.post("/v1/chat/completions", raw)
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion", resp.text  # stream null: false
    streamed = cluster.post("/v1/chat/completions", {**raw, "stream": True, "stream_options": {"include_usage": None}})
    assert streamed.status_code == 200, streamed.text
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks and all("usage" not in c for c in chunks)  # include_usage null: false


# --- 4. message fields Ember cannot honour ---------------------------------------------------
def test_tool_fields_in_messages_are_named_not_dropped(cluster: Cluster) -> None:
    """Tool calls, tool results, participant names and messages without content were dropped
    silently (the model answered another conversation): each is a 400 naming the field."""
    client = cluster.client()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    user = {"role": "user", "content": "Hi"}
    cases: dict[str, list[dict[str, Any]]] = {
        "messages[1].tool_calls": [user, {"role": "assistant", "content": None, "tool_calls": [call]}],
        "messages[1].function_call": [user, {"role": "assistant", "content": None,
                                             "function_call": {"name": "f", "arguments": "{}"}}],
        "messages[1].role": [user, {"role": "tool", "tool_call_id": "c1", "content": "42"}],
        "messages[0].role": [{"role": "function", "name": "f", "content": "42"}],
        "messages[0].name": [{"role": "user", "name": "bob", "content": "Hello"}],
        "messages[0].content": [{"role": "user", "content": None}],
        "messages[2].content": [user, {"role": "assistant", "content": "Sure"}, {"role": "user"}],
    }
    for param, messages in cases.items():
        err = _status_error(lambda m=messages: client.chat.completions.create(model="tiny", messages=m,
                                                                              max_tokens=2))
        assert err.status_code == 400, (param, err.body)
        assert err.body["param"] == param and param.split(".")[-1] in err.body["message"], (param, err.body)
    neutral = [{"role": "user", "content": "Hi", "name": None},
               {"role": "assistant", "content": "Sure", "tool_calls": [], "function_call": None, "refusal": None},
               {"role": "user", "content": "Hello"}]
    assert client.chat.completions.create(model="tiny", messages=neutral, max_tokens=2).choices


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


# --- smaller differences from OpenAI ---------------------------------------------------------
def test_parameters_as_openai_takes_them(cluster: Cluster) -> None:
    """`top_p: 0` is the smallest nucleus (greedy), not a 422; `stream_options` without `stream`
    is a 400; /v1/completions has no `max_completion_tokens` (it overrode max_tokens); errors
    name the parameter at fault in `param`."""
    client = cluster.client()
    greedy = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    nucleus = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=1.5,
                                             top_p=0)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content
    err = _status_error(lambda: client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2,
                                                               stream_options={"include_usage": True}))
    assert err.status_code == 400 and err.body["param"] == "stream_options", err.body
    err = _status_error(lambda: client.completions.create(model="tiny", prompt="Hello", max_tokens=2,
                                                          extra_body={"max_completion_tokens": 5}))
    assert err.status_code == 400 and err.body["param"] == "max_completion_tokens", err.body
    err = _status_error(lambda: client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2,
                                                               presence_penalty=0.5))
    assert err.body["code"] == "unsupported_parameter" and err.body["param"] == "presence_penalty"
    err = _status_error(lambda: client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2,
                                                               temperature=5))
    assert err.body["param"] == "temperature", err.body
    assert err.response.headers["x-should-retry"] == "false"
