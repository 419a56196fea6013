"""Loading a checkpoint from a local converted directory (an SSD-tier entry): every chunk into the
DRAM pool's new entry when it fits (else private memory) and on to the device, the manifest, the
model files and every chunk verified on the way."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.loader import vm
from ember.loader.device import DeviceUpload
from ember.loader.format import FILES_DIR, MANIFEST_FILE, CheckpointManifest
from ember.loader.identity import CheckpointIdentity
from ember.loader.pipeline import open_partitions, read_from_fds, tensors_from_buffer
from ember.loader.verify import verified_manifest, verify_files

if TYPE_CHECKING:
    from ember.loader.dram import DramEntry
    from ember.loader.tiers import NodeTiers


def load_local(tiers: NodeTiers, ident: CheckpointIdentity, directory: Path, dev, dram_keep: int = 0):
    """SSD (or any local converted directory) -> DRAM pool (when it fits, as an entry with retention
    priority `dram_keep`) -> device. The manifest, the model files and every chunk are verified;
    CheckpointError if one differs.
    Returns (state dict, manifest, DRAM entry or None, model files directory)."""
    import torch

    manifest = verified_manifest(directory, ident)
    verify_files(directory, manifest)
    key = ident.key
    fds = open_partitions(directory, manifest, None)  # opened now: eviction cannot pull files away
    try:
        entry = _dram_entry(tiers, ident, directory, manifest, dram_keep)
        if entry is None:
            return read_private(tiers, manifest, fds, dev) + (None, directory / FILES_DIR)
        try:
            view = tiers.dram.writable_view(entry)
            dest = tiers.dram.rw_slice(entry) if view is None else view.array()
            up = DeviceUpload(manifest.total_bytes, dev) if dev.type == "cuda" else None
            on_chunk = tiers.pool_uploader(entry, up) if up is not None else None
            read_from_fds(
                fds, manifest, memoryview(dest), threads=tiers.threads, on_chunk=on_chunk,
                stage_direct=not tiers.dram.huge_pages,
            )
            entry, done = commit_or_private(tiers, entry, view, dest, up is not None)
        except BaseException:
            tiers.dram.abort(key)
            raise
        buf = up.finish() if up is not None else torch.from_numpy(done)
        files = entry.meta_dir if entry is not None else directory
        return tensors_from_buffer(manifest, buf), manifest, entry, files / FILES_DIR
    finally:
        for fd, _ in fds:
            os.close(fd)


def _dram_entry(tiers: NodeTiers, ident: CheckpointIdentity, directory: Path, manifest: CheckpointManifest,
                keep: int):
    """A new DRAM entry for the checkpoint with its manifest and model files copied beside it, or
    None when the pool cannot hold it. A shared-memory directory that cannot take the files (a
    full /dev/shm: ENOSPC) is the DRAM tier's trouble, not the SSD entry's: the entry is given up
    and the load serves from private memory."""
    entry = None
    try:
        entry = tiers.dram.allocate(ident.key, manifest.total_bytes, ref=ident.ref, keep=keep)
        if entry is not None:
            copy_meta(directory, entry.meta_dir)
        return entry
    except OSError as e:
        with contextlib.suppress(OSError):
            tiers.dram.abort(ident.key)
        tiers.dram.cannot_write(e)
        return None
    except BaseException:
        if entry is not None:
            tiers.dram.abort(ident.key)
        raise


def commit_or_private(tiers: NodeTiers, entry: DramEntry, view, dest, on_device: bool,
                      beside: Callable[[], None] | None = None) -> tuple[DramEntry | None, Any]:
    """Make a filled DRAM entry ready (after `beside()`: what still goes beside it) and return
    (entry, its bytes read-only). A DRAM tier that cannot write now (a full /dev/shm: OSError)
    costs the DRAM copy, never the load: the entry is given up (said once in the log) and the bytes
    are copied out to private memory (a device load has them on the device already): (None, them)."""
    try:
        if beside is not None:
            beside()
        done = tiers.dram.filled_view(entry, view)
        return tiers.dram.commit(entry.name), done
    except OSError as e:
        tiers.dram.cannot_write(e)
    if not on_device:
        private = vm.anonymous(max(entry.nbytes, 1), touch=False)
        private.array()[: entry.nbytes] = dest[: entry.nbytes]
        dest = private.array()
    with contextlib.suppress(OSError):  # on a tmpfs this full, the entry goes with this process
        tiers.dram.abort(entry.name)
    return None, dest


def read_private(tiers: NodeTiers, manifest: CheckpointManifest, fds, dev):
    """A checkpoint larger than the DRAM pool: read into private (pinned on CUDA) memory.
    Returns (state dict, manifest)."""
    import torch

    if dev.type == "cuda":
        host = torch.empty(manifest.total_bytes, dtype=torch.uint8, pin_memory=True)
        up = DeviceUpload(manifest.total_bytes, dev)

        def on_chunk(at: int, n: int) -> None:
            up.copy(host[at : at + n], at)

        read_from_fds(fds, manifest, memoryview(host.numpy()), threads=tiers.threads, on_chunk=on_chunk)
        return tensors_from_buffer(manifest, up.finish()), manifest
    mapping = vm.anonymous(max(manifest.total_bytes, 1), touch=False)
    read_from_fds(fds, manifest, mapping.memoryview(), threads=tiers.threads)
    return tensors_from_buffer(manifest, torch.from_numpy(mapping.array())), manifest


def copy_meta(src: Path, meta_dir: Path) -> None:
    """Copy manifest and model files of a local checkpoint beside a DRAM entry."""
    shutil.copyfile(src / MANIFEST_FILE, meta_dir / MANIFEST_FILE)
    if (src / FILES_DIR).is_dir():
        shutil.copytree(src / FILES_DIR, meta_dir / FILES_DIR, dirs_exist_ok=True)
    else:
        (meta_dir / FILES_DIR).mkdir(exist_ok=True)
