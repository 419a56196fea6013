"""`http_common.serve`, which runs the gateway and the worker: the port listens before the app's
startup runs, so a connection made while a worker registers and starts (a gateway routing a load
to a node it just saw in Redis) waits and is answered, where it was refused and the gateway took
the worker for dead."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from ember.platform.redis_server import free_port

APP = """
import sys, time
from contextlib import asynccontextmanager
from pathlib import Path
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from ember.platform.http_common import serve

marker = Path(sys.argv[2])

@asynccontextmanager
async def lifespan(app):
    time.sleep(2.0)  # a slow startup (a worker measuring its tiers, then registering)
    marker.write_text("started")
    yield

app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("served"))], lifespan=lifespan)
serve(app, "127.0.0.1", int(sys.argv[1]), log_level="warning")
"""


def test_the_port_listens_before_startup_and_early_connections_are_answered(tmp_path: Path) -> None:
    port, marker = free_port(), tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), str(marker)])
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                time.sleep(0.01)
        assert not marker.exists()  # accepted while the app was still starting
        with conn:
            conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"served") and marker.exists()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, "-c", APP, str(port), str(tmp_path / "m")], capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 1
    assert "error while attempting to bind" in done.stderr and "Traceback" not in done.stderr
