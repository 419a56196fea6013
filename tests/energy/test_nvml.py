"""NvmlDevice on a machine without GPUs: detection falls back, errors map to Ember errors, and
setters refuse unless actuation was explicitly enabled (no GPU here, so only these paths run)."""

from __future__ import annotations

import pynvml
import pytest

from ember.energy import detect_devices
from ember.energy.nvml import NvmlDevice, _call, nvml_device_count
from ember.errors import DeviceError, DevicePermissionError, DeviceSettingOutOfRange


def test_detect_devices_never_crashes_without_gpus() -> None:
    assert detect_devices() == []
    sims = detect_devices(simulated=3)
    assert [d.device_id for d in sims] == ["sim:0", "sim:1", "sim:2"]


def test_nvml_unavailable_is_a_device_error() -> None:
    with pytest.raises(DeviceError):
        nvml_device_count()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (pynvml.NVML_ERROR_NO_PERMISSION, DevicePermissionError),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, DeviceSettingOutOfRange),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, DeviceError),
    ],
)
def test_nvml_errors_map_to_ember_errors(code: int, error: type[DeviceError]) -> None:
    def fails() -> None:
        raise pynvml.NVMLError(code)

    with pytest.raises(error) as info:
        _call(fails)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)


def test_setters_refuse_without_explicit_actuation() -> None:
    dev = object.__new__(NvmlDevice)  # no GPU here: skip the NVML handle, keep the guard
    dev.device_id, dev.allow_actuation = "cuda:0", False
    dev._nvml = None  # any NVML call would fail loudly
    with pytest.raises(DevicePermissionError, match="not enabled"):
        dev.set_power_limit_w(300)
    with pytest.raises(DevicePermissionError, match="not enabled"):
        dev.lock_sm_clock_mhz(1500)
    assert dev.can_actuate() is False


class _FakeNvml:
    """NVML's device listing as a driver would answer it (no setters: nothing may change)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, uuids: list[str]) -> None:
        self.uuids = uuids

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's names
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802
        return self.uuids[handle].encode()

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return "NVIDIA H200"


def test_a_worker_gets_its_own_gpus_matched_by_uuid(monkeypatch, caplog) -> None:
    """A worker that owns CUDA devices 0 and 1 (CUDA_VISIBLE_DEVICES reordered them) gets the
    NVML devices with those UUIDs, named by its CUDA ids; another worker's GPU is not among them;
    a MIG instance is left out and, in actuate mode, its power control is refused by name."""
    from ember.energy import nvml
    from ember.platform.devices import GpuInfo

    monkeypatch.setattr(nvml, "_nvml", lambda: _FakeNvml(["GPU-a", "GPU-b", "GPU-c", "GPU-d"]))
    mine = [GpuInfo(0, "GPU-c", 1 << 30), GpuInfo(1, "GPU-a", 1 << 30)]
    devices = detect_devices(gpus=mine)
    assert [(d.device_id, d.index) for d in devices] == [("cuda:0", 2), ("cuda:1", 0)]
    assert all(not d.allow_actuation for d in devices)

    with caplog.at_level("WARNING"):
        devices = detect_devices(gpus=[GpuInfo(0, "MIG-x", 1 << 30), GpuInfo(1, "GPU-d", 1 << 30)],
                                 allow_actuation=True)
    assert [(d.device_id, d.index) for d in devices] == [("cuda:1", 3)]
    assert "MIG instance" in caplog.text and "will not change them" in caplog.text

    # a CUDA device NVML does not list: no readings could be attributed, the agent stays off
    assert detect_devices(gpus=[GpuInfo(0, "GPU-zz", 1 << 30)]) == []


class _FakeClocksNvml(_FakeNvml):
    """One H100 as NVML lists its clocks (graphics clocks 15 MHz apart, fewer at a lower memory
    clock); lock calls are recorded, never sent to a driver."""

    NVML_CLOCK_SM = 1

    def __init__(self, graphics_mhz: list[int] | None = None) -> None:
        super().__init__(["GPU-a"])
        self.graphics_mhz = list(range(1980, 209, -15)) if graphics_mhz is None else graphics_mhz
        self.locks: list[tuple[int, int]] = []

    def nvmlDeviceGetMaxClockInfo(self, handle: int, kind: int) -> int:  # noqa: N802
        return 1980

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: int) -> list[int]:  # noqa: N802
        return [1593, 2619]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: int, mem_mhz: int) -> list[int]:  # noqa: N802
        return self.graphics_mhz if mem_mhz == 2619 else self.graphics_mhz[::2]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return (200_000, 700_000)

    def nvmlDeviceGetPowerManagementLimit(self, handle: int) -> int:  # noqa: N802
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802
        return 0

    def nvmlDeviceSetGpuLockedClocks(self, handle: int, lo: int, hi: int) -> None:  # noqa: N802
        self.locks.append((lo, hi))

    def nvmlDeviceResetGpuLockedClocks(self, handle: int) -> None:  # noqa: N802
        self.locks.append((0, 0))


def test_sm_clock_locks_are_the_clocks_nvml_lists(monkeypatch) -> None:
    """NvmlDevice lists the graphics clocks at the top memory clock and refuses any other lock; the
    controller's ladder snaps to them, so in actuate mode it only ever locks listed clocks."""
    from ember.energy import nvml
    from ember.energy.controller import PowerLimitController

    fake = _FakeClocksNvml()
    monkeypatch.setattr(nvml, "_nvml", lambda: fake)
    monkeypatch.setattr(nvml, "_is_root", lambda: True)
    dev = NvmlDevice(0, allow_actuation=True)
    with pytest.raises(DeviceSettingOutOfRange, match="not a supported clock"):
        dev.lock_sm_clock_mhz(1881)  # 0.95 x 1980, between two listed clocks
    assert fake.locks == []
    dev.lock_sm_clock_mhz(1875)
    assert fake.locks == [(1875, 1875)] and dev.sm_clock_mhz() == 1875
    assert dev.supported_sm_clocks_mhz() == tuple(float(c) for c in fake.graphics_mhz)

    ctrl = PowerLimitController(dev, mode="actuate")  # starts unlocked at the top
    assert fake.locks[-1] == (0, 0) and ctrl.mode == "actuate"
    ladder = [c for c in ctrl._clocks if c is not None]
    assert ladder and set(ladder) <= set(dev.supported_sm_clocks_mhz())
    assert ladder == sorted(ladder, reverse=True) and len(set(ladder)) == len(ladder)

    # a GPU whose driver lists no clocks: nothing is locked, the controller keeps the power limit knob
    bare = _FakeClocksNvml(graphics_mhz=[])
    monkeypatch.setattr(nvml, "_nvml", lambda: bare)
    dev = NvmlDevice(0, allow_actuation=True)
    with pytest.raises(DeviceSettingOutOfRange):
        dev.lock_sm_clock_mhz(1980)
    assert PowerLimitController(dev, mode="recommend")._clocks == [None] and bare.locks == []
