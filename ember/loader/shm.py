"""Where a node's DRAM pool lives: its shared-memory directory (named from the node's data
directory, so every process of the node finds it), its index file, whether that tmpfs hands out
huge pages, and sweeping pools nobody can use any more (their data directory gone, or every
process that used them dead without closing)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ember.errors import CapacityError
from ember.loader.blocks import populate_pool
from ember.loader.locks import pid_alive


def shm_dir_for(data_dir: Path) -> Path:
    """The node's shared-memory directory, named from its data directory."""
    root = Path(os.environ.get("EMBER_SHM_DIR", "/dev/shm"))
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return root / f"ember-{digest}"


def create_pool(pool: Path, capacity_bytes: int) -> None:
    """A new pool file of `capacity_bytes`, every page allocated and touched now; CapacityError
    (and no file) when the tmpfs cannot hold it."""
    fd = os.open(pool, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if capacity_bytes:
            os.ftruncate(fd, capacity_bytes)
            populate_pool(fd, capacity_bytes)
    except OSError as e:
        os.close(fd)
        pool.unlink()
        raise CapacityError(f"cannot allocate a DRAM pool of {capacity_bytes} bytes in {pool.parent}: {e}") from e
    os.close(fd)


def read_index(directory: Path) -> dict | None:
    """The pool's index (JSON beside it), or None when there is none or it is unreadable."""
    try:
        return json.loads((directory / "index.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_index(directory: Path, index: dict) -> None:
    """Replace the pool's index (the caller holds the pool's lock): a new file renamed over it; on a
    full tmpfs (ENOSPC), written in place into the pages the old file already has, padded with
    spaces. So an entry given up on a full /dev/shm (abort, evict, unpin) is still forgotten, instead
    of its blocks staying taken, and a commit of the same size still goes through."""
    data = json.dumps(index).encode()
    tmp = directory / f"index.json.{os.getpid()}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, directory / "index.json")
        return
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a half-written copy holds the very pages the tmpfs lacks
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = e
    try:
        fd = os.open(directory / "index.json", os.O_WRONLY)
    except FileNotFoundError:
        raise full from None
    try:
        st = os.fstat(fd)
        if len(data) > st.st_blocks * 512:  # more than the pages it has: writing it could tear it
            raise full
        data = data.ljust(st.st_size, b" ")  # the rest of the old text becomes whitespace
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def tmpfs_has_huge_pages(path: Path) -> bool:
    """Whether files under `path` get huge pages: its tmpfs is mounted huge=always|within_size,
    or the kernel forces huge pages on every tmpfs (shmem_enabled = force)."""
    try:
        shmem_enabled = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    return huge_tmpfs_in(str(Path(path).resolve()), mounts, forced="[force]" in shmem_enabled)


def huge_tmpfs_in(target: str, mounts: str, *, forced: bool = False) -> bool:
    """Whether the mount holding `target` (the longest matching mount point in a
    /proc/mounts text) is a tmpfs that hands out huge pages."""
    best, best_fs, best_opts = "", "", ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_fs, best_opts = point, parts[2], parts[3]
    if best_fs != "tmpfs":
        return False
    opts = best_opts.split(",")
    return forced or "huge=always" in opts or "huge=within_size" in opts


def sweep_orphan_pools(root: Path, *, keep: Path | None = None) -> list[Path]:
    """Remove node pools under `root` that nobody can use any more: every process that used
    them died without closing, and none asked to keep them or their data directory is gone. A
    pool a live process has open is never removed (its data directory gone or not).
    Pools of an older layout (no process list) go once untouched for ten minutes."""
    import fcntl

    removed = []
    try:
        candidates = [d for d in Path(root).glob("ember-*") if d.is_dir() and d != keep]
    except OSError:
        return removed
    now = time.time()
    for d in candidates:
        try:
            lock_fd = os.open(d / "lock", os.O_RDWR)
        except OSError:
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime > 60:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
            continue
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # someone is using it right now
            try:
                index_path = d / "index.json"
                index = json.loads(index_path.read_text())
                age = now - index_path.stat().st_mtime
            except (OSError, ValueError):
                index, age = None, now - d.stat().st_mtime
            if index is None:
                dead = age > 60
            elif "procs" not in index:
                dead = age > 600
            elif any(pid_alive(p) for p in index["procs"]):
                dead = False  # in use (mapped): never taken from under a live process
            else:  # kept for the next worker on its data dir, unless that data dir is gone
                dead = not index.get("persist") or not Path(index.get("data_dir", "/nonexistent")).exists()
            if dead:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        finally:
            os.close(lock_fd)
    return removed
