"""`ember up` fails fast and clearly when its Redis is unreachable or its port is taken."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ember.platform.redis_server import free_port


def _up(tmp_path: Path, port: int, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "1",
                           "--data-dir", str(tmp_path / "data"), "--no-demo"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_unreachable_redis_is_named_without_its_password(tmp_path: Path) -> None:
    r = _up(tmp_path, free_port(), EMBER_REDIS_URL="redis://:hunter2@127.0.0.1:1/0")
    assert r.returncode == 1
    assert "Redis at redis://127.0.0.1:1" in r.stdout and "does not answer" in r.stdout
    assert "hunter2" not in r.stdout + r.stderr


def test_gateway_port_in_use_stops_everything(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "EMBER_REDIS_URL"}
        r = subprocess.run([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "1",
                            "--data-dir", str(tmp_path / "data"), "--no-demo"], env={**env,
                           "EMBER_DRAM_CAPACITY_BYTES": str(64 << 20)}, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1
    assert "gateway exited" in r.stdout


def test_several_gateway_processes_refuse_the_local_node_backend(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ember", "up", "--port", str(free_port()), "--workers", "1",
                        "--gateway-processes", "2", "--node-backend", "local", "--data-dir", str(tmp_path / "data"),
                        "--no-demo"], env={**os.environ, "COLUMNS": "300"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot run the local node backend" in r.stdout + r.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started
