"""Give GPUs back as they were found: each device's original power limit and SM clock lock are
recorded (and persisted) before the first change, and restored on a clean stop, or at the next
start after the process was killed without one.

`SettingsJournal(path)` keeps {device id: {"power_limit_w", "sm_clock_mhz"}} in a JSON file
(written atomically, before the change it guards). `JournaledDevice(device, journal)` is the
device the controller and the agent get in actuate mode: its setters remember the originals
first, everything else goes to the device.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ember.energy.device import Device
from ember.errors import DeviceError

log = logging.getLogger(__name__)


def locked_clock_mhz(device: Any) -> float | None:
    """The SM clock lock a device has in force (None: unlocked, or the device cannot tell)."""
    getter = getattr(device, "locked_sm_clock_mhz", None)
    return getter() if callable(getter) else None


class SettingsJournal:
    """Original settings of the devices this process changed, persisted at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.originals: dict[str, dict[str, float | None]] = self._read()

    def remember(self, device: Device) -> None:
        """Record `device`'s settings now, unless already recorded (call before changing it)."""
        with self._lock:
            if device.device_id in self.originals:
                return
            self.originals[device.device_id] = {
                "power_limit_w": device.power_limit_w(),
                "sm_clock_mhz": locked_clock_mhz(device),
            }
            self._write()

    def restore(self, devices: Iterable[Device]) -> list[str]:
        """Put every recorded device back; forget those restored. Returns their ids."""
        done = []
        with self._lock:
            for dev in devices:
                orig = self.originals.get(dev.device_id)
                if orig is None:
                    continue
                try:
                    limit = orig.get("power_limit_w")
                    if limit is not None and dev.power_limit_w() != limit:
                        dev.set_power_limit_w(float(limit))
                    clock = orig.get("sm_clock_mhz")
                    dev.lock_sm_clock_mhz(None if clock is None else float(clock))
                except DeviceError as e:
                    log.warning("energy: could not restore %s to %s: %s", dev.device_id, orig, e)
                    continue
                log.info("energy: restored %s to %s", dev.device_id, orig)
                del self.originals[dev.device_id]
                done.append(dev.device_id)
            self._write()
        return done

    def _read(self) -> dict[str, dict[str, float | None]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("energy: unreadable settings journal %s (%s); ignoring it", self.path, e)
            return {}
        return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}

    def _write(self) -> None:
        if not self.originals:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.originals, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


class JournaledDevice:
    """`device` with setters that record its original settings in `journal` first."""

    def __init__(self, device: Device, journal: SettingsJournal) -> None:
        self.device = device
        self.journal = journal
        self.device_id = device.device_id
        self.name = device.name

    def set_power_limit_w(self, watts: float) -> None:
        self.journal.remember(self.device)
        self.device.set_power_limit_w(watts)

    def lock_sm_clock_mhz(self, mhz: float | None) -> None:
        self.journal.remember(self.device)
        self.device.lock_sm_clock_mhz(mhz)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device, name)
