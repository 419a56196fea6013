"""`ember up --node-backend local`: the gateway's node scaler starts and stops worker processes.

One worker (one CPU slot that holds one instance) runs function `a` (min_instances 1, so it is
never evicted). A request for `b` finds no room, waits, and is counted; the node scaler adds a
worker process; `b` is served there. After `b`'s keep-alive plus the grace period the new node is
drained and its process terminated (desired capacity back to 1), while requests to `a` keep
flowing: every request of the run succeeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from ember.platform.redis_server import free_port
from ember.platform.state import Keys

pytestmark = pytest.mark.slow
ADMIN = "fleet-admin-key-0123456789"


def _wait(cond, timeout: float, what: str, logs: Path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    text = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"timed out waiting for {what}\n{text}")


def test_burst_scales_workers_out_and_back_in_without_losing_requests(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {**os.environ, "EMBER_ADMIN_KEY": ADMIN, "EMBER_AUTOSCALER_INTERVAL_S": "0.3",
           "EMBER_HEARTBEAT_INTERVAL_S": "0.3", "EMBER_CPU_SLOTS": "1",
           "EMBER_DRAM_CAPACITY_BYTES": str(1 << 20),  # one slot of 1 MiB: one tiny instance per worker
           # each instance claims its KV budget too (64 tokens x 512 B beside 755 kB of weights); weights are
           # claimed once per device, so `b` deploys its own copy of the checkpoint ("tiny2", pushed below)
           "EMBER_KV_BUDGET_TOKENS": "64",
           "EMBER_NODE_SCALER_INTERVAL_S": "0.5", "EMBER_NODE_GRACE_S": "1", "EMBER_NODE_BOOT_S": "0",
           # one instance fills 0.75 of a worker: above the default target (0.55) the memory rule would
           # add node-l1 before the burst (and keep it); this test is about the waiting and idle rules
           "EMBER_NODE_TARGET_MEMORY_UTILIZATION": "0.9",
           "EMBER_SLO_TIMEOUT_S": "150", "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "1",
                             "--max-workers", "2", "--node-backend", "local", "--data-dir", str(data_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    logs = data_dir / "logs"
    auth = {"Authorization": f"Bearer {ADMIN}"}
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("ready: "):
                break
        assert lines and lines[-1].startswith("ready: "), "\n".join(lines)
        redis_url = next(line.split()[1] for line in lines if line.startswith("redis: "))
        password = (data_dir / "redis_password").read_text().strip()  # `ember up`'s Redis has one
        redis_url = redis_url.replace("redis://", f"redis://:{password}@")
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        assert r.hget(Keys.node("node-l0"), "cloud_instance_id") == "local-0"  # workers record their id
        worker_url = r.hget(Keys.node("node-l0"), "url")
        assert httpx.get(f"{worker_url}/healthz", timeout=10).status_code == 200  # load-balancer check, no token
        assert httpx.get(f"{worker_url}/internal/healthz", timeout=10).status_code == 401

        from ember.loader import open_store
        from ember.tinymodel import make_tiny_model

        open_store(f"file://{data_dir / 'store'}").push(make_tiny_model(tmp_path / "tiny2"), "tiny2")
        with httpx.Client(base_url=url, headers=auth, timeout=200) as c:
            for name, ck, body in (("a", "tiny", {"min_instances": 1, "keep_alive_s": 300}),
                                   ("b", "tiny2", {"min_instances": 0, "keep_alive_s": 1, "max_instances": 1})):
                resp = c.put(f"/v1/functions/{name}", json={"checkpoint": ck, "scaling": body})
                assert resp.status_code in (200, 201), resp.text
            statuses: list[int] = []
            stop = threading.Event()

            def call(model: str) -> int:
                return c.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).status_code

            assert call("a") == 200

            def steady() -> None:  # requests to `a` all through the scale-out and the drain
                while not stop.is_set():
                    statuses.append(call("a"))
                    time.sleep(0.2)

            t = threading.Thread(target=steady)
            t.start()
            try:
                resp = c.post("/v1/chat/completions", json={
                    "model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                assert resp.status_code == 200, resp.text
                assert resp.headers["x-ember-worker"] == "node-l1"  # the node the burst brought up
                metrics = c.get("/metrics").text
                assert "ember_placements_waited_total 1.0" in metrics
                # keep-alive (1 s) + grace (1 s): b unloads, node-l1 drains and its process goes
                _wait(lambda: "node-l1" not in r.smembers(Keys.nodes), 90, "node-l1 to be scaled in", logs)
                _wait(lambda: not (logs / "node-l1.log").exists() or "Shutting down" in
                      (logs / "node-l1.log").read_text() or "shutdown" in (logs / "node-l1.log").read_text().lower(),
                      30, "node-l1's process to stop", logs)
                assert r.scard(Keys.nodes_draining) == 0
                assert sorted(r.smembers(Keys.nodes)) == ["node-l0"]
                time.sleep(1.0)
            finally:
                stop.set()
                t.join(timeout=60)
            assert statuses and all(s == 200 for s in statuses), statuses
            assert call("a") == 200
            gateway_log = (logs / "gateway.log").read_text()
            assert "terminating node-l1 (local-1)" in gateway_log
            assert "local-0 exited" not in gateway_log and "node-l2" not in gateway_log  # the first node stayed
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

