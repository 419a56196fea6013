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
    # refused before anything starts (before, a server already there answering /readyz, another
    # `ember up` say, made this one print "ready" at a URL its admin key did not open)
    assert f"cannot listen on 127.0.0.1:{port}" in r.stdout + r.stderr, r.stdout + r.stderr
    # the hint once said "choose --port", which led to a second `ember up` on the same data dir
    assert "its own --port and its own --data-dir" in r.stdout, r.stdout
    assert not (tmp_path / "data").exists()


def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    """Before: given another port, a second `ember up` on a data dir in use started: two Redis
    servers appending to one AOF, two workers node-0 on one node dir, and what the second did was
    replayed into the first's state at its next start. Now the first holds a lock on the data dir."""
    env = {k: v for k, v in os.environ.items() if k != "EMBER_REDIS_URL"}
    first = subprocess.Popen([sys.executable, "-m", "ember", "up", "--port", str(free_port()), "--workers", "1",
                              "--data-dir", str(tmp_path / "data"), "--no-demo"], env={**env, "PYTHONUNBUFFERED": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first.stdout is not None
        seen = []
        for line in first.stdout:
            seen.append(line)
            if line.startswith("ready: "):
                break
        assert seen and seen[-1].startswith("ready: "), "".join(seen)
        second = subprocess.run([sys.executable, "-m", "ember", "up", "--port", str(free_port()), "--workers", "1",
                                 "--data-dir", str(tmp_path / "data"), "--no-demo"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stdout.splitlines() == [
            f"error: {(tmp_path / 'data').resolve()} is in use by another `ember up` (pid {first.pid}): stop it, "
            "or give this one its own --data-dir"], second.stdout + second.stderr
        assert first.poll() is None  # the first one runs on
    finally:
        first.terminate()
        first.wait(60)


def test_settings_and_urls_that_are_not_what_they_should_be_are_one_line(tmp_path: Path) -> None:
    """A setting of the wrong type, a Redis URL without its scheme, client verbs without a key or
    with an unreachable gateway: a one-line error and a non-zero exit, never a traceback."""
    bad_port = _up(tmp_path, free_port(), EMBER_DRAM_CAPACITY_BYTES="lots")
    assert bad_port.returncode == 2 and "EMBER_DRAM_CAPACITY_BYTES" in bad_port.stderr, bad_port.stderr
    bad_url = _up(tmp_path, free_port(), EMBER_REDIS_URL="localhost:6379")
    assert bad_url.returncode == 1 and "EMBER_REDIS_URL must be" in bad_url.stdout + bad_url.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_URL", "EMBER_API_KEY")}
    cases = [({"EMBER_URL": f"http://127.0.0.1:{free_port()}", "EMBER_API_KEY": "k"}, "ConnectError"),
             ({"EMBER_URL": "127.0.0.1:8000", "EMBER_API_KEY": "k"}, "EMBER_URL"),
             ({"EMBER_URL": "http://127.0.0.1:1"}, "EMBER_API_KEY"),
             ({"EMBER_URL": "http://127.0.0.1:1", "EMBER_API_KEY": "cl\u00e9"}, "EMBER_API_KEY")]
    for extra, says in cases:
        for verb in (["ls"], ["invoke", "f", "hi", "--stream"]):
            r = subprocess.run([sys.executable, "-m", "ember", *verb], env={**env, **extra, "COLUMNS": "300"},
                               capture_output=True, text=True, timeout=60)
            out = r.stdout + r.stderr
            assert r.returncode != 0 and says in out and "Traceback" not in out, (verb, extra, out)


def test_an_empty_admin_key_file_gets_a_new_key_not_the_public_default(tmp_path: Path) -> None:
    """An interrupted first start could leave `admin_key` empty: the gateway then fell back to the
    public development key, while the printed path pointed at the empty file."""
    from ember.platform.supervisor import read_or_create_secret

    path = tmp_path / "admin_key"
    path.write_text("\n")
    key = read_or_create_secret(path, None)
    assert len(key) >= 20 and path.read_text().strip() == key and oct(path.stat().st_mode & 0o777) == "0o600"
    assert read_or_create_secret(path, None) == key  # remembered
    assert not list(tmp_path.glob(".admin_key*"))  # no temporary file left


def test_several_gateway_processes_refuse_the_local_node_backend(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ember", "up", "--port", str(free_port()), "--workers", "1",
                        "--gateway-processes", "2", "--node-backend", "local", "--data-dir", str(tmp_path / "data"),
                        "--no-demo"], env={**os.environ, "COLUMNS": "300"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot run the local node backend" in r.stdout + r.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started
