"""Several gateway processes on one port (`EMBER_GATEWAY_PROCESSES`).

A gateway process is one event loop on one core: ~0.5-0.9 ms of CPU per warm request, so with 32
clients the requests of one engine step queue behind each other in the gateway. N processes, each
a whole gateway (its own Redis connections, autoscaler and node-scaler loops under the same leases
any two gateways share), bind the same port with SO_REUSEPORT and the kernel spreads connections
over them.

This parent serves nothing: it starts the N children (each `ember gateway` again, with
EMBER_GATEWAY_CHILD set), restarts one that dies (after a second, doubling up to 30 s), forwards
SIGTERM/SIGINT (each child drains its streams for up to `drain_grace_s`), and gives every child
PR_SET_PDEATHSIG so none outlives it. Their Prometheus metrics are kept in a shared directory
(prometheus_client's multiprocess mode) that any child's `/metrics` sums, so a scrape sees the
whole gateway whichever process answers it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from ember.platform.http_common import listening_socket
from ember.platform.redis_server import die_with_parent

log = logging.getLogger(__name__)

CHILD_ENV = "EMBER_GATEWAY_CHILD"
GROUP_ENV = "EMBER_GATEWAY_GROUP"  # shared by the processes of one gateway: their lease holder ids start with it
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
STARTUP_S = 10.0


def is_child() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def refusal(processes: int, node_backend: str) -> str | None:
    """Why these settings cannot run, or None."""
    if processes > 1 and node_backend == "local":
        return "more than one gateway process cannot run the local node backend (its workers are one process's children)"
    return None


def _check_port(host: str, port: int) -> None:
    """Raise OSError when the port is held by a socket the children could not share."""
    listening_socket(host, port, reuse_port=True, listen=False).close()


def run_processes(n: int, host: str, port: int, grace_s: float) -> int:
    """Run `n` gateway processes with this process's arguments until a signal; returns the exit code.
    A process that exits within `STARTUP_S` of its start (a port taken, a bad setting) stops them all:
    starting it again would fail again."""
    try:
        _check_port(host, port)
    except OSError as e:
        log.error("gateway: cannot bind %s:%d: %s", host, port, e)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="ember-gateway-metrics-")
    env = {**os.environ, CHILD_ENV: "1", METRICS_DIR_ENV: metrics_dir, GROUP_ENV: uuid.uuid4().hex[:8]}
    args = [sys.executable, "-m", "ember", *sys.argv[1:]]
    stopping = False
    code = 0

    def start(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, env=env, preexec_fn=die_with_parent)

    def on_signal(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    procs = [start(i) for i in range(n)]
    backoff = [1.0] * n
    started = [time.monotonic()] * n
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("gateway: %d processes (pids %s)", n, ", ".join(str(p.pid) for p in procs))
    try:
        while not stopping:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                if stopping or p.poll() is None:
                    continue
                _forget_live_gauges(p.pid, metrics_dir)
                if time.monotonic() - started[i] < STARTUP_S:
                    log.error("gateway process %d exited with %s while starting; stopping", i, p.returncode)
                    on_signal(signal.SIGTERM, None)
                    code = p.returncode or 1
                    break
                if time.monotonic() - started[i] > 60:
                    backoff[i] = 1.0
                log.warning("gateway process %d (pid %d) exited with %s; restarting in %.0fs", i, p.pid,
                            p.returncode, backoff[i])
                time.sleep(backoff[i])
                backoff[i] = min(30.0, backoff[i] * 2)
                if not stopping:
                    procs[i], started[i] = start(i), time.monotonic()
        deadline = time.monotonic() + grace_s + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return code
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _forget_live_gauges(pid: int, metrics_dir: str) -> None:
    """A dead process's gauges stop counting (its counters and histograms stay in the sums)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=metrics_dir)
    except OSError as e:
        log.debug("could not clear the gauges of pid %d: %s", pid, e)
