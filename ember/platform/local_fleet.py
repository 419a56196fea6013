"""A `CloudBackend` on one machine: worker processes instead of instances, for `ember up
--node-backend local`. It behaves like an Auto Scaling group (a desired capacity it converges to,
a terminate that decrements it, dead workers replaced), so the node scaler's behaviour is seen
without a cloud. The processes are children of the gateway that holds the backend and die with it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ember.config import Settings
from ember.platform.redis_server import die_with_parent, free_port

log = logging.getLogger(__name__)

__all__ = ["LocalWorkerFleet"]


@dataclass
class _LocalInstance:
    cloud_id: str
    node_id: str
    proc: subprocess.Popen[bytes]
    share: int = -1  # its slot in the GPU split (-1: CPU slots)
    started_s: float = 0.0  # time.monotonic() at its start


FAILED_START_S = 60.0  # a worker that exits sooner than this after its start failed to start
MAX_BACKOFF_S = 60.0


class LocalWorkerFleet:
    """`ember worker` processes on this machine, ids "local-<n>", node ids "<prefix>-<n>"."""

    name = "local"

    def __init__(self, settings: Settings, *, node_prefix: str = "node-l") -> None:
        self.settings = settings
        self.data_dir = Path(os.environ.get("EMBER_FLEET_DATA_DIR") or settings.data_dir).resolve()
        self.host = os.environ.get("EMBER_FLEET_WORKER_HOST", "127.0.0.1")
        self.node_prefix = node_prefix
        self.desired = 0
        self.running: dict[str, _LocalInstance] = {}
        self.terminated = 0
        self._next = 0
        self._lock = threading.Lock()
        # Workers that die soon after their start (a bad setting, a full disk) are replaced after a
        # back-off that doubles up to MAX_BACKOFF_S, not at every step (each start is a full import)
        self.failed_starts = 0
        self._not_before = 0.0
        # The machine's GPUs divided into node_max shares, one per worker (EMBER_DEVICES), as `ember
        # up --workers N` does: two workers never register the same GPU. None: no GPUs (CPU slots).
        # Fewer GPUs than node_max is refused here (ConfigError), before any worker starts.
        from ember.platform.devices import split_devices, visible_gpu_ids

        given = [d.strip() for d in (os.environ.get("EMBER_DEVICES") or "").split(",") if d.strip()]
        self.shares = split_devices(given or visible_gpu_ids(), max(1, settings.node_max))
        # Workers get SIGTERM when the thread that started them exits (PR_SET_PDEATHSIG follows the
        # thread, not the process): start them all from one thread that lives as long as the gateway.
        self._spawns: queue.SimpleQueue[tuple[list[str], dict[str, str], Path, Future]] = queue.SimpleQueue()
        threading.Thread(target=self._spawner, name="local-fleet-spawner", daemon=True).start()

    def desired_capacity(self) -> int:
        return self.desired

    def set_desired_capacity(self, count: int) -> None:
        with self._lock:
            self.desired = max(self.settings.node_min, min(self.settings.node_max, count))
            self._converge()

    def terminate(self, cloud_id: str) -> None:
        with self._lock:
            inst = self.running.pop(cloud_id, None)
            if inst is None:
                return
            self.desired = max(0, self.desired - 1)
            self.terminated += 1
            _stop(inst.proc)
            log.info("local fleet: terminated %s (%s); desired %d", cloud_id, inst.node_id, self.desired)

    def instances(self) -> dict[str, str]:
        with self._lock:
            self._converge()
            return {i: "InService" for i in self.running}

    def protect(self, cloud_ids: list[str]) -> None:
        """Nothing terminates a local worker except `terminate`."""

    def complete_termination(self, cloud_id: str) -> None:
        self.terminate(cloud_id)

    def put_metrics(self, values: Mapping[str, float]) -> None:
        """Local metrics are the gateway's Prometheus gauges."""

    def node_id(self, cloud_id: str) -> str | None:
        inst = self.running.get(cloud_id)
        return inst.node_id if inst else None

    def close(self) -> None:
        with self._lock:
            self.desired = 0
            for inst in self.running.values():
                _stop(inst.proc)
            self.running.clear()

    def _converge(self) -> None:
        """Replace dead workers and start or stop processes to match the desired capacity."""
        now = time.monotonic()
        for cid, inst in list(self.running.items()):
            if inst.proc.poll() is not None:
                del self.running[cid]
                if now - inst.started_s < FAILED_START_S:
                    self.failed_starts += 1
                    backoff = min(MAX_BACKOFF_S, 2.0 ** (self.failed_starts - 1))
                    self._not_before = now + backoff
                    log.warning("local fleet: %s (%s) exited with %s %.0f s after its start; replaced in %.0f s "
                                "(see %s)", cid, inst.node_id, inst.proc.returncode, now - inst.started_s, backoff,
                                self.data_dir / "logs" / f"{inst.node_id}.log")
                else:
                    self.failed_starts = 0
                    log.warning("local fleet: %s exited with %s", cid, inst.proc.returncode)
        while len(self.running) < self.desired and now >= self._not_before:
            self._spawn()
        while len(self.running) > self.desired:  # newest first, like a group's default policy
            cid = max(self.running, key=lambda c: int(c.rsplit("-", 1)[1]))
            _stop(self.running.pop(cid).proc)

    def _spawn(self) -> None:
        n = self._next
        self._next += 1
        cloud_id, node_id = f"local-{n}", f"{self.node_prefix}{n}"
        port = free_port(self.host)
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "EMBER_CLOUD_INSTANCE_ID": cloud_id, "PYTHONUNBUFFERED": "1"}
        env.pop("EMBER_NODE_ID", None)
        taken = {i.share for i in self.running.values()}
        share = next(k for k in range(len(self.shares)) if k not in taken)  # desired <= node_max = shares
        if self.shares[share] is not None:
            env["EMBER_DEVICES"] = str(self.shares[share])
        else:
            env.pop("EMBER_DEVICES", None)
        args = [sys.executable, "-m", "ember", "worker", "--data-dir", str(self.data_dir / "nodes" / node_id),
                "--node-id", node_id, "--host", self.host, "--port", str(port)]
        done: Future[subprocess.Popen[bytes]] = Future()
        self._spawns.put((args, env, logs / f"{node_id}.log", done))
        proc = done.result(timeout=60)
        self.running[cloud_id] = _LocalInstance(cloud_id, node_id, proc, share, time.monotonic())
        log.info("local fleet: started %s as %s on port %d", cloud_id, node_id, port)

    def _spawner(self) -> None:
        while True:
            args, env, log_path, done = self._spawns.get()
            try:
                with open(log_path, "ab") as out:
                    # its own session: a Ctrl-C at a terminal reaches the gateway alone, which stops
                    # each worker with one SIGTERM (a second signal would cut the streams it drains)
                    done.set_result(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                                     preexec_fn=die_with_parent))
            except OSError as e:
                done.set_exception(e)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the worker deregisters and unloads), then SIGKILL after 15 s; reaped in a thread."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)

    def reap() -> None:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    threading.Thread(target=reap, name=f"reap-{proc.pid}", daemon=True).start()
