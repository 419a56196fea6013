"""Conversion is bit-exact for every safetensors dtype; bad checkpoints are refused by name."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.errors import CheckpointError, IntegrityError, InvalidName, UnsafeFormat
from ember.loader import convert_checkpoint, load_state_dict, verify_checkpoint
from ember.loader.format import DTYPES, parse_manifest
from ember.loader.names import validate_name


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for code, (attr, size) in DTYPES.items():
        if not hasattr(torch, attr):
            continue
        dtype = getattr(torch, attr)
        raw = torch.randint(0, 256, (3 * 5 * size,), dtype=torch.uint8, generator=g)
        out[f"t_{code}"] = raw.view(dtype).reshape(3, 5)
    out["scalar"] = torch.tensor(3.5, dtype=torch.float32)
    out["empty"] = torch.empty(0, 4, dtype=torch.float16)
    out["odd"] = torch.arange(7, dtype=torch.int8)  # 7 bytes: the next tensor must still be aligned
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


def test_every_dtype_round_trips_bit_exactly(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    tensors = _every_dtype()
    save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    manifest = convert_checkpoint(src, tmp_path / "out", partition_bytes=8192, chunk_bytes=4096)
    assert len(manifest.partitions) > 1  # small partitions: tensors spread over several files
    assert all(t.offset % 4096 == 0 for t in manifest.tensors)
    assert verify_checkpoint(tmp_path / "out")["ok"]
    loaded = load_state_dict(tmp_path / "out")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert _same_bits(loaded[k], v), k
    assert [f.path for f in manifest.files] == ["config.json"]


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    a = {"a.weight": torch.randn(4, 4, dtype=torch.bfloat16)}
    b = {"b.weight": torch.randn(8, dtype=torch.float16), "c": torch.arange(5, dtype=torch.int64)}
    save_file(a, src / "model-00001-of-00002.safetensors")
    save_file(b, src / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    convert_checkpoint(src, tmp_path / "out")
    loaded = load_state_dict(str(tmp_path / "out"))
    for k, v in {**a, **b}.items():
        assert _same_bits(loaded[k], v)


def test_tiny_model_matches_safetensors(tiny_model_dir: Path, tiny_converted: Path) -> None:
    ref = load_file(tiny_model_dir / "model.safetensors")
    got = load_state_dict(tiny_converted)
    assert set(got) == set(ref) and all(_same_bits(got[k], ref[k]) for k in ref)


def test_pickles_are_refused_with_a_safe_recipe(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFormat, match="safe_serialization=True"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_safetensors_header_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="out of bounds"):
        convert_checkpoint(src, tmp_path / "out")
    header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(CheckpointError, match="unknown dtype"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}, "bad shape"),
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "bad shape"),
    ],
)
def test_mistyped_safetensors_header_is_refused(tmp_path: Path, entry: dict, match: str) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    header = json.dumps({"w": entry}).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=match):
        convert_checkpoint(src, tmp_path / "out")


def test_deeply_nested_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not valid JSON"):
        parse_manifest(b"[" * 100_000 + b"]" * 100_000)
    src = tmp_path / "hf"
    src.mkdir()
    header = b"[" * 100_000 + b"]" * 100_000
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="not JSON"):
        convert_checkpoint(src, tmp_path / "out")


def test_a_malformed_checkpoint_in_a_store_is_skipped_by_listing(tmp_path: Path, tiny_converted: Path,
                                                                  make_tiers) -> None:
    """One checkpoint with a mistyped manifest field: listing skips it, the worker's bandwidth
    probe (which lists the store at start) still runs, and loading it is a CheckpointError."""
    import shutil

    from ember.loader import open_store

    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_converted, "good")
    shutil.copytree(tiny_converted, tmp_path / "store" / "bad")
    (tmp_path / "store" / "bad" / "manifest.json").write_text(json.dumps(dict(_manifest(tiny_converted), extra=5)))
    assert [i.name for i in store.list()] == ["good"]
    tiers = make_tiers()
    assert tiers.measure_bandwidth(probe_bytes=1 << 20)["remote"] > 0
    with pytest.raises(CheckpointError, match="extra"):
        tiers.load("bad")


def _manifest(conv: Path) -> dict:
    return json.loads((conv / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m["tensors"][0].update(offset=m["partitions"][0]["size"]), "out of bounds"),
        (lambda m: m["tensors"][1].update(offset=m["tensors"][0]["offset"]), "overlap"),
        (lambda m: m["tensors"][0].update(dtype="F12"), "unknown dtype"),
        (lambda m: m["tensors"][0].update(nbytes=m["tensors"][0]["nbytes"] + 4), "does not match"),
        (lambda m: m["partitions"][0].update(file="../../etc/passwd"), "bad partition file name"),
        (lambda m: m["partitions"][0].update(file="/abs/part-00000.bin"), "bad partition file name"),
        (lambda m: m["files"][0].update(path="../config.json"), "bad model file name"),
        (lambda m: m["partitions"][0].update(size=100 << 40), "not a plausible"),
        (lambda m: m["tensors"][0].update(partition=9), "out of range"),
        (lambda m: m.update(version=99), "version"),
        (lambda m: m.update(extra=5), "extra must be an object"),
        (lambda m: m.update(extra="x"), "extra must be an object"),
        (lambda m: m.update(extra=[1]), "extra must be an object"),
        (lambda m: m.update(partitions="part-00000.bin"), "mistypes a field"),
        (lambda m: m.update(tensors={"a": 1}), "mistypes a field"),
        (lambda m: m["tensors"][0].update(shape=5), "mistypes a field"),
        (lambda m: m["tensors"][0].update(dtype=["F32"]), "unknown dtype"),
    ],
)
def test_bad_manifests_are_refused(tiny_converted: Path, mutate, match: str) -> None:
    doc = _manifest(tiny_converted)
    mutate(doc)
    with pytest.raises(CheckpointError, match=match):
        parse_manifest(json.dumps(doc).encode())


def test_verify_catches_a_flipped_byte_and_truncation(tiny_converted: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_converted, bad)
    part = bad / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[5000] ^= 0x01
    part.write_bytes(data)
    with pytest.raises(IntegrityError, match="part-00000.bin"):
        verify_checkpoint(bad)
    with pytest.raises(IntegrityError, match="chunk 0"):
        load_state_dict(bad)
    part.write_bytes(data[:4096])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match="manifest claims"):
        load_state_dict(bad)


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "", ".hidden", "a..b", "x" * 129, "name with space"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


def test_valid_names() -> None:
    for name in ("llama-3.1-8b", "Qwen2.5_7B", "a", "x" * 128):
        assert validate_name(name) == name
