"""Gateway API against a real gateway process and a real Redis: auth, roles, functions, errors."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.platform.conftest import ADMIN_KEY, Proc, admin_headers


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    return err


def test_health_ready_metrics_need_no_key(gateway: Proc) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json()["status"] == "ok"
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == 0
    text = httpx.get(f"{gateway.url}/metrics").text
    for name in ("ember_time_to_first_token_seconds", "ember_requests_total", "ember_cold_starts_total",
                 "ember_instances", "ember_time_per_output_token_seconds"):
        assert name in text


def test_auth_required_and_wrong_keys_rejected(gateway: Proc) -> None:
    _assert_openai_error(httpx.get(f"{gateway.url}/v1/models"), 401)
    _assert_openai_error(httpx.get(f"{gateway.url}/v1/models", headers=_h("nope")), 401)
    _assert_openai_error(httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert httpx.get(f"{gateway.url}/v1/models", headers=admin_headers()).json()["object"] == "list"


def test_keys_roles_and_function_ownership(gateway: Proc) -> None:
    u = gateway.url
    keys = {}
    for role in ("operator", "developer", "invoker"):
        r = httpx.post(f"{u}/v1/keys", headers=admin_headers(), json={"role": role, "name": f"{role}-1"})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["role"] == role and body["key"].startswith("ek-")
        keys[role] = body
    dev2 = httpx.post(f"{u}/v1/keys", headers=admin_headers(), json={"role": "developer"}).json()
    listed = httpx.get(f"{u}/v1/keys", headers=admin_headers()).json()["keys"]
    assert {k["id"] for k in listed} >= {k["id"] for k in keys.values()}
    assert all("key" not in k for k in listed)  # plaintext shown only at creation
    # only admins manage keys
    _assert_openai_error(httpx.post(f"{u}/v1/keys", headers=_h(keys["operator"]["key"]),
                                    json={"role": "admin"}), 403)
    _assert_openai_error(httpx.post(f"{u}/v1/keys", headers=admin_headers(), json={"role": "root"}), 422)

    spec = {"checkpoint": "tiny", "scaling": {"max_instances": 2}}
    dev = _h(keys["developer"]["key"])
    grant = {"owner": keys["developer"]["id"]}  # developers deploy checkpoints granted to them
    assert httpx.put(f"{u}/v1/checkpoints/tiny", headers=admin_headers(), json=grant).status_code == 200
    r = httpx.put(f"{u}/v1/functions/mine", headers=dev, json=spec)
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["name"] == "mine" and got["scaling"]["max_instances"] == 2
    assert got["slo"]["ttft_ms"] == 1000 and got["scaling"]["keep_alive_s"] == 60 and got["energy"]["eta"] == 0.5
    assert httpx.put(f"{u}/v1/functions/mine", headers=dev, json=spec).status_code == 200  # update
    # invoker and operator cannot deploy; operator can read
    _assert_openai_error(httpx.put(f"{u}/v1/functions/x", headers=_h(keys["invoker"]["key"]), json=spec), 403)
    _assert_openai_error(httpx.put(f"{u}/v1/functions/x", headers=_h(keys["operator"]["key"]), json=spec), 403)
    names = [f["name"] for f in httpx.get(f"{u}/v1/functions", headers=_h(keys["operator"]["key"])).json()["functions"]]
    assert names == ["mine"]
    # another developer cannot change or delete it, nor invoke it; to it the function does not exist
    # (404 as for GET), except that the name is taken (403 on PUT)
    _assert_openai_error(httpx.delete(f"{u}/v1/functions/mine", headers=_h(dev2["key"])), 404)
    _assert_openai_error(httpx.put(f"{u}/v1/functions/mine", headers=_h(dev2["key"]), json=spec), 403)
    err = _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=_h(dev2["key"]),
                                          json={"model": "mine", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert err["code"] == "model_not_found"
    _assert_openai_error(httpx.get(f"{u}/v1/functions/mine", headers=_h(dev2["key"])), 404)
    assert httpx.get(f"{u}/v1/functions/mine", headers=admin_headers()).json()["instances"] == []
    assert httpx.delete(f"{u}/v1/functions/mine", headers=dev).status_code == 204
    _assert_openai_error(httpx.get(f"{u}/v1/functions/mine", headers=dev), 404)
    # a revoked key stops working
    assert httpx.delete(f"{u}/v1/keys/{keys['invoker']['id']}", headers=admin_headers()).status_code == 204
    _assert_openai_error(httpx.get(f"{u}/v1/models", headers=_h(keys["invoker"]["key"])), 401)


def test_bad_input_gets_openai_errors_and_server_keeps_serving(gateway: Proc) -> None:
    u, h = gateway.url, admin_headers()
    chat = {"model": "ghost", "messages": [{"role": "user", "content": "hi"}]}
    err = _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=h, json=chat), 404)
    assert err["code"] == "model_not_found"
    _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers={**h, "content-type": "application/json"},
                                    content=b"{not json"), 400)
    _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=h, json={"model": "ghost"}), 422)
    _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=h,
                                    json={**chat, "temperature": 9}), 422)
    _assert_openai_error(httpx.post(f"{u}/v1/completions", headers=h,
                                    json={"model": "ghost", "prompt": "x", "max_tokens": 10**6}), 400)
    big = {"model": "ghost", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=h, json=big), 413)
    # path tricks in names
    for bad in ("%2E%2E", "a..b", "-x", "x" * 200, "a%2Fb"):
        r = httpx.put(f"{u}/v1/functions/{bad}", headers=h, json={"checkpoint": "tiny"})
        assert r.status_code in (400, 404), r.text  # 404 where the router already refused the path
        _assert_openai_error(r, r.status_code)
    _assert_openai_error(httpx.put(f"{u}/v1/functions/a..b", headers=h, json={"checkpoint": "tiny"}), 400)
    _assert_openai_error(httpx.put(f"{u}/v1/functions/ok", headers=h, json={"checkpoint": "tiny",
                         "scaling": {"min_instances": 3, "max_instances": 1}}), 400)
    _assert_openai_error(httpx.put(f"{u}/v1/functions/ok", headers=h, json={"checkpoint": "tiny",
                         "placement_policy": "nonsense"}), 400)
    _assert_openai_error(httpx.get(f"{u}/v1/nowhere", headers=h), 404)
    assert httpx.get(f"{u}/v1/models", headers=_h(ADMIN_KEY)).status_code == 200  # still serving


def test_access_log_is_a_setting(gateway: Proc, redis_server: str, tmp_path: Path) -> None:
    """A line per request by default (uvicorn's access log); EMBER_ACCESS_LOG=false turns it off
    (behind a load balancer that logs already, it is ~3% of the gateway's CPU and megabytes a run)."""
    from tests.platform.conftest import base_env, start_gateway

    assert httpx.get(f"{gateway.url}/v1/models", headers=admin_headers()).status_code == 200
    assert '"GET /v1/models HTTP/1.1" 200' in gateway.log.read_text()
    quiet = start_gateway(tmp_path, base_env(redis_server, f"file://{tmp_path / 'store'}", EMBER_ACCESS_LOG="false"))
    try:
        assert httpx.get(f"{quiet.url}/v1/models", headers=admin_headers()).status_code == 200
        assert httpx.get(f"{quiet.url}/v1/models").status_code == 401
    finally:
        quiet.stop()
    text = quiet.log.read_text()
    assert "GET /v1/models" not in text and "Application startup complete" in text


def test_a_spec_nobody_can_read_costs_only_itself(gateway: Proc, redis_url: str) -> None:
    """Non-finite numbers are refused at deploy (JSON's 1e999 is infinity: stored, it was written back
    as null, and from then on every listing, the function's own GET and DELETE and the autoscaler
    failed with 500 for every tenant). A stored spec that does not validate any more (an older
    version's, or edited by hand) is left out of listings, is a 409 to read or invoke, and can be
    deleted or deployed again."""
    import redis as redis_lib

    from ember.platform.state import Keys

    u, h = gateway.url, {**admin_headers(), "content-type": "application/json"}
    for body in ('{"checkpoint": "tiny", "slo": {"ttft_ms": 1e999}}', '{"checkpoint": "tiny", "slo": {"tpot_ms": -1e999}}',
                 '{"checkpoint": "tiny", "scaling": {"keep_alive_s": Infinity}}',
                 '{"checkpoint": "tiny", "energy": {"eta": NaN}}'):
        err = _assert_openai_error(httpx.put(f"{u}/v1/functions/inf", headers=h, content=body), 422)
        assert "finite" in err["message"] or "valid number" in err["message"] or "JSON" in err["message"], err
    assert httpx.put(f"{u}/v1/functions/fine", headers=h, json={"checkpoint": "tiny"}).status_code == 201
    r = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    r.hset(Keys.functions, "broken", '{"name": "broken", "checkpoint": "tiny", "owner": "admin", "slo": {"ttft_ms": null}}')
    listed = httpx.get(f"{u}/v1/functions", headers=h)
    assert listed.status_code == 200 and [f["name"] for f in listed.json()["functions"]] == ["fine"]
    assert httpx.get(f"{u}/v1/models", headers=h).status_code == 200
    stats = httpx.get(f"{u}/v1/stats/functions", headers=h)
    assert stats.status_code == 200 and [f["name"] for f in stats.json()["functions"]] == ["fine"]
    err = _assert_openai_error(httpx.get(f"{u}/v1/functions/broken", headers=h), 409)
    assert err["code"] == "function_unreadable"
    chat = {"model": "broken", "messages": [{"role": "user", "content": "hi"}]}
    assert _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=h, json=chat), 409)["code"] == \
        "function_unreadable"
    assert httpx.delete(f"{u}/v1/functions/broken", headers=h).status_code == 204
    assert r.hget(Keys.functions, "broken") is None
    r.hset(Keys.functions, "broken", '{"name": "broken", "checkpoint": "tiny", "owner": "admin", "slo": 5}')
    redeployed = httpx.put(f"{u}/v1/functions/broken", headers=h, json={"checkpoint": "tiny"})
    assert redeployed.status_code == 201 and redeployed.json()["owner"] == "admin"
    assert httpx.get(f"{u}/v1/functions/broken", headers=h).status_code == 200
    r.close()


def test_chat_content_parts_must_carry_text(gateway: Proc) -> None:
    """A text part whose `text` is a number, null or missing is the caller's mistake (it was a 500)."""
    u, h = gateway.url, admin_headers()
    for part in ({"type": "text", "text": 123}, {"type": "text", "text": None}, {"type": "text"}, {"text": []}):
        body = {"model": "anything", "messages": [{"role": "user", "content": [part]}]}
        err = _assert_openai_error(httpx.post(f"{u}/v1/chat/completions", headers=h, json=body), 422)
        assert "text" in err["message"], err


def test_models_retrieve_keys_limits_and_the_last_admin_key(gateway: Proc) -> None:
    """`GET /v1/models/{id}` (the OpenAI clients' models.retrieve) answers for a function the caller
    may see; `GET /v1/keys` shows each key's limits; the last admin key cannot be revoked (doing so
    locked every admin out until a gateway restarted)."""
    u, h = gateway.url, admin_headers()
    assert httpx.put(f"{u}/v1/functions/seen", headers=h, json={"checkpoint": "tiny"}).status_code == 201
    got = httpx.get(f"{u}/v1/models/seen", headers=h)
    assert got.status_code == 200 and got.json()["id"] == "seen" and got.json()["object"] == "model"
    assert _assert_openai_error(httpx.get(f"{u}/v1/models/ghost", headers=h), 404)["code"] == "model_not_found"
    dev = httpx.post(f"{u}/v1/keys", headers=h, json={"role": "developer", "rpm": 7, "tpm": 100}).json()
    _assert_openai_error(httpx.get(f"{u}/v1/models/seen", headers=_h(dev["key"])), 404)  # not its own
    listed = {k["id"]: k for k in httpx.get(f"{u}/v1/keys", headers=h).json()["keys"]}
    assert (listed[dev["id"]]["rpm"], listed[dev["id"]]["tpm"]) == (7, 100)
    err = _assert_openai_error(httpx.delete(f"{u}/v1/keys/admin", headers=h), 409)
    assert err["code"] == "last_admin_key"
    other = httpx.post(f"{u}/v1/keys", headers=h, json={"role": "admin"}).json()
    assert httpx.delete(f"{u}/v1/keys/admin", headers=h).status_code == 204  # another admin remains
    _assert_openai_error(httpx.get(f"{u}/v1/keys", headers=h), 401)
    assert _assert_openai_error(httpx.delete(f"{u}/v1/keys/{other['id']}", headers=_h(other["key"])), 409)["code"] == \
        "last_admin_key"


def test_metrics_behind_a_key_are_for_admins_and_operators(redis_url: str, tmp_path: Path) -> None:
    """EMBER_METRICS_REQUIRE_KEY: /metrics names every tenant's functions and their traffic, so an
    invoker's or a developer's key is refused (any valid key was enough)."""
    from tests.platform.conftest import base_env, start_gateway

    g = start_gateway(tmp_path, base_env(redis_url, f"file://{tmp_path / 'store'}", EMBER_METRICS_REQUIRE_KEY="true"))
    try:
        u = g.url
        assert httpx.get(f"{u}/metrics").status_code == 401
        keys = {role: httpx.post(f"{u}/v1/keys", headers=admin_headers(), json={"role": role}).json()["key"]
                for role in ("operator", "developer", "invoker")}
        assert httpx.get(f"{u}/metrics", headers=admin_headers()).status_code == 200
        assert httpx.get(f"{u}/metrics", headers=_h(keys["operator"])).status_code == 200
        for role in ("developer", "invoker"):
            _assert_openai_error(httpx.get(f"{u}/metrics", headers=_h(keys[role])), 403)
    finally:
        g.stop()


def test_one_developer_cannot_take_the_cluster(gateway: Proc) -> None:
    """A developer's function with min/max_instances 1,024 and keep_alive_s 1e300 placed instances
    on every device of the cluster for good, and every other tenant got 503: a developer key now
    owns at most EMBER_DEVELOPER_MAX_INSTANCES instances (summed max_instances, default 64) and a
    keep-alive is at most a week."""
    u = gateway.url
    dev = httpx.post(f"{u}/v1/keys", headers=admin_headers(), json={"role": "developer"}).json()
    assert httpx.put(f"{u}/v1/checkpoints/tiny", headers=admin_headers(), json={"owner": dev["id"]}).status_code == 200
    hog = {"checkpoint": "tiny", "scaling": {"min_instances": 1024, "max_instances": 1024}}
    err = _assert_openai_error(httpx.put(f"{u}/v1/functions/hog", headers=_h(dev["key"]), json=hog), 403)
    assert err["code"] == "quota_exceeded"
    forever = {"checkpoint": "tiny", "scaling": {"keep_alive_s": 1e300}}
    _assert_openai_error(httpx.put(f"{u}/v1/functions/hog", headers=_h(dev["key"]), json=forever), 422)
    fair = {"checkpoint": "tiny", "scaling": {"max_instances": 8, "keep_alive_s": 3600}}
    assert httpx.put(f"{u}/v1/functions/hog", headers=_h(dev["key"]), json=fair).status_code == 201
    assert httpx.put(f"{u}/v1/functions/big", headers=admin_headers(), json=hog).status_code == 201  # admins decide


def _instances_gauge(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r'^ember_instances\{function="([^"]*)",state="([^"]*)"\} ([0-9.e+]+)$', text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def test_ember_instances_comes_from_the_lease_holder_and_never_stale(gateway: Proc, redis_url: str) -> None:
    """`ember_instances` is what Redis holds at the scrape, exported by the gateway holding the
    autoscaler lease only. A gateway that lost the lease used to keep exporting the counts it last
    set (an instance gone for good still counted), and a sum over gateways counted them again."""
    import redis as redis_lib

    from ember.platform.cluster import DeviceSpec, RedisCluster
    from ember.platform.state import Keys
    from ember.scheduler.view import PlacementRequest, StartupEstimate
    from tests.platform.conftest import until

    class OnN1:
        name = "on_n1"

        def place(self, request, view):
            return StartupEstimate("n1", "cpu:0", "remote", 0.1)

    r = httpx.put(f"{gateway.url}/v1/functions/counted", headers=admin_headers(), json={"checkpoint": "tiny"})
    assert r.status_code == 201, r.text
    checkpoint = r.json()["checkpoint"]
    c = RedisCluster(redis_lib.Redis.from_url(redis_url, decode_responses=True), heartbeat_ttl_s=300)
    c.register_node("n1", "http://127.0.0.1:1", [DeviceSpec("cpu:0", 1 << 30)], {"remote": 1e9})

    def ready_instance() -> str:
        p = c.place(PlacementRequest(function="counted", checkpoint=checkpoint, nbytes=1 << 20), OnN1())
        assert p is not None and c.mark_ready(p.instance_id, "counted")
        return p.instance_id

    first = ready_instance()
    assert until(lambda: _instances_gauge(gateway.url) == {("counted", "ready"): 1.0}, 15), _instances_gauge(gateway.url)
    c.r.set(Keys.lease("autoscaler"), "gw-elsewhere", px=60_000)  # another gateway took the lease
    c.remove_instance(first)
    assert until(lambda: _instances_gauge(gateway.url) == {}, 10), _instances_gauge(gateway.url)  # was: stale 1.0
    ready_instance()
    ready_instance()
    assert _instances_gauge(gateway.url) == {}  # not its to export
    c.r.delete(Keys.lease("autoscaler"))  # the other gateway went away: this one takes the lease again
    assert until(lambda: _instances_gauge(gateway.url) == {("counted", "ready"): 2.0}, 15), _instances_gauge(gateway.url)


def test_a_revoked_bootstrap_admin_key_stays_revoked_across_restarts(redis_url: str, tmp_path: Path) -> None:
    """Every gateway start writes the bootstrap admin key (id `admin`) from EMBER_ADMIN_KEY: once
    revoked by another admin it came back at the next start. Its secret now leaves a tombstone;
    the start logs that it is not restored; another secret makes a bootstrap key again. A restart
    with the same secret keeps the key's creation time (it was reset at every start)."""
    from tests.platform.conftest import base_env, start_gateway

    env = base_env(redis_url, f"file://{tmp_path / 'store'}")

    def bootstrap_created(u: str, key: str) -> float:
        return {k["id"]: k for k in httpx.get(f"{u}/v1/keys", headers=_h(key)).json()["keys"]}["admin"]["created"]

    g = start_gateway(tmp_path, env)
    created = bootstrap_created(g.url, ADMIN_KEY)
    g.stop()
    g = start_gateway(tmp_path, env)
    try:
        assert bootstrap_created(g.url, ADMIN_KEY) == created  # the same key across a restart
        other = httpx.post(f"{g.url}/v1/keys", headers=admin_headers(), json={"role": "admin"}).json()["key"]
        assert httpx.delete(f"{g.url}/v1/keys/admin", headers=_h(other)).status_code == 204
    finally:
        g.stop()
    g = start_gateway(tmp_path, env)  # the same EMBER_ADMIN_KEY
    try:
        err = _assert_openai_error(httpx.get(f"{g.url}/v1/me", headers=admin_headers()), 401)
        assert "revoked" in err["message"]
        assert "admin" not in {k["id"] for k in httpx.get(f"{g.url}/v1/keys", headers=_h(other)).json()["keys"]}
        assert "configured admin key" in g.log.read_text() and "is not restored" in g.log.read_text()
    finally:
        g.stop()
    g = start_gateway(tmp_path, {**env, "EMBER_ADMIN_KEY": "a-new-admin-key-0123456789"})  # rotated
    try:
        me = httpx.get(f"{g.url}/v1/me", headers=_h("a-new-admin-key-0123456789"))
        assert me.status_code == 200 and me.json()["id"] == "admin" and me.json()["role"] == "admin"
        _assert_openai_error(httpx.get(f"{g.url}/v1/me", headers=admin_headers()), 401)
    finally:
        g.stop()


def test_a_revoked_keys_checkpoint_grants_go_with_it(gateway: Proc) -> None:
    """A grant kept naming the revoked key as owner; a shared one stays shared, without owner."""
    u, h = gateway.url, admin_headers()
    dev = httpx.post(f"{u}/v1/keys", headers=h, json={"role": "developer"}).json()
    assert httpx.put(f"{u}/v1/checkpoints/mine", headers=h, json={"owner": dev["id"]}).status_code == 200
    assert httpx.put(f"{u}/v1/checkpoints/ours", headers=h, json={"owner": dev["id"], "shared": True}).status_code == 200
    assert httpx.put(f"{u}/v1/checkpoints/theirs", headers=h, json={"shared": True}).status_code == 200
    assert httpx.delete(f"{u}/v1/keys/{dev['id']}", headers=h).status_code == 204
    grants = {g["name"]: g for g in httpx.get(f"{u}/v1/checkpoints", headers=h).json()["checkpoints"]}
    assert set(grants) == {"ours", "theirs"}
    assert grants["ours"]["owner"] is None and grants["ours"]["shared"] is True


def test_admin_bodies_refuse_unknown_fields_and_loose_types(gateway: Proc) -> None:
    """Admin bodies ignored unknown fields (a deploy with `scaling.min_instance` said 201 and
    deployed the default; PATCH /v1/keys/ID {"role": "admin"} said 200 and changed nothing) and
    coerced types (`"rpm": true` was 1). Each is now a 422 naming the field; the bodies the CLI,
    the console and `ember up` send still pass."""
    u, h = gateway.url, admin_headers()
    key = httpx.post(f"{u}/v1/keys", headers=h, json={"role": "invoker", "name": "k", "rpm": 5, "tpm": None})
    assert key.status_code == 201, key.text
    kid = key.json()["id"]
    refused = [
        ("PUT", "/v1/functions/typo", {"checkpoint": "tiny", "scaling": {"min_instance": 2, "keep_alive_s": 5}},
         "scaling.min_instance"),
        ("PUT", "/v1/functions/typo", {"checkpoint": "tiny", "scalling": {}}, "scalling"),
        ("PUT", "/v1/functions/typo", {"checkpoint": "tiny", "scaling": {"max_instances": "2"}}, "scaling.max_instances"),
        ("PUT", "/v1/functions/typo", {"checkpoint": "tiny", "scaling": {"max_instances": True}}, "scaling.max_instances"),
        ("PUT", "/v1/functions/typo", {"checkpoint": "tiny", "slo": {"ttft_ms": "500"}}, "slo.ttft_ms"),
        ("PUT", "/v1/functions/typo", {"checkpoint": "tiny", "energy": {"eta": False}}, "energy.eta"),
        ("PUT", "/v1/functions/typo", {"checkpoint": 5}, "checkpoint"),
        ("PATCH", f"/v1/keys/{kid}", {"role": "admin"}, "role"),
        ("PATCH", f"/v1/keys/{kid}", {"rpmm": 3}, "rpmm"),
        ("PATCH", f"/v1/keys/{kid}", {"rpm": True}, "rpm"),
        ("PATCH", f"/v1/keys/{kid}", {"tpm": "100"}, "tpm"),
        ("PATCH", f"/v1/keys/{kid}", {"rpm": 2.5}, "rpm"),
        ("POST", "/v1/keys", {"role": "invoker", "rpm": True}, "rpm"),
        ("POST", "/v1/keys", {"role": "invoker", "scope": "all"}, "scope"),
        ("PUT", "/v1/checkpoints/tiny", {"shared": 1}, "shared"),
        ("PUT", "/v1/checkpoints/tiny", {"shared": True, "owners": ["x"]}, "owners"),
        ("PUT", "/v1/stores", {"uri": "file:///tmp/x", "note": "x"}, "note"),
        ("PUT", "/v1/energy/budget", {"cluster_watts": True}, "cluster_watts"),
    ]
    for method, path, body, param in refused:
        err = _assert_openai_error(httpx.request(method, f"{u}{path}", headers=h, json=body), 422)
        assert err["param"] == param and param.rsplit(".", 1)[-1] in err["message"], (body, err)
    assert httpx.get(f"{u}/v1/functions/typo", headers=h).status_code == 404
    got = httpx.get(f"{u}/v1/keys/{kid}", headers=h).json()
    assert (got["role"], got["rpm"]) == ("invoker", 5)
    # what the clients send: `ember deploy` (every field, floats and ints), `ember keys limits`, the console
    cli_deploy = {"checkpoint": "tiny", "slo": {"ttft_ms": 1000.0, "tpot_ms": 200.0},
                  "scaling": {"min_instances": 0, "max_instances": 4, "keep_alive_s": 60.0, "target_concurrency": 4},
                  "energy": {"eta": 0.5}, "placement_policy": "ember"}
    r = httpx.put(f"{u}/v1/functions/typo", headers=h, json=cli_deploy)
    assert r.status_code == 201, r.text
    assert httpx.put(f"{u}/v1/functions/typo", headers=h,
                     json={"checkpoint": "tiny", "scaling": {"keep_alive_s": 5, "min_instances": 0}}).status_code == 200
    assert httpx.get(f"{u}/v1/functions/typo", headers=h).json()["scaling"]["keep_alive_s"] == 5
    assert httpx.patch(f"{u}/v1/keys/{kid}", headers=h, json={"rpm": 7, "tpm": None}).json()["rpm"] == 7
    budget = {"cluster_watts": 900, "node_watts": {"node-0": 450.5}, "energy_kwh_per_day": None}
    assert httpx.put(f"{u}/v1/energy/budget", headers=h, json=budget).status_code == 200
