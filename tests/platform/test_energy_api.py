"""PUT /v1/energy/budget and GET /v1/energy over a real Redis, snapshots published by a
NodeEnergyAgent on simulated GPUs, the allocator's caps and misses, and the CLI over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ember.energy.agent import NodeEnergyAgent
from ember.energy.simulated import SimulatedGpu
from ember.platform.energy_api import router
from ember.platform.energy_state import allocate_and_store, allocate_if_leader, publish_device_snapshots
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.deps import get_principal
from ember.platform.http_common import install_error_handlers
from ember.platform.state import Keys
from tests.platform.conftest import Proc, admin_headers

DEVICE_FIELDS = {
    "node",
    "device",
    "power_w",
    "limit_w",
    "sm_clock_mhz",
    "energy_j",
    "j_per_token",
    "slo_attainment",
    "mode",
    "last_decision",
}


def make_app(redis_url: str) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.redis = redis.Redis.from_url(redis_url, decode_responses=True)

    def principal(x_role: str = Header("admin")) -> Principal:
        return Principal(id="k1", role=x_role, name="test")  # type: ignore[arg-type]

    app.dependency_overrides[get_principal] = principal
    return app


@pytest.fixture
def client(redis_url: str) -> Iterator[TestClient]:
    with TestClient(make_app(redis_url)) as c:
        yield c


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def busy_agent(node: str, devices: int = 2, mode: str = "actuate") -> NodeEnergyAgent:
    gpus = [SimulatedGpu(f"sim:{i}") for i in range(devices)]
    agent = NodeEnergyAgent(node, gpus, mode)  # type: ignore[arg-type]
    for gpu in gpus:
        gpu.run("decode", 20.0)
        gpu.idle(5.0)
        for _ in range(10):
            agent.record_request("chat", gpu.device_id, 100, 0.2, 0.02, 1.0, 0.05)
    agent.tick()
    return agent


def test_budget_put_merges_and_persists(client: TestClient, r: redis.Redis) -> None:
    resp = client.put(
        "/v1/energy/budget",
        json={"cluster_watts": 1200, "node_watts": {"n1": 800}},
        headers={"x-role": "operator"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"cluster_watts": 1200, "node_watts": {"n1": 800}, "energy_kwh_per_day": None}
    resp = client.put("/v1/energy/budget", json={"energy_kwh_per_day": 20})
    assert resp.json() == {"cluster_watts": 1200, "node_watts": {"n1": 800}, "energy_kwh_per_day": 20}
    client.put("/v1/energy/budget", json={"cluster_watts": None})
    assert json.loads(r.get(Keys.energy_budget))["cluster_watts"] is None
    body = client.get("/v1/energy").json()
    assert body["budget"]["energy_kwh_per_day"] == 20 and body["devices"] == []
    assert body["projected_kwh_today"] == 0


@pytest.mark.parametrize("role", ["developer", "invoker"])
def test_only_admin_and_operator(client: TestClient, role: str) -> None:
    for method, path in (("GET", "/v1/energy"), ("PUT", "/v1/energy/budget")):
        resp = client.request(method, path, json={"cluster_watts": 1}, headers={"x-role": role})
        assert resp.status_code == 403
        assert resp.json()["error"]["type"] == "permission_error"


def test_bad_bodies_are_refused(client: TestClient) -> None:
    assert client.put("/v1/energy/budget", json={"cluster_watts": -5}).status_code == 422
    assert client.put("/v1/energy/budget", json={"watts": 5}).status_code == 422
    resp = client.put("/v1/energy/budget", json={"node_watts": {"../x": 100}})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_name"


def test_published_snapshots_appear_with_the_documented_fields(client: TestClient, r: redis.Redis) -> None:
    agent = busy_agent("n1")
    caps = publish_device_snapshots(r, "n1", agent.snapshot(), ttl_s=30)
    assert caps == {"sim:0": None, "sim:1": None}
    body = client.get("/v1/energy").json()
    assert {d["device"] for d in body["devices"]} == {"sim:0", "sim:1"}
    for d in body["devices"]:
        assert DEVICE_FIELDS <= set(d)
        assert d["node"] == "n1" and d["mode"] == "actuate" and d["energy_j"] > 0
        assert d["slo_attainment"] == 1.0 and d["j_per_token"] > 0
    assert body["projected_kwh_today"] > 0
    assert r.ttl(Keys.energy_device("n1", "sim:0")) > 0


def test_expired_snapshots_drop_out(client: TestClient, r: redis.Redis) -> None:
    publish_device_snapshots(r, "n1", busy_agent("n1", 1).snapshot(), ttl_s=30)
    r.delete(Keys.energy_device("n1", "sim:0"))  # as if the TTL ran out
    assert client.get("/v1/energy").json()["devices"] == []
    assert r.smembers(Keys.energy_devices) == set()


def test_cluster_budget_caps_devices_and_names_the_functions_that_miss(
    client: TestClient, r: redis.Redis
) -> None:
    agent = busy_agent("n1")
    publish_device_snapshots(r, "n1", agent.snapshot(), ttl_s=30)
    # roomy: each device gets what it needs and a share of the rest
    client.put("/v1/energy/budget", json={"cluster_watts": 1000})
    body = client.get("/v1/energy").json()
    assert body["allocation"]["misses"] == []
    caps = publish_device_snapshots(r, "n1", agent.snapshot(), ttl_s=30)
    assert sum(caps.values()) <= 1000 + 1e-6
    # tight: below the SLO need of ~2 x 300 W, but above the hardware minimum 2 x 200 W
    client.put("/v1/energy/budget", json={"cluster_watts": 450})
    body = client.get("/v1/energy").json()
    misses = body["allocation"]["misses"]
    assert {m["function"] for m in misses} == {"chat"}
    assert all("cluster budget 450 W" in m["reason"] for m in misses)
    caps = publish_device_snapshots(r, "n1", agent.snapshot(), ttl_s=30)
    assert sum(caps.values()) <= 450 + 1e-6 and all(c >= 200 for c in caps.values())
    agent.set_caps_w(caps)  # the worker hands them to its agent: actuate mode applies them
    limits = [c.device.power_limit_w() for c in agent.controllers.values()]
    assert sum(limits) <= 450 + 1e-6
    # below the hardware minimum: every device at its minimum and the reason says so
    client.put("/v1/energy/budget", json={"cluster_watts": 100})
    misses = client.get("/v1/energy").json()["allocation"]["misses"]
    assert misses and "minimum power limits" in misses[0]["reason"]


def test_node_budget_only_binds_its_node(client: TestClient, r: redis.Redis) -> None:
    publish_device_snapshots(r, "n1", busy_agent("n1").snapshot(), ttl_s=30)
    publish_device_snapshots(r, "n2", busy_agent("n2").snapshot(), ttl_s=30)
    client.put("/v1/energy/budget", json={"node_watts": {"n1": 800}})
    body = client.get("/v1/energy").json()
    caps = {f"{d['node']}/{d['device']}": d["cap_w"] for d in body["devices"]}
    assert caps["n2/sim:0"] is None and caps["n2/sim:1"] is None
    assert caps["n1/sim:0"] + caps["n1/sim:1"] <= 800 + 1e-6


def test_energy_budget_projection_lowers_power_and_reports_misses(client: TestClient, r: redis.Redis) -> None:
    agent = busy_agent("n1")
    now = time.time()
    publish_device_snapshots(r, "n1", agent.snapshot(), ttl_s=30, now=now)
    for gpu in (c.device for c in agent.controllers.values()):
        gpu.run("decode", 3600.0)  # an hour of work since the day started
    agent.tick()
    publish_device_snapshots(r, "n1", agent.snapshot(), ttl_s=30, now=now)
    body = allocate_and_store(r, now=now)
    assert body["allocation"]["used_kwh_today"] == pytest.approx(2 * 315 * 3600 / 3.6e6, rel=0.01)
    # spent (0.63 of 0.5 kWh): no watts left, whatever the time of day. A budget just above what
    # was used (0.7) leaves 0.07 kWh, which in the day's last ~6 minutes allows the full draw:
    # no miss then (CI ran at 23:5x UTC once and failed).
    client.put("/v1/energy/budget", json={"energy_kwh_per_day": 0.5})
    body = client.get("/v1/energy").json()
    assert any("kWh/day" in m["reason"] for m in body["allocation"]["misses"])
    assert all(d["cap_w"] is not None for d in body["devices"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_status_and_budget_set_over_http(
    redis_url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    from ember.cli import app as cli

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(make_app(redis_url), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        publish_device_snapshots(r, "n1", busy_agent("n1").snapshot(), ttl_s=30)
        monkeypatch.setenv("EMBER_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("EMBER_API_KEY", "ignored-by-the-test-app")
        runner = CliRunner()
        res = runner.invoke(cli, ["energy", "budget", "set", "--cluster-watts", "900", "--kwh-per-day", "12"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["cluster_watts"] == 900
        res = runner.invoke(cli, ["energy", "status", "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["budget"]["energy_kwh_per_day"] == 12 and len(data["devices"]) == 2
        res = runner.invoke(cli, ["energy", "status"])
        assert res.exit_code == 0 and "sim:0" in res.output
        res = runner.invoke(cli, ["energy", "budget", "set"])
        assert res.exit_code != 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_one_allocator_per_lease(r: redis.Redis) -> None:
    publish_device_snapshots(r, "n1", busy_agent("n1").snapshot(), ttl_s=30)
    r.set(Keys.energy_budget, json.dumps({"cluster_watts": 450}))
    assert allocate_if_leader(r, "gw-a") is not None
    assert allocate_if_leader(r, "gw-b") is None  # gw-a holds the lease
    assert allocate_if_leader(r, "gw-a") is not None  # and renews it
    assert sum(float(v) for v in r.hgetall(Keys.energy_caps).values()) <= 450 + 1e-6


def _snap(node: str, energy_j: float) -> dict:
    return {"node": node, "device": "sim:0", "energy_j": energy_j, "power_w": 100.0, "avg_power_w": 100.0,
            "limit_w": 700.0, "min_limit_w": 200.0, "max_limit_w": 700.0, "pressure": 0.0, "functions": {}}


def test_used_today_keeps_what_was_drawn_before_a_counter_restart(r: redis.Redis) -> None:
    """A worker restarts under the same node id and its energy counter starts from zero again:
    the day's count adds what the new counter reads to what was drawn before, never falls."""
    now = time.time()
    for e in (1000.0, 3.6e6 + 1000.0):  # 1 kWh drawn
        publish_device_snapshots(r, "n1", [_snap("n1", e)], ttl_s=60, now=now)
    assert allocate_and_store(r, now=now)["allocation"]["used_kwh_today"] == pytest.approx(1.0)
    for e in (0.36e6, 0.72e6):  # restarted: 0.1 kWh by its first report, 0.2 kWh by the next
        publish_device_snapshots(r, "n1", [_snap("n1", e)], ttl_s=60, now=now)
        assert allocate_and_store(r, now=now)["allocation"]["used_kwh_today"] == pytest.approx(1.0 + e / 3.6e6)


def test_used_today_counts_a_restarted_counter_that_climbed_past_the_last_reading(r: redis.Redis) -> None:
    """A worker restarts and, by its first report, its new counter (a new device: another
    `energy_origin`) reads more than the old one's last reading: all of it was drawn since the
    restart. Before, it was taken for the old counter and only the excess was counted."""
    now = time.time()
    first = busy_agent("n1", devices=1).snapshot()[0]
    e0 = float(first["energy_j"])
    publish_device_snapshots(r, "n1", [first], ttl_s=60, now=now)
    publish_device_snapshots(r, "n1", [{**first, "energy_j": e0 + 3.6e6}], ttl_s=60, now=now)  # 1 kWh drawn
    assert allocate_and_store(r, now=now)["allocation"]["used_kwh_today"] == pytest.approx(1.0)
    restarted = busy_agent("n1", devices=1).snapshot()[0]  # a new worker process: a new emulated device
    assert restarted["energy_origin"] and restarted["energy_origin"] != first["energy_origin"]
    climbed = e0 + 3.6e6 + 1.8e6  # 0.5 kWh above the last reading, all of it drawn since the restart
    publish_device_snapshots(r, "n1", [{**restarted, "energy_j": climbed}], ttl_s=60, now=now)
    assert allocate_and_store(r, now=now)["allocation"]["used_kwh_today"] == pytest.approx(1.0 + climbed / 3.6e6, abs=1e-3)
    # the same counter again: only the difference, as before
    publish_device_snapshots(r, "n1", [{**restarted, "energy_j": climbed + 3.6e6}], ttl_s=60, now=now)
    assert allocate_and_store(r, now=now)["allocation"]["used_kwh_today"] == pytest.approx(2.0 + climbed / 3.6e6, abs=1e-3)


def test_used_today_keeps_a_gone_node(r: redis.Redis) -> None:
    """A node whose snapshots expired (worker gone, scaled in) keeps what it drew today."""
    now = time.time()
    for e in (0.0, 3.6e6):
        publish_device_snapshots(r, "gone", [_snap("gone", e)], ttl_s=60, now=now)
        publish_device_snapshots(r, "stays", [_snap("stays", e)], ttl_s=60, now=now)
    assert allocate_and_store(r, now=now)["allocation"]["used_kwh_today"] == pytest.approx(2.0)
    r.delete(Keys.energy_device("gone", "sim:0"))  # its snapshot expired
    body = allocate_and_store(r, now=now)
    assert [d["node"] for d in body["devices"]] == ["stays"]
    assert body["allocation"]["used_kwh_today"] == pytest.approx(2.0)


def test_budget_updates_made_at_once_all_land(gateway: Proc) -> None:
    """Three operators set three different fields at the same moment, against a real gateway
    process: the load-merge-save lost one of them in about 16 rounds of 40; now each merge is one
    WATCH/MULTI transaction (retried), so every field lands."""
    url, h = gateway.url, admin_headers()
    lost = []
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        for i in range(1, 31):
            c.put("/v1/energy/budget", json={"cluster_watts": None, "energy_kwh_per_day": None, "node_watts": {}})
            bodies = [{"cluster_watts": 1000 + i}, {"energy_kwh_per_day": 10 + i}, {"node_watts": {"node-0": 500 + i}}]
            barrier, statuses = threading.Barrier(len(bodies)), []

            def put(body: dict, barrier: threading.Barrier, statuses: list[int]) -> None:
                with httpx.Client(base_url=url, headers=h, timeout=30) as own:
                    barrier.wait()
                    statuses.append(own.put("/v1/energy/budget", json=body).status_code)

            threads = [threading.Thread(target=put, args=(b, barrier, statuses)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert statuses == [200] * len(bodies)
            got = c.get("/v1/energy").json()["budget"]
            if got != {"cluster_watts": 1000 + i, "energy_kwh_per_day": 10 + i, "node_watts": {"node-0": 500 + i}}:
                lost.append(got)
    assert lost == [], f"{len(lost)}/30 rounds lost a field: {lost[:3]}"


def test_a_tiny_budget_is_shown_as_set(client: TestClient, r: redis.Redis) -> None:
    """A cluster budget of 1e-300 W read "cluster budget 0 W" in the misses."""
    publish_device_snapshots(r, "n1", busy_agent("n1").snapshot(), ttl_s=30)
    assert client.put("/v1/energy/budget", json={"cluster_watts": 1e-300}).status_code == 200
    misses = client.get("/v1/energy").json()["allocation"]["misses"]
    assert misses and all("cluster budget 1e-300 W" in m["reason"] for m in misses), misses
