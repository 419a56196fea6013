"""`NvmlDevice`: a real NVIDIA GPU through nvidia-ml-py (`pynvml`).

Reads need no privilege. Setting a power limit or locking clocks needs root AND an explicit
`allow_actuation=True` here; the controller also calls the setters only in `actuate` mode, so a
process on a shared GPU machine can never change a setting by accident. Every NVML error becomes
an Ember DeviceError subclass at this boundary.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

from ember.errors import DeviceError, DevicePermissionError, DeviceSettingOutOfRange

log = logging.getLogger(__name__)


def nvml_device_count() -> int:
    """Number of NVIDIA GPUs NVML sees (initialising NVML); DeviceError when NVML is unusable."""
    pynvml = _nvml()
    return int(_call(pynvml.nvmlDeviceGetCount))


def nvml_uuids() -> list[str]:
    """Every NVML GPU's UUID, by NVML index."""
    pynvml = _nvml()
    out = []
    for i in range(int(_call(pynvml.nvmlDeviceGetCount))):
        u = _call(pynvml.nvmlDeviceGetUUID, _call(pynvml.nvmlDeviceGetHandleByIndex, i))
        out.append(u.decode() if isinstance(u, bytes) else str(u))
    return out


class NvmlDevice:
    """GPU `index` as a `Device`. Units: NVML's mW/mJ are converted to W/J here."""

    def __init__(self, index: int, *, allow_actuation: bool = False, device_id: str | None = None) -> None:
        """`index`: NVML's index; `device_id`: the name the worker uses (its CUDA device, matched
        by UUID: CUDA and NVML may number GPUs differently), default `cuda:<index>`."""
        self._nvml = _nvml()
        self.index = index
        self.device_id = device_id or f"cuda:{index}"
        self.allow_actuation = allow_actuation
        self._handle = _call(self._nvml.nvmlDeviceGetHandleByIndex, index)
        name = _call(self._nvml.nvmlDeviceGetName, self._handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self._locked_mhz: float | None = None
        self._supported_mhz: tuple[float, ...] | None = None
        # NVML's total-energy counter runs from the driver's load: a new boot is a new origin
        self.energy_origin = _boot_id()

    def now_s(self) -> float:
        return time.monotonic()

    def power_w(self) -> float:
        return _call(self._nvml.nvmlDeviceGetPowerUsage, self._handle) / 1000.0

    def energy_j(self) -> float:
        return _call(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle) / 1000.0

    def power_limit_w(self) -> float:
        return _call(self._nvml.nvmlDeviceGetPowerManagementLimit, self._handle) / 1000.0

    def power_limit_range_w(self) -> tuple[float, float]:
        lo, hi = _call(self._nvml.nvmlDeviceGetPowerManagementLimitConstraints, self._handle)
        return lo / 1000.0, hi / 1000.0

    def default_power_limit_w(self) -> float:
        return _call(self._nvml.nvmlDeviceGetPowerManagementDefaultLimit, self._handle) / 1000.0

    def sm_clock_mhz(self) -> float:
        if self._locked_mhz is not None:
            return self._locked_mhz
        return float(_call(self._nvml.nvmlDeviceGetClockInfo, self._handle, self._nvml.NVML_CLOCK_SM))

    def locked_sm_clock_mhz(self) -> float | None:
        """The clock lock this process set (None: unlocked; NVML has no getter for it)."""
        return self._locked_mhz

    def max_sm_clock_mhz(self) -> float:
        return float(_call(self._nvml.nvmlDeviceGetMaxClockInfo, self._handle, self._nvml.NVML_CLOCK_SM))

    def supported_sm_clocks_mhz(self) -> tuple[float, ...]:
        """The graphics clocks NVML lists at the highest memory clock, highest first (read once;
        empty when NVML cannot list them, so no clock is ever locked)."""
        if self._supported_mhz is None:
            try:
                mem_mhz = max(_call(self._nvml.nvmlDeviceGetSupportedMemoryClocks, self._handle))
                clocks = _call(self._nvml.nvmlDeviceGetSupportedGraphicsClocks, self._handle, mem_mhz)
                self._supported_mhz = tuple(sorted({float(c) for c in clocks}, reverse=True))
            except (DeviceError, ValueError) as e:  # not supported by the GPU or driver, or none listed
                log.warning("energy: %s: no supported SM clocks listed (%s); clocks stay unlocked", self.device_id, e)
                self._supported_mhz = ()
        return self._supported_mhz

    def memory_bytes(self) -> int:
        return int(_call(self._nvml.nvmlDeviceGetMemoryInfo, self._handle).total)

    def can_actuate(self) -> bool:
        """Whether setters would be attempted: enabled here and running as root."""
        return self.allow_actuation and _is_root()

    def set_power_limit_w(self, watts: float) -> None:
        self._check_actuation("set the power limit")
        lo, hi = self.power_limit_range_w()
        if not lo <= watts <= hi:
            raise DeviceSettingOutOfRange(f"{self.device_id}: power limit {watts} W outside {lo}-{hi} W")
        _call(self._nvml.nvmlDeviceSetPowerManagementLimit, self._handle, int(round(watts * 1000)))

    def lock_sm_clock_mhz(self, mhz: float | None) -> None:
        self._check_actuation("lock SM clocks")
        if mhz is None:
            _call(self._nvml.nvmlDeviceResetGpuLockedClocks, self._handle)
            self._locked_mhz = None
            return
        supported = self.supported_sm_clocks_mhz()
        if mhz not in supported:
            listed = f"{supported[-1]:.0f}-{supported[0]:.0f} MHz" if supported else "none listed"
            raise DeviceSettingOutOfRange(f"{self.device_id}: SM clock {mhz} MHz is not a supported clock ({listed})")
        _call(self._nvml.nvmlDeviceSetGpuLockedClocks, self._handle, int(mhz), int(mhz))
        self._locked_mhz = float(int(mhz))

    def restorer(self) -> NvmlDevice:
        """This GPU with its setters allowed, only to put back settings Ember itself changed (a
        settings journal left by a killed actuate process, found by a process that only observes)."""
        other = copy.copy(self)
        other.allow_actuation = True
        return other

    def _check_actuation(self, what: str) -> None:
        if not self.allow_actuation:
            raise DevicePermissionError(f"{self.device_id}: refusing to {what}: actuation is not enabled")
        if not _is_root():
            raise DevicePermissionError(f"{self.device_id}: cannot {what}: NVML needs root")


# --- helpers ----------------------------------------------------------------------------------
_initialised = False


def _nvml() -> Any:
    """pynvml, initialised once; DeviceError if the library or the driver is missing."""
    global _initialised
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py not installed
        raise DeviceError("nvidia-ml-py (pynvml) is not installed") from e
    if not _initialised:
        _call(pynvml.nvmlInit)
        _initialised = True
    return pynvml


def _call(fn: Any, *args: Any) -> Any:
    """Call an NVML function, mapping NVMLError to Ember's DeviceError family."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError as e:
        value = getattr(e, "value", None)
        if value == pynvml.NVML_ERROR_NO_PERMISSION:
            raise DevicePermissionError(f"NVML: {e}") from e
        if value == pynvml.NVML_ERROR_INVALID_ARGUMENT:
            raise DeviceSettingOutOfRange(f"NVML: {e}") from e
        raise DeviceError(f"NVML: {e}") from e


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _boot_id() -> str:
    try:
        return "boot:" + Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
