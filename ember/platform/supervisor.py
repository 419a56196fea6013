"""`ember up`: one machine's whole platform as child processes of one supervisor.

Starts a private Redis-protocol server (AOF persistence in the data dir) unless EMBER_REDIS_URL
names one, N workers (each its own node with its own data directory), and the gateway; deploys the
demo function on first start; stops every child on SIGINT/SIGTERM (and, via PR_SET_PDEATHSIG, when
the supervisor itself dies), so no process is orphaned.

One `ember up` per data dir: the supervisor holds an flock on `<data dir>/up.lock` for its lifetime
(the kernel drops it when the process dies, so a crash leaves no stale lock); a second one is refused.

Signals: every child runs in its own session, so a Ctrl-C at the terminal (SIGINT to the whole
foreground process group) reaches the supervisor alone, which sends each child ONE SIGTERM. A child
that got the terminal's SIGINT and then the supervisor's SIGTERM could take the second signal for a
"force quit" (uvicorn does) and cut the streams it was draining, and Redis stopped at the SIGINT,
under workers still draining. A second Ctrl-C stops every child at once.

Faults: a worker that dies is restarted with back-off (1 s doubling to 30 s, reset after a minute
up), and the gateway's /readyz says "degraded" while fewer workers than started are alive; a
private Redis that dies is restarted on the same port from its AOF (gateways and workers reconnect;
workers re-register with the instances they really hold). SIGTERM lets the gateway and workers
finish streams in flight for up to EMBER_DRAIN_GRACE_S before they are stopped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ember.config import Settings, new_secret
from ember.errors import ConfigError, EmberError, ServiceUnavailable, StateUnavailable
from ember.platform.redis_server import RedisServerProcess, die_with_parent, free_port

log = logging.getLogger(__name__)


def torch_threads_beside(workers: int, cpus: int | None = None) -> int:
    """torch threads per worker of an `ember up`: the machine's CPUs less one (the gateway and Redis
    run beside the workers) shared among the workers, at least one. torch's default (a thread per
    core in every worker) hands each operator's work between threads that then wait on the CPUs the
    gateway needs: on 2 cores at 400 warm req/s the gateway's p50 was 5-7 ms with two threads and
    2.4 ms with one (direct to the worker: 1.8 ms)."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, (cpus - 1) // max(1, workers))


@dataclass
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    data_dir: Path = Path("data")
    demo: bool = True
    ready_timeout_s: float = 120.0
    extra_env: dict[str, str] = field(default_factory=dict)
    node_backend: str = "none"  # "local": the gateway's node scaler starts and stops the workers
    max_workers: int = 0  # with the local backend: the most workers (0: as many as `workers`)


def read_or_create_secret(path: Path, env_value: str | None) -> str:
    """The env value if set, else a secret remembered in `path` (mode 0600), created once, whole
    (written aside and renamed: an interrupted first start leaves no empty file). A file that is
    empty anyway gets a new secret: an empty one would fall back to the public development
    defaults (the dev admin key, a Redis without a password)."""
    if env_value:
        return env_value
    if path.exists() and (kept := path.read_text().strip()):
        return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return secret


def _check_redis(url: str) -> None:
    """Fail fast, naming the URL (without its password), when EMBER_REDIS_URL does not answer."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    except ValueError as e:  # not a Redis URL at all ("localhost:6379")
        raise ConfigError(f"EMBER_REDIS_URL must be redis://, rediss:// or unix:// ({e})") from e
    try:
        client.ping()
    except redis.RedisError as e:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        raise StateUnavailable(f"Redis at {parts.scheme}://{parts.hostname}:{parts.port} (EMBER_REDIS_URL) "
                               f"does not answer: {e}") from e


def _check_port_free(host: str, port: int) -> None:
    """Refuse at once a port something already listens on (another `ember up`, say): otherwise
    its /readyz answers and this platform is announced ready, at a URL its admin key does not open.
    The hint names both --port and --data-dir: a second `ember up` on the same data dir is refused."""
    from ember.platform.http_common import listening_socket

    try:
        listening_socket(host, port, listen=False).close()
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another `ember up` there? stop "
                          "it, or give this one its own --port and its own --data-dir)") from e


def lock_data_dir(data_dir: Path) -> int:
    """An exclusive flock on `data_dir`/up.lock, held while the returned descriptor is open (the
    caller's lifetime: the kernel releases it when the process dies, however it dies). Two `ember
    up` on one data dir would run two Redis servers appending to one AOF and two workers `node-0`
    on one node dir; the second is refused, naming the first's pid."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "up.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"{data_dir} is in use by another `ember up` (pid {holder}): stop it, or give this "
                          "one its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _ids(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


class Platform:
    """The running processes of `ember up`."""

    def __init__(self, opts: UpOptions, settings: Settings) -> None:
        self.opts = opts
        self.settings = settings
        self.data_dir = opts.data_dir.resolve()
        self.redis: RedisServerProcess | None = None
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._launch: dict[str, tuple[list[str], dict[str, str], Path]] = {}  # name -> how to start it again
        self._restarts: dict[str, tuple[int, float]] = {}  # name -> (consecutive failures, not before)
        self.restarts: dict[str, int] = {}  # name -> restarts so far (workers, "redis")
        self._started_at: dict[str, float] = {}
        self.stopping = threading.Event()
        self.url = f"http://{opts.host}:{opts.port}"
        self.admin_key_path = self.data_dir / "admin_key"
        self._lock_fd: int | None = None

    def start(self, echo: Callable[[str], None] = print) -> None:
        _check_port_free(self.opts.host, self.opts.port)  # else a server already there looks ready
        self._lock_fd = lock_data_dir(self.data_dir)
        admin_key = read_or_create_secret(self.admin_key_path, self.settings.admin_key)
        if self.settings.admin_key:
            self.admin_key_path.write_text(admin_key + "\n")
            self.admin_key_path.chmod(0o600)
        token = read_or_create_secret(self.data_dir / "cluster_token", self.settings.cluster_token)
        redis_url = self.settings.redis_url
        if redis_url:
            _check_redis(redis_url)
        else:
            # A password generated once and kept in the data dir: a process that can reach the port
            # but cannot read the data dir cannot write keys (an admin API key, say) into Redis.
            password = read_or_create_secret(self.data_dir / "redis_password", None)
            self.redis = RedisServerProcess(self.data_dir / "redis", persistent=True, password=password).start()
            redis_url = self.redis.url
            echo(f"redis: {self.redis.public_url} (AOF in {self.data_dir / 'redis'}, password in "
                 f"{self.data_dir / 'redis_password'})")
        store_url = self.settings.resolved_store_url if self.settings.store_url else \
            f"file://{self.data_dir / 'store'}"
        env = {**os.environ, "EMBER_EXPECTED_WORKERS": str(self.opts.workers), **self.opts.extra_env,
               "EMBER_REDIS_URL": redis_url, "EMBER_CLUSTER_TOKEN": token,
               "EMBER_ADMIN_KEY": admin_key, "EMBER_STORE_URL": store_url, "PYTHONUNBUFFERED": "1"}
        scaled = self.opts.node_backend == "local"
        env.setdefault("EMBER_TORCH_THREADS", str(torch_threads_beside(max(self.opts.workers, self.opts.max_workers))))
        if scaled:  # the gateway's node scaler owns the workers, as it owns an Auto Scaling group
            env.update({"EMBER_NODE_BACKEND": "local", "EMBER_NODE_MIN": str(self.opts.workers),
                        "EMBER_NODE_MAX": str(max(self.opts.workers, self.opts.max_workers, 1)),
                        "EMBER_FLEET_DATA_DIR": str(self.data_dir), "EMBER_FLEET_WORKER_HOST": self.opts.host})
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        if self.opts.demo:
            self._ensure_demo_checkpoint(store_url, echo)
        from ember.platform.devices import split_devices, visible_gpu_ids

        shares = split_devices(_ids(env.get("EMBER_DEVICES")) or visible_gpu_ids(), self.opts.workers)
        for i in range(0 if scaled else self.opts.workers):
            node = f"node-{i}"
            port = free_port(self.opts.host)
            share = shares[i]
            worker_env = env if share is None else {**env, "EMBER_DEVICES": share}  # never a shared GPU
            self._spawn(node, [sys.executable, "-m", "ember", "worker", "--data-dir", str(self.data_dir / "nodes" / node),
                               "--node-id", node, "--host", self.opts.host, "--port", str(port)], worker_env, logs)
        self._spawn("gateway", [sys.executable, "-m", "ember", "gateway", "--host", self.opts.host,
                                "--port", str(self.opts.port)], env, logs)
        self._wait_ready(admin_key)
        if self.opts.demo:
            self._deploy_demo(admin_key, echo)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self._launch[name] = (args, env, logs)
        self.children.append((name, self._popen(name)))

    def _popen(self, name: str) -> subprocess.Popen[bytes]:
        args, env, logs = self._launch[name]
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        # its own session: the terminal's signals reach the supervisor only, which forwards one SIGTERM
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
        out.close()
        return proc

    def _restart_dead_workers(self) -> None:
        """Start again every worker that exited, each after its back-off."""
        now = time.monotonic()
        for k, (name, proc) in enumerate(self.children):
            if name == "gateway" or proc.poll() is None:
                continue
            failures, not_before = self._restarts.get(name, (0, 0.0))
            if not_before == 0.0:  # just found dead: wait 1 s, 2 s, 4 s ... 30 s before starting it
                delay = min(30.0, 2.0 ** failures)
                log.warning("worker %s exited with %s; restarting it in %.0f s", name, proc.returncode, delay)
                self._restarts[name] = (failures + 1, now + delay)
                continue
            if now < not_before:
                continue
            self.children[k] = (name, self._popen(name))
            self._restarts[name] = (failures, 0.0)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self._started_at[name] = now
        for name, started in list(self._started_at.items()):  # a minute up: the back-off starts over
            if now - started > 60 and name in self._restarts:
                self._restarts.pop(name, None)
                self._started_at.pop(name, None)

    def _restart_redis(self) -> None:
        """A private Redis that died is started again on its port, from its AOF."""
        if self.redis is None or self.redis.proc is None or self.redis.proc.poll() is None:
            return
        log.warning("the Redis server exited with %s; restarting it from its AOF", self.redis.proc.returncode)
        try:
            self.redis.start()
            self.restarts["redis"] = self.restarts.get("redis", 0) + 1
        except EmberError as e:
            log.error("could not restart Redis: %s (trying again)", e)

    def _ensure_demo_checkpoint(self, store_url: str, echo: Callable[[str], None]) -> None:
        from ember.loader import open_store

        store = open_store(store_url)
        name = self.settings.demo_function
        if store.exists(name):
            return
        from ember.tinymodel import make_tiny_model

        echo(f"making the demo model {name!r} (ember model tiny) and pushing it to {store_url}")
        src = make_tiny_model(self.data_dir / "models" / name)
        store.push(src, name)

    def _wait_ready(self, admin_key: str) -> None:
        deadline = time.monotonic() + self.opts.ready_timeout_s
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                raise ServiceUnavailable("stopped before the platform was ready")
            self._check_children()
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=1.0)
                if r.status_code == 200 and r.json().get("workers", 0) >= self.opts.workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServiceUnavailable(f"the platform was not ready within {self.opts.ready_timeout_s:.0f}s; "
                                 f"see {self.data_dir / 'logs'}")

    def _deploy_demo(self, admin_key: str, echo: Callable[[str], None]) -> None:
        name = self.settings.demo_function
        headers = {"Authorization": f"Bearer {admin_key}"}
        r = httpx.get(f"{self.url}/v1/functions/{name}", headers=headers, timeout=10)
        if r.status_code == 404:
            r = httpx.put(f"{self.url}/v1/functions/{name}", headers=headers, timeout=60,
                          json={"checkpoint": name})  # API defaults: min_instances 0, keep_alive_s 60
            if r.status_code >= 300:
                raise EmberError(f"deploying the demo function failed: {r.status_code} {r.text}")
            echo(f"deployed demo function {name!r} (min_instances 0: its first call is a cold start)")

    def _check_children(self) -> None:
        for name, proc in self.children:
            if proc.poll() is not None and not self.stopping.is_set():
                if name == "gateway":
                    raise ServiceUnavailable(f"the gateway exited with {proc.returncode}; "
                                             f"see {self.data_dir / 'logs' / 'gateway.log'}")
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            raise ServiceUnavailable("the Redis server exited")

    def wait(self) -> None:
        """Block until a signal or until the gateway dies; dead workers and Redis are restarted."""
        while not self.stopping.is_set():
            self._restart_redis()
            self._restart_dead_workers()
            for name, proc in self.children:
                if name == "gateway" and proc.poll() is not None:
                    raise ServiceUnavailable(f"the gateway exited with {proc.returncode}; "
                                             f"see {self.data_dir / 'logs' / 'gateway.log'}")
            self.stopping.wait(0.25)

    def stop(self) -> None:
        """One SIGTERM to each child (each drains its streams for up to drain_grace_s), SIGKILL to
        those still up after that; Redis last, once nothing draining needs it; then the lock."""
        self.stopping.set()
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.settings.drain_grace_s + 5
        for _, proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def kill_now(self) -> None:
        """Stop every child at once, streams in flight or not (a second Ctrl-C)."""
        for _, proc in self.children:
            if proc.poll() is None:
                proc.kill()
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is None:
            self.redis.proc.kill()


def run_up(opts: UpOptions, settings: Settings, echo: Callable[[str], None] = print) -> int:
    platform = Platform(opts, settings)

    def on_signal(signum: int, _: object) -> None:
        if platform.stopping.is_set() and signum == signal.SIGINT:
            platform.kill_now()  # a second Ctrl-C: no more waiting for streams to drain
        platform.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        platform.start(echo)
        echo(f"admin key: {platform.admin_key_path} (export EMBER_API_KEY=$(cat {platform.admin_key_path}))")
        echo(f"ready: {platform.url}")
        platform.wait()
        echo(f"stopping: streams in flight may finish within {platform.settings.drain_grace_s:.0f} s "
             "(Ctrl-C again to stop at once)")
        return 0
    except EmberError as e:
        echo(f"error: {e.message}")
        return 1
    finally:
        platform.stop()
