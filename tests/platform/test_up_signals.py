"""`ember up` and signals, through a real process tree: a Ctrl-C at the terminal (SIGINT to the whole
foreground process group) reaches the supervisor alone, which stops each child with one SIGTERM, so
streams in flight finish and Redis outlives the workers' drain; a SIGKILLed supervisor still takes
every child with it, and leaves no lock that keeps the next `ember up` off its data dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ember.platform.redis_server import free_port

pytestmark = pytest.mark.slow
ADMIN = "signals-admin-key-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def _descendants(pid: int) -> dict[int, int]:
    """Every live process below `pid`, with its process group (from /proc)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[2])))
    found, todo = {}, [pid]
    while todo:
        for child, pgrp in children.get(todo.pop(), []):
            found[child] = pgrp
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and
            Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}


def _start_up(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """`ember up` as a terminal starts a job: the leader of its own process group."""
    env = {**os.environ, "EMBER_ADMIN_KEY": ADMIN, "EMBER_DRAIN_GRACE_S": "60", "EMBER_HEARTBEAT_INTERVAL_S": "0.5",
           "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "1",
                             "--data-dir", str(data_dir), "--no-demo", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("ready: "):
            return proc
    proc.wait(10)
    pytest.fail("ember up did not become ready:\n" + "\n".join(lines))


@pytest.fixture
def up_proc() -> Iterator[list[subprocess.Popen[str]]]:
    """The `ember up` processes a test starts; whatever is left of their trees is killed afterwards."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        leftovers = _descendants(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ctrl_c_on_the_process_group_lets_streams_in_flight_finish(tmp_path: Path, up_proc: list) -> None:
    """Before: every child was in the terminal's process group. A Ctrl-C gave each one SIGINT and
    then the supervisor's SIGTERM (uvicorn takes a second signal during its shutdown for a force
    quit: 3 streams in 12 were cut), and Redis stopped at once, under workers still draining (they
    could not deregister)."""
    data_dir, port = tmp_path / "data", free_port()
    up = _start_up(data_dir, port)
    up_proc.append(up)
    from ember.loader import open_store
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    # a model slow enough on a CPU (~70 tokens/s) that its answer is still streaming after the signal
    src = make_tiny_model(tmp_path / "slow", TinyModelSpec(hidden=512, layers=4, seed=3))
    open_store(f"file://{data_dir / 'store'}").push(src, "slow")
    url = f"http://127.0.0.1:{port}"
    r = httpx.put(f"{url}/v1/functions/slow", headers=HEADERS, json={"checkpoint": "slow"}, timeout=60)
    assert r.status_code == 201, r.text
    warm = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=120,
                      json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert warm.status_code == 200, warm.text

    tree = _descendants(up.pid)
    assert len(tree) >= 3  # redis, gateway, a worker
    in_terminal_group = [pid for pid, pgrp in tree.items() if pgrp == up.pid]
    assert in_terminal_group == [], f"children a Ctrl-C reaches directly: {in_terminal_group}"

    body = {"model": "slow", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1000,
            "stream": True, "temperature": 0}
    chunks_after, done = 0, False
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=HEADERS, json=body, timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(lines)
        os.killpg(up.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        for line in lines:
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                assert "error" not in line, line
                chunks_after += 1
    assert done and chunks_after > 0
    assert up.wait(90) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(set(tree)):
        time.sleep(0.2)
    assert _alive(set(tree)) == set()
    worker_log = (data_dir / "logs" / "node-0.log").read_text()
    assert "could not deregister" not in worker_log, worker_log[-2000:]  # Redis was still there
    redis_log = (data_dir / "redis" / "redis.log").read_text()
    assert "Received SIGINT" not in redis_log and "Received SIGTERM" in redis_log


def test_a_killed_supervisor_takes_its_children_and_leaves_no_lock(tmp_path: Path, up_proc: list) -> None:
    """SIGKILL to the supervisor alone: PR_SET_PDEATHSIG stops every child (they are in their own
    sessions now, out of reach of a signal to the supervisor's group); its data-dir lock died with
    it, so the next `ember up` on that data dir starts."""
    data_dir = tmp_path / "data"
    up = _start_up(data_dir, free_port())
    up_proc.append(up)
    tree = _descendants(up.pid)
    assert len(tree) >= 3
    os.kill(up.pid, signal.SIGKILL)
    up.wait(10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(set(tree)):
        time.sleep(0.2)
    assert _alive(set(tree)) == set()
    assert (data_dir / "up.lock").read_text().strip() == str(up.pid)  # the file stays; its lock does not
    again = _start_up(data_dir, free_port())
    up_proc.append(again)
    again.send_signal(signal.SIGTERM)
    try:
        assert again.wait(60) == 0
    except subprocess.TimeoutExpired:  # seen once in a full run, not since: say which child held it up
        alive = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                 for pid in _alive(set(_descendants(again.pid)))}
        logs = {p.name: p.read_text(errors="replace")[-1500:] for p in (data_dir / "logs").glob("*.log")}
        pytest.fail(f"ember up did not stop within 60 s of SIGTERM; children still up: {alive}; logs: {logs}")
