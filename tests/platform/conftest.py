"""Fixtures that start real gateway and worker processes (uvicorn) on free loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ember.platform.redis_server import free_port

ADMIN_KEY = "test-admin-key-0123456789"
CLUSTER_TOKEN = "test-cluster-token-0123456789"


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def base_env(redis_url: str, store_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "EMBER_REDIS_URL": redis_url, "EMBER_ADMIN_KEY": ADMIN_KEY,
            "EMBER_CLUSTER_TOKEN": CLUSTER_TOKEN, "EMBER_STORE_URL": store_url, "PYTHONUNBUFFERED": "1",
            "EMBER_HEARTBEAT_INTERVAL_S": "0.3", "EMBER_HEARTBEAT_TTL_S": "2", "EMBER_AUTOSCALER_INTERVAL_S": "0.3",
            "EMBER_DRAM_CAPACITY_BYTES": str(128 << 20), **extra}


def start_process(args: list[str], env: dict[str, str], log: Path, health_url: str, *, headers: dict | None = None,
                  timeout_s: float = 60.0) -> Proc:
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ember", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    p = Proc(proc, health_url.rsplit("/", 2)[0] if "/internal/" in health_url else health_url.rsplit("/", 1)[0], log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{p.output()}")
        try:
            if httpx.get(health_url, headers=headers, timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"{args[0]} did not become healthy:\n{p.output()}")


def start_gateway(tmp: Path, env: dict[str, str]) -> Proc:
    port = free_port()
    return start_process(["gateway", "--host", "127.0.0.1", "--port", str(port)], env, tmp / f"gateway-{port}.log",
                         f"http://127.0.0.1:{port}/healthz")


def start_worker(tmp: Path, env: dict[str, str], node_id: str) -> Proc:
    port = free_port()
    return start_process(["worker", "--data-dir", str(tmp / node_id), "--node-id", node_id, "--host", "127.0.0.1",
                          "--port", str(port)], env, tmp / f"{node_id}.log",
                         f"http://127.0.0.1:{port}/internal/healthz",
                         headers={"x-ember-cluster-token": CLUSTER_TOKEN}, timeout_s=120)


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[Proc]:
    """A real gateway process without workers."""
    g = start_gateway(tmp_path, base_env(redis_url, f"file://{tmp_path / 'store'}"))
    yield g
    g.stop()


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}
