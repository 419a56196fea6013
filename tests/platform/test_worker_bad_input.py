"""Bodies a worker's instance cannot generate from, against a real gateway and worker: a clear
4xx in the OpenAI shape from the worker (and the same status at the gateway), never a 500/502."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from tests.platform.conftest import CLUSTER_TOKEN, TierCluster, admin_headers

WORKER = {"x-ember-cluster-token": CLUSTER_TOKEN}
# Gemma/Mistral-style: the template itself refuses a system role and roles that do not alternate
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def _deploy(cluster: TierCluster, name: str, checkpoint: str) -> str:
    """Deploy `name`, serve one request through the gateway (a cold start), and return the id of
    the instance the worker holds for it."""
    u = cluster.gateway.url
    r = httpx.put(f"{u}/v1/functions/{name}", headers=admin_headers(), json={"checkpoint": checkpoint})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{u}/v1/completions", headers=admin_headers(), timeout=120,
                   json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = httpx.get(f"{cluster.worker.url}/internal/healthz", headers=WORKER, timeout=10).json()["instances"]
        ids = [i for i, v in held.items() if v["function"] == name]
        if ids:
            return ids[0]
        time.sleep(0.1)
    raise AssertionError(f"no instance of {name} on the worker")


def _worker_generate(cluster: TierCluster, iid: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{cluster.worker.url}/internal/instances/{iid}/generate", content=body, timeout=60,
                      headers={**WORKER, "content-type": "application/json"})


def test_out_of_range_sampling_bodies_get_422_from_the_worker(tier_cluster: TierCluster) -> None:
    """max_tokens 0 used to generate a token and -5 shrank the request's KV need below its prompt;
    the worker's wire now has the gateway's bounds, and an in-range body still serves."""
    iid = _deploy(tier_cluster, "wbad", "rlck")
    for body in ('{"prompt": "hi", "max_tokens": 0}', '{"prompt": "hi", "max_tokens": -5}',
                 '{"prompt": "hi", "max_tokens": 2, "temperature": 2.5}', '{"prompt": "hi", "top_p": 0}',
                 '{"prompt": "hi", "top_p": 1.5}', '{"messages": [], "max_tokens": 3}',
                 '{"prompt": "hi", "seed": 18446744073709551616}', '{"prompt": "hi", "eta": 2}',
                 '{"max_tokens": 3}', '{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}'):
        r = _worker_generate(tier_cluster, iid, body.encode())
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error", body
    ok = _worker_generate(tier_cluster, iid, b'{"prompt": "hi", "max_tokens": 1, "temperature": 0}')
    assert ok.status_code == 200 and '"done"' in ok.text, ok.text


def test_a_conversation_the_chat_template_refuses_is_a_400(tier_cluster: TierCluster, tiny_model_dir: Path) -> None:
    """A model whose chat template raises (system role, roles out of order) answered 500 from the
    worker and 502 from the gateway; now 400 invalid_request_error with the template's message at
    both, and a conversation it takes still serves."""
    from ember.loader import open_store
    from ember.loader.convert import convert_checkpoint

    src = tier_cluster.tmp / "strict-hf"
    if not src.exists():
        shutil.copytree(tiny_model_dir, src)
        (src / "chat_template.jinja").write_text(STRICT_TEMPLATE)
        convert_checkpoint(src, tier_cluster.tmp / "strict-conv")
        open_store(f"file://{tier_cluster.tmp / 'store'}").push(tier_cluster.tmp / "strict-conv", "strictck")
    iid = _deploy(tier_cluster, "wstrict", "strictck")
    u, h = tier_cluster.gateway.url, admin_headers()
    cases = {"System role not supported": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
             "Conversation roles must alternate": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    for says, messages in cases.items():
        at_worker = _worker_generate(tier_cluster, iid, httpx.Request(
            "POST", "/", json={"messages": messages, "max_tokens": 3}).content)
        at_gateway = httpx.post(f"{u}/v1/chat/completions", headers=h, timeout=60,
                                json={"model": "wstrict", "messages": messages, "max_tokens": 3})
        for r in (at_worker, at_gateway):
            assert r.status_code == 400, (says, r.status_code, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and says in err["message"], err
    ok = httpx.post(f"{u}/v1/chat/completions", headers=h, timeout=60,
                    json={"model": "wstrict", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok.status_code == 200, ok.text


def test_an_instance_on_its_way_out_refuses_new_requests_and_stays_booked(tier_cluster: TierCluster) -> None:
    """An instance draining on its worker (unloading while a request runs) takes no new request: a
    409 instance_draining, on which the gateway only tries elsewhere. It used to be served (and cut at
    the drain grace), and an instance retired by the DRAM scrub answered 404, on which the gateway
    freed the claim of an instance the worker still held."""
    import threading

    import redis as redis_lib

    iid = _deploy(tier_cluster, "wdrain", "rlck")
    # greedy from "Hello" this model never meets EOS: 2,000 tokens, about a second
    body = b'{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2000, "temperature": 0}'
    done: dict = {}
    running = threading.Thread(target=lambda: done.update(r=_worker_generate(tier_cluster, iid, body)))
    running.start()
    time.sleep(0.2)  # it is generating
    unload = httpx.delete(f"{tier_cluster.worker.url}/internal/instances/{iid}", params={"wait_s": 0}, timeout=30,
                          headers=WORKER)
    assert unload.status_code in (200, 202), unload.text
    refused = _worker_generate(tier_cluster, iid, b'{"prompt": "hi", "max_tokens": 2}')
    running.join(120)
    assert unload.status_code == 202, unload.text  # still draining when asked
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "instance_draining", refused.text
    assert done["r"].status_code == 200 and '"length"' in done["r"].text  # the running one ran to its end
    r = redis_lib.Redis.from_url(tier_cluster.env["EMBER_REDIS_URL"], decode_responses=True)  # type: ignore[index]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and r.exists(f"ember:instance:{iid}"):
        time.sleep(0.1)
    assert not r.exists(f"ember:instance:{iid}")  # removed by its worker once idle
    r.close()
