"""The private Redis-protocol server: starts on loopback, and never outlives a killed parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # exited; only waiting for a reaper


def test_server_answers_and_dies_with_a_killed_parent(tmp_path: Path) -> None:
    code = ("import sys, time\n"
            "from ember.platform.redis_server import RedisServerProcess\n"
            "r = RedisServerProcess(sys.argv[1], persistent=False).start()\n"
            "print(r.proc.pid, r.url, flush=True)\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid_s, url = parent.stdout.readline().split()
    assert url.startswith("redis://127.0.0.1:")
    assert redis.Redis.from_url(url).ping()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _dead(int(pid_s)):
        time.sleep(0.1)
    assert _dead(int(pid_s))
