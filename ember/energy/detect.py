"""`detect_devices`: the GPUs this process may monitor, never crashing on a machine without any."""

from __future__ import annotations

import logging

from ember.energy.device import Device
from ember.energy.simulated import SimulatedGpu
from ember.errors import DeviceError

log = logging.getLogger(__name__)


def detect_devices(simulated: int = 0, *, allow_actuation: bool = False, live: bool = False) -> list[Device]:
    """`simulated` > 0: that many SimulatedGpus (sim:0..); with `live`, EmulatedGpus on the wall
    clock that the engine's steps drive (a worker's). Otherwise every NVML GPU, or [] when NVML,
    its driver or GPUs are missing. `allow_actuation` is passed to NvmlDevice (default off)."""
    if simulated > 0:
        if live:
            from ember.energy.emulated import EmulatedGpu

            return [EmulatedGpu(f"sim:{i}") for i in range(simulated)]
        return [SimulatedGpu(f"sim:{i}") for i in range(simulated)]
    try:
        from ember.energy.nvml import NvmlDevice, nvml_device_count

        return [NvmlDevice(i, allow_actuation=allow_actuation) for i in range(nvml_device_count())]
    except DeviceError as e:
        log.info("no NVML devices: %s", e)
        return []
    except Exception as e:  # a broken driver stack must not take the worker down
        log.warning("NVML detection failed unexpectedly: %r", e)
        return []
