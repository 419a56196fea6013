"""The request slots of the streams each instance of this worker serves, as the gateway names them
(`SLOT_HEADER`). When Redis forgets an instance (a restart, its node reaped) the worker restores it
with these slots, so its `outstanding` still counts the streams running on it and each gateway's
release of its slot still finds it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ServingSlots:
    """Instance id -> the slots of its running streams (changed on the event loop, read by the
    heartbeat thread when it registers again)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_instance: dict[str, set[str]] = {}

    @contextmanager
    def held(self, instance_id: str, slot: str) -> Iterator[None]:
        """The slot counts for the instance while the block (one stream) runs; "" counts nothing."""
        if slot:
            with self._lock:
                self._by_instance.setdefault(instance_id, set()).add(slot)
        try:
            yield
        finally:
            if slot:
                with self._lock:
                    held = self._by_instance.get(instance_id)
                    if held is not None:
                        held.discard(slot)
                        if not held:
                            del self._by_instance[instance_id]

    def of(self, instance_id: str) -> list[str]:
        """The slots the instance's running streams hold."""
        with self._lock:
            return sorted(self._by_instance.get(instance_id, ()))
