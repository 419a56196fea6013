"""Several gateway processes on one port (`ember up --gateway-processes 2`): both serve, /metrics
and /v1/stats/functions count every process's requests whichever answers, a process that dies is
started again while the other keeps serving, both come back after Redis is killed and restarted,
and SIGTERM stops them all and frees the port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from ember.platform.redis_server import free_port


def _requests_ok(url: str, headers: dict[str, str]) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text  # a new connection each time
    m = re.search(r'^ember_requests_total\{function="tiny",status="200"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _ready_instances(url: str, headers: dict[str, str]) -> float | None:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text  # a new connection each time
    m = re.search(r'^ember_instances\{function="tiny",state="ready"\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else None


def _gateway_children(up: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in up.children(recursive=True):
        try:
            if "gateway" in p.cmdline() and p.parent() is not None and p.parent().pid != up.pid:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_two_gateway_processes_share_the_port_metrics_and_restarts(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_REDIS_URL", "EMBER_STORE_URL")}
    env.update({"EMBER_ADMIN_KEY": "procs-admin-key-0123456789", "EMBER_DRAM_CAPACITY_BYTES": str(64 << 20)})
    headers = {"Authorization": "Bearer procs-admin-key-0123456789"}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "1",
                           "--gateway-processes", "2", "--data-dir", str(tmp_path / "data")],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json().get("data"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "up.log").read_text()[-3000:])
        ids = {httpx.get(f"{url}/healthz", timeout=5).json()["gateway"] for _ in range(24)}
        assert len(ids) == 2, ids  # fresh connections reach both processes

        before = _requests_ok(url, headers)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        for _ in range(10):  # each on a new connection: spread over both processes
            r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=120)
            assert r.status_code == 200, r.text
        assert {_requests_ok(url, headers) - before for _ in range(6)} == {10.0}  # every scrape sums both

        def stats() -> tuple[str, int]:  # a new connection each time: either process answers
            body = httpx.get(f"{url}/v1/stats/functions", headers=headers, timeout=10).json()
            (tiny,) = [f for f in body["functions"] if f["name"] == "tiny"]
            return body["gateway"], tiny["requests"]

        # each process shares its window about once a second: wait until both processes (not four answers
        # that may all come from one of them) count all ten; then every answer must
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = [stats() for _ in range(8)]
            if {n for _, n in seen} == {10} and len({g for g, _ in seen}) == 2:
                break
            time.sleep(0.3)
        answers = [stats() for _ in range(24)]
        assert {n for _, n in answers} == {10} and len({g for g, _ in answers}) == 2, answers  # both count all
        # one process holds the autoscaler lease; either exports ember_instances (read from Redis)
        gauges = {_ready_instances(url, headers) for _ in range(12)}
        assert len(gauges) == 1 and (gauges.pop() or 0) >= 1, gauges

        children = _gateway_children(psutil.Process(up.pid))
        assert len(children) == 2, children
        time.sleep(max(0.0, 11 - (time.time() - min(c.create_time() for c in children))))  # past startup
        victim = children[0]
        victim.kill()
        for _ in range(10):  # the other process serves meanwhile (a connection may meet the dead one's socket once)
            r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=120)
            if r.status_code == 200:
                break
        assert r.status_code == 200
        restarted = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not restarted:
            now = _gateway_children(psutil.Process(up.pid))
            restarted = len(now) == 2 and victim.pid not in {p.pid for p in now}
            time.sleep(0.3)
        assert restarted
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200

        # Redis dies: `ember up` restarts it from its AOF and both processes reconnect (every
        # request below is on a new connection: spread over both processes)
        (server,) = [p for p in psutil.Process(up.pid).children()
                     if any(name in " ".join(p.cmdline()) for name in ("redis-server", "valkey-server"))]
        server.kill()
        served, deadline = 0, time.monotonic() + 60
        while served < 24 and time.monotonic() < deadline:
            try:
                r = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=30)
                served = served + 1 if r.status_code == 200 else 0
            except httpx.HTTPError:
                served = 0
            if not served:
                time.sleep(0.3)
        assert served == 24, served

        everyone = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        gone, alive = psutil.wait_procs(everyone, timeout=20)
        assert not alive, alive
        with socket.socket() as s:  # the port is free again (no process kept it)
            s.bind(("127.0.0.1", port))
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        log.close()
