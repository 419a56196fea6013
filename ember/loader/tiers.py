"""A node's checkpoint tiers: remote store -> SSD -> DRAM (shared memory) -> device.

One NodeTiers per node process. `load(ref)` looks for the checkpoint in the nearest tier and
fills the nearer tiers on the way: an SSD hit is read into the DRAM pool; a remote load streams
every chunk into the DRAM pool and the SSD tier's temporary entry at once, verifying as it goes.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import CapacityError, CheckpointError, IntegrityError
from ember.loader import vm
from ember.loader.convert import read_manifest
from ember.loader.device import DeviceUpload, register_host_memory, run_slices, unregister_host_memory
from ember.loader.dram import DramEntry, DramTier
from ember.loader.format import (
    FILES_DIR,
    MANIFEST_FILE,
    CheckpointManifest,
    chunk_hash_available,
    chunk_hasher,
    parse_manifest,
)
from ember.loader.pipeline import (
    DEFAULT_THREADS,
    open_partitions,
    read_from_fds,
    run_parallel,
    tensors_from_buffer,
    worker_pool,
)
from ember.loader.ssd import SsdTier
from ember.loader.store import (
    S3_THREADS,
    CheckpointStore,
    default_data_dir,
    default_store_url,
    open_store,
    split_ref,
)

DEFAULT_DRAM_CAPACITY_BYTES = 1 << 30
DEFAULT_SSD_CAPACITY_BYTES = 32 << 30


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to use in this process."""

    name: str
    state_dict: dict
    tier: str  # where the bytes came from for this load: "gpu" | "dram" | "ssd" | "remote"
    seconds: float
    nbytes: int  # tensor bytes
    model_files: Path
    manifest: CheckpointManifest
    _on_release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """This process no longer uses the tensors; the DRAM entry stays cached (LRU).
        Drop every model built on them first: released bytes may be evicted and reused."""
        self.state_dict = {}
        if self._on_release is not None:
            cb, self._on_release = self._on_release, None
            cb()


class NodeTiers:
    """The tiers of one node; `data_dir` is the node's own directory."""

    def __init__(
        self,
        data_dir: Path | str,
        store_url: str | None = None,
        *,
        dram_capacity_bytes: int = DEFAULT_DRAM_CAPACITY_BYTES,
        ssd_capacity_bytes: int = DEFAULT_SSD_CAPACITY_BYTES,
        threads: int = DEFAULT_THREADS,
        pretouch: bool | None = None,
    ) -> None:
        """pretouch: map the DRAM pool populated at start (the node's worker: True); None does
        so only when this process creates the pool; False attaches lazily (copy-on-write views)."""
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store_url = store_url or f"file://{(self.data_dir / 'store').resolve()}"
        self.threads = threads
        self.ssd = SsdTier(self.data_dir / "ssd", ssd_capacity_bytes)
        self.dram = DramTier(self.data_dir, dram_capacity_bytes, pretouch=pretouch)
        self.pinned_pool = bool(self.dram.rw) and register_host_memory(self.dram.rw.addr, self.dram.capacity_bytes)
        worker_pool("ember-read", threads, warm=True)  # reader threads started now, not during a cold start
        self._stores: dict[str, CheckpointStore] = {}
        self._lock = threading.Lock()
        self._names_lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._on_device: dict[tuple[str, str], list] = {}  # (name, device) -> [state_dict, manifest, files, refs]

    @classmethod
    def from_env(cls, **overrides) -> NodeTiers:
        """From EMBER_DATA_DIR, EMBER_STORE_URL, EMBER_DRAM_CAPACITY_BYTES, EMBER_SSD_CAPACITY_BYTES."""
        kwargs = {
            "data_dir": default_data_dir(),
            "store_url": default_store_url(),
            "dram_capacity_bytes": int(os.environ.get("EMBER_DRAM_CAPACITY_BYTES", DEFAULT_DRAM_CAPACITY_BYTES)),
            "ssd_capacity_bytes": int(os.environ.get("EMBER_SSD_CAPACITY_BYTES", DEFAULT_SSD_CAPACITY_BYTES)),
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # --- the API the worker uses ------------------------------------------------------------------
    def load(self, ref: str, device: str = "cpu") -> LoadedCheckpoint:
        """Load a checkpoint (a name in the node's store, or a URI) from its nearest tier.
        Concurrent loads of one checkpoint in this process are single-flight: the first fills
        the tiers, the others then hit DRAM (no duplicate downloads, no entry replaced under a reader)."""
        _, name = split_ref(ref)
        with self._names_lock:
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            return self._load(ref, device)

    def _load(self, ref: str, device: str) -> LoadedCheckpoint:
        import torch

        t0 = time.perf_counter()
        store_uri, name = split_ref(ref)
        dev = torch.device(device)
        if dev.type == "cuda":
            hit = self._device_hit(name, str(dev), t0)
            if hit is not None:
                return hit
        self.dram.wait_filling(name)
        entry = self.dram.pin(name)
        if entry is not None:
            try:
                manifest = read_manifest(entry.meta_dir)
                sd = self._dram_tensors(entry, manifest, dev)
            except BaseException:
                self.dram.unpin(name)
                raise
            self.ssd.touch(name)
            return self._loaded(name, sd, "dram", t0, manifest, entry.meta_dir / FILES_DIR, dev, entry)
        ssd_dir = self.ssd.path(name)
        if ssd_dir is not None:
            sd, manifest, entry, files = self._load_local(name, ssd_dir, dev)
            self.ssd.touch(name)
            return self._loaded(name, sd, "ssd", t0, manifest, files, dev, entry)
        store = self.store(store_uri or self.store_url)
        sd, manifest, entry, files = self._load_remote(store, name, dev)
        return self._loaded(name, sd, "remote", t0, manifest, files, dev, entry)

    def holdings(self) -> dict[str, str]:
        """Checkpoint name -> nearest local tier ("dram" | "ssd")."""
        out = {n: "ssd" for n in self.ssd.entries()}
        out.update({n: "dram" for n in self.dram.holdings()})
        return out

    def checkpoint_nbytes(self, ref: str) -> int:
        """Total tensor bytes of a checkpoint, from its manifest (local tiers first)."""
        store_uri, name = split_ref(ref)
        entry = self.dram.lookup(name)
        if entry is not None:
            try:
                return read_manifest(entry.meta_dir).tensor_nbytes
            except CheckpointError:
                pass
        ssd_dir = self.ssd.path(name)
        if ssd_dir is not None:
            return read_manifest(ssd_dir).tensor_nbytes
        return self.store(store_uri or self.store_url).manifest(name).tensor_nbytes

    def measure_bandwidth(self, probe_bytes: int = 64 << 20) -> dict[str, float]:
        """Quick probe at worker start: {"dram", "ssd", "remote"} in bytes/s."""
        from ember.loader.bandwidth import measure_tier_bandwidth

        return measure_tier_bandwidth(self, probe_bytes)

    def store(self, uri: str) -> CheckpointStore:
        """The store at `uri` (opened once)."""
        with self._lock:
            if uri not in self._stores:
                self._stores[uri] = open_store(uri)
            return self._stores[uri]

    def evict(self, name: str) -> dict[str, bool]:
        """Drop a checkpoint from the local tiers (unpinned DRAM entry and SSD entry)."""
        return {"dram": self.dram.evict(name), "ssd": self.ssd.remove(name)}

    def close(self, *, destroy_dram: bool | None = None) -> None:
        """Close handles. The DRAM pool goes when its last process closes (destroy_dram None),
        now (True), or is kept for the next worker on this data dir (False)."""
        self.ssd.close()
        if self.pinned_pool and self.dram.rw is not None:
            unregister_host_memory(self.dram.rw.addr)
            self.pinned_pool = False
        if destroy_dram:
            self.dram.destroy()
        else:
            self.dram.close(keep=destroy_dram is False)

    # --- loading paths --------------------------------------------------------------------------
    def _dram_tensors(self, entry: DramEntry, manifest: CheckpointManifest, dev) -> dict:
        import torch

        if dev.type == "cuda":
            up = DeviceUpload(manifest.total_bytes, dev)
            pool = torch.from_numpy(self.dram.rw.array())
            for pool_off, entry_off, n in run_slices(entry.runs, 0, manifest.total_bytes):
                up.copy(pool[pool_off : pool_off + n], entry_off)
            return tensors_from_buffer(manifest, up.finish())
        return tensors_from_buffer(manifest, torch.from_numpy(self.dram.read_view(entry)))

    def _load_local(self, name: str, directory: Path, dev):
        """SSD (or any local converted directory) -> DRAM pool (when it fits) -> device."""
        import torch

        manifest = read_manifest(directory)
        fds = open_partitions(directory, manifest, None)  # opened now: eviction cannot pull files away
        try:
            entry = self.dram.allocate(name, manifest.total_bytes)
            if entry is None:
                return self._read_private(manifest, fds, dev) + (None, directory / FILES_DIR)
            try:
                view = self.dram.writable_view(entry)
                dest = self.dram.rw_slice(entry) if view is None else view.array()
                up = DeviceUpload(manifest.total_bytes, dev) if dev.type == "cuda" else None
                on_chunk = self._pool_uploader(entry, up) if up is not None else None
                read_from_fds(
                    fds, manifest, memoryview(dest), threads=self.threads, on_chunk=on_chunk,
                    stage_direct=not self.dram.huge_pages,
                )
                _copy_meta(directory, entry.meta_dir)
                done = self.dram.filled_view(entry, view)
                self.dram.commit(name)
            except BaseException:
                self.dram.abort(name)
                raise
            buf = up.finish() if up is not None else torch.from_numpy(done)
            return tensors_from_buffer(manifest, buf), manifest, entry, entry.meta_dir / FILES_DIR
        finally:
            for fd, _ in fds:
                os.close(fd)

    def _read_private(self, manifest: CheckpointManifest, fds, dev):
        """A checkpoint larger than the DRAM pool: read into private (pinned on CUDA) memory."""
        import torch

        if dev.type == "cuda":
            host = torch.empty(manifest.total_bytes, dtype=torch.uint8, pin_memory=True)
            up = DeviceUpload(manifest.total_bytes, dev)

            def on_chunk(at: int, n: int) -> None:
                up.copy(host[at : at + n], at)

            read_from_fds(fds, manifest, memoryview(host.numpy()), threads=self.threads, on_chunk=on_chunk)
            return tensors_from_buffer(manifest, up.finish()), manifest
        mapping = vm.anonymous(max(manifest.total_bytes, 1), touch=False)
        read_from_fds(fds, manifest, mapping.memoryview(), threads=self.threads)
        return tensors_from_buffer(manifest, torch.from_numpy(mapping.array())), manifest

    def _load_remote(self, store: CheckpointStore, name: str, dev):
        """Remote -> (SSD temp entry + DRAM pool at once) -> device, verifying every chunk."""
        import torch

        manifest = parse_manifest(store.read_bytes(name, MANIFEST_FILE))
        for p in manifest.partitions:
            size = store.object_size(name, p.file)
            if size != p.size:
                raise CheckpointError(
                    f"{store.uri}/{name}/{p.file} is {size} bytes but the manifest claims {p.size}"
                )
        total = manifest.total_bytes
        files_bytes = sum(f.size for f in manifest.files)
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if total > physical and total > self.dram.capacity_bytes and dev.type == "cpu":
            raise CapacityError(f"checkpoint {name} needs {total} bytes; this node has {physical} bytes of memory")
        ssd_tmp = None
        if total + files_bytes + (1 << 20) <= self.ssd.capacity_bytes:
            ssd_tmp = self.ssd.begin(name, total + files_bytes + (1 << 20))
        entry = None
        try:
            entry = self.dram.allocate(name, total)
            view = None
            if entry is not None:
                view = self.dram.writable_view(entry)
                dest = self.dram.rw_slice(entry) if view is None else view.array()
            else:
                mapping = vm.anonymous(max(total, 1), touch=False)
                dest = mapping.array()
            up = DeviceUpload(total, dev) if dev.type == "cuda" else None
            on_chunk = None
            if up is not None:
                host = torch.from_numpy(dest)
                on_chunk = self._pool_uploader(entry, up) if entry is not None else (
                    lambda at, n: up.copy(host[at : at + n], at)
                )
            self._download(store, name, manifest, memoryview(dest), ssd_tmp, on_chunk)
            meta_dir = entry.meta_dir if entry is not None else None
            files_dir = self._download_files(store, name, manifest, [d for d in (ssd_tmp, meta_dir) if d])
            if ssd_tmp is not None:
                self.ssd.commit(name, ssd_tmp)
                ssd_tmp = None
                files_dir = self.ssd.root / name / FILES_DIR
            if entry is not None:
                dest = self.dram.filled_view(entry, view)
                self.dram.commit(name)
                files_dir = entry.meta_dir / FILES_DIR
        except BaseException:
            if entry is not None:
                self.dram.abort(name)
            if ssd_tmp is not None:
                self.ssd.abort(ssd_tmp)
            raise
        buf = up.finish() if up is not None else torch.from_numpy(dest)
        return tensors_from_buffer(manifest, buf), manifest, entry, files_dir

    def _download(self, store, name, manifest: CheckpointManifest, dest: memoryview, ssd_tmp, on_chunk) -> None:
        fast = chunk_hash_available(manifest.chunk_hash)
        hasher = chunk_hasher(manifest.chunk_hash) if fast else None
        fds: dict[str, tuple[int, int | None]] = {}  # partition -> (buffered fd, O_DIRECT fd or None)
        import numpy as np

        dest_addr = np.frombuffer(dest, dtype=np.uint8).ctypes.data if len(dest) else 0
        jobs = []
        # Entering the SSD tier: the whole-partition sha256 as well, over memory, fed in order as
        # the chunks land (it overlaps the download instead of following it).
        digests = {p.file: _InOrderSha256(dest, base, p.size, manifest.chunk_bytes)
                   for base, p in zip(manifest.partition_bases(), manifest.partitions, strict=False)}
        for base, p in zip(manifest.partition_bases(), manifest.partitions, strict=False):
            for i, off in enumerate(range(0, p.size, manifest.chunk_bytes)):
                jobs.append((p, i, off, min(manifest.chunk_bytes, p.size - off), base + off))

        def run(job) -> None:
            p, i, off, n, at = job
            view = dest[at : at + n]
            store.read_range(name, p.file, off, view)
            if hasher is not None and hasher(view) != p.chunks[i]:
                raise IntegrityError(f"{store.uri}/{name}/{p.file}: chunk {i} fails its checksum")
            if p.file in fds:
                # The SSD copy goes straight from memory to the disk where it can (O_DIRECT: no page
                # cache to allocate, nothing left to flush at commit); a ragged tail goes buffered.
                buffered, direct = fds[p.file]
                aligned = (dest_addr + at) % 4096 == 0 and off % 4096 == 0 and n % 4096 == 0
                try:
                    written = os.pwrite(direct if direct is not None and aligned else buffered, view, off)
                except OSError as e:
                    if e.errno != errno.EINVAL or direct is None:
                        raise
                    written = os.pwrite(buffered, view, off)  # a device wanting larger alignment
                if written != n:
                    raise CapacityError(f"SSD tier: short write of {p.file} at byte {off} ({written} of {n})")
            if on_chunk is not None:
                on_chunk(at, n)
            digests[p.file].landed(i)

        try:
            for p in manifest.partitions if ssd_tmp is not None else ():
                fd = os.open(ssd_tmp / p.file, os.O_RDWR | os.O_CREAT, 0o600)
                fds[p.file] = (fd, None)
                os.ftruncate(fd, p.size)
                fds[p.file] = (fd, _open_direct_writer(ssd_tmp / p.file))
            run_parallel(run, jobs, S3_THREADS, "ember-get")
            for p in manifest.partitions:
                if digests[p.file].hexdigest() != p.sha256:
                    raise IntegrityError(f"{store.uri}/{name}/{p.file}: sha256 mismatch")
        finally:
            for pair in fds.values():
                for fd in pair:
                    if fd is not None:
                        os.close(fd)
        if ssd_tmp is not None:
            (ssd_tmp / MANIFEST_FILE).write_bytes(manifest.to_json())

    def _download_files(self, store, name, manifest: CheckpointManifest, targets: list[Path]) -> Path:
        import hashlib

        if not targets:
            targets = [self.data_dir / "files" / name]
            shutil.rmtree(targets[0], ignore_errors=True)
            targets[0].mkdir(parents=True)
            (targets[0] / MANIFEST_FILE).write_bytes(manifest.to_json())
        for t in targets:
            (t / FILES_DIR).mkdir(parents=True, exist_ok=True)
            (t / MANIFEST_FILE).write_bytes(manifest.to_json())
        for f in manifest.files:
            data = store.read_bytes(name, f"{FILES_DIR}/{f.path}")
            if hashlib.sha256(data).hexdigest() != f.sha256:
                raise IntegrityError(f"{store.uri}/{name}/{FILES_DIR}/{f.path}: sha256 mismatch")
            for t in targets:
                (t / FILES_DIR / f.path).write_bytes(data)
        return targets[0] / FILES_DIR

    def _pool_uploader(self, entry: DramEntry, up: DeviceUpload):
        """on_chunk that copies landed bytes from the (page-locked) pool mapping to the device."""
        import torch

        pool = torch.from_numpy(self.dram.rw.array())

        def on_chunk(at: int, n: int) -> None:
            for pool_off, entry_off, length in run_slices(entry.runs, at, n):
                up.copy(pool[pool_off : pool_off + length], entry_off)

        return on_chunk

    # --- bookkeeping ----------------------------------------------------------------------------
    def _device_hit(self, name: str, dev: str, t0: float) -> LoadedCheckpoint | None:
        with self._lock:
            held = self._on_device.get((name, dev))
            if held is None:
                return None
            held[3] += 1
        sd, manifest, files = held[0], held[1], held[2]
        return LoadedCheckpoint(
            name, dict(sd), "gpu", time.perf_counter() - t0, manifest.tensor_nbytes, files, manifest,
            lambda: self._device_release(name, dev),
        )

    def _device_release(self, name: str, dev: str) -> None:
        with self._lock:
            held = self._on_device.get((name, dev))
            if held is not None:
                held[3] -= 1
                if held[3] <= 0:
                    del self._on_device[(name, dev)]

    def _loaded(self, name, sd, tier, t0, manifest, files, dev, entry) -> LoadedCheckpoint:
        def release() -> None:
            if entry is not None:
                self.dram.unpin(name)
            if dev.type == "cuda":
                self._device_release(name, str(dev))

        if dev.type == "cuda":
            with self._lock:
                self._on_device[(name, str(dev))] = [sd, manifest, files, 1]
            if entry is not None:  # device bytes are private: the DRAM entry need not stay pinned
                self.dram.unpin(name)
                entry = None
        return LoadedCheckpoint(
            name, sd, tier, time.perf_counter() - t0, manifest.tensor_nbytes, files, manifest, release
        )


def _open_direct_writer(path: Path) -> int | None:
    """A second descriptor on `path` with O_DIRECT, or None where the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None


class _InOrderSha256:
    """sha256 of one partition whose chunks land in any order: whichever thread finds the next
    chunk in order landed hashes it (and those after it) while the others go on downloading."""

    def __init__(self, dest: memoryview, base: int, size: int, chunk_bytes: int) -> None:
        import hashlib

        self.dest, self.base, self.size, self.chunk_bytes = dest, base, size, chunk_bytes
        self.sha = hashlib.sha256()
        self.next = 0
        self.landed_chunks: set[int] = set()
        self.hashing = False
        self.lock = threading.Lock()

    def landed(self, i: int) -> None:
        with self.lock:
            self.landed_chunks.add(i)
            if self.hashing:
                return  # the thread hashing now will get to chunk i
            self.hashing = True
        while True:
            with self.lock:
                if self.next not in self.landed_chunks:
                    self.hashing = False
                    return
                j = self.next
            lo = self.base + j * self.chunk_bytes
            self.sha.update(self.dest[lo : min(self.base + self.size, lo + self.chunk_bytes)])
            with self.lock:
                self.landed_chunks.discard(j)
                self.next = j + 1

    def hexdigest(self) -> str:
        """The partition's sha256; every chunk must have landed (a partition of 0 bytes has none)."""
        if self.next * self.chunk_bytes < self.size:
            raise IntegrityError(f"sha256 of a partition asked before chunk {self.next} landed")
        return self.sha.hexdigest()


def _copy_meta(src: Path, meta_dir: Path) -> None:
    """Copy manifest and model files of a local checkpoint beside a DRAM entry."""
    shutil.copyfile(src / MANIFEST_FILE, meta_dir / MANIFEST_FILE)
    if (src / FILES_DIR).is_dir():
        shutil.copytree(src / FILES_DIR, meta_dir / FILES_DIR, dirs_exist_ok=True)
    else:
        (meta_dir / FILES_DIR).mkdir(exist_ok=True)
