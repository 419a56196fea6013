"""Quick per-tier bandwidth probes, run once when a worker starts (well under a second)."""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from typing import TYPE_CHECKING

from ember.errors import EmberError
from ember.loader import vm

if TYPE_CHECKING:
    from ember.loader.tiers import NodeTiers

log = logging.getLogger(__name__)

# Used when a tier cannot be probed (an empty store): a conservative figure for S3 from one node.
FALLBACK_REMOTE_BPS = 200e6
# Used when the SSD tier's disk has no room for a probe (a full disk): a conservative SATA SSD.
FALLBACK_SSD_BPS = 500e6
_SSD_PROBE_CHUNK = 4 << 20


def measure_tier_bandwidth(tiers: NodeTiers, probe_bytes: int = 64 << 20) -> dict[str, float]:
    """{"dram", "ssd", "remote"} in bytes/s."""
    return {
        "dram": _dram_bps(probe_bytes),
        "ssd": _ssd_bps(tiers.ssd.tmp, probe_bytes, tiers.threads),
        "remote": _remote_bps(tiers, probe_bytes),
    }


def _dram_bps(nbytes: int) -> float:
    src, dst = vm.anonymous(nbytes), vm.anonymous(nbytes)
    a, b = src.array(), dst.array()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        b[:] = a
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _ssd_bps(directory, nbytes: int, threads: int) -> float:
    """Write, fsync and read back a probe file of at most a quarter of the disk's free space (a
    probe must not fill the disk other workers write to); a disk without room for one chunk, or
    a write that fails (ENOSPC, read-only), gives FALLBACK_SSD_BPS: the worker still starts."""
    try:
        st = os.statvfs(directory)
        nbytes = min(nbytes, st.f_bavail * st.f_frsize // 4 // _SSD_PROBE_CHUNK * _SSD_PROBE_CHUNK)
        if nbytes < _SSD_PROBE_CHUNK:
            raise OSError(errno.ENOSPC, f"{st.f_bavail * st.f_frsize} bytes free")
        return _probe_file(directory, nbytes, threads)
    except OSError as e:
        log.warning("SSD tier %s cannot be probed (%s): assuming %.0f MB/s", directory, e, FALLBACK_SSD_BPS / 1e6)
        return FALLBACK_SSD_BPS


def _probe_file(directory, nbytes: int, threads: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    # named as the SSD tier's temporaries (NAME.PID.RAND): a killed worker's is swept at the next start
    path = os.path.join(directory, f"probe.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    chunk = _SSD_PROBE_CHUNK
    buf = vm.anonymous(nbytes)
    try:
        with open(path, "wb") as f:
            f.write(memoryview(buf.array()))
            f.flush()
            os.fsync(f.fileno())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
        view = buf.memoryview()
        try:
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                list(pool.map(lambda o: os.preadv(fd, [view[o : o + chunk]], o), range(0, nbytes, chunk)))
            return nbytes / (time.perf_counter() - t)
        finally:
            os.close(fd)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _remote_bps(tiers: NodeTiers, nbytes: int) -> float:
    try:
        store = tiers.store(tiers.store_url)
        infos = store.list()
        for info in infos:
            manifest = store.manifest(info.name)
            if not manifest.partitions:
                continue
            p = manifest.partitions[0]
            n = min(nbytes, p.size)
            buf = bytearray(n)
            t = time.perf_counter()
            store.read_range(info.name, p.file, 0, memoryview(buf))
            return n / (time.perf_counter() - t)
    except EmberError:
        pass
    return FALLBACK_REMOTE_BPS
