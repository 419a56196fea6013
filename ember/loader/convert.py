"""Convert a Hugging Face safetensors directory into Ember's format, bit-exactly, and verify one.

Nothing is unpickled: safetensors headers are parsed as JSON and tensor bytes are copied as
bytes. Pickle checkpoints (.bin, .pt, .pth, .ckpt, .pkl) are refused with UnsafeFormat.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

from ember.errors import CheckpointError, CheckpointNotFound, IntegrityError, UnsafeFormat
from ember.loader.format import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_PARTITION_BYTES,
    DTYPES,
    FILES_DIR,
    MANIFEST_FILE,
    CheckpointManifest,
    ModelFile,
    PartitionEntry,
    TensorEntry,
    aligned,
    chunk_hash_available,
    chunk_hasher,
    default_chunk_hash,
    parse_manifest,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MODEL_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
MAX_MODEL_FILE_BYTES = 256 << 20
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20
_COPY_BYTES = 8 << 20

SAFE_CONVERSION_HINT = (
    "Pickle files can run code when loaded, so Ember never opens them. Convert them once, in an "
    "isolated environment you trust, e.g.: python -c \"from transformers import "
    "AutoModelForCausalLM as M; M.from_pretrained('SRC').save_pretrained('OUT', "
    "safe_serialization=True)\", then `ember checkpoint convert OUT DST`."
)


def is_converted(path: Path) -> bool:
    """Whether `path` is an Ember checkpoint directory (has manifest.json)."""
    return (Path(path) / MANIFEST_FILE).is_file()


def convert_checkpoint(
    src: Path | str,
    dst: Path | str,
    *,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> CheckpointManifest:
    """Convert HF safetensors in `src` (one file or sharded with an index) into `dst`.

    `dst` is written under a temporary name and renamed into place, so a failed conversion
    leaves nothing behind. `progress(n)` is called with each number of tensor bytes copied.
    """
    src, dst = Path(src), Path(dst)
    shards = find_safetensors(src)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"destination {dst} exists and is not empty")
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        manifest = _convert_into(src, shards, tmp, partition_bytes, chunk_bytes, progress)
        fsync_tree(tmp)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def verify_checkpoint(path: Path | str) -> dict:
    """Check every partition (size, sha256, chunk hashes) and model file; IntegrityError if bad."""
    path = Path(path)
    manifest = read_manifest(path)
    for p in manifest.partitions:
        file = path / p.file
        if not file.is_file():
            raise CheckpointError(f"partition {p.file} is missing")
        size = file.stat().st_size
        if size != p.size:
            raise CheckpointError(f"partition {p.file} is {size} bytes, the manifest says {p.size} (truncated?)")
        sha, chunks = hash_file(file, manifest.chunk_bytes, manifest.chunk_hash)
        if sha != p.sha256:
            raise IntegrityError(f"partition {p.file}: sha256 mismatch")
        if chunk_hash_available(manifest.chunk_hash) and tuple(chunks) != p.chunks:
            bad = next(i for i, (a, b) in enumerate(zip(chunks, p.chunks, strict=False)) if a != b)
            raise IntegrityError(f"partition {p.file}: chunk {bad} hash mismatch")
    for f in manifest.files:
        file = path / FILES_DIR / f.path
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != f.sha256:
            raise IntegrityError(f"model file {f.path} is missing or does not match its sha256")
    return {
        "ok": True,
        "tensors": len(manifest.tensors),
        "partitions": len(manifest.partitions),
        "tensor_bytes": manifest.tensor_nbytes,
        "files": [f.path for f in manifest.files],
    }


def read_manifest(path: Path | str) -> CheckpointManifest:
    """Parse `path/manifest.json`."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointNotFound(f"no Ember checkpoint at {path} (no {MANIFEST_FILE})")
    return parse_manifest(file.read_bytes())


def find_safetensors(src: Path) -> list[Path]:
    """The safetensors shards of an HF directory in load order; refuses pickle-only directories."""
    if not src.is_dir():
        raise CheckpointNotFound(f"no such directory: {src}")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index.name} is not a valid safetensors index: {e}") from e
        shards: list[Path] = []
        for shard in weight_map.values():
            if "/" in shard or "\\" in shard or shard.startswith(".") or not shard.endswith(".safetensors"):
                raise CheckpointError(f"index names an unsafe shard path {shard!r}")
            if src / shard not in shards:
                shards.append(src / shard)
        shards.sort()
        for s in shards:
            if not s.is_file():
                raise CheckpointError(f"index names shard {s.name}, which is missing")
        return shards
    shards = sorted(p for p in src.glob("*.safetensors") if p.is_file())
    if shards:
        return shards
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormat(f"{src} holds only pickle checkpoints ({', '.join(pickles)}). {SAFE_CONVERSION_HINT}")
    raise CheckpointError(f"{src} holds no .safetensors files")


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file, validated against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path.name}: header length {n} is out of bounds")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise CheckpointError(f"{path.name}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not an object")
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path.name}: tensor {name} has a malformed entry") from e
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has unknown dtype {dtype!r}")
        if not isinstance(shape, list):
            raise CheckpointError(f"{path.name}: tensor {name} has a bad shape {shape!r}")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b and start + b <= size):
            raise CheckpointError(f"{path.name}: tensor {name} offsets {a}..{b} are out of bounds")
        count = 1
        for d in shape:
            if not isinstance(d, int) or isinstance(d, bool) or d < 0:
                raise CheckpointError(f"{path.name}: tensor {name} has a bad shape {shape!r}")
            count *= d
        if count * DTYPES[dtype][1] != b - a:
            raise CheckpointError(f"{path.name}: tensor {name} size does not match shape and dtype")
    return start, header


def hash_file(path: Path, chunk_bytes: int, chunk_hash: str) -> tuple[str, list[str]]:
    """(sha256, per-chunk hashes) of a file, read once."""
    sha = hashlib.sha256()
    hasher = chunk_hasher(chunk_hash) if chunk_hash_available(chunk_hash) else None
    chunks: list[str] = []
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk_bytes)
            if not buf:
                break
            sha.update(buf)
            if hasher:
                chunks.append(hasher(buf))
    return sha.hexdigest(), chunks


# --- conversion internals ---------------------------------------------------------------------
class _PartitionWriter:
    """Writes one partition file sequentially, hashing whole-file and per chunk as it goes."""

    def __init__(self, path: Path, chunk_bytes: int, chunk_hash: str) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.size = 0
        self.sha = hashlib.sha256()
        self.chunk_bytes = chunk_bytes
        self.hasher = chunk_hasher(chunk_hash)
        self.pending = bytearray()
        self.chunks: list[str] = []

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)
        self.pending += data
        while len(self.pending) >= self.chunk_bytes:
            self.chunks.append(self.hasher(bytes(self.pending[: self.chunk_bytes])))
            del self.pending[: self.chunk_bytes]

    def pad_to(self, offset: int) -> None:
        if offset > self.size:
            self.write(bytes(offset - self.size))

    def close(self) -> PartitionEntry:
        self.pad_to(aligned(self.size))
        if self.pending:
            self.chunks.append(self.hasher(bytes(self.pending)))
            self.pending.clear()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return PartitionEntry(self.path.name, self.size, self.sha.hexdigest(), tuple(self.chunks))


def _convert_into(
    src: Path,
    shards: list[Path],
    out: Path,
    partition_bytes: int,
    chunk_bytes: int,
    progress: Callable[[int], None] | None,
) -> CheckpointManifest:
    kind = default_chunk_hash()
    tensors: list[TensorEntry] = []
    partitions: list[PartitionEntry] = []
    writer: _PartitionWriter | None = None
    seen: set[str] = set()
    for shard in shards:
        start, header = read_safetensors_header(shard)
        items = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
        )
        with open(shard, "rb") as f:
            for name, info in items:
                if name in seen:
                    raise CheckpointError(f"tensor {name} appears in two shards")
                seen.add(name)
                a, b = info["data_offsets"]
                nbytes = b - a
                if writer is None or (writer.size and aligned(writer.size) + nbytes > partition_bytes):
                    if writer is not None:
                        partitions.append(writer.close())
                    writer = _PartitionWriter(out / f"part-{len(partitions):05d}.bin", chunk_bytes, kind)
                writer.pad_to(aligned(writer.size))
                tensors.append(
                    TensorEntry(name, info["dtype"], tuple(info["shape"]), len(partitions), writer.size, nbytes)
                )
                f.seek(start + a)
                left = nbytes
                while left:
                    buf = f.read(min(_COPY_BYTES, left))
                    if not buf:
                        raise CheckpointError(f"{shard.name} ends inside tensor {name}")
                    writer.write(buf)
                    left -= len(buf)
                    if progress:
                        progress(len(buf))
    if writer is not None:
        partitions.append(writer.close())
    files = _copy_model_files(src, out / FILES_DIR)
    manifest = CheckpointManifest(
        tensors=tuple(tensors), partitions=tuple(partitions), files=tuple(files), chunk_bytes=chunk_bytes, chunk_hash=kind
    )
    parse_manifest(manifest.to_json())  # what we write must pass our own validation
    (out / MANIFEST_FILE).write_bytes(manifest.to_json())
    return manifest


def _copy_model_files(src: Path, out: Path) -> list[ModelFile]:
    out.mkdir()
    files = []
    for p in sorted(src.iterdir()):
        if (
            not p.is_file()
            or p.suffix not in MODEL_FILE_SUFFIXES
            or p.name.endswith(".safetensors.index.json")
            or p.stat().st_size > MAX_MODEL_FILE_BYTES
        ):
            continue
        data = p.read_bytes()
        (out / p.name).write_bytes(data)
        files.append(ModelFile(p.name, len(data), hashlib.sha256(data).hexdigest()))
    return files


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (before a rename makes it visible)."""
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
