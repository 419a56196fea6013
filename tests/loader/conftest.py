"""Loader fixtures: a real S3-protocol server (moto in server mode, IAM auth on) on loopback,
node tiers in tmp_path (their shared-memory pool removed afterwards), small checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class MotoS3:
    url: str
    allowed: tuple[str, str]  # access key, secret of a user allowed s3:*
    denied: tuple[str, str]  # a real user with no permissions
    bucket: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto_server with IAM auth enforced after the 5 setup calls that create two users."""
    import boto3

    port = _free_port()
    moto_bin = Path(sys.executable).parent / "moto_server"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="5")
    proc = subprocess.Popen(
        [str(moto_bin), "-H", "127.0.0.1", "-p", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        kw = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="alice")
        a = iam.create_access_key(UserName="alice")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="alice", PolicyName="s3", PolicyDocument=json.dumps(policy))
        iam.create_user(UserName="bob")
        b = iam.create_access_key(UserName="bob")["AccessKey"]
        s3 = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id=a["AccessKeyId"], aws_secret_access_key=a["SecretAccessKey"],
        )
        s3.create_bucket(Bucket="ember-ckpts")
        yield MotoS3(url, (a["AccessKeyId"], a["SecretAccessKey"]), (b["AccessKeyId"], b["SecretAccessKey"]), "ember-ckpts")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_env(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """Environment for the allowed user; returns a fresh s3:// store URI (unique prefix)."""
    monkeypatch.setenv("EMBER_S3_ENDPOINT_URL", moto_s3.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.allowed[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.allowed[1])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{moto_s3.bucket}/t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_tiers(tmp_path: Path):
    """Factory of NodeTiers under tmp_path; every DRAM pool made is removed at teardown."""
    from ember.loader.tiers import NodeTiers

    made = []

    def make(data_dir: Path | None = None, store_url: str | None = None, *, dram: int = 64 << 20, ssd: int = 1 << 30):
        tiers = NodeTiers(
            data_dir or tmp_path / "node",
            store_url or f"file://{tmp_path / 'store'}",
            dram_capacity_bytes=dram,
            ssd_capacity_bytes=ssd,
        )
        made.append(tiers)
        return tiers

    yield make
    for t in made:
        t.close(destroy_dram=True)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with other bytes (seed 1)."""
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other") / "other", TinyModelSpec(seed=1))


@pytest.fixture(scope="session")
def tiny_converted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model converted to Ember's format (session-wide, read-only)."""
    from ember.loader.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("conv") / "tiny"
    convert_checkpoint(tiny_model_dir, out)
    return out


@pytest.fixture
def snapshot():
    """A function returning what a NodeTiers holds, to assert a failed load changed nothing."""
    return _snapshot


def _snapshot(tiers) -> dict:
    return {
        "holdings": tiers.holdings(),
        "dram_used": tiers.dram.used_bytes(),
        "ssd": sorted(p.name for p in tiers.ssd.root.iterdir() if p.name not in (".lock",)),
        "ssd_tmp": sorted(p.name for p in tiers.ssd.tmp.iterdir()),
        "meta": sorted(p.name for p in (tiers.dram.dir / "meta").iterdir()),
    }
