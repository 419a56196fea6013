"""Checkpoints already on a GPU: one copy per (tier entry, device), shared by the instances that
load it there (counted), dropped with the last of them. A load that finds its checkpoint here is
a "gpu" tier hit: no bytes move."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.loader.format import CheckpointManifest


@dataclass
class _Copy:
    state_dict: dict[str, Any]
    manifest: CheckpointManifest
    files: Path
    name: str
    on_drop: Callable[[], None] | None = None  # lets go of what keeps `files` there
    holders: int = 1


class DeviceCopies:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[tuple[str, str], _Copy] = {}

    def take(self, key: str, device: str) -> _Copy | None:
        """The copy of entry `key` on `device`, with one more holder (give it back with
        `release`), or None when that device holds none."""
        with self._lock:
            copy = self._copies.get((key, device))
            if copy is not None:
                copy.holders += 1
            return copy

    def hold(self, key: str, device: str, state_dict: dict[str, Any], manifest: CheckpointManifest, files: Path,
             name: str, on_drop: Callable[[], None] | None = None) -> None:
        """A copy just loaded onto `device`, held by its loader; `on_drop` is called when the
        copy goes with its last holder."""
        with self._lock:
            self._copies[(key, device)] = _Copy(state_dict, manifest, files, name, on_drop)

    def release(self, key: str, device: str) -> bool:
        """One holder less; the copy goes with the last (then True)."""
        with self._lock:
            copy = self._copies.get((key, device))
            if copy is None:
                return False
            copy.holders -= 1
            if copy.holders > 0:
                return False
            del self._copies[(key, device)]
        if copy.on_drop is not None:
            copy.on_drop()
        return True
