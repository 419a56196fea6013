"""Ember's checkpoint format: a versioned JSON manifest plus partition files.

Layout of a converted checkpoint directory (the same in a file:// store, an S3 prefix and the
SSD tier)::

    manifest.json          format/version, tensors, partitions (size, sha256, chunk hashes), files
    part-00000.bin ...     tensor bytes, each tensor at a 4 KiB-aligned offset, files padded to 4 KiB
    files/config.json ...  the model's config, generation config, tokenizer files, chat template

Partitions are hashed twice: sha256 over the whole file (checked when an entry enters the SSD
tier) and a fast hash per `chunk_bytes` chunk (xxh3-64, or crc32 when xxhash is missing), checked
as each chunk lands in memory on every load.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from ember.errors import CheckpointError

FORMAT_NAME = "ember-checkpoint"
FORMAT_VERSION = 1
ALIGN_BYTES = 4096
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_PARTITION_BYTES = 2 << 30
MANIFEST_FILE = "manifest.json"
FILES_DIR = "files"
MAX_MANIFEST_BYTES = 256 << 20
# A sanity bound, not a capacity: anything larger is a forged or corrupted manifest.
MAX_CLAIMED_BYTES = 64 << 40

_PARTITION_FILE = re.compile(r"part-[0-9]{5}\.bin")
_MODEL_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# safetensors dtype string -> (torch dtype attribute name, itemsize in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
    "C64": ("complex64", 8),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: where its bytes are and how to view them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PartitionEntry:
    """One partition file: padded size, sha256 of the whole file, fast hash per chunk."""

    file: str
    size: int
    sha256: str
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class ModelFile:
    """A small model file (config, tokenizer, chat template) kept beside the tensors."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointManifest:
    """The parsed, validated manifest of one checkpoint."""

    tensors: tuple[TensorEntry, ...]
    partitions: tuple[PartitionEntry, ...]
    files: tuple[ModelFile, ...]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    chunk_hash: str = "xxh3_64"
    alignment: int = ALIGN_BYTES
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_nbytes(self) -> int:
        """Total tensor bytes (what `checkpoint_nbytes` reports)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        """Total partition bytes (padded): what a tier holds for this checkpoint."""
        return sum(p.size for p in self.partitions)

    def partition_bases(self) -> list[int]:
        """Offset of each partition in one buffer that holds all partitions back to back."""
        bases, pos = [], 0
        for p in self.partitions:
            bases.append(pos)
            pos += p.size
        return bases

    def to_json(self) -> bytes:
        """Serialize (stable key order)."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "alignment": self.alignment,
            "chunk_bytes": self.chunk_bytes,
            "chunk_hash": self.chunk_hash,
            "tensor_bytes": self.tensor_nbytes,
            "partitions": [
                {"file": p.file, "size": p.size, "sha256": p.sha256, "chunks": list(p.chunks)}
                for p in self.partitions
            ],
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "partition": t.partition,
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                }
                for t in self.tensors
            ],
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
            **({"extra": self.extra} if self.extra else {}),
        }
        return json.dumps(doc, indent=1).encode()


def parse_manifest(data: bytes) -> CheckpointManifest:
    """Parse and validate a manifest; every inconsistency raises CheckpointError naming it."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"manifest is not valid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError("manifest is not an Ember checkpoint manifest (format field)")
    if doc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format version {doc.get('version')!r}")
    try:
        alignment = _int(doc.get("alignment", ALIGN_BYTES), "alignment")
        chunk_bytes = _int(doc["chunk_bytes"], "chunk_bytes")
        chunk_hash = str(doc["chunk_hash"])
        if chunk_hash not in ("xxh3_64", "crc32"):
            raise CheckpointError(f"unknown chunk hash {chunk_hash!r}")
        if alignment != ALIGN_BYTES or chunk_bytes <= 0 or chunk_bytes % ALIGN_BYTES:
            raise CheckpointError("alignment must be 4096 and chunk_bytes a positive multiple of it")
        partitions = tuple(_parse_partition(p, chunk_bytes) for p in doc["partitions"])
        tensors = tuple(_parse_tensor(t, partitions) for t in doc["tensors"])
        files = tuple(_parse_file(f) for f in doc.get("files", []))
        extra = doc.get("extra") or {}
        if not isinstance(extra, dict):
            raise CheckpointError(f"manifest field extra must be an object, got {type(extra).__name__}")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"manifest is missing or mistypes a field: {e!r}") from e
    if len({p.file for p in partitions}) != len(partitions):
        raise CheckpointError("manifest lists a partition file twice")
    if len({t.name for t in tensors}) != len(tensors):
        raise CheckpointError("manifest lists a tensor name twice")
    if len({f.path for f in files}) != len(files):
        raise CheckpointError("manifest lists a model file twice")
    total = sum(p.size for p in partitions)
    if total > MAX_CLAIMED_BYTES:
        raise CheckpointError(f"manifest claims {total} bytes of partitions: not a plausible checkpoint")
    _check_overlaps(tensors, partitions)
    return CheckpointManifest(
        tensors=tensors,
        partitions=partitions,
        files=files,
        chunk_bytes=chunk_bytes,
        chunk_hash=chunk_hash,
        alignment=alignment,
        extra=dict(extra),
    )


def chunk_count(size: int, chunk_bytes: int) -> int:
    """Number of hash chunks of a partition of `size` bytes."""
    return max(1, math.ceil(size / chunk_bytes)) if size else 0


def chunk_hasher(kind: str):
    """A callable bytes-like -> hex digest for the manifest's chunk hash."""
    if kind == "xxh3_64":
        import xxhash  # a soft dependency: absent, callers fall back to sha256 per partition

        return lambda buf: xxhash.xxh3_64_hexdigest(buf)
    if kind == "crc32":
        return lambda buf: f"{zlib.crc32(buf):08x}"
    raise CheckpointError(f"unknown chunk hash {kind!r}")


class _Crc32:
    """zlib.crc32 with the update/hexdigest shape of a streaming hash."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, buf) -> None:
        self.value = zlib.crc32(buf, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def chunk_stream_hasher(kind: str):
    """A new streaming hasher (update(buf), hexdigest()) for the manifest's chunk hash; its digest
    over pieces equals chunk_hasher's over the whole."""
    if kind == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64()
    if kind == "crc32":
        return _Crc32()
    raise CheckpointError(f"unknown chunk hash {kind!r}")


def default_chunk_hash() -> str:
    """xxh3-64 when xxhash is installed, else crc32."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def chunk_hash_available(kind: str) -> bool:
    """Whether this process can compute `kind`."""
    if kind == "xxh3_64":
        try:
            import xxhash  # noqa: F401
        except ImportError:
            return False
    return True


def sha256_hex(buf) -> str:
    """sha256 of a bytes-like object."""
    return hashlib.sha256(buf).hexdigest()


def torch_dtype(dtype: str):
    """The torch dtype of a safetensors dtype string; CheckpointError when unknown here."""
    import torch

    if dtype not in DTYPES or not hasattr(torch, DTYPES[dtype][0]):
        raise CheckpointError(f"unknown or unsupported tensor dtype {dtype!r}")
    return getattr(torch, DTYPES[dtype][0])


def aligned(n: int) -> int:
    """`n` rounded up to the 4 KiB alignment."""
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


# --- validation helpers ----------------------------------------------------------------------
def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"manifest field {what} must be a non-negative integer, got {value!r}")
    return value


def _parse_partition(p: dict, chunk_bytes: int) -> PartitionEntry:
    file = str(p["file"])
    if not _PARTITION_FILE.fullmatch(file):
        raise CheckpointError(f"bad partition file name {file!r} (expected part-NNNNN.bin)")
    size = _int(p["size"], f"{file}.size")
    if size % ALIGN_BYTES:
        raise CheckpointError(f"partition {file} size {size} is not a multiple of {ALIGN_BYTES}")
    if size > MAX_CLAIMED_BYTES:
        raise CheckpointError(f"partition {file} claims {size} bytes: not a plausible checkpoint")
    chunks = tuple(str(c) for c in p["chunks"])
    if len(chunks) != chunk_count(size, chunk_bytes):
        raise CheckpointError(f"partition {file} lists {len(chunks)} chunk hashes for {size} bytes")
    sha = str(p["sha256"])
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CheckpointError(f"partition {file} has a malformed sha256")
    return PartitionEntry(file=file, size=size, sha256=sha, chunks=chunks)


def _parse_tensor(t: dict, partitions: tuple[PartitionEntry, ...]) -> TensorEntry:
    name = t["name"]
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"bad tensor name {name!r}")
    dtype = str(t["dtype"])
    if dtype not in DTYPES:
        raise CheckpointError(f"tensor {name}: unknown dtype {dtype!r}")
    shape = tuple(_int(d, f"{name}.shape") for d in t["shape"])
    part = _int(t["partition"], f"{name}.partition")
    offset = _int(t["offset"], f"{name}.offset")
    nbytes = _int(t["nbytes"], f"{name}.nbytes")
    if part >= len(partitions):
        raise CheckpointError(f"tensor {name}: partition {part} out of range ({len(partitions)} partitions)")
    if nbytes != math.prod(shape) * DTYPES[dtype][1]:
        raise CheckpointError(f"tensor {name}: nbytes {nbytes} does not match shape {shape} and dtype {dtype}")
    if offset % ALIGN_BYTES:
        raise CheckpointError(f"tensor {name}: offset {offset} is not 4 KiB aligned")
    if offset + nbytes > partitions[part].size:
        raise CheckpointError(
            f"tensor {name}: bytes {offset}..{offset + nbytes} are out of bounds of "
            f"{partitions[part].file} ({partitions[part].size} bytes)"
        )
    return TensorEntry(name=name, dtype=dtype, shape=shape, partition=part, offset=offset, nbytes=nbytes)


def _parse_file(f: dict) -> ModelFile:
    path = str(f["path"])
    if not _MODEL_FILE.fullmatch(path) or ".." in path:
        raise CheckpointError(f"bad model file name {path!r} (plain file names only)")
    sha = str(f["sha256"])
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CheckpointError(f"model file {path} has a malformed sha256")
    return ModelFile(path=path, size=_int(f["size"], f"{path}.size"), sha256=sha)


def _check_overlaps(tensors: tuple[TensorEntry, ...], partitions: tuple[PartitionEntry, ...]) -> None:
    by_part: dict[int, list[TensorEntry]] = {}
    for t in tensors:
        if t.nbytes:
            by_part.setdefault(t.partition, []).append(t)
    for part, items in by_part.items():
        items.sort(key=lambda t: t.offset)
        for a, b in zip(items, items[1:], strict=False):
            if a.offset + a.nbytes > b.offset:
                raise CheckpointError(
                    f"tensors {a.name} and {b.name} overlap in {partitions[part].file}"
                )
