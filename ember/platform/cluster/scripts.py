"""The cluster's Lua scripts: read once from the package's lua/ folder, registered per client.

A file named lib_*.lua holds local functions; a script that uses one says so in its header and is
registered with the library prepended (Redis scripts cannot import)."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

_USES = {
    "remove_instance": ("lib_remove",),
    "evict_if_idle": ("lib_remove",),
    "drain": ("lib_remove",),
    "reap_stuck": ("lib_remove",),
    "heartbeat": ("lib_remove",),
    "drop_node": ("lib_drop_node",),
    "reap_dead": ("lib_drop_node",),
    "snapshot_nodes": ("lib_node_entry",),
    "decision_snapshot": ("lib_node_entry",),
    "devices_with_room": ("lib_node_entry",),
}

SCRIPT_NAMES = (
    "register", "heartbeat", "claim", "restore", "begin_load", "mark_ready", "drain", "remove_instance",
    "evict_if_idle", "reap_stuck", "drop_node", "reap_dead", "acquire_warm", "release_request", "renew_slots",
    "lease", "snapshot_nodes", "decision_snapshot", "devices_with_room",
)


@functools.cache
def source(name: str) -> str:
    """A script's text with the libraries it uses prepended (read from package data once)."""
    folder = resources.files("ember.platform.cluster") / "lua"
    parts = [(folder / f"{lib}.lua").read_text() for lib in _USES.get(name, ())]
    parts.append((folder / f"{name}.lua").read_text())
    return "\n".join(parts)


class Scripts:
    """Every cluster script registered on one client (sync or asyncio): `scripts.claim(keys=..., args=...)`."""

    def __init__(self, client: Any, names: tuple[str, ...] = SCRIPT_NAMES) -> None:
        for name in names:
            setattr(self, name, client.register_script(source(name)))

    def __getattr__(self, name: str) -> Any:  # for type checkers: attributes are set in __init__
        raise AttributeError(name)
