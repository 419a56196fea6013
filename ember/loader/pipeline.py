"""The read pipeline: chunked parallel `preadv` into one preallocated buffer, each chunk checked
as it lands, optionally handed to a device copy while later chunks are still being read.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ember.errors import CheckpointError, IntegrityError
from ember.loader.envvars import env_int
from ember.loader.format import (
    CheckpointManifest,
    chunk_hash_available,
    chunk_stream_hasher,
    sha256_hex,
    torch_dtype,
)
from ember.loader.vm import cached_fraction

# Found by measurement on a 2-vCPU VM (cold 2 GB reads into the DRAM pool): 1 thread reaches
# ~1.7 GB/s, 2-4 threads ~2.5-3.1, 8 threads ~3.1-3.3, 12 threads ~3.2-3.4 (within the drift; the
# plain read reaches 3.7-3.8 GB/s with 8 or 12); 16 MiB chunks were as good as 4-64 MiB. 8 is the
# default: the H100 machine met its SSD->GPU target with 8 (1.07x), and a run with 12 there (and
# other changes) gave 1.18x, not yet told apart.
DEFAULT_THREADS = env_int("EMBER_LOADER_THREADS", 8, minimum=1)
# Below this fraction of a file in the page cache, O_DIRECT reads beat buffered ones by 2-3x.
O_DIRECT_BELOW_CACHED = 0.5


@dataclass(frozen=True)
class ReadStats:
    """What one read did."""

    nbytes: int
    o_direct: bool
    verified: str  # "chunks" | "sha256" | "none"


def read_partitions(
    directory: Path,
    manifest: CheckpointManifest,
    dest: memoryview,
    *,
    threads: int = DEFAULT_THREADS,
    o_direct: bool | None = None,
    verify: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> ReadStats:
    """Read every partition of the checkpoint in `directory` into `dest`, back to back.

    `dest` must hold `manifest.total_bytes` and, for O_DIRECT, start on a 4 KiB boundary.
    o_direct None decides per file from how much of it is in the page cache. With `verify`
    each chunk's fast hash is checked as it lands (sha256 per partition when the fast hash is
    unavailable here). `on_chunk(offset, length)` is called from reader threads after a chunk
    landed and was verified. Raises CheckpointError (missing/short file), IntegrityError.
    """
    fds = open_partitions(directory, manifest, o_direct)
    try:
        return read_from_fds(fds, manifest, dest, threads=threads, verify=verify, on_chunk=on_chunk)
    finally:
        for fd, _direct in fds:
            os.close(fd)


def open_partitions(directory: Path, manifest: CheckpointManifest, o_direct: bool | None) -> list[tuple[int, bool]]:
    """Open every partition (checking its size against the manifest); [(fd, is_direct)]."""
    fds: list[tuple[int, bool]] = []
    try:
        for p in manifest.partitions:
            path = Path(directory) / p.file
            try:
                size = path.stat().st_size
            except FileNotFoundError as e:
                raise CheckpointError(f"partition {p.file} is missing") from e
            if size != p.size:
                raise CheckpointError(
                    f"partition {p.file} is {size} bytes but the manifest claims {p.size} (truncated or forged)"
                )
            direct = o_direct if o_direct is not None else cached_fraction(str(path), size) < O_DIRECT_BELOW_CACHED
            fd = -1
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    fd = -1  # a file system without O_DIRECT (tmpfs): buffered reads
            if fd < 0:
                direct = False
                fd = os.open(path, os.O_RDONLY)
            fds.append((fd, direct))
    except BaseException:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds


def read_from_fds(
    fds: list[tuple[int, bool]],
    manifest: CheckpointManifest,
    dest: memoryview,
    *,
    threads: int = DEFAULT_THREADS,
    verify: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    stage_direct: bool = False,
) -> ReadStats:
    """read_partitions over already opened files (see there).

    stage_direct: O_DIRECT reads land in a per-thread staging buffer of anonymous (huge-page)
    memory and are copied into `dest` from there. For a destination of 4 KiB shared-memory pages
    (the DRAM pool) this is faster: direct I/O into small pages costs more than the extra copy,
    which overlaps with the other threads' reads.
    """
    if dest.nbytes < manifest.total_bytes:
        raise ValueError(f"buffer of {dest.nbytes} bytes cannot hold {manifest.total_bytes}")
    dest = dest.cast("B") if dest.format != "B" else dest
    usable = _buffered_unless_aligned(fds, dest)
    try:
        return _read(usable, manifest, dest, threads, verify, on_chunk, stage_direct)
    finally:
        for (fd, _), (orig, _) in zip(usable, fds, strict=True):
            if fd != orig:
                os.close(fd)


def _read(fds, manifest, dest: memoryview, threads: int, verify: bool, on_chunk, stage_direct: bool) -> ReadStats:
    import numpy as np

    dest_np = np.frombuffer(dest, dtype=np.uint8)
    fast = verify and chunk_hash_available(manifest.chunk_hash)
    step = manifest.chunk_bytes
    jobs = []
    for (fd, direct), base, p in zip(fds, manifest.partition_bases(), manifest.partitions, strict=False):
        for i, off in enumerate(range(0, p.size, step)):
            jobs.append((fd, direct, direct and stage_direct, p, i, off, min(step, p.size - off), base + off))

    def run(job) -> None:
        fd, direct, staged, p, i, off, n, at = job
        h = chunk_stream_hasher(manifest.chunk_hash) if fast else None
        if staged:
            # O_DIRECT into this thread's huge-page buffer, then copied into `dest` piece by
            # piece, each piece hashed right after the copy read it (it is in the CPU's cache).
            stage = _staging_buffer(step)
            pread_full(fd, stage.memoryview()[:n], off, f"partition {p.file}")
            src = stage.array()
            for lo in range(0, n, FUSED_PIECE_BYTES):
                hi = min(n, lo + FUSED_PIECE_BYTES)
                np.copyto(dest_np[at + lo : at + hi], src[lo:hi])
                if h is not None:
                    h.update(src[lo:hi])
        elif direct:
            view = dest[at : at + n]
            pread_full(fd, view, off, f"partition {p.file}")
            if h is not None:
                h.update(view)
        else:
            # Buffered (page cache) reads: read and hash piece by piece, each still in the cache.
            for lo in range(0, n, FUSED_PIECE_BYTES):
                piece = dest[at + lo : at + min(n, lo + FUSED_PIECE_BYTES)]
                pread_full(fd, piece, off + lo, f"partition {p.file}")
                if h is not None:
                    h.update(piece)
        if h is not None and h.hexdigest() != p.chunks[i]:
            raise IntegrityError(f"partition {p.file}: chunk {i} (bytes {off}..{off + n}) fails its checksum")
        if on_chunk is not None:
            on_chunk(at, n)

    run_parallel(run, jobs, threads, "ember-read")
    verified = "chunks" if fast else "none"
    if verify and not fast:
        for base, p in zip(manifest.partition_bases(), manifest.partitions, strict=False):
            if sha256_hex(dest[base : base + p.size]) != p.sha256:
                raise IntegrityError(f"partition {p.file}: sha256 mismatch")
        verified = "sha256"
    return ReadStats(nbytes=manifest.total_bytes, o_direct=any(d for _, d in fds), verified=verified)


_staging = threading.local()
# Chunks are hashed in pieces of this size right after each piece is read (buffered) or copied
# out of the staging buffer (O_DIRECT), while it is in the CPU's cache: hot from the page cache
# ~+10% over hashing a whole 16 MiB chunk afterwards, measured on 2 vCPUs.
FUSED_PIECE_BYTES = 4 << 20


def pread_full(fd: int, view: memoryview, offset: int, what: str) -> None:
    """preadv until `view` is full; CheckpointError naming `what` if the file ends first."""
    got, n = 0, len(view)
    while got < n:
        r = os.preadv(fd, [view[got:]], offset + got)
        if r <= 0:
            raise CheckpointError(f"{what} ended early at byte {offset + got}")
        got += r


def _staging_buffer(nbytes: int):
    """This thread's staging buffer for O_DIRECT reads (huge anonymous pages), kept with the
    pool's thread: touching 8 fresh 16 MiB buffers per load cost ~0.1 s of CPU here."""
    from ember.loader.vm import anonymous

    stage = getattr(_staging, "buffer", None)
    if stage is None or stage.length < nbytes:
        stage = _staging.buffer = anonymous(nbytes)
    return stage


def run_parallel(run: Callable, jobs: list, threads: int, name: str) -> None:
    """Run `run(job)` for every job on `threads` threads of a pool kept for the process (starting
    8 threads anew took ~55 ms of a 0.6 s load on 2 vCPUs); the first error cancels what has not
    started and is raised. A `run` must not itself call run_parallel with the same name."""
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            run(job)
        return
    pool = worker_pool(name, threads)
    futures = [pool.submit(run, job) for job in jobs]
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        for f in futures:  # none may still write into the caller's buffer once we return
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:
                    pass
        raise


_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def worker_pool(name: str, threads: int, *, warm: bool = False) -> ThreadPoolExecutor:
    """The process's pool of `threads` threads named `name` (created once; `warm` starts them now)."""
    with _pools_lock:
        pool = _pools.get((name, threads))
        if pool is None:
            pool = _pools[(name, threads)] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    if warm:
        barrier = threading.Barrier(threads)
        for f in [pool.submit(barrier.wait, 5.0) for _ in range(threads)]:
            try:
                f.result()
            except threading.BrokenBarrierError:
                pass
    return pool


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's threads: its pools start afresh."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _buffered_unless_aligned(fds: list[tuple[int, bool]], dest: memoryview) -> list[tuple[int, bool]]:
    """O_DIRECT needs a 4 KiB-aligned buffer: for any other buffer, read the same files through
    new buffered descriptors (the caller closes those that differ from its own)."""
    import numpy as np

    if not any(d for _, d in fds) or np.frombuffer(dest, dtype=np.uint8).ctypes.data % 4096 == 0:
        return fds
    out = []
    for fd, direct in fds:
        out.append((os.open(f"/proc/self/fd/{fd}", os.O_RDONLY), False) if direct else (fd, direct))
    return out


def tensors_from_buffer(manifest: CheckpointManifest, buffer) -> dict:
    """Tensors as views into `buffer` (a uint8 torch tensor holding all partitions back to back)."""
    bases = manifest.partition_bases()
    out = {}
    for t in manifest.tensors:
        at = bases[t.partition] + t.offset
        out[t.name] = buffer[at : at + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
    return out


def uint8_tensor(array):
    """A uint8 torch tensor sharing memory with a numpy uint8 array."""
    import torch

    return torch.from_numpy(array)
