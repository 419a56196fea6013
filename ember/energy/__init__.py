"""GPU energy: devices (NVML, simulated), monitor, SLO-aware controller, node agent, budgets.

Imports only the standard library, numpy and nvidia-ml-py (lazily), so it runs on GPU machines
without the platform's dependencies.
"""

from __future__ import annotations

from ember.energy.detect import detect_devices
from ember.energy.device import Device
from ember.energy.simulated import SimulatedGpu

__all__ = ["Device", "SimulatedGpu", "detect_devices"]
