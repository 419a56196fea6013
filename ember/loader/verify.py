"""Checks of a local tier entry against its identity: the manifest's digest, the model files'
sha256, the chunk hash of every byte. Each raises IntegrityError (or CheckpointError) naming what differs."""

from __future__ import annotations

from pathlib import Path

from ember.errors import CheckpointError, IntegrityError
from ember.loader.format import (
    FILES_DIR,
    MANIFEST_FILE,
    CheckpointManifest,
    chunk_hash_available,
    chunk_hasher,
    parse_manifest,
)
from ember.loader.identity import CheckpointIdentity, manifest_digest
from ember.loader.pipeline import run_parallel


def verified_manifest(directory: Path, ident: CheckpointIdentity) -> CheckpointManifest:
    """The manifest of a local entry, if its bytes are the identity's; IntegrityError otherwise."""
    try:
        raw = (directory / MANIFEST_FILE).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{directory / MANIFEST_FILE} cannot be read: {e}") from e
    if manifest_digest(raw) != ident.digest:
        raise IntegrityError(f"{directory / MANIFEST_FILE}: digest differs from {ident.ref}")
    return parse_manifest(raw)


def verify_files(directory: Path, manifest: CheckpointManifest) -> None:
    """Every model file (config, tokenizer, ...) against its sha256 in the manifest."""
    for f in manifest.files:
        path = directory / FILES_DIR / f.path
        try:
            data = path.read_bytes()
        except OSError as e:
            raise IntegrityError(f"{path} cannot be read: {e}") from e
        check_file_bytes(data, f, str(path))


def check_file_bytes(data: bytes, entry: object, where: str) -> None:
    """One model file's bytes against its manifest entry (size and sha256)."""
    import hashlib

    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:  # type: ignore[attr-defined]
        raise IntegrityError(f"{where}: sha256 mismatch")


def verify_chunks(manifest: CheckpointManifest, buf, threads: int) -> None:
    """Every chunk of a buffer holding all partitions back to back against its hash (sha256 per
    partition where the fast chunk hash is not available); IntegrityError names the first bad one."""
    import numpy as np

    mv = memoryview(np.ascontiguousarray(buf)).cast("B")
    if not chunk_hash_available(manifest.chunk_hash):
        import hashlib

        for base, p in zip(manifest.partition_bases(), manifest.partitions, strict=False):
            if hashlib.sha256(mv[base : base + p.size]).hexdigest() != p.sha256:
                raise IntegrityError(f"partition {p.file}: sha256 mismatch")
        return
    hasher = chunk_hasher(manifest.chunk_hash)
    jobs = []
    for base, p in zip(manifest.partition_bases(), manifest.partitions, strict=False):
        for i, off in enumerate(range(0, p.size, manifest.chunk_bytes)):
            jobs.append((p, i, base + off, min(manifest.chunk_bytes, p.size - off)))

    def run(job) -> None:
        p, i, at, n = job
        if hasher(mv[at : at + n]) != p.chunks[i]:
            raise IntegrityError(f"partition {p.file}: chunk {i} fails its checksum")

    run_parallel(run, jobs, threads, "ember-read")
