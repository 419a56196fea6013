"""Actuate mode gives GPUs back as it found them: originals recorded (and persisted) before the first
change, restored by close(), and by the next agent after a SIGKILL. NVML devices here have their
NVML calls replaced by recorders (no real NVML setter is ever called); per-phase clocks set the
recorder's locked clocks at each phase start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ember.energy import nvml
from ember.energy.agent import NodeEnergyAgent
from ember.energy.restore import SettingsJournal
from ember.energy.simulated import SimulatedGpu

RECORDER = textwrap.dedent(
    """
    from ember.energy import nvml
    from ember.energy.nvml import NvmlDevice


    class RecorderNvml:
        NVML_CLOCK_SM = 1

        def __init__(self, limit_mw=650_000):
            self.calls = []
            self.limit_mw = limit_mw

        def nvmlDeviceGetPowerManagementLimit(self, h): return self.limit_mw
        def nvmlDeviceGetPowerManagementLimitConstraints(self, h): return (200_000, 700_000)
        def nvmlDeviceGetPowerManagementDefaultLimit(self, h): return 700_000
        def nvmlDeviceGetMaxClockInfo(self, h, clock): return 1980
        def nvmlDeviceGetClockInfo(self, h, clock): return 1980
        def nvmlDeviceGetPowerUsage(self, h): return 300_000
        def nvmlDeviceGetTotalEnergyConsumption(self, h): return 1_000_000
        def nvmlDeviceGetSupportedMemoryClocks(self, h): return [2619]
        def nvmlDeviceGetSupportedGraphicsClocks(self, h, mem): return list(range(1980, 209, -15))

        def nvmlDeviceSetPowerManagementLimit(self, h, mw):
            self.calls.append(("limit_w", mw / 1000))
            self.limit_mw = mw

        def nvmlDeviceSetGpuLockedClocks(self, h, lo, hi): self.calls.append(("lock_mhz", lo))
        def nvmlDeviceResetGpuLockedClocks(self, h): self.calls.append(("reset", None))


    def recorder_device(index=0, limit_mw=650_000):
        rec = RecorderNvml(limit_mw)
        dev = object.__new__(NvmlDevice)
        dev._nvml, dev._handle, dev.index = rec, object(), index
        dev.device_id, dev.name, dev.allow_actuation, dev._locked_mhz = f"cuda:{index}", "recorder", True, None
        dev._supported_mhz = None
        nvml._is_root = lambda: True  # setters reach the recorder, never a real GPU
        return dev, rec
    """
)
_ns: dict[str, Any] = {}
exec(compile(RECORDER, "recorder", "exec"), _ns)
recorder_device = _ns["recorder_device"]


@pytest.fixture(autouse=True)
def _restore_root_check() -> Any:
    original = nvml._is_root
    yield
    nvml._is_root = original


def _slack(agent: NodeEnergyAgent, device: str, windows: int = 3) -> None:
    for _ in range(windows):
        for _ in range(4):
            agent.record_request("chat", device, 32, 0.01, 0.005, 1.0, 0.2)
        agent.tick()


def test_simulated_device_is_restored_on_close(tmp_path: Path) -> None:
    gpu = SimulatedGpu("sim:0")
    gpu.set_power_limit_w(600)  # someone's setting before the worker started
    journal = SettingsJournal(tmp_path / "original_settings.json")
    agent = NodeEnergyAgent("n1", [gpu], "actuate", journal=journal, profile_windows=1, min_requests=2)
    assert json.loads(journal.path.read_text()) == {"sim:0": {"power_limit_w": 600.0, "sm_clock_mhz": None}}
    _slack(agent, "sim:0")
    assert gpu.power_limit_w() == 700 and gpu.locked_sm_clock_mhz() is not None  # the controller's doing
    assert agent.close() == ["sim:0"]
    assert gpu.power_limit_w() == 600 and gpu.locked_sm_clock_mhz() is None
    assert not journal.path.exists()


def test_recommend_mode_never_records_or_touches(tmp_path: Path) -> None:
    dev, rec = recorder_device()
    agent = NodeEnergyAgent("n1", [dev], "recommend", journal=SettingsJournal(tmp_path / "j.json"))
    _slack(agent, "cuda:0")
    agent.phase_starts("cuda:0", "prefill")
    assert agent.close() == [] and rec.calls == [] and not (tmp_path / "j.json").exists()


def test_nvml_per_phase_clocks_and_restore_with_recorders(tmp_path: Path) -> None:
    dev, rec = recorder_device()
    agent = NodeEnergyAgent("n1", [dev], "actuate", journal=SettingsJournal(tmp_path / "j.json"),
                            phase_clocks=True, profile_windows=1, min_requests=2)
    # the first change (the controller's start at the top of the ladder) came after the originals
    assert json.loads((tmp_path / "j.json").read_text()) == {"cuda:0": {"power_limit_w": 650.0, "sm_clock_mhz": None}}
    assert rec.calls[0] == ("limit_w", 700.0)
    _slack(agent, "cuda:0")
    decode_mhz = agent.controllers["cuda:0"].setting.sm_clock_mhz
    assert decode_mhz is not None
    rec.calls.clear()
    for _ in range(2):
        agent.phase_starts("cuda:0", "prefill")
        agent.phase_starts("cuda:0", "decode")
        agent.phase_starts("cuda:0", "decode")  # no switch when the clock is already right
    assert rec.calls == [("reset", None), ("lock_mhz", int(decode_mhz))] * 2
    rec.calls.clear()
    assert agent.close() == ["cuda:0"]
    assert rec.calls == [("limit_w", 650.0), ("reset", None)]
    agent.phase_starts("cuda:0", "prefill")  # after close: no more switching
    assert len(rec.calls) == 2


def test_settings_left_by_a_killed_worker_are_restored_at_the_next_start(tmp_path: Path) -> None:
    journal = tmp_path / "energy" / "original_settings.json"
    child = RECORDER + textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from ember.energy.agent import NodeEnergyAgent
        from ember.energy.restore import SettingsJournal

        dev, rec = recorder_device(limit_mw=650_000)
        agent = NodeEnergyAgent("n1", [dev], "actuate", journal=SettingsJournal(Path({str(journal)!r})))
        dev.set_power_limit_w(300)  # as a budget cap would
        os.kill(os.getpid(), signal.SIGKILL)  # no close(): nothing restored
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], env={**os.environ}, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert json.loads(journal.read_text()) == {"cuda:0": {"power_limit_w": 650.0, "sm_clock_mhz": None}}
    # the next start: the GPU is still at what the killed process left (300 W)
    dev, rec = recorder_device(limit_mw=300_000)
    NodeEnergyAgent("n1", [dev], "actuate", journal=SettingsJournal(journal))
    assert rec.calls[:2] == [("limit_w", 650.0), ("reset", None)]


@pytest.mark.parametrize("mode", ["observe", "recommend"])
def test_settings_a_killed_actuator_left_are_restored_by_a_worker_that_only_observes(tmp_path: Path,
                                                                                       mode: str) -> None:
    """The worker comes back in observe or recommend mode after an actuate process was killed: the
    300 W cap it left is Ember's own change and is undone (before, the journal was skipped outside
    actuate mode and the GPU stayed capped until some later actuate start); then nothing more."""
    journal = tmp_path / "original_settings.json"
    journal.write_text(json.dumps({"cuda:0": {"power_limit_w": 650.0, "sm_clock_mhz": None}}))
    dev, rec = recorder_device(limit_mw=300_000)
    dev.allow_actuation = False  # as detect_devices gives it outside actuate mode
    agent = NodeEnergyAgent("n1", [dev], mode, journal=SettingsJournal(journal))
    assert rec.calls == [("limit_w", 650.0), ("reset", None)] and not journal.exists()
    assert dev.allow_actuation is False  # the agent's own device still cannot set anything
    _slack(agent, "cuda:0")
    agent.phase_starts("cuda:0", "prefill")
    assert agent.close() == [] and len(rec.calls) == 2
