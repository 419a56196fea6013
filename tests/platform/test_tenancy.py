"""Tenancy, deploy-time sizing and per-key limits through a real gateway and worker (the shared
`tier_cluster`: one worker with two 64 MiB CPU slots, a real redis-server)."""

from __future__ import annotations

import hashlib
import threading

import httpx

from ember.loader.convert import read_manifest
from tests.platform.conftest import TierCluster, admin_headers, start_gateway


def _key(url: str, role: str, **limits: int) -> dict:
    r = httpx.post(f"{url}/v1/keys", headers=admin_headers(), json={"role": role, **limits})
    assert r.status_code == 201, r.text
    return r.json()


def _h(key: dict) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def _chat(url: str, model: str, headers: dict, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": max_tokens, "temperature": 0})


def test_deploy_sizes_unknown_checkpoints_and_refuses_too_large(tier_cluster: TierCluster) -> None:
    u = tier_cluster.gateway.url
    # `early` was deployed before any worker was up: its size is learned before its first placement
    assert _chat(u, "early", admin_headers()).status_code == 200
    spec = httpx.get(f"{u}/v1/functions/early", headers=admin_headers()).json()
    manifest = read_manifest(tier_cluster.tmp / "store" / "earlyck")
    assert spec["nbytes"] == manifest.tensor_nbytes
    digest = hashlib.sha256((tier_cluster.tmp / "store" / "earlyck" / "manifest.json").read_bytes()).hexdigest()
    assert spec["checkpoint_id"] == f"file://{tier_cluster.tmp / 'store'}/earlyck#{digest}"
    # ... and its KV budget, as a deploy with a worker up records it (claims are weights + KV)
    r = httpx.put(f"{u}/v1/functions/early-again", headers=admin_headers(), json={"checkpoint": "earlyck"})
    assert r.status_code == 201, r.text
    assert spec["kv_bytes"] > 0 and spec["kv_bytes"] == r.json()["kv_bytes"]
    # a model larger than every device: 400 at deploy, not 201 and a 503 at every invoke
    r = httpx.put(f"{u}/v1/functions/huge", headers=admin_headers(), json={"checkpoint": "big"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_too_large", r.text
    assert httpx.get(f"{u}/v1/functions/huge", headers=admin_headers()).status_code == 404


def test_developers_see_and_deploy_only_their_own(tier_cluster: TierCluster) -> None:
    u = tier_cluster.gateway.url
    dev1, dev2, op = _key(u, "developer"), _key(u, "developer"), _key(u, "operator")
    grant = {"owner": dev1["id"]}
    assert httpx.put(f"{u}/v1/checkpoints/third", headers=admin_headers(), json=grant).status_code == 200
    r = httpx.put(f"{u}/v1/functions/d1f", headers=_h(dev1), json={"checkpoint": "third"})
    assert r.status_code == 201, r.text
    # another developer may not deploy it, nor a checkpoint nobody granted
    for ckpt in ("third", "victim"):
        r = httpx.put(f"{u}/v1/functions/d2f", headers=_h(dev2), json={"checkpoint": ckpt})
        assert r.status_code == 403 and r.json()["error"]["code"] == "checkpoint_not_allowed", r.text
    # nor see it
    assert "d1f" not in [f["name"] for f in httpx.get(f"{u}/v1/functions", headers=_h(dev2)).json()["functions"]]
    assert httpx.get(f"{u}/v1/functions/d1f", headers=_h(dev2)).status_code == 404
    assert [f["name"] for f in httpx.get(f"{u}/v1/functions", headers=_h(dev1)).json()["functions"]] == ["d1f"]
    for who in (admin_headers(), _h(op), _h(dev1)):
        assert httpx.get(f"{u}/v1/functions/d1f", headers=who).status_code == 200
    # checkpoint URIs outside the cluster's stores are refused (admins too) until an admin allows them
    nowhere = f"file://{tier_cluster.tmp / 'nowhere'}/twin"
    for who in (_h(dev2), admin_headers()):
        r = httpx.put(f"{u}/v1/functions/d2f", headers=who, json={"checkpoint": nowhere})
        assert r.status_code == 403 and r.json()["error"]["code"] == "store_not_allowed", r.text
    assert httpx.put(f"{u}/v1/stores", headers=admin_headers(), json={"uri": nowhere[:-5]}).status_code == 200
    r = httpx.put(f"{u}/v1/functions/d2f", headers=_h(dev2), json={"checkpoint": nowhere})
    assert r.status_code == 403 and r.json()["error"]["code"] == "checkpoint_not_allowed", r.text
    # a shared checkpoint any developer may deploy
    assert httpx.put(f"{u}/v1/checkpoints/victim", headers=admin_headers(), json={"shared": True}).status_code == 200
    assert httpx.put(f"{u}/v1/functions/d2f", headers=_h(dev2), json={"checkpoint": "victim"}).status_code == 201
    # the stated rule: revoking a key deletes the functions it owns
    assert httpx.delete(f"{u}/v1/keys/{dev1['id']}", headers=admin_headers()).status_code == 204
    assert httpx.get(f"{u}/v1/functions/d1f", headers=admin_headers()).status_code == 404
    assert httpx.get(f"{u}/v1/functions/d2f", headers=admin_headers()).status_code == 200


def test_a_flooding_key_gets_429_and_a_steady_key_is_unaffected(tier_cluster: TierCluster) -> None:
    u = tier_cluster.gateway.url
    r = httpx.put(f"{u}/v1/functions/rl", headers=admin_headers(), json={"checkpoint": "rlck"})
    assert r.status_code in (200, 201), r.text
    flood, steady = _key(u, "invoker", rpm=3), _key(u, "invoker", rpm=3)
    assert flood["rpm"] == 3
    assert _chat(u, "rl", admin_headers()).status_code == 200  # warm, unlimited bootstrap key
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = _chat(u, "rl", _h(flood))
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(9)]
    for t in threads:
        t.start()
    steady_codes = [_chat(u, "rl", _h(steady)).status_code for _ in range(3)]
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 3 + [429] * 6, codes
    assert steady_codes == [200, 200, 200]
    limited = next(r for r in results if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    # an admin raises the limit: it holds at the key's next request
    r = httpx.patch(f"{u}/v1/keys/{flood['id']}", headers=admin_headers(), json={"rpm": 100})
    assert r.status_code == 200 and r.json()["rpm"] == 100
    assert _chat(u, "rl", _h(flood)).status_code == 200
    # tokens per minute: a request that alone exceeds the key's budget
    small = _key(u, "invoker", tpm=20)
    r = _chat(u, "rl", _h(small), max_tokens=64)
    assert r.status_code == 429 and r.json()["error"]["code"] == "tokens_exceed_limit"
    # waiting cannot help this one: no Retry-After, and the OpenAI clients' header says not to retry
    # (they retried it twice after 60 s each)
    assert "retry-after" not in r.headers and r.headers["x-should-retry"] == "false"
    assert _chat(u, "rl", _h(small), max_tokens=4).status_code == 200


def test_two_gateways_share_one_rate_window(tier_cluster: TierCluster) -> None:
    """A key's limit holds across gateways: requests spread over two gateways on one Redis are
    admitted up to the key's rpm in all, never rpm per gateway."""
    u = tier_cluster.gateway.url
    r = httpx.put(f"{u}/v1/functions/rl2", headers=admin_headers(), json={"checkpoint": "rlck"})
    assert r.status_code in (200, 201), r.text
    assert _chat(u, "rl2", admin_headers()).status_code == 200  # warm
    assert tier_cluster.env is not None
    other = start_gateway(tier_cluster.tmp, tier_cluster.env)
    try:
        key = _key(u, "invoker", rpm=4)
        results: list[int] = []
        lock = threading.Lock()

        def one(url: str) -> None:
            code = _chat(url, "rl2", _h(key)).status_code
            with lock:
                results.append(code)

        threads = [threading.Thread(target=one, args=(url,)) for url in [u, other.url] * 5]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [200] * 4 + [429] * 6, results
    finally:
        other.stop()



def test_a_request_that_fails_gives_back_its_token_charge(tier_cluster: TierCluster) -> None:
    """Tokens are charged up front (prompt estimate + max_tokens) and corrected by the real usage;
    a request refused by the worker (here: prompt + max_tokens over the model's 2,048-token
    context) used none, and kept its whole estimate charged for the minute before."""
    u = tier_cluster.gateway.url
    r = httpx.put(f"{u}/v1/functions/refundf", headers=admin_headers(), json={"checkpoint": "rlck"})
    assert r.status_code in (200, 201), r.text
    key = _key(u, "invoker", tpm=4200)
    for _ in range(2):  # each charged 1 + 2048 up front
        r = _chat(u, "refundf", _h(key), max_tokens=2048)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = _chat(u, "refundf", _h(key), max_tokens=110)  # 4,098 + 111 would exceed 4,200
    assert r.status_code == 200, r.text
