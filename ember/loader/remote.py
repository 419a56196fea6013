"""Loading a checkpoint from its store (`load_remote`, the tiers' last resort): every chunk into
memory (verified: the DRAM pool's new entry, or private memory) and, while the SSD tier can write,
into the SSD tier's temporary entry at once (O_DIRECT where it can), then the model files beside
them. A write error of the SSD tier (a full disk) costs the SSD copy, one of the DRAM tier (a full
/dev/shm) the DRAM copy, never the load."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import CapacityError, CheckpointChanged, CheckpointError, IntegrityError
from ember.loader import vm
from ember.loader.device import DeviceUpload
from ember.loader.format import (
    FILES_DIR,
    MANIFEST_FILE,
    CheckpointManifest,
    chunk_hash_available,
    chunk_hasher,
    parse_manifest,
)
from ember.loader.identity import CheckpointIdentity, manifest_digest
from ember.loader.local import commit_or_private
from ember.loader.locks import pid_alive
from ember.loader.pipeline import run_parallel, tensors_from_buffer
from ember.loader.ssd import REF_FILE
from ember.loader.store import S3_THREADS
from ember.loader.verify import check_file_bytes

if TYPE_CHECKING:
    from ember.loader.dram import DramEntry
    from ember.loader.tiers import NodeTiers

FALLBACK_DIR = "files"  # under the node's data dir (or its shared-memory dir): `_fallback_files`


def download_partitions(store, name: str, manifest: CheckpointManifest, raw: bytes, dest: memoryview,
                        ssd_tmp: Path | None, on_chunk) -> OSError | None:
    """Fetch every chunk into `dest` (verified) and, while the SSD tier writes, into `ssd_tmp`.
    Returns the SSD tier's write error (the caller drops its copy), or None."""
    fast = chunk_hash_available(manifest.chunk_hash)
    hasher = chunk_hasher(manifest.chunk_hash) if fast else None
    fds: dict[str, tuple[int, int | None]] = {}  # partition -> (buffered fd, O_DIRECT fd or None)
    ssd_error: list[OSError] = []
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

    def write_ssd(p, view, off: int, n: int, at: int) -> None:
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
            raise OSError(errno.ENOSPC, f"short write of {p.file} at byte {off} ({written} of {n})")

    def run(job) -> None:
        p, i, off, n, at = job
        view = dest[at : at + n]
        store.read_range(name, p.file, off, view)
        if hasher is not None and hasher(view) != p.chunks[i]:
            raise IntegrityError(f"{store.uri}/{name}/{p.file}: chunk {i} fails its checksum")
        if p.file in fds and not ssd_error:
            try:
                write_ssd(p, view, off, n, at)
            except OSError as e:  # a full disk costs the SSD copy, never the load
                ssd_error.append(e)
        if on_chunk is not None:
            on_chunk(at, n)
        digests[p.file].landed(i)

    try:
        try:
            for p in manifest.partitions if ssd_tmp is not None else ():
                fd = os.open(ssd_tmp / p.file, os.O_RDWR | os.O_CREAT, 0o600)
                fds[p.file] = (fd, None)
                os.ftruncate(fd, p.size)
                fds[p.file] = (fd, _open_direct_writer(ssd_tmp / p.file))
        except OSError as e:
            ssd_error.append(e)
        run_parallel(run, jobs, S3_THREADS, "ember-get")
        for p in manifest.partitions:
            if digests[p.file].hexdigest() != p.sha256:
                raise IntegrityError(f"{store.uri}/{name}/{p.file}: sha256 mismatch")
    finally:
        for pair in fds.values():
            for fd in pair:
                if fd is not None:
                    os.close(fd)
    if ssd_tmp is not None and not ssd_error:
        try:
            (ssd_tmp / MANIFEST_FILE).write_bytes(raw)  # as stored: its digest is the identity's
        except OSError as e:
            ssd_error.append(e)
    return ssd_error[0] if ssd_error else None


def fetch_model_files(store, name: str, manifest: CheckpointManifest) -> dict[str, bytes]:
    """Every model file (config, tokenizer, ...) of a stored checkpoint, read once and checked
    against its size and sha256 in the manifest (IntegrityError names the first bad one)."""
    files = {}
    for f in manifest.files:
        data = store.read_bytes(name, f"{FILES_DIR}/{f.path}")
        check_file_bytes(data, f, f"{store.uri}/{name}/{FILES_DIR}/{f.path}")
        files[f.path] = data
    return files


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


def load_remote(tiers: NodeTiers, store, ident: CheckpointIdentity, dev, dram_keep: int = 0):
    """Remote -> (SSD temp entry + DRAM pool at once, the DRAM entry with retention priority
    `dram_keep`) -> device, verifying every chunk. An SSD tier that cannot write (a full disk) is
    skipped: the load serves from memory. Returns (state dict, manifest, DRAM entry or None, model
    files directory, what keeps the model files for the instance (the SSD entry's pin, or this
    load's FallbackFiles) when no DRAM entry has them, else None)."""
    import torch

    name, key = ident.name, ident.key
    raw = store.read_bytes(name, MANIFEST_FILE)
    if manifest_digest(raw) != ident.digest:
        raise CheckpointChanged(
            f"{store.uri}/{name} changed in its store since it was deployed (manifest digest "
            f"{manifest_digest(raw)[:12]}, pinned {ident.digest[:12]}): deploy the function again"
        )
    manifest = parse_manifest(raw)
    for p in manifest.partitions:
        size = store.object_size(name, p.file)
        if size != p.size:
            raise CheckpointError(
                f"{store.uri}/{name}/{p.file} is {size} bytes but the manifest claims {p.size}"
            )
    total = manifest.total_bytes
    files_bytes = sum(f.size for f in manifest.files)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > physical and total > tiers.dram.capacity_bytes and dev.type == "cpu":
        raise CapacityError(f"checkpoint {name} needs {total} bytes; this node has {physical} bytes of memory")
    ssd_tmp = None
    if total + files_bytes + (1 << 20) <= tiers.ssd.capacity_bytes:
        try:  # None: the room is held by entries in use and other loads: this one is not cached
            ssd_tmp = tiers.ssd.begin(key, total + files_bytes + (1 << 20))
        except OSError as e:
            tiers.ssd_unwritable(e)
    entry = ssd_pin = None
    try:
        entry = _new_dram_entry(tiers, ident, total, dram_keep)
        view = None
        if entry is not None:
            view = tiers.dram.writable_view(entry)
            dest = tiers.dram.rw_slice(entry) if view is None else view.array()
        else:
            mapping = vm.anonymous(max(total, 1), touch=False)
            dest = mapping.array()
        up = DeviceUpload(total, dev) if dev.type == "cuda" else None
        on_chunk = None
        if up is not None:
            host = torch.from_numpy(dest)
            on_chunk = tiers.pool_uploader(entry, up) if entry is not None else (
                lambda at, n: up.copy(host[at : at + n], at)
            )
        ssd_error = download_partitions(store, name, manifest, raw, memoryview(dest), ssd_tmp, on_chunk)
        if ssd_error is not None:
            tiers.ssd.abort(ssd_tmp)
            ssd_tmp = None
            tiers.ssd_unwritable(ssd_error)
        ssd_tmp, files = _download_files(tiers, store, name, manifest, raw, ssd_tmp)
        if ssd_tmp is not None:
            try:
                (ssd_tmp / REF_FILE).write_text(ident.ref)
                ssd_pin = tiers.ssd.commit(key, ssd_tmp)
                tiers.ssd_warned = False  # writing again: a later failure is news again
            except OSError as e:
                tiers.ssd.abort(ssd_tmp)
                tiers.ssd_unwritable(e)
            ssd_tmp = None
        if entry is not None:  # the model files beside it, then ready; a full /dev/shm costs the DRAM copy
            meta = entry.meta_dir
            entry, dest = commit_or_private(tiers, entry, view, dest, up is not None,
                                            lambda: write_model_files(meta, raw, files))
        if entry is not None:  # the files are beside the DRAM entry: the SSD entry need not stay
            if ssd_pin is not None:
                ssd_pin.release()
                ssd_pin = None
            files_dir = entry.meta_dir / FILES_DIR
        elif ssd_pin is not None:  # in the installed SSD entry, pinned while the instance uses them
            files_dir = ssd_pin.path / FILES_DIR
        else:
            ssd_pin = _fallback_files(tiers, key, raw, files)  # released with the instance, as a pin
            files_dir = ssd_pin.path / FILES_DIR
    except BaseException:
        if entry is not None:
            tiers.dram.abort(key)
        if ssd_tmp is not None:
            tiers.ssd.abort(ssd_tmp)
        if ssd_pin is not None:
            ssd_pin.release()
        raise
    buf = up.finish() if up is not None else torch.from_numpy(dest)
    return tensors_from_buffer(manifest, buf), manifest, entry, files_dir, ssd_pin


def _new_dram_entry(tiers: NodeTiers, ident: CheckpointIdentity, nbytes: int, keep: int) -> DramEntry | None:
    """A new DRAM entry to fill, or None: the pool cannot hold it, or its directory cannot be
    written (a full /dev/shm: said once in the log; the load serves from private memory)."""
    try:
        return tiers.dram.allocate(ident.key, nbytes, ref=ident.ref, keep=keep)
    except OSError as e:
        with contextlib.suppress(OSError):
            tiers.dram.abort(ident.key)
        tiers.dram.cannot_write(e)
        return None


def _download_files(tiers: NodeTiers, store, name, manifest: CheckpointManifest, raw: bytes,
                    ssd_tmp: Path | None) -> tuple[Path | None, dict[str, bytes]]:
    """Fetch and verify the model files (once), into the SSD entry's directory too. Returns
    (ssd_tmp or None when the SSD tier could not write them, the files' bytes)."""
    files = fetch_model_files(store, name, manifest)
    if ssd_tmp is not None:
        try:
            write_model_files(ssd_tmp, raw, files, manifest=False)
        except OSError as e:
            tiers.ssd.abort(ssd_tmp)
            tiers.ssd_unwritable(e)
            ssd_tmp = None
    return ssd_tmp, files


class FallbackFiles:
    """Model files written for one load because no tier holds them (`_fallback_files`): in the
    place of an SSD entry's pin, they go when the instance (or the device copy) using them lets
    go; those of a process that died first are swept at the node's next start."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory  # as an SsdPin's: the model files are under path / FILES_DIR

    def release(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _fallback_files(tiers: NodeTiers, key: str, raw: bytes, files: dict[str, bytes]) -> FallbackFiles:
    """Neither a DRAM entry nor the SSD tier holds the model files (a checkpoint larger than the
    DRAM tier, the SSD tier full or too small): they go beside the node's data, else, on a disk that
    cannot write them, into the node's shared-memory directory (a few MB of memory). A directory of
    this load's own, KEY.PID.RAND (the identity key, never the bare name: two stores may both have
    a `llama`), so its release cannot pull the files from under another instance."""
    own = f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    disk = tiers.data_dir / FALLBACK_DIR / own
    try:
        write_model_files(disk, raw, files)
        return FallbackFiles(disk)
    except OSError as e:
        shutil.rmtree(disk, ignore_errors=True)
        tiers.ssd_unwritable(e)
    memory = tiers.dram.dir / FALLBACK_DIR / own
    try:
        write_model_files(memory, raw, files)
    except BaseException:
        shutil.rmtree(memory, ignore_errors=True)
        raise
    return FallbackFiles(memory)


def sweep_fallback_files(*roots: Path) -> None:
    """Remove the fallback model files (under each root's FALLBACK_DIR) of processes no longer
    alive, and any of the layout before them (KEY alone: no process to ask)."""
    for root in roots:
        try:
            found = list((root / FALLBACK_DIR).iterdir())
        except OSError:
            continue
        for d in found:
            parts = d.name.rsplit(".", 2)
            pid = parts[1] if len(parts) == 3 else ""
            if not pid.isdigit() or not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def write_model_files(directory: Path, raw: bytes, files: dict[str, bytes], manifest: bool = True) -> None:
    """Write verified model files (and the manifest's exact bytes) under `directory`, each file
    replaced whole (a temporary file renamed over it): an instance reading a file while another load
    writes the same one sees the old bytes or the new, never half of either."""
    (directory / FILES_DIR).mkdir(parents=True, exist_ok=True)
    if manifest:
        _replace(directory / MANIFEST_FILE, raw)
    for path, data in files.items():
        _replace(directory / FILES_DIR / path, data)


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
