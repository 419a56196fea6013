"""Thin ctypes wrappers over mmap/munmap/mprotect/madvise/mincore (Linux).

Python's mmap module cannot place a mapping at a chosen address; the DRAM tier needs that to
show an entry spread over several runs of pool blocks as one contiguous range of virtual memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_SHARED = mmap.MAP_SHARED
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS = 0x20
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = None


def libc():
    """The C library with argument types set (loaded on first use)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mmap_at(addr: int | None, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2); returns the address or raises OSError."""
    out = libc().mmap(addr, length, prot, flags, fd, offset)
    if out is None or out == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
    return out


def munmap(addr: int, length: int) -> None:
    """munmap(2)."""
    _check(libc().munmap(addr, length), "munmap")


def mprotect(addr: int, length: int, prot: int) -> None:
    """mprotect(2)."""
    _check(libc().mprotect(addr, length, prot), "mprotect")


def madvise(addr: int, length: int, advice: int) -> bool:
    """madvise(2); False where the kernel does not know the advice."""
    return libc().madvise(addr, length, advice) == 0


class Mapping:
    """A region of virtual memory this process owns; unmapped when the last user is gone.

    `array()` returns a numpy uint8 array over the region; torch tensors made from it keep it
    (and so the mapping) alive, and the mapping is removed only after all of them are freed.
    """

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        self._array = None
        self.array()  # registers the finalizer that unmaps the region

    def array(self):
        """numpy uint8 array over the whole region (one per Mapping)."""
        if self._array is None:
            import numpy as np

            raw = (ctypes.c_char * self.length).from_address(self.addr)
            arr = np.frombuffer(raw, dtype=np.uint8)
            weakref.finalize(arr, _unmap_quietly, self.addr, self.length)
            self._array = arr
        return self._array

    def memoryview(self) -> memoryview:
        """A writable memoryview over the region (for preadv)."""
        return memoryview(self.array())

    def release(self) -> None:
        """Drop this object's reference; the region goes when its last tensor does."""
        self._array = None


def _unmap_quietly(addr: int, length: int) -> None:
    try:
        munmap(addr, length)
    except OSError:
        pass


def map_file_runs(fd: int, runs: list[tuple[int, int]], *, prot: int, private: bool, populate: bool) -> Mapping:
    """Map byte ranges (file offset, length) of `fd` back to back at one contiguous address."""
    total = sum(n for _, n in runs)
    if total == 0:
        return Mapping(mmap_at(None, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS), 4096)
    flags = (MAP_PRIVATE if private else MAP_SHARED) | (MAP_POPULATE if populate and not private else 0)
    if len(runs) == 1:
        addr = mmap_at(None, total, prot, flags, fd, runs[0][0])
    else:
        addr = mmap_at(None, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
        pos = addr
        try:
            for off, n in runs:
                mmap_at(pos, n, prot, flags | MAP_FIXED, fd, off)
                pos += n
        except OSError:
            munmap(addr, total)
            raise
    if populate and private:
        # Map the shared pages read-only now (copy-on-write stays possible): no copy, no faults later.
        populate_read(addr, total)
    return Mapping(addr, total)


POPULATE_SLICE = 256 << 20


def populate_read(addr: int, length: int, threads: int = 4) -> None:
    """MADV_POPULATE_READ over a region, in slices on several threads: with 4 KiB pages the
    page-table work is the cost (~0.07 s/GB on one thread here; 4 threads on 2 vCPUs: -25%)."""
    if length <= POPULATE_SLICE or threads <= 1:
        madvise(addr, length, MADV_POPULATE_READ)
        return
    from ember.loader.pipeline import run_parallel

    slices = [(addr + o, min(POPULATE_SLICE, length - o)) for o in range(0, length, POPULATE_SLICE)]
    run_parallel(lambda s: madvise(s[0], s[1], MADV_POPULATE_READ), slices, threads, "ember-populate")


def anonymous(length: int, *, touch: bool = True) -> Mapping:
    """Private anonymous memory, touched (pre-faulted) when `touch`."""
    addr = mmap_at(None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
    madvise(addr, length, MADV_HUGEPAGE)
    mapping = Mapping(addr, length)
    if touch and not madvise(addr, length, MADV_POPULATE_WRITE):
        mapping.array()[::4096] = 0
    return mapping


def cached_fraction(path: str, size: int, samples: int = 256) -> float:
    """Fraction of a file's pages in the page cache, from `samples` pages spread over it
    (mincore); 0.0 when it cannot be told."""
    if size <= 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = mmap_at(None, size, PROT_READ, MAP_SHARED, fd, 0)
    except OSError:
        return 0.0
    finally:
        os.close(fd)
    try:
        pages = (size + 4095) // 4096
        step = max(1, pages // samples)
        vec = (ctypes.c_ubyte * 1)()
        hits = total = 0
        for page in range(0, pages, step):
            if libc().mincore(addr + page * 4096, 4096, vec) != 0:
                return 0.0
            hits += vec[0] & 1
            total += 1
        return hits / total
    finally:
        munmap(addr, size)
