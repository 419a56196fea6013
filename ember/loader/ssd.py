"""The SSD tier: a directory of converted checkpoints with a byte capacity and LRU eviction.

An entry is installed under .tmp/<name>.<pid>.<rand>, checked (sha256 per partition), fsynced
and renamed into place, so a half-written entry is never seen under its name; temporary
directories of dead processes are removed on start. The index is the directory itself: it is
rebuilt from disk by listing it. LRU order is the mtime of each entry's `.used` file.

A reader pins an entry while it uses it (a shared flock on the entry's `.pin` file: released by
the kernel when the reader's process dies, however it dies). Eviction takes only unpinned entries;
an entry removed while pinned (found corrupt, evicted by an operator) is hidden at once (a
`.removed` marker) and deleted with its last pin, so an instance's model files never vanish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from ember.errors import CapacityError
from ember.loader.convert import fsync_dir, fsync_tree
from ember.loader.format import MANIFEST_FILE
from ember.loader.identity import ENTRY_KEY_PATTERN
from ember.loader.locks import NodeLock, pid_alive
from ember.loader.names import NAME_PATTERN

_USED = ".used"
_PIN = ".pin"
_REMOVED = ".removed"
REF_FILE = ".ref"  # the entry's canonical checkpoint ref (store/name#digest)


class SsdPin:
    """One reader's hold on an SSD-tier entry (see the module docstring); `release` it once done."""

    def __init__(self, tier: SsdTier, name: str, fd: int) -> None:
        self.tier, self.name, self._fd = tier, name, fd
        self.path = tier.root / name

    def release(self) -> None:
        """Let go (again: a no-op). An entry removed meanwhile is deleted with its last pin."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            with contextlib.suppress(OSError):  # the tier closed meanwhile: its next start sweeps
                self.tier._delete_removed()


class SsdTier:
    """Checkpoints on the node's local disk (see the module docstring)."""

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = NodeLock(self.root / ".lock")
        with self._locked():
            for d in self.tmp.iterdir():  # temporary entries and probe files: NAME.PID.RAND
                pid = d.name.rsplit(".", 2)[-2] if d.name.count(".") >= 2 else "0"
                if not pid.isdigit() or not pid_alive(int(pid)):
                    if d.is_dir() and not d.is_symlink():
                        shutil.rmtree(d, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            d.unlink()
            for d in self.root.glob(".trash-*"):
                shutil.rmtree(d, ignore_errors=True)
            self._delete_removed()

    def path(self, name: str) -> Path | None:
        """The entry's directory if a complete entry is installed."""
        d = self.root / name
        return d if _installed(d) else None

    def pin(self, name: str) -> SsdPin | None:
        """Pin an installed entry (eviction skips it until released); None if it is not there."""
        import fcntl

        with self._locked():
            d = self.root / name
            if not _installed(d):
                return None
            fd = os.open(d / _PIN, os.O_RDONLY | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            return SsdPin(self, name, fd)

    def entries(self) -> dict[str, int]:
        """Installed entries: name -> bytes on disk."""
        out = {}
        for d in self.root.iterdir():
            if d.is_dir() and _entry_name(d.name) and _installed(d):
                out[d.name] = _dir_bytes(d)
        return out

    def refs(self) -> dict[str, str]:
        """Installed entries that know their identity: entry key -> canonical ref."""
        out = {}
        for key in self.entries():
            with contextlib.suppress(OSError):
                out[key] = (self.root / key / REF_FILE).read_text().strip()
        return out

    def used_bytes(self) -> int:
        """Bytes held by entries: installed, and removed but still pinned."""
        return sum(self.entries().values()) + self._removed_bytes()

    def touch(self, name: str) -> None:
        """Mark an entry used now (LRU)."""
        with contextlib.suppress(OSError):
            (self.root / name / _USED).touch()

    def begin(self, name: str, nbytes: int) -> Path | None:
        """A fresh temporary directory for installing `name`, holding a reservation of `nbytes`
        (until commit or abort) after evicting LRU unpinned entries so that it fits beside the
        entries and the other loads' reservations. None when it cannot fit now (pinned entries and
        loads in progress hold the room); CapacityError when it cannot fit even in an empty tier."""
        if nbytes > self.capacity_bytes:
            raise CapacityError(
                f"checkpoint {name} needs {nbytes} bytes, more than the SSD tier's {self.capacity_bytes}"
            )
        with self._locked():
            entries = self.entries()
            used = sum(entries.values()) + self._removed_bytes() + self._reserved_bytes()
            order = sorted((self._last_used(n), n) for n in entries if n != name and not _pinned(self.root / n))
            while used + nbytes > self.capacity_bytes and order:
                _, victim = order.pop(0)
                used -= entries[victim]
                self._remove_locked(victim)
            if used + nbytes > self.capacity_bytes:
                return None
            # the reservation is in the name: every process sees it, and it goes with the directory
            tmp = self.tmp / f"{name}.{nbytes}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            return tmp

    def commit(self, name: str, tmp: Path) -> SsdPin | None:
        """fsync and rename a filled temporary directory into place; returns the installed entry
        pinned (release it when its files are not needed). None (`tmp` thrown away) when a removed
        entry of that name is still pinned: its readers' files stay where they are."""
        fsync_tree(tmp)
        (tmp / _USED).touch()
        with self._locked():
            final = self.root / name
            if final.exists():
                if _installed(final) and _same_manifest(final, tmp):
                    # another process installed the same checkpoint meanwhile: keep the entry its
                    # readers may already use, drop ours
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self.pin(name)
                self._remove_locked(name)
                if final.exists():  # removed, but pinned by its readers
                    shutil.rmtree(tmp, ignore_errors=True)
                    return None
            os.replace(tmp, final)
            fsync_dir(self.root)
            return self.pin(name)

    def abort(self, tmp: Path) -> None:
        """Throw away a temporary directory."""
        shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, name: str) -> bool:
        """Take an entry out of service now (deleted now, or with its last pin); False if absent."""
        with self._locked():
            return self._remove_locked(name)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._lock.close()

    # --- internals ------------------------------------------------------------------------------
    def _remove_locked(self, name: str) -> bool:
        d = self.root / name
        if not d.exists() or (d / _REMOVED).exists():
            return False
        if _pinned(d):
            try:
                (d / _REMOVED).touch()
                return True
            except OSError:  # cannot even mark it (a read-only disk): it goes now
                pass
        _delete(self.root, d)
        return True

    def _delete_removed(self) -> None:
        """Delete the removed entries whose last pin went."""
        with self._locked():
            for d in self.root.glob(f"*/{_REMOVED}"):
                if not _pinned(d.parent):
                    _delete(self.root, d.parent)

    def _reserved_bytes(self) -> int:
        """Bytes reserved by the temporary entries of loads in progress (live processes)."""
        total = 0
        for d in self.tmp.iterdir():
            parts = d.name.rsplit(".", 3)  # name.nbytes.pid.rand
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit() and pid_alive(int(parts[2])):
                total += max(int(parts[1]), _dir_bytes(d))
        return total

    def _removed_bytes(self) -> int:
        return sum(_dir_bytes(d.parent) for d in self.root.glob(f"*/{_REMOVED}"))

    def _last_used(self, name: str) -> float:
        try:
            return (self.root / name / _USED).stat().st_mtime
        except OSError:
            return 0.0

    def _locked(self):
        return self._lock.held()


def _entry_name(name: str) -> bool:
    return bool(ENTRY_KEY_PATTERN.fullmatch(name) or NAME_PATTERN.fullmatch(name))


def _installed(d: Path) -> bool:
    return (d / MANIFEST_FILE).is_file() and not (d / _REMOVED).exists()


def _pinned(d: Path) -> bool:
    """Whether a reader holds a pin on the entry directory `d`."""
    import fcntl

    try:
        fd = os.open(d / _PIN, os.O_RDONLY)
    except OSError:
        return False  # never pinned: pins create the file under the tier's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _delete(root: Path, d: Path) -> None:
    trash = root / f".trash-{uuid.uuid4().hex[:8]}"
    os.replace(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _dir_bytes(d: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _same_manifest(a: Path, b: Path) -> bool:
    try:
        return (a / MANIFEST_FILE).read_bytes() == (b / MANIFEST_FILE).read_bytes()
    except OSError:
        return False
