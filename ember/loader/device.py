"""Device copies for CUDA: one device allocation per checkpoint, host->device copies on a
separate stream from pinned memory, overlapped with reads. Guarded by torch.cuda.is_available();
on CPU nothing here runs.
"""

from __future__ import annotations

import threading


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (False when torch has no CUDA build)."""
    import torch

    return bool(torch.cuda.is_available())


def register_host_memory(addr: int, length: int) -> bool:
    """Page-lock (cudaHostRegister) a host range so copies from it are async DMA. Best effort."""
    if not length or not cuda_available():
        return False
    import torch

    try:
        rc = torch.cuda.cudart().cudaHostRegister(addr, length, 0)
    except (RuntimeError, AttributeError):
        return False
    return int(rc) == 0


def unregister_host_memory(addr: int) -> bool:
    """Undo register_host_memory (before the range is unmapped: the driver would otherwise keep a
    registration over addresses a later mapping may reuse). Best effort."""
    if not cuda_available():
        return False
    import torch

    try:
        rc = torch.cuda.cudart().cudaHostUnregister(addr)
    except (RuntimeError, AttributeError):
        return False
    return int(rc) == 0


class DeviceUpload:
    """One device buffer for a whole checkpoint, filled by async copies on a side stream."""

    def __init__(self, nbytes: int, device) -> None:
        import torch

        self.device = torch.device(device)
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.stream = torch.cuda.Stream(device=self.device)
        # The buffer may reuse memory that work queued on the current stream still touches.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._lock = threading.Lock()

    def copy(self, host, offset: int) -> None:
        """Enqueue a copy of a host uint8 tensor (pinned for overlap) to buffer[offset:]."""
        import torch

        with self._lock, torch.cuda.stream(self.stream):
            self.buffer[offset : offset + host.numel()].copy_(host, non_blocking=True)

    def finish(self):
        """Wait for every copy; the filled device buffer."""
        self.stream.synchronize()
        return self.buffer


def run_slices(runs: tuple[tuple[int, int], ...], at: int, n: int) -> list[tuple[int, int, int]]:
    """Split entry bytes at..at+n over pool runs: [(pool offset, entry offset, length)]."""
    out, pos = [], 0
    for pool_off, length in runs:
        lo, hi = max(at, pos), min(at + n, pos + length)
        if lo < hi:
            out.append((pool_off + lo - pos, lo, hi - lo))
        pos += length
        if pos >= at + n:
            break
    return out
