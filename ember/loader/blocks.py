"""How the DRAM pool is cut into blocks: an entry as its runs in the pool (DramEntry), placing an
entry's runs among the used ones (best fit, else the largest holes), and allocating the pool
file's pages once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ember.loader import vm


@dataclass(frozen=True)
class DramEntry:
    """A ready entry: where its bytes are in the pool and where its manifest/model files are."""

    name: str
    runs: tuple[tuple[int, int], ...]  # (byte offset in pool, byte length)
    nbytes: int
    meta_dir: Path
    gen: str = ""  # which fill of `name` this is: pins and quarantine act on this one only
    keep: int = 0  # retention priority: the lowest goes first (ember.loader.retention)

    @property
    def contiguous(self) -> bool:
        return len(self.runs) == 1


def fit_runs(used_runs: Iterable[list[int]], total_blocks: int, need: int) -> list[list[int]] | None:
    """Runs ([first block, blocks]) for `need` blocks among `total_blocks` of which `used_runs`
    are taken: one run in the smallest hole that holds it, else the largest holes first. None when
    fewer than `need` blocks are free."""
    used = bytearray(total_blocks)
    for s, n in used_runs:
        used[s : s + n] = b"\x01" * n
    free: list[tuple[int, int]] = []
    i = 0
    while i < total_blocks:
        if used[i]:
            i += 1
            continue
        j = i
        while j < total_blocks and not used[j]:
            j += 1
        free.append((i, j - i))
        i = j
    if sum(n for _, n in free) < need:
        return None
    fitting = [r for r in free if r[1] >= need]
    if fitting:
        s, _ = min(fitting, key=lambda r: r[1])  # best fit keeps large holes for large models
        return [[s, need]]
    runs, left = [], need
    for s, n in sorted(free, key=lambda r: -r[1]):
        take = min(n, left)
        runs.append([s, take])
        left -= take
        if not left:
            break
    return sorted(runs)


def populate_pool(fd: int, nbytes: int) -> None:
    """Allocate every page of the pool file once. Through a mapping advised MADV_HUGEPAGE, so the
    pool gets 2 MiB pages where tmpfs allows them (shmem_enabled=advise/always): mapping and
    direct I/O then cost 512x fewer page-table entries. Falls back to posix_fallocate."""
    addr = vm.mmap_at(None, nbytes, vm.PROT_READ | vm.PROT_WRITE, vm.MAP_SHARED, fd, 0)
    try:
        vm.madvise(addr, nbytes, vm.MADV_HUGEPAGE)
        populated = vm.madvise(addr, nbytes, vm.MADV_POPULATE_WRITE)
    finally:
        vm.munmap(addr, nbytes)
    if not populated:
        os.posix_fallocate(fd, 0, nbytes)
