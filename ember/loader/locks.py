"""Coordination between the processes of a node: a lock (flock on a file) and a liveness check."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class NodeLock:
    """Re-entrant within a thread; exclusive among processes that lock the same file."""

    def __init__(self, path: Path) -> None:
        self._thread_lock = threading.RLock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._depth = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        import fcntl

        with self._thread_lock:
            if not self._depth:  # a nested hold must not unlock the outer one's flock on exit
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if not self._depth:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
