"""Deploying a function again, through the real routes (gateway + worker, a real redis-server; the
`tier_cluster` fixture): a new checkpoint is what the next request gets, while the request in flight
on the old one finishes; a function deleted and created again starts with no statistics."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from ember.platform.state import Keys
from tests.platform.conftest import TierCluster, admin_headers, feed_fifo, until

CHAT = {"messages": [{"role": "user", "content": "Once upon"}], "max_tokens": 12, "temperature": 0}


def _deploy(url: str, name: str, checkpoint: str) -> httpx.Response:
    r = httpx.put(f"{url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                  json={"checkpoint": checkpoint, "scaling": {"keep_alive_s": 600, "max_instances": 2}})
    assert r.status_code in (200, 201), r.text
    return r


def _chat(url: str, name: str) -> httpx.Response:
    r = httpx.post(f"{url}/v1/chat/completions", headers=admin_headers(), json={"model": name, **CHAT}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def _text(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def test_a_redeploy_on_another_checkpoint_serves_it_next_and_lets_the_old_one_finish(tier_cluster: TierCluster) -> None:
    """Before, the warm instance of the old checkpoint kept serving the old model for as long as it
    was kept alive (under steady traffic, for good)."""
    u = tier_cluster.gateway.url
    elsewhere = f"file://{tier_cluster.tmp / 'elsewhere'}/twin"  # other weights under the same name
    _deploy(u, "swapf", "twin")
    old_text = _text(_chat(u, "swapf"))
    body = {"model": "swapf", "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{u}/v1/completions", headers=admin_headers(), json=body, timeout=120) as stream:
        assert stream.status_code == 200 and stream.headers["x-ember-cold-start"] == "false"
        lines = stream.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        assert json.loads(first[6:])["choices"]
        assert _deploy(u, "swapf", elsewhere).status_code == 200  # redeployed while that stream runs
        r = _chat(u, "swapf")
        assert r.headers["x-ember-cold-start"] == "true", r.headers
        assert _text(r) != old_text  # the new checkpoint's weights
        rest = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "[DONE]"  # the request on the old instance ran to its end, not cut
    events = [json.loads(x) for x in rest[:-1]]
    assert not [e for e in events if "error" in e], events
    assert [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")] in (["stop"], ["length"])
    assert events[-1]["usage"]["completion_tokens"] >= 1
    spec = httpx.get(f"{u}/v1/functions/swapf", headers=admin_headers(), timeout=10).json()
    assert until(lambda: len(httpx.get(f"{u}/v1/functions/swapf", headers=admin_headers(),
                                       timeout=10).json()["instances"]) == 1), spec  # the old one went
    assert _text(_chat(u, "swapf")) == _text(r)
    assert httpx.delete(f"{u}/v1/functions/swapf", headers=admin_headers(), timeout=60).status_code == 204


def test_a_function_created_again_starts_with_no_statistics(tier_cluster: TierCluster) -> None:
    """Requests of a deleted function were counted for the next function of that name (another
    tenant's too)."""
    u = tier_cluster.gateway.url

    def stats() -> dict:
        got = httpx.get(f"{u}/v1/stats/functions", headers=admin_headers(), timeout=10).json()["functions"]
        return next(f for f in got if f["name"] == "statf")

    _deploy(u, "statf", "twin")
    for _ in range(2):
        _chat(u, "statf")
    assert stats()["requests"] == 2
    assert httpx.delete(f"{u}/v1/functions/statf", headers=admin_headers(), timeout=60).status_code == 204
    _deploy(u, "statf", "twin")
    fresh = stats()
    assert fresh["requests"] == 0 and fresh["errors"] == 0 and fresh["slo_attainment"] is None
    assert fresh["cold_starts"] == {} and fresh["last_request_s"] is None
    _chat(u, "statf")
    assert stats()["requests"] == 1
    assert httpx.delete(f"{u}/v1/functions/statf", headers=admin_headers(), timeout=60).status_code == 204


def _hold_load_on_a_fifo(tc: TierCluster, tiny_model_dir: Path, name: str) -> tuple[Path, bytes]:
    """Push the tiny model as checkpoint `name` with one of its model files a FIFO nobody writes
    yet: a load of it blocks reading that file ("loading") until `_feed` writes it."""
    from ember.loader import open_store

    assert tc.env is not None
    store = open_store(tc.env["EMBER_STORE_URL"])
    store.push(tiny_model_dir, name)
    fifo = Path(store.uri.removeprefix("file://")) / name / "files" / "tokenizer_config.json"
    data = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    return fifo, data


def _invoke_during_a_held_load(tc: TierCluster, tiny_model_dir: Path, name: str,
                               change: Callable[[], None]) -> httpx.Response:
    """Deploy `name` on a checkpoint whose load blocks, invoke it, `change` the function while its
    cold start loads, let the load end; returns what the invocation got."""
    u = tc.gateway.url
    fifo, data = _hold_load_on_a_fifo(tc, tiny_model_dir, f"{name}-ck")
    result: dict[str, httpx.Response] = {}
    try:
        _deploy(u, name, f"{name}-ck")
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{u}/v1/chat/completions", headers=admin_headers(), json={"model": name, **CHAT}, timeout=120)))
        t.start()

        def states() -> list[str]:
            got = httpx.get(f"{u}/v1/functions/{name}", headers=admin_headers(), timeout=10)
            return [i["state"] for i in got.json().get("instances", [])] if got.status_code == 200 else []

        assert until(lambda: states() == ["loading"], 30), states()
        change()
    finally:
        fed = feed_fifo(fifo, data)  # the old load goes on and ends (finding its instance removed)
        fifo.unlink()
        fifo.write_bytes(data)
    assert fed
    t.join(120)
    return result["r"]


def test_a_redeploy_during_a_cold_start_serves_the_request_from_the_new_checkpoint(
        tier_cluster: TierCluster, tiny_model_dir: Path) -> None:
    """The redeploy retires the instance loading the old checkpoint. Before, the request waiting
    on that cold start failed with 409 instance_gone ("removed while it loaded"); now it is placed
    again, once, on the checkpoint deployed now."""
    u = tier_cluster.gateway.url
    elsewhere = f"file://{tier_cluster.tmp / 'elsewhere'}/twin"  # other weights
    r = _invoke_during_a_held_load(tier_cluster, tiny_model_dir, "midload",
                                   lambda: _deploy(u, "midload", elsewhere))
    assert r.status_code == 200, r.text
    assert r.headers["x-ember-cold-start"] == "true"
    assert _text(r) == _text(_chat(u, "midload"))  # the new checkpoint's instance: the only one left
    assert until(lambda: len(httpx.get(f"{u}/v1/functions/midload", headers=admin_headers(),
                                       timeout=10).json()["instances"]) == 1)
    assert httpx.delete(f"{u}/v1/functions/midload", headers=admin_headers(), timeout=60).status_code == 204


def test_a_delete_during_a_cold_start_answers_404(tier_cluster: TierCluster, tiny_model_dir: Path) -> None:
    """Before: 409 instance_gone for a function that no longer exists."""
    u = tier_cluster.gateway.url
    r = _invoke_during_a_held_load(
        tier_cluster, tiny_model_dir, "gonefn",
        lambda: httpx.delete(f"{u}/v1/functions/gonefn", headers=admin_headers(), timeout=60).raise_for_status())
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    assert tier_cluster.env is not None
    r = redis.Redis.from_url(tier_cluster.env["EMBER_REDIS_URL"], decode_responses=True)
    try:  # nothing of it was placed again
        assert until(lambda: not r.smembers(Keys.function_instances("gonefn"))), r.smembers(
            Keys.function_instances("gonefn"))
    finally:
        r.close()
