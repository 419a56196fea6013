"""A gateway and two workers started separately (the multi-machine shape) on one real Redis:
locality, a worker killed mid-life, a Redis restart, cancellation when the client goes away."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.platform.redis_server import RedisServerProcess
from tests.platform.conftest import (
    CLUSTER_TOKEN,
    Proc,
    admin_headers,
    base_env,
    flip_byte,
    start_gateway,
    start_worker,
    wait_healthy,
)

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, redis: RedisServerProcess, gateway: Proc, workers: dict[str, Proc], env: dict[str, str],
                 tmp: Path) -> None:
        self.redis, self.gateway, self.workers, self.env, self.tmp = redis, gateway, workers, env, tmp

    @property
    def url(self) -> str:
        return self.gateway.url

    def chat(self, model: str, **kw: object) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **kw}
        return httpx.post(f"{self.url}/v1/chat/completions", headers=admin_headers(), json=body, timeout=120)


@pytest.fixture
def cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    from ember.loader import open_store

    store_url = f"file://{tmp_path / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    redis = RedisServerProcess(tmp_path / "redis", persistent=True).start()
    env = base_env(redis.url, store_url, EMBER_SLO_TIMEOUT_S="20", EMBER_SIMULATED_GPUS="1")
    procs: list[Proc] = []
    try:
        workers = {}
        for node in ("w0", "w1"):  # the three processes boot side by side
            workers[node] = start_worker(tmp_path, env, node, wait=False)
            procs.append(workers[node])
        gateway = start_gateway(tmp_path, env, wait=False)
        procs.append(gateway)
        for p in procs:
            wait_healthy(p)
        deadline = time.monotonic() + 20
        while httpx.get(f"{gateway.url}/readyz").json().get("workers") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        yield Cluster(redis, gateway, workers, env, tmp_path)
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def _deploy(c: Cluster, name: str, **scaling: object) -> None:
    r = httpx.put(f"{c.url}/v1/functions/{name}", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "tiny", "scaling": {"keep_alive_s": 300, **scaling}})
    assert r.status_code in (200, 201), r.text


def test_killed_worker_is_routed_around(cluster: Cluster) -> None:
    _deploy(cluster, "f")
    r1 = cluster.chat("f")
    assert r1.status_code == 200 and r1.headers["x-ember-cold-start"] == "true"
    victim = r1.headers["x-ember-worker"]
    cluster.workers[victim].proc.send_signal(signal.SIGKILL)
    cluster.workers[victim].proc.wait()
    r2 = cluster.chat("f")
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-ember-worker"] != victim
    assert r2.headers["x-ember-cold-start"] == "true"
    inst = httpx.get(f"{cluster.url}/v1/functions/f", headers=admin_headers()).json()["instances"]
    assert [i["node"] for i in inst] == [r2.headers["x-ember-worker"]]


def test_redis_restart_keeps_functions_and_workers_reregister(cluster: Cluster) -> None:
    _deploy(cluster, "g")
    assert cluster.chat("g").status_code == 200
    cluster.redis.stop()
    r = httpx.get(f"{cluster.url}/v1/functions", headers=admin_headers())
    assert r.status_code == 503 and r.json()["error"]["code"] == "state_unavailable"
    cluster.redis.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready = httpx.get(f"{cluster.url}/readyz")
        if ready.status_code == 200 and ready.json()["workers"] == 2:
            break
        time.sleep(0.2)
    assert httpx.get(f"{cluster.url}/readyz").json()["workers"] == 2  # workers registered again
    names = [f["name"] for f in httpx.get(f"{cluster.url}/v1/functions", headers=admin_headers()).json()["functions"]]
    assert "g" in names  # specs are durable (AOF)
    r2 = cluster.chat("g")
    assert r2.status_code == 200, r2.text


def test_generation_stops_when_client_goes_away(cluster: Cluster) -> None:
    _deploy(cluster, "h")
    body = {"model": "h", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2000, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", headers=admin_headers(), json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200
        worker = cluster.workers[resp.headers["x-ember-worker"]]
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                seen += 1
            if seen >= 3:
                break
    # the client is gone: the worker's decode loop must end as cancelled, not run to max_tokens
    deadline = time.monotonic() + 15
    finished: dict = {}
    while time.monotonic() < deadline:
        health = httpx.get(f"{worker.url}/internal/healthz", headers={"x-ember-cluster-token": CLUSTER_TOKEN}).json()
        finished = next(iter(health["instances"].values()))["finished"]
        if sum(finished.values()):
            break
        time.sleep(0.05)
    assert finished["cancelled"] == 1 and finished["length"] == 0, finished


def test_invoke_stream_says_so_when_its_worker_dies(cluster: Cluster) -> None:
    """`ember invoke --stream`: the worker is killed mid-stream; the gateway ends the stream with an
    error event and no [DONE]. The CLI must print the error and exit non-zero (it printed the text
    so far and exited 0, as if the answer were whole)."""
    import os
    import subprocess
    import sys

    from tests.platform.conftest import ADMIN_KEY

    _deploy(cluster, "dies")
    warm = cluster.chat("dies")
    assert warm.status_code == 200  # warm: the stream starts at once, on this instance's worker
    victim = cluster.workers[warm.headers["x-ember-worker"]]
    env = {**os.environ, "EMBER_URL": cluster.url, "EMBER_API_KEY": ADMIN_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "ember", "invoke", "dies", "Hello", "--stream", "--max-tokens",
                             "2000", "--temperature", "1", "--seed", "3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # tokens are arriving
    # killed at once (asking the gateway where the instance is first let a loaded machine finish the
    # stream before the kill: seen under two pytest processes)
    victim.proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 1, (first + out, err)
    assert b"error:" in err and b"Traceback" not in err, err


def test_worker_api_needs_cluster_token(cluster: Cluster) -> None:
    w = next(iter(cluster.workers.values()))
    assert httpx.get(f"{w.url}/internal/healthz").status_code == 401
    assert httpx.get(f"{w.url}/internal/healthz", headers={"x-ember-cluster-token": "wrong"}).status_code == 401
    r = httpx.post(f"{w.url}/internal/instances", json={"instance_id": "x", "function": "f", "checkpoint": "tiny"})
    assert r.status_code == 401


def test_concurrent_burst_scales_out_within_max_instances(cluster: Cluster) -> None:
    import concurrent.futures

    _deploy(cluster, "burst", target_concurrency=1, max_instances=2)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: cluster.chat("burst", max_tokens=64, temperature=0), range(6)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    colds = sum(r.headers["x-ember-cold-start"] == "true" for r in results)
    inst = httpx.get(f"{cluster.url}/v1/functions/burst", headers=admin_headers()).json()["instances"]
    assert 1 <= colds <= 2 and len(inst) == colds  # scaled out (a burst on no instance), never beyond max
    assert all(i["outstanding"] == 0 for i in inst)  # every slot was released


def test_deploy_by_uri_and_unknown_checkpoint(cluster: Cluster) -> None:
    uri = f"file://{cluster.tmp / 'store'}/tiny"
    r = httpx.put(f"{cluster.url}/v1/functions/by-uri", headers=admin_headers(), timeout=60, json={"checkpoint": uri})
    assert r.status_code == 201, r.text
    assert r.json()["nbytes"] > 0
    assert cluster.chat("by-uri").status_code == 200
    r = httpx.put(f"{cluster.url}/v1/functions/ghost", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "no-such-checkpoint"})
    assert r.status_code == 404, r.text
    assert "no-such-checkpoint" in r.json()["error"]["message"]
    r = httpx.put(f"{cluster.url}/v1/functions/evil", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "../../etc"})
    assert r.status_code == 400, r.text


def test_energy_api_budgets_and_metrics_from_workers(cluster: Cluster) -> None:
    _deploy(cluster, "e")
    for _ in range(3):
        assert cluster.chat("e").status_code == 200
    op = httpx.post(f"{cluster.url}/v1/keys", headers=admin_headers(), json={"role": "operator"}).json()["key"]
    inv = httpx.post(f"{cluster.url}/v1/keys", headers=admin_headers(), json={"role": "invoker"}).json()["key"]
    assert httpx.get(f"{cluster.url}/v1/energy", headers={"Authorization": f"Bearer {inv}"}).status_code == 403
    r = httpx.put(f"{cluster.url}/v1/energy/budget", headers={"Authorization": f"Bearer {op}"},
                  json={"cluster_watts": 900, "energy_kwh_per_day": 40})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    body: dict = {}
    while time.monotonic() < deadline:
        body = httpx.get(f"{cluster.url}/v1/energy", headers={"Authorization": f"Bearer {op}"}).json()
        if len(body["devices"]) == 2:
            break
        time.sleep(0.2)
    assert body["budget"]["cluster_watts"] == 900 and body["budget"]["energy_kwh_per_day"] == 40
    assert {(d["node"], d["device"]) for d in body["devices"]} == {("w0", "sim:0"), ("w1", "sim:0")}
    for d in body["devices"]:
        assert d["power_w"] > 0 and d["limit_w"] > 0 and d["mode"] in ("observe", "recommend")
    assert isinstance(body["projected_kwh_today"], float)
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert 'ember_gpu_power_watts{device="sim:0",node="w0"}' in metrics
    assert "ember_energy_joules_total" in metrics and "ember_gpu_power_limit_watts" in metrics


def test_a_bad_store_copy_is_served_from_another_nodes_good_copy(cluster: Cluster) -> None:
    """The store's copy goes bad after one node cached a good one. A load placed on the other node
    finds every copy it can reach bad (422 checksum_mismatch there): the gateway places it once
    more, on the node holding a good copy, and the request succeeds."""
    _deploy(cluster, "keeper")
    r = cluster.chat("keeper", temperature=0)
    assert r.status_code == 200, r.text
    holder = r.headers["x-ember-worker"]
    other = ({"w0", "w1"} - {holder}).pop()
    part = cluster.tmp / "store" / "tiny" / "part-00000.bin"
    assert flip_byte(part, 100, 0x20)  # the store's only copy: one byte flipped
    # least_loaded places on the device with most free memory: the other node (keeper's instance
    # holds memory on the holder's), which has no copy but the store's
    put = httpx.put(f"{cluster.url}/v1/functions/second", headers=admin_headers(), timeout=60,
                    json={"checkpoint": "tiny", "placement_policy": "least_loaded", "scaling": {"keep_alive_s": 300}})
    assert put.status_code in (200, 201), put.text
    r2 = cluster.chat("second", temperature=0)
    assert r2.status_code == 200, r2.text
    assert r2.headers["x-ember-worker"] == holder
    assert r2.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    assert "checksum" in cluster.workers[other].log.read_text()  # it was tried there first, and failed
    inst = httpx.get(f"{cluster.url}/v1/functions/second", headers=admin_headers()).json()["instances"]
    assert [i["node"] for i in inst] == [holder]  # nothing left booked on the node that failed
