"""The DRAM tier: one shared-memory pool per node, cut into blocks, holding checkpoints.

The pool is a tmpfs file (/dev/shm) named from the node's data directory, so every process
with the same EMBER_DATA_DIR finds it. It is allocated and touched once, when the first process
opens it (fresh memory is slow to touch on VMs; reused memory is fast). A checkpoint occupies
whole blocks, in one run when possible and in several runs otherwise; several runs are mapped
back to back so tensors still see one contiguous buffer. Eviction is partial: only as many
unpinned entries go as the new one needs, the lowest retention priority (`keep`, set by the latest
use) first, then the least recently used (`ember.loader.retention`); a checkpoint larger than the
pool is simply not cached here. Entries in use by a live process are pinned and never evicted.

The index (JSON) lives beside the pool and is changed only under an flock, by any process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from ember.loader import vm
from ember.loader.blocks import DramEntry, fit_runs
from ember.loader.locks import NodeLock, pid_alive
from ember.loader.retention import victim
from ember.loader.shm import (
    create_pool,
    read_index,
    shm_dir_for,
    sweep_orphan_pools,
    tmpfs_has_huge_pages,
    write_index,
)

log = logging.getLogger(__name__)

DEFAULT_BLOCK_BYTES = 2 << 20


class DramTier:
    """The node's DRAM pool (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        capacity_bytes: int,
        *,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        pretouch: bool | None = None,
    ) -> None:
        self.dir = shm_dir_for(data_dir)
        sweep_orphan_pools(self.dir.parent, keep=self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "meta").mkdir(exist_ok=True)
        self._lock = NodeLock(self.dir / "lock")
        self.pid = os.getpid()
        pool = self.dir / "pool"
        with self._locked():
            index = self._read_index()
            created = index is None or not pool.exists()
            if created:
                blocks = max(0, capacity_bytes // block_bytes)
                index = {
                    "capacity_bytes": blocks * block_bytes,
                    "block_bytes": block_bytes,
                    "entries": {},
                    "data_dir": str(Path(data_dir).resolve()),
                    "persist": False,
                    "procs": [],
                }
                create_pool(pool, index["capacity_bytes"])
                shutil.rmtree(self.dir / "meta", ignore_errors=True)
                (self.dir / "meta").mkdir()
            # Every process using the pool is registered: the last one to close removes it, and
            # a pool whose processes all died is removed by the next process that opens any pool.
            index["procs"] = [p for p in index.get("procs", []) if pid_alive(p)] + [self.pid]
            index.setdefault("data_dir", str(Path(data_dir).resolve()))
            self._write_index(index)
        self.capacity_bytes: int = index["capacity_bytes"]
        self.block_bytes: int = index["block_bytes"]
        self.fd = os.open(pool, os.O_RDWR)
        # The whole pool, mapped twice per process: read-only (tensors are views of it) and
        # read-write (fills write through it), so no load pays for mprotect or page faults. The
        # process that created the pool (or any process asking with pretouch=True: a restarted
        # worker) maps both populated: that is the one-time pre-touch, bounded by the capacity.
        # Other processes map lazily and get copy-on-write views instead.
        self.base: vm.Mapping | None = None
        self.rw: vm.Mapping | None = None
        if self.capacity_bytes:
            populate = vm.MAP_POPULATE if (created if pretouch is None else pretouch) else 0
            self.base = vm.Mapping(
                vm.mmap_at(None, self.capacity_bytes, vm.PROT_READ, vm.MAP_SHARED | populate, self.fd, 0),
                self.capacity_bytes,
            )
            self.rw = vm.Mapping(
                vm.mmap_at(None, self.capacity_bytes, vm.PROT_READ | vm.PROT_WRITE, vm.MAP_SHARED | populate, self.fd, 0),
                self.capacity_bytes,
            )
            for m in (self.base, self.rw):
                vm.madvise(m.addr, m.length, vm.MADV_HUGEPAGE)
        self.created = created
        self.prefaulted = bool(self.capacity_bytes) and (created if pretouch is None else pretouch)
        # Huge pages (a tmpfs mounted huge=always|within_size): direct I/O straight into the pool
        # is then the fastest fill; with 4 KiB pages reads are staged through huge anonymous pages.
        self.huge_pages = tmpfs_has_huge_pages(self.dir)
        self.warned = False  # `cannot_write` said so in the log (until a commit goes through again)

    # --- queries ----------------------------------------------------------------------------
    def lookup(self, name: str) -> DramEntry | None:
        """The ready entry for `name`, or None."""
        with self._locked():
            e = (self._read_index() or {}).get("entries", {}).get(name)
            return self._entry(name, e) if e and e["state"] == "ready" else None

    def holdings(self) -> dict[str, int]:
        """Ready entries: name -> bytes."""
        with self._locked():
            entries = (self._read_index() or {}).get("entries", {})
            return {n: e["nbytes"] for n, e in entries.items() if e["state"] == "ready"}

    def refs(self) -> dict[str, str]:
        """Ready entries that know their identity: entry key -> canonical ref."""
        with self._locked():
            entries = (self._read_index() or {}).get("entries", {})
            return {n: e["ref"] for n, e in entries.items() if e["state"] == "ready" and e.get("ref")}

    def used_bytes(self) -> int:
        """Bytes of the pool held by entries (ready or filling)."""
        with self._locked():
            entries = (self._read_index() or {}).get("entries", {})
            return sum(n * self.block_bytes for e in entries.values() for _, n in e["runs"])

    # --- pins -------------------------------------------------------------------------------
    def pin(self, name: str, keep: int | None = None) -> DramEntry | None:
        """Pin a ready entry for this process and mark it used; `keep`, unless None, is its
        retention priority from now on (the latest use sets it). None if the entry is not there."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            e = index["entries"].get(name)
            if not e or e["state"] != "ready":
                return None
            pins = e.setdefault("pins", {})
            pins[str(self.pid)] = pins.get(str(self.pid), 0) + 1
            e["last_used"] = time.time()
            if keep is not None:
                e["keep"] = keep
            self._write_index(index)
            return self._entry(name, e)

    def unpin(self, entry: DramEntry, *, used: bool = False) -> None:
        """Undo one pin of this process on exactly `entry` (found under its name, or set aside by
        `quarantine`; never a newer fill of the same name). A set-aside entry whose last pin goes
        is dropped: its blocks are free again. `used`: the pin was an instance's, which used the
        entry until now (its last use, for the LRU order)."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            entries = index["entries"]
            name = self._find(entries, entry)
            if name is None:
                return
            e = entries[name]
            if used:
                e["last_used"] = time.time()
            pins = e.setdefault("pins", {})
            left = pins.get(str(self.pid), 0) - 1
            if left > 0:
                pins[str(self.pid)] = left
            else:
                pins.pop(str(self.pid), None)
            if e["state"] == "bad" and not self._pinned(e):
                self._drop(entries, name)
            self._write_index(index)

    def touch(self, name: str) -> bool:
        """Mark a ready entry used now (its keep unchanged): an instance built from it, whose
        device copy went with it, used the checkpoint until now. False if it is not there."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            e = index["entries"].get(name)
            if not e or e["state"] != "ready":
                return False
            e["last_used"] = time.time()
            self._write_index(index)
            return True

    # --- filling ----------------------------------------------------------------------------
    def allocate(self, name: str, nbytes: int, ref: str = "", keep: int = 0) -> DramEntry | None:
        """Reserve blocks for a new entry with retention priority `keep` (evicting unpinned
        entries as needed, `retention.victim` first), pinned by this process and in state
        "filling". None when the pool cannot hold it even empty of unpinned entries, or another
        live process is filling the same name."""
        need = -(-nbytes // self.block_bytes) if nbytes else 1
        if need * self.block_bytes > self.capacity_bytes:
            return None
        with self._locked():
            index = self._read_index() or {"entries": {}}
            entries = index["entries"]
            old = entries.get(name)
            if old is not None:
                if old["state"] == "filling" and pid_alive(old.get("pid", 0)):
                    return None
                if old["state"] == "ready":
                    return None  # already cached; the caller should pin it instead
                self._drop(entries, name)
            total_blocks = self.capacity_bytes // self.block_bytes
            while True:
                runs = fit_runs((r for e in entries.values() for r in e["runs"]), total_blocks, need)
                if runs is not None:
                    break
                name_out = victim((n, e.get("keep", 0), e["last_used"])  # an index from before keep: 0
                                  for n, e in entries.items() if not self._pinned(e))
                if name_out is None:
                    return None
                self._drop(entries, name_out)
            gen = uuid.uuid4().hex[:12]
            entries[name] = {
                "runs": runs,
                "nbytes": nbytes,
                "state": "filling",
                "pid": self.pid,
                "pins": {str(self.pid): 1},
                "last_used": time.time(),
                "gen": gen,
                "ref": ref,
                "keep": keep,
            }
            self._write_index(index)
            meta = self.dir / "meta" / f"{name}.{gen}"
            shutil.rmtree(meta, ignore_errors=True)
            meta.mkdir()
            return self._entry(name, entries[name])

    def commit(self, name: str) -> DramEntry:
        """Mark a filled entry ready (it stays pinned by this process)."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            e = index["entries"][name]
            e["state"] = "ready"
            e["last_used"] = time.time()
            self._write_index(index)
            self.warned = False  # writing again: a later failure is news again
            return self._entry(name, e)

    def cannot_write(self, err: BaseException) -> None:
        """The tier could not take an entry (a full /dev/shm): said once in the log."""
        if not self.warned:
            self.warned = True
            log.warning("DRAM tier %s cannot take entries (%s): serving from memory without caching in DRAM",
                        self.dir, err)
        else:
            log.debug("DRAM tier %s still cannot take entries: %s", self.dir, err)

    def abort(self, name: str) -> None:
        """Forget a filling entry of this process (its blocks become free)."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            e = index["entries"].get(name)
            if e and e["state"] == "filling" and e.get("pid") == self.pid:
                self._drop(index["entries"], name)
                self._write_index(index)

    def evict(self, name: str) -> bool:
        """Remove an unpinned entry now; False if it is pinned by a live process or absent."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            e = index["entries"].get(name)
            if not e or self._pinned(e):
                return False
            self._drop(index["entries"], name)
            self._write_index(index)
            return True

    def quarantine(self, entry: DramEntry) -> None:
        """Take a ready entry that failed verification out of service: dropped now when nobody
        pins it, else set aside (never found again) until its last pin goes (`unpin`)."""
        with self._locked():
            index = self._read_index() or {"entries": {}}
            entries = index["entries"]
            name = self._find(entries, entry)
            if name is None or entries[name]["state"] == "bad":
                return
            if not self._pinned(entries[name]):
                self._drop(entries, name)
            else:
                e = entries.pop(name)
                e["state"] = "bad"
                e["meta"] = f"{entry.name}.{e['gen']}"
                entries[_set_aside(entry)] = e
            self._write_index(index)

    def wait_filling(self, name: str, timeout_s: float = 600.0) -> None:
        """Wait while another live process fills `name`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._locked():
                e = (self._read_index() or {}).get("entries", {}).get(name)
                if not e or e["state"] != "filling" or not pid_alive(e.get("pid", 0)) or e.get("pid") == self.pid:
                    return
            time.sleep(0.02)

    # --- memory -----------------------------------------------------------------------------
    def writable_view(self, entry: DramEntry) -> vm.Mapping | None:
        """Where to write a filling entry: None for a contiguous entry (write through `rw_slice`),
        else a shared writable mapping of its runs back to back."""
        if entry.contiguous and self.rw is not None:
            if not self.prefaulted:
                off, n = entry.runs[0]
                vm.madvise(self.rw.addr + off, n, vm.MADV_POPULATE_WRITE)
            return None
        return vm.map_file_runs(self.fd, list(entry.runs), prot=vm.PROT_READ | vm.PROT_WRITE, private=False, populate=True)

    def rw_slice(self, entry: DramEntry):
        """numpy view of a contiguous entry in this process's read-write pool mapping."""
        off, n = entry.runs[0]
        return self.rw.array()[off : off + n]

    def filled_view(self, entry: DramEntry, view: vm.Mapping | None):
        """After a fill: numpy uint8 array over the entry for tensors, read-only memory."""
        if view is None:
            if self.prefaulted:
                off, n = entry.runs[0]
                return self.base.array()[off : off + n]
            return self.read_view(entry)
        vm.mprotect(view.addr, view.length, vm.PROT_READ)
        return view.array()

    def read_view(self, entry: DramEntry):
        """numpy uint8 array over a ready entry for tensors: a slice of this process's read-only
        pool mapping when the entry is contiguous and this process pre-faulted the pool, otherwise
        a private copy-on-write mapping populated now (no bytes are copied)."""
        if entry.contiguous and self.base is not None and self.prefaulted:
            off, n = entry.runs[0]
            return self.base.array()[off : off + n]
        view = vm.map_file_runs(
            self.fd, list(entry.runs), prot=vm.PROT_READ | vm.PROT_WRITE, private=True, populate=True
        )
        return view.array()

    def close(self, *, keep: bool = False) -> None:
        """This process is done with the pool. The last process to close removes it unless
        `keep` (then it stays, with its entries, for the next worker on this data dir)."""
        last = False
        with contextlib.suppress(OSError), self._locked():
            index = self._read_index()
            if index is not None:
                index["procs"] = [p for p in index.get("procs", []) if p != self.pid and pid_alive(p)]
                index["persist"] = bool(keep or index.get("persist"))
                last = not index["procs"] and not index["persist"]
                if last:
                    shutil.rmtree(self.dir, ignore_errors=True)
                else:
                    self._write_index(index)
        with contextlib.suppress(OSError):
            self._lock.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def destroy(self) -> None:
        """Remove the pool and its index now (tests, operators)."""
        with contextlib.suppress(OSError):
            self._lock.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- internals ----------------------------------------------------------------------------
    def _locked(self):
        return self._lock.held()

    def _read_index(self) -> dict | None:
        return read_index(self.dir)

    def _write_index(self, index: dict) -> None:
        write_index(self.dir, index)

    def _entry(self, name: str, e: dict) -> DramEntry:
        runs = tuple((s * self.block_bytes, n * self.block_bytes) for s, n in e["runs"])
        meta = self.dir / "meta" / e.get("meta", f"{name}.{e['gen']}")
        return DramEntry(name, runs, e["nbytes"], meta, e["gen"], e.get("keep", 0))

    @staticmethod
    def _find(entries: dict, entry: DramEntry) -> str | None:
        """The index name of exactly this fill of the entry: its own name or its set-aside name."""
        for name in (entry.name, _set_aside(entry)):
            e = entries.get(name)
            if e is not None and e.get("gen") == entry.gen:
                return name
        return None

    def _drop(self, entries: dict, name: str) -> None:
        e = entries.pop(name)
        shutil.rmtree(self.dir / "meta" / e.get("meta", f"{name}.{e['gen']}"), ignore_errors=True)

    def _pinned(self, e: dict) -> bool:
        if e["state"] == "filling" and pid_alive(e.get("pid", 0)):
            return True
        return any(pid_alive(int(pid)) for pid, n in e.get("pins", {}).items() if n > 0)


def _set_aside(entry: DramEntry) -> str:
    """The index name of a quarantined entry: no lookup by checkpoint key ever finds it."""
    return f"{entry.name}!bad-{entry.gen}"
