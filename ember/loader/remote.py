"""Fetching a checkpoint's partitions from its store: every chunk into memory (verified) and,
while the SSD tier can write, into the SSD tier's temporary entry at once (O_DIRECT where it can).
A write error of the SSD tier (a full disk) costs the SSD copy, never the load."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from ember.errors import IntegrityError
from ember.loader.format import (
    FILES_DIR,
    MANIFEST_FILE,
    CheckpointManifest,
    chunk_hash_available,
    chunk_hasher,
)
from ember.loader.pipeline import run_parallel
from ember.loader.store import S3_THREADS
from ember.loader.verify import check_file_bytes


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
