"""The client verbs of the real CLI (`python -m ember ...`) against a real `ember up`: what they print
and how they exit. An error is one line and a non-zero exit (2: refused before any request), never
a success for a request that did nothing, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from ember.platform.redis_server import free_port

pytestmark = pytest.mark.slow
ADMIN = "cli-admin-key-0123456789"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("up") / "data"
    port = free_port()
    env = {**os.environ, "EMBER_ADMIN_KEY": ADMIN, "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "ember", "up", "--port", str(port), "--workers", "1",
                             "--data-dir", str(data_dir), "--no-demo"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("ready: "):
            break
    try:
        assert seen and seen[-1].startswith("ready: "), "".join(seen)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


def ember(url: str, *args: str, key: str = ADMIN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_URL": url, "EMBER_API_KEY": key, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "ember", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _refused(r: subprocess.CompletedProcess[str], says: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2 and says in out and "Traceback" not in out, out
    assert r.stdout == "", out  # nothing that reads as a result


def test_an_empty_name_is_a_usage_error_not_a_success(url: str) -> None:
    """Before: `ember keys rm ''` printed "revoked" and `ember rm ''` "deleted" (exit 0: the gateway
    redirected the collection's URL and the redirect was taken for a success); `ember keys limits ''
    --rpm 4` printed `null`."""
    _refused(ember(url, "keys", "rm", ""), "invalid key id ''")
    _refused(ember(url, "rm", ""), "invalid function name ''")
    _refused(ember(url, "keys", "limits", "", "--rpm", "4"), "invalid key id ''")
    _refused(ember(url, "deploy", "", "--checkpoint", "tiny"), "invalid function name ''")
    _refused(ember(url, "invoke", "", "hi"), "invalid function name ''")


def test_nan_and_inf_options_are_refused_when_parsed(url: str) -> None:
    """Before: a Python traceback (ValueError: Out of range float values are not JSON compliant)."""
    _refused(ember(url, "energy", "budget", "set", "--kwh-per-day", "nan"), "nan is not a finite number")
    _refused(ember(url, "energy", "budget", "set", "--cluster-watts", "inf"), "inf is not a finite number")
    _refused(ember(url, "deploy", "f", "--checkpoint", "tiny", "--keep-alive-s", "nan"), "not a finite number")
    _refused(ember(url, "invoke", "f", "hi", "--temperature", "nan"), "nan is not a finite number")
    _refused(ember(url, "energy", "budget", "set", "--node-watts", "node-0=nan"), "is not NODE=WATTS")


def test_energy_errors_are_one_line_like_every_other_verb(url: str) -> None:
    """Before: `PUT /v1/energy/budget: HTTP 422: {"error": ...}` (the raw body)."""
    r = ember(url, "energy", "budget", "set", "--cluster-watts", "0")
    assert r.returncode == 1 and r.stderr.splitlines() == ["error 422: cluster_watts: Input should be greater than 0"], \
        r.stderr
    r = ember(url, "energy", "status", key="not-a-key")
    assert r.returncode == 1 and r.stderr.splitlines() == ["error 401: invalid API key"], r.stderr
    r = ember(url, "ls", key="not-a-key")
    assert r.returncode == 1 and r.stderr.splitlines() == ["error 401: invalid API key"], r.stderr


def test_energy_budget_set_show_clear_and_node_watts(url: str) -> None:
    """Before: `energy budget` had only `set` (cluster watts and kWh/day), and `energy status` with no
    budget said "cluster None W"."""
    r = ember(url, "energy", "budget", "set", "--cluster-watts", "900", "--node-watts", "node-0=300",
              "--node-watts", "node-1=200", "--kwh-per-day", "12")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == {"cluster_watts": 900, "node_watts": {"node-0": 300, "node-1": 200},
                                    "energy_kwh_per_day": 12}
    r = ember(url, "energy", "budget", "set", "--node-watts", "node-1=250")  # other nodes' budgets stay
    assert r.returncode == 0 and json.loads(r.stdout)["node_watts"] == {"node-0": 300, "node-1": 250}, r.stdout
    r = ember(url, "energy", "budget", "show")
    assert r.returncode == 0 and r.stdout.splitlines() == [
        "cluster 900.0 W", "node node-0 300.0 W", "node node-1 250.0 W", "12.000 kWh/day"], r.stdout
    r = ember(url, "energy", "budget", "clear", "--node", "node-1", "--kwh-per-day")
    assert r.returncode == 0 and json.loads(r.stdout) == {"cluster_watts": 900, "node_watts": {"node-0": 300},
                                                          "energy_kwh_per_day": None}, r.stdout
    r = ember(url, "energy", "budget", "clear")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ember(url, "energy", "budget", "show").stdout.splitlines() == ["no cluster budget", "no daily energy budget"]
    status = ember(url, "energy", "status")
    assert status.returncode == 0 and "no cluster budget" in status.stdout and "None" not in status.stdout, \
        status.stdout


def test_keys_ls_shows_each_keys_limits(url: str) -> None:
    r = ember(url, "keys", "create", "--role", "invoker", "--name", "limited", "--rpm", "7", "--tpm", "1000")
    assert r.returncode == 0, r.stderr
    key_id = json.loads(r.stdout)["id"]
    rows = {line.split("\t")[0]: line.split("\t") for line in ember(url, "keys", "ls").stdout.splitlines()}
    assert rows[key_id] == [key_id, "invoker", "limited", "rpm=7", "tpm=1000"]
    assert rows["admin"][3:] == ["rpm=unlimited", "tpm=unlimited"]


class _Redirects(BaseHTTPRequestHandler):
    """A proxy that sends every request elsewhere (http to https, say)."""

    def _redirect(self) -> None:
        self.send_response(301)
        self.send_header("Location", "https://gateway.example" + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST = _redirect

    def log_message(self, *args: object) -> None:
        pass


def test_a_redirect_is_not_a_success(tmp_path: Path) -> None:
    """Before: `ember rm f` behind a redirect printed "deleted f" and `ember keys limits` `null`, exit 0."""
    server = HTTPServer(("127.0.0.1", 0), _Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        for args in (["rm", "f"], ["keys", "rm", "abc"], ["keys", "limits", "abc", "--rpm", "4"], ["ls"],
                     ["energy", "status"]):
            r = ember(url, *args)
            assert r.returncode == 1 and r.stdout == "", (args, r.stdout)
            assert r.stderr.startswith("error 301: redirected to https://gateway.example/v1/"), (args, r.stderr)
            assert len(r.stderr.splitlines()) == 1, r.stderr
    finally:
        server.shutdown()
