"""A worker's energy wiring: its `NodeEnergyAgent` (started over this worker's own GPUs, read-only
unless configured), the agent's tick and publication on every heartbeat, and each request's
joules and latencies fed to it. A base class of `WorkerNode`, which owns the state it reads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ember.config import Settings
from ember.platform.cluster import DeviceSpec, InstanceRecord, RedisCluster
from ember.platform.runtime.engine import ModelInstance
from ember.platform.wire import GenerateRequest

log = logging.getLogger("ember.platform.worker.node")  # its records keep the worker node's logger name


class WorkerEnergy:
    """The energy half of `WorkerNode`: `energy` is the agent (None: no energy agent)."""

    settings: Settings
    cluster: RedisCluster
    data_dir: Path
    node_id: str
    devices: list[DeviceSpec]
    instances: dict[str, ModelInstance]
    records: dict[str, InstanceRecord]
    energy: Any
    energy_device_ids: list[str]

    def _start_energy_agent(self) -> None:
        try:
            from ember.energy import detect_devices
            from ember.energy.agent import NodeEnergyAgent
        except ImportError:
            return
        from ember.energy.restore import SettingsJournal
        from ember.platform.devices import GpuInfo

        s = self.settings
        gpus = [GpuInfo(int(d.device_id.partition(":")[2]), d.uuid, d.memory_bytes)
                for d in self.devices if d.device_id.startswith("cuda:")]
        # this worker's GPUs only (two workers on one machine never control each other's), matched
        # to NVML by UUID; simulated devices stand in for whatever this worker serves on
        devices = detect_devices(simulated=s.simulated_gpus, allow_actuation=s.energy_mode == "actuate", live=True,
                                 gpus=gpus if gpus else None)
        if devices:
            # actuate mode: original limits and clocks are persisted before the first change and
            # restored on stop; a journal a killed process left behind is restored here first
            journal = SettingsJournal(self.data_dir / "energy" / "original_settings.json")
            self.energy = NodeEnergyAgent(self.node_id, devices, s.energy_mode, warmup_requests=1, journal=journal,
                                          emulated_model_bytes=s.simulated_params_b * 2e9,
                                          phase_clocks=s.energy_phase_clocks)
            self.energy_device_ids = [d.device_id for d in devices]
            for i, d in enumerate(self.devices):  # CPU slots are accounted on emulated GPUs by index
                # (a real GPU is its NVML device, same id; one NVML left out, a MIG instance, has none)
                if d.device_id not in self.energy_device_ids and (s.simulated_gpus > 0 or not d.device_id.startswith("cuda:")):
                    self.energy.aliases.setdefault(d.device_id, self.energy_device_ids[i % len(devices)])

    def _energy_tick(self) -> None:
        if self.energy is None:
            return
        self.energy.tick()
        try:
            from ember.platform.energy_state import publish_device_snapshots
        except ImportError:
            return
        caps_w = publish_device_snapshots(self.cluster.r, self.node_id, self.energy.snapshot(),
                                          ttl_s=self.settings.heartbeat_ttl_s * 3)
        self.energy.set_caps_w(caps_w)  # the cluster allocator's share of the power budget

    def _energy_device(self, inst: Any) -> str | None:
        """The energy agent's device that accounts for `inst` (None: none does)."""
        rec = self.records.get(inst.instance_id)
        return self.energy.device_for(rec.device_id if rec else self.devices[0].device_id)

    def begin_request_energy(self, inst: ModelInstance) -> tuple[str, float, int] | None:
        """Mark a request's start on its device's energy counter (None without an energy agent)."""
        if self.energy is None:
            return None
        try:  # a trace's joules must never fail the request
            device_id = self._energy_device(inst)
            if device_id is None:
                return None
            return device_id, self.energy.monitor.device(device_id).energy_j(), self._active_on(device_id)
        except Exception as e:  # noqa: BLE001 - NVML errors of every kind end here
            log.debug("no energy mark for %s: %r", inst.instance_id, e)
            return None

    def end_request_energy(self, mark: tuple[str, float, int] | None) -> float | None:
        """Joules the request's device drew since `mark`, split evenly among the requests running
        there (the others counted at its start and end, before and after it ran): its trace's share."""
        if mark is None or self.energy is None:
            return None
        device_id, start_j, active_then = mark
        try:
            drawn_j = max(0.0, self.energy.monitor.device(device_id).energy_j() - start_j)
        except Exception as e:  # noqa: BLE001 - as above
            log.debug("no energy reading on %s: %r", device_id, e)
            return None
        sharing = 1.0 + (active_then + self._active_on(device_id)) / 2  # the others, and this one
        return round(drawn_j / sharing, 6)

    def _active_on(self, device_id: str) -> int:
        return sum(getattr(i, "active", 0) for i in list(self.instances.values()) if self._energy_device(i) == device_id)

    def record_request(self, inst: ModelInstance, done: Any, req: GenerateRequest) -> None:
        """Feed the energy agent with the request's tokens, latencies and its function's SLO."""
        if self.energy is None:
            return
        device_id = self._energy_device(inst)
        if device_id is None:
            return
        self.energy.record_request(inst.function, device_id, done.completion_tokens, done.ttft_s, done.tpot_s,
                                   req.ttft_slo_s, req.tpot_slo_s, req.eta)
