"""Integrity and checkpoint identity through the real routes (gateway + worker under uvicorn, a
real redis-server): a flipped byte in any tier is never served and never sticks, two stores'
checkpoints of one name are never confused, an SSD tier on a full disk only costs the cache.

Tier layout a test (or the chaos test) can fault, for a worker started with --data-dir D:
- SSD tier: D/ssd/NAME@KEY/{manifest.json, part-00000.bin, files/config.json, ...}
- DRAM tier: ember.loader.shm.shm_dir_for(D) (/dev/shm/ember-<hash>): `pool` (the bytes),
  `index.json` (entries: runs as [first block, blocks] of `block_bytes`), meta/NAME@KEY.GEN/files/...
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ember.loader.shm import shm_dir_for
from tests.platform.conftest import CLUSTER_TOKEN, TierCluster, admin_headers, flip_byte
from tests.platform.conftest import until as _until


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


def _loaded_from(r: httpx.Response, tier: str, cluster: TierCluster, since: int, checkpoint: str) -> None:
    """The cold start `r` loaded from `tier`, or from a DRAM entry the autoscaler's prefetch (a
    popular function whose checkpoint left DRAM) made again meanwhile: then the worker's log since
    byte `since` says so. Never from the bad bytes: the callers compare the text too."""
    got = r.headers["x-ember-load-tier"]
    if got == "dram" and tier != "dram":
        lines = cluster.worker.log.read_bytes()[since:].decode().splitlines()
        assert any("prefetched" in ln and checkpoint in ln for ln in lines), lines
    else:
        assert got == tier


def _dram_entry(node_dir: Path, name: str) -> tuple[Path, dict, int]:
    shm = shm_dir_for(node_dir)
    index = json.loads((shm / "index.json").read_text())
    (key, e), = [(k, e) for k, e in index["entries"].items() if k.partition("@")[0] == name and e["state"] == "ready"]
    return shm, {"key": key, **e}, index["block_bytes"]


def _held(cluster: TierCluster) -> dict:
    r = httpx.get(f"{cluster.worker.url}/internal/healthz", headers={"x-ember-cluster-token": CLUSTER_TOKEN}, timeout=10)
    return r.json()["instances"]


def _bump_digit(path: Path, field: str) -> None:
    """Change one digit of a numeric field of a JSON file: still valid JSON, another model."""
    text = path.read_text()
    at = text.index(f'"{field}"')
    at = next(i for i in range(at, len(text)) if text[i].isdigit() and text[i] != "0")
    path.write_text(text[:at] + str(int(text[at]) % 9 + 1) + text[at + 1:])


def test_a_flipped_byte_in_any_tier_is_healed_never_served(tier_cluster: TierCluster) -> None:
    u = tier_cluster.gateway.url
    _deploy(u, "f", "victim")
    first = _chat(u, "f")
    reference = _text(first)
    assert first.headers["x-ember-load-tier"] == "remote"

    # DRAM tier: one byte of the entry's tensor bytes
    shm, e, block = _dram_entry(tier_cluster.node_dir, "victim")
    since = len(tier_cluster.worker.log.read_bytes())
    flip_byte(shm / "pool", e["runs"][0][0] * block + 4096 + 7)
    r = _cold(u, "f", "victim")
    assert _text(r) == reference
    _loaded_from(r, "ssd", tier_cluster, since, "victim")

    # DRAM tier: the model's config.json (still valid JSON, another model)
    shm, e, _ = _dram_entry(tier_cluster.node_dir, "victim")
    since = len(tier_cluster.worker.log.read_bytes())
    _bump_digit(shm / "meta" / f"{e['key']}.{e['gen']}" / "files" / "config.json", "rms_norm_eps")
    r = _cold(u, "f", "victim")
    assert _text(r) == reference
    _loaded_from(r, "ssd", tier_cluster, since, "victim")

    # SSD tier partition and config.json, with the DRAM entry bad too: the store serves, and the
    # tiers are whole again afterwards (the next cold start is a clean DRAM hit)
    shm, e, block = _dram_entry(tier_cluster.node_dir, "victim")
    flip_byte(shm / "pool", e["runs"][0][0] * block + 11)
    ssd_entry = tier_cluster.node_root / "ssd" / e["key"]
    flip_byte(ssd_entry / "part-00000.bin", 5000)
    _bump_digit(ssd_entry / "files" / "config.json", "rms_norm_eps")
    since = len(tier_cluster.worker.log.read_bytes())
    r = _cold(u, "f", "victim")
    assert _text(r) == reference
    _loaded_from(r, "remote", tier_cluster, since, "victim")
    r = _cold(u, "f", "victim")
    assert _text(r) == reference and r.headers["x-ember-load-tier"] == "dram"
    log = tier_cluster.worker.log.read_text()
    assert "DRAM tier entry" in log and "SSD tier entry" in log and "failed verification" in log


def test_corruption_under_a_warm_instance_is_retired_by_the_scrub(tier_cluster: TierCluster) -> None:
    """An attach-time check cannot see bytes that change under a running instance: the worker's
    DRAM scrub finds them, the instance takes no new request, and the next one cold-starts from
    the SSD tier with the right text (or from a DRAM entry a prefetch made again from it meanwhile)."""
    u = tier_cluster.gateway.url
    _deploy(u, "warmf", "scrubck")
    reference = _text(_chat(u, "warmf"))
    warm = _chat(u, "warmf")
    assert warm.headers["x-ember-load-tier"] == "warm"
    (old,) = [i for i, h in _held(tier_cluster).items() if h["function"] == "warmf"]
    shm, e, block = _dram_entry(tier_cluster.node_dir, "scrubck")
    since = len(tier_cluster.worker.log.read_bytes())
    flip_byte(shm / "pool", e["runs"][0][0] * block + 4096 + 9)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = _chat(u, "warmf")
        if r.headers.get("x-ember-load-tier") != "warm":
            break
        time.sleep(0.2)
    assert _text(r) == reference
    _loaded_from(r, "ssd", tier_cluster, since, "scrubck")
    # the retired instance is gone from the worker (its requests were done), not just skipped; the
    # check that found the bytes may be the scrub or a prefetch attaching the entry, whichever ran first
    assert _until(lambda: old not in _held(tier_cluster), 15)
    log = tier_cluster.worker.log.read_text()
    assert f"instance {old} retired" in log and "DRAM scrub failed" not in log


def test_two_stores_same_name_never_confused(tier_cluster: TierCluster) -> None:
    """Another store's `twin` loaded first (it is in this node's DRAM and SSD tiers) must not
    serve a function on the cluster store's `twin`."""
    u = tier_cluster.gateway.url
    elsewhere = f"file://{tier_cluster.tmp / 'elsewhere'}"  # allowed by EMBER_ALLOWED_STORES
    _deploy(u, "otherf", f"{elsewhere}/twin")
    other_text = _text(_chat(u, "otherf"))
    _deploy(u, "twinf", "twin")
    r = _chat(u, "twinf")
    assert r.headers["x-ember-load-tier"] == "remote"  # not the other store's cached bytes
    twin_text = _text(r)
    assert twin_text != other_text
    # and each one's cached copy serves its own text again from DRAM
    r = _cold(u, "twinf", "twin")
    assert _text(r) == twin_text and r.headers["x-ember-load-tier"] == "dram"
    r = _cold(u, "otherf", f"{elsewhere}/twin")
    assert _text(r) == other_text and r.headers["x-ember-load-tier"] == "dram"


def test_ssd_tier_on_a_full_disk_serves_from_memory(tier_cluster: TierCluster) -> None:
    """The worker's SSD tier filled to the last byte: every SSD write fails with ENOSPC; cold starts
    still succeed, from memory, and the log says so once."""
    if not tier_cluster.small_ssd:
        pytest.skip("needs unshare and mount (root) for a small tmpfs under the worker's SSD tier")
    u = tier_cluster.gateway.url
    filler = tier_cluster.node_root / "ssd" / "filler"
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
        shm, e, block = _dram_entry(tier_cluster.node_dir, "third")
        since = len(tier_cluster.worker.log.read_bytes())
        flip_byte(shm / "pool", e["runs"][0][0] * block + 3)
        r = _cold(u, "f3", "third")
        assert _text(r) == first
        _loaded_from(r, "remote", tier_cluster, since, "third")
        assert tier_cluster.worker.log.read_text().count("cannot write") == 1
    finally:
        filler.unlink(missing_ok=True)
