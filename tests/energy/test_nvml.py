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
