"""S3 store against a real S3-protocol server (moto, server mode, IAM auth enforced)."""

from __future__ import annotations

import boto3
import pytest
import torch
from safetensors.torch import load_file

from ember.errors import CheckpointNotFound, StoreAccessDenied, StoreError
from ember.loader import convert_checkpoint, open_store


def test_push_ls_load_rm(s3_env, tiny_model_dir, tiny_converted, make_tiers, tmp_path) -> None:
    store = open_store(s3_env)
    assert store.list() == []
    info = store.push(tiny_model_dir, "tiny")  # an HF directory, converted on the way
    store.push(tiny_converted, "tiny-conv")  # an already converted one
    assert [i.name for i in store.list()] == ["tiny", "tiny-conv"]
    assert store.exists("tiny") and not store.exists("other") and info.nbytes > 0
    tiers = make_tiers()
    loaded = tiers.load(f"{s3_env}/tiny")
    assert loaded.tier == "remote"
    ref = load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(loaded.state_dict[k], ref[k]) for k in ref)
    assert (loaded.model_files / "tokenizer.json").is_file()
    assert tiers.checkpoint_nbytes(f"{s3_env}/tiny") == info.nbytes
    loaded.release()
    store.remove("tiny")
    assert [i.name for i in store.list()] == ["tiny-conv"]
    with pytest.raises(CheckpointNotFound):
        store.remove("tiny")


def test_missing_objects(s3_env, tiny_converted, make_tiers, snapshot, moto_s3) -> None:
    store = open_store(s3_env)
    store.push(tiny_converted, "partial")
    prefix = s3_env.split("/", 3)[3]
    boto3.client("s3", endpoint_url=moto_s3.url).delete_object(Bucket=moto_s3.bucket, Key=f"{prefix}/partial/part-00000.bin")
    tiers = make_tiers()
    before = snapshot(tiers)
    with pytest.raises(CheckpointNotFound):
        tiers.load(f"{s3_env}/absent")
    with pytest.raises(CheckpointNotFound, match="part-00000.bin"):
        tiers.load(f"{s3_env}/partial")
    with pytest.raises(StoreError, match="does not exist"):
        tiers.load("s3://no-such-bucket/x/partial")
    assert snapshot(tiers) == before


def test_denied_credentials(s3_env, tiny_converted, make_tiers, snapshot, moto_s3, monkeypatch) -> None:
    open_store(s3_env).push(tiny_converted, "tiny")
    tiers = make_tiers()
    before = snapshot(tiers)
    # A real IAM user without any S3 permission, then an access key the server does not know.
    for key, secret in (moto_s3.denied, ("AKIAUNKNOWN000000000", "nope")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        with pytest.raises(StoreAccessDenied):
            tiers._stores.clear()  # a fresh client picks up the new credentials
            tiers.load(f"{s3_env}/tiny")
        with pytest.raises(StoreAccessDenied):
            open_store(s3_env).list()
        assert snapshot(tiers) == before


def test_convert_then_push_large_enough_for_multipart(s3_env, tmp_path, make_tiers) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "hf"
    src.mkdir()
    w = torch.randint(0, 256, (20 << 20,), dtype=torch.uint8)  # 20 MiB: multipart upload, several ranges
    save_file({"w": w}, src / "model.safetensors")
    convert_checkpoint(src, tmp_path / "conv")
    open_store(s3_env).push(tmp_path / "conv", "mp")
    got = make_tiers(dram=32 << 20).load(f"{s3_env}/mp")
    assert got.tier == "remote" and torch.equal(got.state_dict["w"], w)
    got.release()


def test_list_skips_foreign_prefixes(s3_env, tiny_converted, moto_s3) -> None:
    """Folders beside the checkpoints that are no checkpoint name (_logs/, a name with a space,
    .cache/) are skipped by listing, as the file store skips them (was InvalidName)."""
    store = open_store(s3_env)
    store.push(tiny_converted, "good")
    prefix = s3_env.split("/", 3)[3]
    s3 = boto3.client("s3", endpoint_url=moto_s3.url)
    for folder in ("_logs", "my model", ".cache"):
        s3.put_object(Bucket=moto_s3.bucket, Key=f"{prefix}/{folder}/x.txt", Body=b"x")
    assert [i.name for i in store.list()] == ["good"]
