"""`NodeEnergyAgent`: what a worker runs for its GPUs (monitor + one controller per device).

The worker reports each finished request with `record_request`, calls `tick()` every few
seconds, and publishes `snapshot()` (one dict per device, the fields of GET /v1/energy's
"devices" entries) to Redis through ember.platform.energy_state.publish_device_snapshots.

The agent is also the engine's `StepListener` (ember.energy.steps): at `phase_starts` it switches
the device to the controller's clock for that phase (`phase_clocks`, actuate mode only), and at
`step_done` it charges an emulated GPU (ember.energy.emulated) with the step's GPU-equivalent work
at the setting the step ran under, then makes the engine wait the extra time that setting costs.

In actuate mode with a `SettingsJournal`, the devices' original settings are recorded before the
first change and restored by `close()` (or, after a kill, when the next agent starts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ember.energy.controller import PowerLimitController
from ember.energy.decision import Decision, Mode
from ember.energy.device import Device, energy_origin
from ember.energy.emulated import step_full_clock_s
from ember.energy.monitor import Attribution, EnergyMonitor, RequestRecord
from ember.energy.restore import JournaledDevice, SettingsJournal, locked_clock_mhz
from ember.energy.steps import EngineStep, Phase
from ember.errors import DeviceError

log = logging.getLogger(__name__)
RECENT_DECISIONS = 20


@dataclass
class _FunctionSlo:
    requests: int = 0
    met: int = 0


class NodeEnergyAgent:
    """Energy monitoring and control for the devices of one node."""

    def __init__(
        self,
        node_id: str,
        devices: Sequence[Device],
        mode: Mode = "recommend",
        *,
        warmup_requests: int = 0,
        journal: SettingsJournal | None = None,
        emulated_model_bytes: float = 0.0,
        **controller_kw: object,
    ) -> None:
        """warmup_requests: the first requests of each function on each device are measured and
        counted in its SLO attainment but not shown to the controller (on a GPU the first
        request of a process pays for loading kernels: one H100 run saw TTFT at 1.8x its SLO,
        which ended profiling at once).
        journal: where actuate mode keeps original settings; settings a killed process left in it
        are restored first, in any mode. emulated_model_bytes: emulated GPUs charge every step as if
        the model had this many weight bytes (0: the size the engine reports)."""
        self.node_id = node_id
        self.warmup_requests = warmup_requests
        self.journal = journal if mode == "actuate" else None
        self.raw_devices = list(devices)
        if self.journal is not None:
            self.journal.restore(self.raw_devices)  # left over from a process that was killed
            devices = [JournaledDevice(d, self.journal) for d in devices]  # type: ignore[misc]
        elif journal is not None and journal.originals:
            # A killed actuate process left its changes, and this one only observes or recommends:
            # those changes are Ember's own and are undone (else the GPU stays capped for good).
            journal.restore([d.restorer() if hasattr(d, "restorer") else d for d in self.raw_devices])
        self.emulated_model_bytes = float(emulated_model_bytes)
        self.aliases: dict[str, str] = {}  # the worker's device ids ("cpu:0") -> energy device ids
        self._local = threading.local()  # per engine thread: the clock its current step runs at
        self._switch_lock = threading.Lock()
        self._closed = False
        self.monitor = EnergyMonitor(devices)
        self.controllers = {d.device_id: PowerLimitController(d, mode=mode, **controller_kw) for d in devices}  # type: ignore[arg-type]
        self._slo: dict[tuple[str, str], _FunctionSlo] = {}
        self._last_power: dict[str, tuple[float, float]] = {
            d.device_id: (d.now_s(), d.energy_j()) for d in devices
        }
        self._avg_power_w: dict[str, float] = {}

    def record_request(
        self,
        function: str,
        device_id: str,
        tokens: int,
        ttft_s: float,
        tpot_s: float,
        ttft_slo_s: float,
        tpot_slo_s: float,
        eta: float = 0.5,
        busy_s: float | None = None,
    ) -> None:
        """Report one finished request (latencies in seconds, eta the function's Zeus cost knob)."""
        record = RequestRecord(
            function, device_id, tokens, ttft_s, tpot_s, ttft_slo_s, tpot_slo_s, eta, busy_s
        )
        self.monitor.record_request(record)
        slo = self._slo.setdefault((device_id, function), _FunctionSlo())
        if slo.requests >= self.warmup_requests:
            self.controllers[record.device_id].observe(record)
        slo.requests += 1
        slo.met += int(record.meets_slo)

    # --- the engine's phase signal (StepListener) ---
    def device_for(self, device_id: str) -> str | None:
        """The energy device id for a worker device id (itself, an alias, or None)."""
        if device_id in self.controllers:
            return device_id
        return self.aliases.get(device_id)

    def phase_starts(self, device_id: str, phase: Phase) -> None:
        """Switch the device to the clock the controller wants for `phase` (actuate mode with
        phase_clocks), and remember the clock this thread's step runs at."""
        dev_id = self.device_for(device_id)
        if dev_id is None:
            return
        controller = self.controllers[dev_id]
        dev = controller.device
        setting = controller.setting
        want = setting.prefill_sm_clock_mhz if phase == "prefill" else setting.sm_clock_mhz
        clock = locked_clock_mhz(dev)
        if controller.mode == "actuate" and controller.phase_clocks and not self._closed:
            with self._switch_lock:
                if locked_clock_mhz(dev) != want:
                    try:
                        dev.lock_sm_clock_mhz(want)
                    except DeviceError as e:
                        log.warning("energy %s: per-phase clock switch refused: %s", dev_id, e)
                clock = locked_clock_mhz(dev)
        self._local.clock = (dev_id, phase, clock)

    def step_done(self, step: EngineStep) -> None:
        """Charge an emulated device with the step's GPU-equivalent work and wait the extra time
        its setting costs (real GPUs: nothing to do, their counters run by themselves)."""
        dev_id = self.device_for(step.device_id)
        if dev_id is None:
            return
        dev = self.controllers[dev_id].device
        charge = getattr(dev, "charge", None)
        if charge is None:
            return
        started = getattr(self._local, "clock", None)
        clock = started[2] if started and started[0] == dev_id and started[1] == step.phase else locked_clock_mhz(dev)
        model_bytes = self.emulated_model_bytes or float(step.model_bytes)
        full_s = step_full_clock_s(step.phase, step.tokens, step.batch_size, model_bytes)
        elapsed = charge(step.phase, full_s, clock)
        if elapsed > full_s:
            time.sleep(elapsed - full_s)

    def close(self) -> list[str]:
        """Stop switching clocks and put every changed device back as it was found."""
        self._closed = True
        if self.journal is None:
            return []
        with self._switch_lock:
            return self.journal.restore(self.raw_devices)

    def tick(self, now: float | None = None) -> tuple[list[Attribution], list[Decision]]:
        """Attribute energy since the last tick and step every controller."""
        attributions = self.monitor.attribute()
        decisions = []
        for device_id, controller in self.controllers.items():
            dev = controller.device
            t0, e0 = self._last_power[device_id]
            t1, e1 = dev.now_s(), dev.energy_j()
            if t1 > t0:
                self._avg_power_w[device_id] = (e1 - e0) / (t1 - t0)
            self._last_power[device_id] = (t1, e1)
            decision = controller.step(now)
            if decision is not None:
                decisions.append(decision)
        return attributions, decisions

    def set_caps_w(self, caps_w: dict[str, float | None]) -> None:
        """Apply the allocator's per-device power caps (device id -> watts, None: uncapped)."""
        for device_id, watts in caps_w.items():
            if device_id in self.controllers:
                self.controllers[device_id].set_cap_w(watts)

    def function_slo(self, device_id: str) -> dict[str, dict[str, float | int]]:
        """Per function on a device: requests, attainment, joules per token."""
        out: dict[str, dict[str, float | int]] = {}
        for (dev, function), slo in self._slo.items():
            if dev != device_id:
                continue
            energy = self.monitor.functions.get(function)
            out[function] = {
                "requests": slo.requests,
                "slo_attainment": slo.met / slo.requests if slo.requests else 1.0,
                "j_per_token": (energy.j_per_token if energy and energy.j_per_token is not None else 0.0),
            }
        return out

    def snapshot(self) -> list[dict[str, object]]:
        """One dict per device with the fields of GET /v1/energy's "devices" entries, plus the
        allocator's inputs (avg_power_w, pressure, functions, cap_w, max_limit_w, min_limit_w)."""
        out = []
        for device_id, controller in self.controllers.items():
            dev = controller.device
            last = controller.last_decision
            window = controller.last_window
            lo, hi = dev.power_limit_range_w()
            out.append(
                {
                    "node": self.node_id,
                    "device": device_id,
                    "power_w": round(dev.power_w(), 3),
                    "limit_w": round(dev.power_limit_w(), 3),
                    "sm_clock_mhz": round(dev.sm_clock_mhz(), 1),
                    "energy_j": round(dev.energy_j(), 3),
                    "energy_origin": energy_origin(dev),
                    "j_per_token": self.monitor.device_j_per_token(device_id),
                    "slo_attainment": controller.slo_attainment,
                    "mode": controller.mode,
                    "last_decision": None
                    if last is None
                    else {
                        "at_s": last.at_s,
                        "reason": last.reason,
                        "limit_w": last.setting.power_limit_w,
                        "sm_clock_mhz": last.setting.sm_clock_mhz,
                        "applied": last.applied,
                    },
                    "recommended_limit_w": controller.setting.power_limit_w,
                    "recommended_sm_clock_mhz": controller.setting.sm_clock_mhz,
                    "avg_power_w": round(self._avg_power_w.get(device_id, dev.power_w()), 3),
                    "pressure": 0.0
                    if window is None or window.requests == 0
                    else round(max(window.ttft_ratio_p95, window.tpot_ratio_p95), 4),
                    "cap_w": controller.cap_w,
                    "min_limit_w": lo,
                    "max_limit_w": hi,
                    "functions": self.function_slo(device_id),
                    "last_error": controller.last_error,
                    "phase_clocks": controller.phase_clocks,
                    "clock_switches": getattr(dev, "clock_switch_count", None),
                    "prefill_sm_clock_mhz": controller.setting.prefill_sm_clock_mhz,
                    "decisions": [
                        {"at_s": round(d.at_s, 3), "reason": d.reason, "applied": d.applied,
                         "limit_w": d.setting.power_limit_w, "sm_clock_mhz": d.setting.sm_clock_mhz,
                         "prefill_sm_clock_mhz": d.setting.prefill_sm_clock_mhz}
                        for d in list(controller.decisions)[-RECENT_DECISIONS:]
                    ],
                }
            )
        return out
