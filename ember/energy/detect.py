"""`detect_devices`: the GPUs this process may monitor, never crashing on a machine without any."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ember.energy.device import Device
from ember.energy.simulated import SimulatedGpu
from ember.errors import ConfigError, DeviceError, DevicePermissionError
from ember.platform.devices import GpuInfo, match_nvml, refuse_power_control

log = logging.getLogger(__name__)


def detect_devices(simulated: int = 0, *, allow_actuation: bool = False, live: bool = False,
                   gpus: Sequence[GpuInfo] | None = None) -> list[Device]:
    """`simulated` > 0: that many SimulatedGpus (sim:0..); with `live`, EmulatedGpus on the wall
    clock that the engine's steps drive (a worker's). Otherwise every NVML GPU, or [] when NVML,
    its driver or GPUs are missing; with `gpus` (a worker's own CUDA devices) only those, matched
    to NVML by UUID (`owned_nvml_devices`). `allow_actuation` is passed to NvmlDevice (default off)."""
    if simulated > 0:
        if live:
            from ember.energy.emulated import EmulatedGpu

            return [EmulatedGpu(f"sim:{i}") for i in range(simulated)]
        return [SimulatedGpu(f"sim:{i}") for i in range(simulated)]
    try:
        from ember.energy.nvml import NvmlDevice, nvml_device_count, nvml_uuids

        if gpus is not None:
            return owned_nvml_devices(gpus, nvml_uuids(), allow_actuation=allow_actuation)
        return [NvmlDevice(i, allow_actuation=allow_actuation) for i in range(nvml_device_count())]
    except ConfigError as e:  # a CUDA device NVML does not list: no readings we could attribute
        log.error("energy: %s; the energy agent is off on this worker", e)
        return []
    except DeviceError as e:
        log.info("no NVML devices: %s", e)
        return []
    except Exception as e:  # a broken driver stack must not take the worker down
        log.warning("NVML detection failed unexpectedly: %r", e)
        return []


def owned_nvml_devices(gpus: Sequence[GpuInfo], uuids: Sequence[str], *, allow_actuation: bool) -> list[Device]:
    """NvmlDevices for a worker's CUDA devices, matched to NVML's indices by UUID (never by
    position) and named by the worker's device ids (`cuda:<CUDA index>`), so readings and
    settings land on the GPU the worker serves from. A MIG instance has no power limit or clocks
    of its own: with actuation asked for it is refused (logged with the reason), and it is left
    out (NVML's readings are the whole GPU's, shared with other instances). ConfigError when a
    whole GPU is missing from NVML."""
    from ember.energy.nvml import NvmlDevice

    whole = []
    for g in gpus:
        if not g.mig:
            whole.append(g)
            continue
        if allow_actuation:
            try:
                refuse_power_control(g)
            except DevicePermissionError as e:
                log.error("energy: %s", e)
        log.warning("energy: %s is a MIG instance: no readings of its own, left out of the energy agent", g.uuid)
    index = match_nvml(whole, list(uuids))
    return [NvmlDevice(index[g.index], allow_actuation=allow_actuation, device_id=f"cuda:{g.index}") for g in whole]
