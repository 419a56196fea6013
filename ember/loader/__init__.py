"""Ember's checkpoint loader: a loading-optimized format and the remote -> SSD -> DRAM -> device tiers.

Imports only torch, numpy, safetensors (and optionally xxhash, nvidia-ml-py) and ember.errors;
boto3 only when an s3:// store is used. Submodules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "NodeTiers",
    "LoadedCheckpoint",
    "load_state_dict",
    "build_model",
    "open_store",
    "CheckpointStore",
    "CheckpointInfo",
    "CheckpointManifest",
    "convert_checkpoint",
    "verify_checkpoint",
    "validate_name",
]

_EXPORTS = {
    "NodeTiers": "ember.loader.tiers",
    "LoadedCheckpoint": "ember.loader.tiers",
    "load_state_dict": "ember.loader.api",
    "build_model": "ember.loader.model",
    "open_store": "ember.loader.store",
    "CheckpointStore": "ember.loader.store",
    "CheckpointInfo": "ember.loader.store",
    "CheckpointManifest": "ember.loader.format",
    "convert_checkpoint": "ember.loader.convert",
    "verify_checkpoint": "ember.loader.convert",
    "validate_name": "ember.loader.names",
}

if TYPE_CHECKING:
    from ember.loader.api import load_state_dict
    from ember.loader.convert import convert_checkpoint, verify_checkpoint
    from ember.loader.format import CheckpointManifest
    from ember.loader.model import build_model
    from ember.loader.names import validate_name
    from ember.loader.store import CheckpointInfo, CheckpointStore, open_store
    from ember.loader.tiers import LoadedCheckpoint, NodeTiers


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ember.loader' has no attribute {name!r}")
