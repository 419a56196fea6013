"""Integrity and checkpoint identity through the real routes (gateway + worker under uvicorn, a
real redis-server): a flipped byte in any tier is never served and never sticks, two stores'
checkpoints of one name are never confused, an SSD tier on a full disk only costs the cache.

Tier layout a test (or the chaos test) can fault, for a worker started with --data-dir D:
- SSD tier: D/ssd/NAME@KEY/{manifest.json, part-00000.bin, files/config.json, ...}
- DRAM tier: ember.loader.dram.shm_dir_for(D) (/dev/shm/ember-<hash>): `pool` (the bytes),
  `index.json` (entries: runs as [first block, blocks] of `block_bytes`), meta/NAME@KEY.GEN/files/...
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ember.loader.dram import shm_dir_for
from ember.platform.redis_server import RedisServerProcess, free_port
from tests.platform.conftest import (
    CLUSTER_TOKEN,
    Proc,
    admin_headers,
    base_env,
    start_gateway,
    start_worker,
)


@dataclass
class Cluster:
    gateway: Proc
    worker: Proc
    node_dir: Path  # the worker's --data-dir
    node_root: Path  # the same path as the worker sees it (its own mount namespace), for faults
    tmp: Path
    small_ssd: bool  # the SSD tier is a 96 MiB tmpfs (a test can fill it)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    """One gateway and one worker for the module. The worker's SSD tier is a small tmpfs in the
    worker's own mount namespace where unshare and mount work (root), else a plain directory."""
    from ember.loader import open_store

    tmp = tmp_path_factory.mktemp("integrity")
    from ember.loader.convert import convert_checkpoint

    store = open_store(f"file://{tmp / 'store'}")
    convert_checkpoint(tiny_model_dir, tmp / "conv")
    for name in ("victim", "twin", "third"):
        store.push(tmp / "conv", name)
    # another tenant's store with its own "twin": other weights under the same name
    other = _other_weights(tiny_model_dir, tmp / "other-hf")
    open_store(f"file://{tmp / 'elsewhere'}").push(other, "twin")
    redis = RedisServerProcess(tmp / "redis").start()
    env = base_env(redis.url, store.uri)
    node = tmp / "w0"
    (node / "ssd").mkdir(parents=True)
    small_ssd = bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {node / 'ssd'}"],
        capture_output=True).returncode == 0
    procs: list[Proc] = []
    try:
        if small_ssd:
            port = free_port()
            script = (f"mount -t tmpfs -o size=96m tmpfs {node / 'ssd'} && exec {sys.executable} -m ember worker "
                      f"--data-dir {node} --node-id w0 --host 127.0.0.1 --port {port}")
            procs.append(_start_shell(["unshare", "--mount", "--", "sh", "-c", script], env, tmp / "w0.log",
                                      f"http://127.0.0.1:{port}/internal/healthz"))
            root = Path(f"/proc/{procs[0].proc.pid}/root") / str(node).lstrip("/")
        else:
            procs.append(start_worker(tmp, env, "w0"))
            root = node
        procs.append(start_gateway(tmp, env))
        yield Cluster(procs[1], procs[0], node, root, tmp, small_ssd)
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def _other_weights(src: Path, dst: Path) -> Path:
    """The same model files with other weights (every matrix rolled by one row)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    save_file({k: torch.roll(v, 1, dims=0).contiguous() if v.dim() > 1 else v for k, v in sd.items()},
              dst / "model.safetensors")
    return dst


def _deploy(url: str, name: str, checkpoint: str, headers: dict | None = None) -> None:
    r = httpx.put(f"{url}/v1/functions/{name}", headers=headers or admin_headers(), timeout=60,
                  json={"checkpoint": checkpoint, "scaling": {"keep_alive_s": 300}})
    assert r.status_code in (200, 201), r.text


def _chat(url: str, model: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=headers or admin_headers(), timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": "Once upon"}],
                            "max_tokens": 12, "temperature": 0})


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _cold(url: str, name: str, checkpoint: str) -> httpx.Response:
    """Unload every instance of `name` (delete + deploy again) and invoke: a cold start."""
    assert httpx.delete(f"{url}/v1/functions/{name}", headers=admin_headers(), timeout=60).status_code == 204
    _deploy(url, name, checkpoint)
    return _chat(url, name)


def _dram_entry(node_dir: Path, name: str) -> tuple[Path, dict, int]:
    shm = shm_dir_for(node_dir)
    index = json.loads((shm / "index.json").read_text())
    (key, e), = [(k, e) for k, e in index["entries"].items() if k.startswith(name + "@") and e["state"] == "ready"]
    return shm, {"key": key, **e}, index["block_bytes"]


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


def _bump_digit(path: Path, field: str) -> None:
    """Change one digit of a numeric field of a JSON file: still valid JSON, another model."""
    text = path.read_text()
    at = text.index(f'"{field}"')
    at = next(i for i in range(at, len(text)) if text[i].isdigit() and text[i] != "0")
    path.write_text(text[:at] + str(int(text[at]) % 9 + 1) + text[at + 1:])


def test_a_flipped_byte_in_any_tier_is_healed_never_served(cluster: Cluster) -> None:
    u = cluster.gateway.url
    _deploy(u, "f", "victim")
    first = _chat(u, "f")
    reference = _text(first)
    assert first.headers["x-ember-load-tier"] == "remote"

    # DRAM tier: one byte of the entry's tensor bytes
    shm, e, block = _dram_entry(cluster.node_dir, "victim")
    _flip(shm / "pool", e["runs"][0][0] * block + 4096 + 7)
    r = _cold(u, "f", "victim")
    assert _text(r) == reference and r.headers["x-ember-load-tier"] == "ssd"

    # DRAM tier: the model's config.json (still valid JSON, another model)
    shm, e, _ = _dram_entry(cluster.node_dir, "victim")
    _bump_digit(shm / "meta" / f"{e['key']}.{e['gen']}" / "files" / "config.json", "rms_norm_eps")
    r = _cold(u, "f", "victim")
    assert _text(r) == reference and r.headers["x-ember-load-tier"] == "ssd"

    # SSD tier partition and config.json, with the DRAM entry bad too: the store serves, and the
    # tiers are whole again afterwards (the next cold start is a clean DRAM hit)
    shm, e, block = _dram_entry(cluster.node_dir, "victim")
    _flip(shm / "pool", e["runs"][0][0] * block + 11)
    ssd_entry = cluster.node_root / "ssd" / e["key"]
    _flip(ssd_entry / "part-00000.bin", 5000)
    _bump_digit(ssd_entry / "files" / "config.json", "rms_norm_eps")
    r = _cold(u, "f", "victim")
    assert _text(r) == reference and r.headers["x-ember-load-tier"] == "remote"
    r = _cold(u, "f", "victim")
    assert _text(r) == reference and r.headers["x-ember-load-tier"] == "dram"
    log = cluster.worker.log.read_text()
    assert "DRAM tier entry" in log and "SSD tier entry" in log and "failed verification" in log


def test_two_stores_same_name_never_confused(cluster: Cluster) -> None:
    """A developer's `file:///elsewhere/twin` loaded first must not serve the admin's `twin`."""
    u = cluster.gateway.url
    dev = httpx.post(f"{u}/v1/keys", headers=admin_headers(), json={"role": "developer"}).json()
    dev_h = {"Authorization": f"Bearer {dev['key']}"}
    elsewhere = f"file://{cluster.tmp / 'elsewhere'}"
    # refused until an admin allows the store and grants the checkpoint
    r = httpx.put(f"{u}/v1/functions/devf", headers=dev_h, json={"checkpoint": f"{elsewhere}/twin"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "store_not_allowed", r.text
    assert httpx.put(f"{u}/v1/stores", headers=admin_headers(), json={"uri": elsewhere}).status_code == 200
    r = httpx.put(f"{u}/v1/functions/devf", headers=dev_h, json={"checkpoint": f"{elsewhere}/twin"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "checkpoint_not_allowed", r.text
    grant = {"store": elsewhere, "owner": dev["id"]}
    assert httpx.put(f"{u}/v1/checkpoints/twin", headers=admin_headers(), json=grant).status_code == 200
    _deploy(u, "devf", f"{elsewhere}/twin", dev_h)
    dev_text = _text(_chat(u, "devf", dev_h))  # now in this node's DRAM and SSD tiers
    _deploy(u, "adminf", "twin")
    r = _chat(u, "adminf")
    assert r.headers["x-ember-load-tier"] == "remote"  # not the developer's cached bytes
    admin_text = _text(r)
    assert admin_text != dev_text
    # and the admin's cached copy serves the admin's text again from DRAM
    r = _cold(u, "adminf", "twin")
    assert _text(r) == admin_text and r.headers["x-ember-load-tier"] == "dram"


def test_ssd_tier_on_a_full_disk_serves_from_memory(cluster: Cluster) -> None:
    """The worker's SSD tier filled to the last byte: every SSD write fails with ENOSPC; cold starts
    still succeed, from memory, and the log says so once."""
    if not cluster.small_ssd:
        pytest.skip("needs unshare and mount (root) for a small tmpfs under the worker's SSD tier")
    u = cluster.gateway.url
    filler = cluster.node_root / "ssd" / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)  # until ENOSPC
    try:
        _deploy(u, "f3", "third")
        r = _chat(u, "f3")
        assert r.status_code == 200 and r.headers["x-ember-load-tier"] == "remote", r.text
        first = _text(r)
        for _ in range(2):
            r = _cold(u, "f3", "third")
            assert _text(r) == first and r.headers["x-ember-load-tier"] == "dram"
        # a DRAM miss after that: still served from the store, still said once
        shm, e, block = _dram_entry(cluster.node_dir, "third")
        _flip(shm / "pool", e["runs"][0][0] * block + 3)
        r = _cold(u, "f3", "third")
        assert _text(r) == first and r.headers["x-ember-load-tier"] == "remote"
        assert cluster.worker.log.read_text().count("cannot write") == 1
    finally:
        filler.unlink(missing_ok=True)


def _start_shell(cmd: list[str], env: dict[str, str], log: Path, health_url: str) -> Proc:
    import time

    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    p = Proc(proc, health_url.rsplit("/", 2)[0], log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{p.output()}")
        try:
            if httpx.get(health_url, headers={"x-ember-cluster-token": CLUSTER_TOKEN}, timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"worker did not become healthy:\n{p.output()}")
