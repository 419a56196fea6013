"""The `Device` protocol: what the monitor and controller may ask of a GPU, real or simulated.

Units are in the names: watts (`_w`), joules (`_j`), megahertz (`_mhz`), seconds (`_s`).
Reads never change anything; the two setters are the only actuation and are called by the
controller only in `actuate` mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Device(Protocol):
    """A GPU as the energy subsystem sees it. `NvmlDevice` and `SimulatedGpu` implement it."""

    device_id: str  # "cuda:0", "sim:1", ...
    name: str  # "NVIDIA H100 80GB HBM3", "SimulatedGpu(H100 SXM)"

    def now_s(self) -> float:
        """The device's clock in seconds (monotonic wall time, or simulated time)."""
        ...

    def power_w(self) -> float:
        """Current (or last-interval average) board power draw in watts."""
        ...

    def energy_j(self) -> float:
        """Total energy drawn since an arbitrary origin, in joules (monotonic). A device may also
        name that origin in an `energy_origin` string attribute (see `energy_origin`): a reading
        under another origin is a counter that started again from zero."""
        ...

    def power_limit_w(self) -> float:
        """The power limit in force, in watts."""
        ...

    def power_limit_range_w(self) -> tuple[float, float]:
        """(min, max) power limit the device accepts, in watts."""
        ...

    def default_power_limit_w(self) -> float:
        """The factory power limit, in watts."""
        ...

    def sm_clock_mhz(self) -> float:
        """Current SM clock in MHz (the locked clock if one is set, else the maximum it may run at)."""
        ...

    def max_sm_clock_mhz(self) -> float:
        """The highest SM clock, in MHz."""
        ...

    def supported_sm_clocks_mhz(self) -> Sequence[float]:
        """The SM clocks the device can be locked at, in MHz, highest first (empty: unknown, so
        the clock is never locked)."""
        ...

    def set_power_limit_w(self, watts: float) -> None:
        """Set the power limit. Raises DevicePermissionError / DeviceSettingOutOfRange."""
        ...

    def lock_sm_clock_mhz(self, mhz: float | None) -> None:
        """Lock the SM clock at `mhz`, one of `supported_sm_clocks_mhz()` (None: unlock, back to
        default boost behaviour)."""
        ...


def energy_origin(device: object) -> str:
    """What the device's energy counter counts from ("" when it does not say): the cluster's daily
    energy count takes a reading under another origin as a counter restarted from zero, even when
    it has already climbed past the last reading."""
    return str(getattr(device, "energy_origin", "") or "")


def nearest_clock_mhz(mhz: float, supported: Sequence[float]) -> float | None:
    """The supported clock nearest `mhz` (the higher of two as near; None when none is known)."""
    if not supported:
        return None
    return float(min(supported, key=lambda c: (abs(c - mhz), -c)))


def describe(device: Device) -> dict[str, float | str]:
    """A plain dict of the device's readings (for logs and snapshots)."""
    return {
        "device": device.device_id,
        "name": device.name,
        "power_w": round(device.power_w(), 3),
        "energy_j": round(device.energy_j(), 3),
        "limit_w": round(device.power_limit_w(), 3),
        "sm_clock_mhz": round(device.sm_clock_mhz(), 1),
    }
