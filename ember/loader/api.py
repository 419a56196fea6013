"""`load_state_dict`: one call, like safetensors.torch.load_file, with the tiers underneath."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ember.errors import CheckpointNotFound

_tiers = None
_tiers_lock = threading.Lock()
_held: list = []  # loads made through this API stay pinned for the life of the process


def load_state_dict(source, device: str = "cpu") -> dict:
    """Tensors of a checkpoint: `source` is a local converted directory, a checkpoint name in
    the node's store (EMBER_STORE_URL), or a URI (file:///abs/store/NAME, s3://bucket/prefix/NAME).

    A local directory is read straight into private memory (verified per chunk); a name or URI
    goes through the node's tiers (EMBER_DATA_DIR) and is cached there.
    """
    if isinstance(source, Path) or (isinstance(source, str) and "://" not in source and os.sep in source):
        return _load_directory(Path(source), device)
    if isinstance(source, str) and "://" not in source and Path(source).is_dir():
        return _load_directory(Path(source), device)
    loaded = node_tiers().load(str(source), device=device)
    _held.append(loaded)
    return loaded.state_dict


def node_tiers():
    """The process's NodeTiers, built from EMBER_* settings on first use."""
    global _tiers
    with _tiers_lock:
        if _tiers is None:
            from ember.loader.tiers import NodeTiers

            _tiers = NodeTiers.from_env()
        return _tiers


def _load_directory(path: Path, device: str) -> dict:
    import torch

    from ember.loader.convert import read_manifest
    from ember.loader.pipeline import read_partitions, tensors_from_buffer
    from ember.loader.vm import anonymous

    if not path.is_dir():
        raise CheckpointNotFound(f"no checkpoint directory {path}")
    manifest = read_manifest(path)
    dev = torch.device(device)
    if dev.type == "cuda":
        from ember.loader.device import DeviceUpload

        host = torch.empty(manifest.total_bytes, dtype=torch.uint8, pin_memory=True)
        up = DeviceUpload(manifest.total_bytes, dev)
        read_partitions(path, manifest, memoryview(host.numpy()), on_chunk=lambda at, n: up.copy(host[at : at + n], at))
        return tensors_from_buffer(manifest, up.finish())
    mapping = anonymous(max(manifest.total_bytes, 1), touch=False)
    read_partitions(path, manifest, mapping.memoryview())
    return tensors_from_buffer(manifest, torch.from_numpy(mapping.array()))
