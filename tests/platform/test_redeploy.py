"""Deploying a function again, through the real routes (gateway + worker, a real redis-server; the
`tier_cluster` fixture): a new checkpoint is what the next request gets, while the request in flight
on the old one finishes; a function deleted and created again starts with no statistics."""

from __future__ import annotations

import json

import httpx

from tests.platform.conftest import TierCluster, admin_headers, until

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
