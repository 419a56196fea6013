"""Which GPUs a worker owns, so two workers on one machine never register the same GPU.

`ember up --workers N` divides the visible GPUs between its workers (`split_devices`) and gives
each its share in `EMBER_DEVICES` (CUDA indices or UUIDs, comma-separated); a worker serves only
those (`select_devices`). GPUs are identified by UUID (recorded with each device in Redis), and
NVML handles are matched to CUDA indices by UUID (`match_nvml`), never by position: CUDA and
NVML may order devices differently (CUDA_DEVICE_ORDER), and CUDA_VISIBLE_DEVICES renumbers them.
A MIG instance shares its GPU's power and clocks with other instances: power control on it is
refused (`refuse_power_control`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import ConfigError, DevicePermissionError


@dataclass(frozen=True)
class GpuInfo:
    index: int  # CUDA index in this process
    uuid: str  # "GPU-..." (or "MIG-..." for a MIG instance)
    memory_bytes: int
    name: str = ""

    @property
    def mig(self) -> bool:
        return self.uuid.startswith("MIG-")


def cuda_devices() -> list[GpuInfo]:
    """The CUDA devices this process sees, with their UUIDs."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        raw = str(getattr(p, "uuid", "") or "")
        uuid = raw if raw.startswith(("GPU-", "MIG-")) or not raw else f"GPU-{raw}"
        out.append(GpuInfo(i, uuid, int(p.total_memory), p.name))
    return out


def _ids(spec: str | None) -> list[str]:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def select_devices(visible: list[GpuInfo], spec: str | None) -> list[GpuInfo]:
    """The devices named by `spec` (indices or UUIDs; None or empty: all visible)."""
    wanted = _ids(spec)
    if not wanted:
        return list(visible)
    out: list[GpuInfo] = []
    for w in wanted:
        match = [d for d in visible if (w.isdigit() and d.index == int(w)) or (not w.isdigit() and d.uuid == w)]
        if not match:
            raise ConfigError(f"EMBER_DEVICES names {w!r}, which this process does not see "
                              f"(visible: {', '.join(f'{d.index}={d.uuid}' for d in visible) or 'none'})")
        if match[0] not in out:
            out.append(match[0])
    return out


def split_devices(visible: list[str], workers: int) -> list[str | None]:
    """Divide the visible GPUs (ids or UUIDs) between `workers` workers in contiguous shares; each
    entry is one worker's EMBER_DEVICES value. No GPUs: None for each (CPU slots). Fewer GPUs than
    workers is refused (two workers would share a GPU)."""
    if workers < 1:
        raise ConfigError("need at least one worker")
    if not visible:
        return [None] * workers
    if len(visible) < workers:
        raise ConfigError(f"{workers} workers but only {len(visible)} GPUs: each GPU belongs to one worker "
                          f"(use --workers {len(visible)} or fewer)")
    base, extra = divmod(len(visible), workers)
    out: list[str | None] = []
    start = 0
    for w in range(workers):
        n = base + (1 if w < extra else 0)
        out.append(",".join(visible[start:start + n]))
        start += n
    return out


def visible_gpu_ids() -> list[str]:
    """The GPUs `ember up`'s workers will see, for `split_devices`, without creating a CUDA context
    in the supervisor: with CUDA_VISIBLE_DEVICES set, indices into that list (the workers inherit
    it); else every GPU's UUID from NVML; empty without NVML (no GPUs, or CPU slots)."""
    import os

    masked = os.environ.get("CUDA_VISIBLE_DEVICES")
    if masked is not None:
        return [str(i) for i, d in enumerate(x for x in masked.split(",") if x.strip() and x.strip() != "-1")]
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: no GPUs to divide
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            out.append(u.decode() if isinstance(u, bytes) else str(u))
        return out
    finally:
        pynvml.nvmlShutdown()


def match_nvml(cuda: list[GpuInfo], nvml_uuids: list[str]) -> dict[int, int]:
    """CUDA index -> NVML index, matched by UUID; a CUDA device NVML does not list is an error."""
    by_uuid = {u: i for i, u in enumerate(nvml_uuids)}
    out = {}
    for d in cuda:
        if d.uuid not in by_uuid:
            raise ConfigError(f"CUDA device {d.index} ({d.uuid}) is not among NVML's devices: cannot match "
                              "its energy and power readings")
        out[d.index] = by_uuid[d.uuid]
    return out


def refuse_power_control(device: GpuInfo) -> None:
    """Power limits and clocks belong to the whole GPU, not to one MIG instance."""
    if device.mig:
        raise DevicePermissionError(
            f"device {device.index} is a MIG instance ({device.uuid}): its power limit and clocks are shared "
            "with the GPU's other instances, so Ember will not change them (run the energy controller in "
            "observe mode, or on whole GPUs)", code="mig_power_control")
