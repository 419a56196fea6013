"""A small real filesystem (tmpfs) over a directory, for tests that need a disk to fill up, mounted
in a mount namespace of one thread so that nothing is seen by, or leaks to, the machine or the rest
of the test session.

unshare(CLONE_NEWNS) moves only the calling thread into the new namespace (it gets its own
fs_struct); the processes and threads it starts afterwards inherit it. So the body runs on a
thread of its own that unshares first: the test session's threads never change namespace (a
thread cannot go back while threads it started run on, and libraries start some: tqdm's monitor,
torch's pools). The tmpfs is unmounted when the body ends; the namespace goes with the last thread
or process in it, the test process's death included.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_CLONE_NEWNS = 0x00020000


def on_small_disk(path: Path, size: str, body: Callable[[str], T]) -> T:
    """`body(why_not)` on a new thread that sees a tmpfs of `size` (mount's syntax: "64m") over
    `path`, as do the processes and threads it starts. `why_not` is "" when the tmpfs is mounted,
    else why not (not root, no unshare or mount: `path` is then a plain directory). Returns what
    the body returns; raises what it raises."""
    done: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with _private_tmpfs(path, size) as why_not:
                done.append(body(why_not))
        except BaseException as e:  # re-raised on the caller's thread
            failed.append(e)

    thread = threading.Thread(target=run, name="small-disk", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return done[0]


@contextlib.contextmanager
def _private_tmpfs(path: Path, size: str) -> Iterator[str]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield "needs root and mount(8) for a private tmpfs"
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        yield f"unshare(CLONE_NEWNS) failed: {os.strerror(ctypes.get_errno())}"
        return
    # every mount of the new namespace private first: nothing we do propagates to the machine's
    for cmd in (["mount", "--make-rprivate", "/"], ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            yield f"{' '.join(cmd)}: {r.stderr.strip() or r.returncode}"
            return
    try:
        yield ""
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)
