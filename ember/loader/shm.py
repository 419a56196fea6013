"""Where a node's DRAM pool lives: its shared-memory directory (named from the node's data
directory, so every process of the node finds it), whether that tmpfs hands out huge pages, and
sweeping pools nobody can use any more (their data directory gone, or every process that used
them dead without closing)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ember.loader.locks import pid_alive


def shm_dir_for(data_dir: Path) -> Path:
    """The node's shared-memory directory, named from its data directory."""
    root = Path(os.environ.get("EMBER_SHM_DIR", "/dev/shm"))
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    return root / f"ember-{digest}"


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
    """Remove node pools under `root` that nobody can use any more: their data directory is
    gone, or every process that used them died without closing (and none asked to keep them).
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
            elif not Path(index.get("data_dir", "/nonexistent")).exists():
                dead = True
            else:
                dead = not index.get("persist") and not any(pid_alive(p) for p in index["procs"])
            if dead:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        finally:
            os.close(lock_fd)
    return removed
