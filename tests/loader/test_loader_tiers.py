"""Node tiers: remote -> SSD -> DRAM, shared memory across processes, LRU, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.errors import CheckpointError, CheckpointNotFound, IntegrityError, InvalidName
from ember.loader import open_store
from ember.loader.ssd import SsdTier


def _hf(dir_: Path, mib: int, seed: int) -> Path:
    """An HF-style directory with one safetensors file of about `mib` MiB of random bytes."""
    dir_.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    n = mib << 20
    save_file(
        {"a": torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=g),
         "b": torch.randint(0, 256, (n // 8,), dtype=torch.uint8, generator=g).view(torch.float32).reshape(-1, 4)},
        dir_ / "model.safetensors",
    )
    (dir_ / "config.json").write_text(json.dumps({"seed": seed}))
    return dir_


def _held(tiers) -> dict[str, str]:
    """Holdings by bare checkpoint name (the tiers publish canonical refs: store/name#digest)."""
    return {ref.rpartition("/")[2].partition("#")[0]: tier for ref, tier in tiers.holdings().items()}


def _equal(sd: dict, ref: dict) -> bool:
    return set(sd) == set(ref) and all(torch.equal(sd[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)


def test_remote_then_dram_then_ssd(tmp_path, tiny_model_dir, make_tiers) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_model_dir, "tiny")
    ref = load_file(tiny_model_dir / "model.safetensors")
    tiers = make_tiers()
    assert _held(tiers) == {}
    first = tiers.load("tiny")
    assert first.tier == "remote" and _equal(first.state_dict, ref)
    assert first.nbytes == sum(t.numel() * t.element_size() for t in ref.values()) == tiers.checkpoint_nbytes("tiny")
    assert (first.model_files / "config.json").is_file() and (first.model_files / "chat_template.jinja").is_file()
    assert _held(tiers) == {"tiny": "dram"}
    first.release()
    second = tiers.load("tiny")
    assert second.tier == "dram" and _equal(second.state_dict, ref)
    second.release()
    assert tiers.dram.evict(tiers.key("tiny"))
    assert _held(tiers) == {"tiny": "ssd"}
    third = tiers.load(f"file://{tmp_path / 'store'}/tiny")
    assert third.tier == "ssd" and _equal(third.state_dict, ref)
    third.release()
    assert _held(tiers) == {"tiny": "dram"}


def test_second_process_shares_dram_copy_on_write(tmp_path, tiny_model_dir, make_tiers) -> None:
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    mine = tiers.load("tiny")
    before = {k: v.clone() for k, v in mine.state_dict.items()}
    child = textwrap.dedent(
        """
        import sys, json, torch
        from ember.loader import NodeTiers
        t = NodeTiers(sys.argv[1], sys.argv[2], dram_capacity_bytes=64 << 20, ssd_capacity_bytes=1 << 30)
        l = t.load("tiny")
        w = l.state_dict["model.embed_tokens.weight"]
        first = float(w[0, 0])
        w.fill_(123.0)  # copy-on-write: this process's private copy only
        print(json.dumps({"tier": l.tier, "first": first, "after": float(w[0, 0])}))
        l.release(); t.close()
        """
    )
    for _ in range(1):
        out = subprocess.run(
            [sys.executable, "-c", child, str(tmp_path / "node"), f"file://{tmp_path / 'store'}"],
            capture_output=True, text=True, check=True, timeout=120,
        )
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        assert doc["tier"] == "dram" and doc["after"] == 123.0
        assert doc["first"] == float(before["model.embed_tokens.weight"][0, 0])  # the child's write did not leak
    assert _equal(mine.state_dict, before)
    mine.release()


def test_owner_tensors_are_read_only(tmp_path, tiny_model_dir) -> None:
    """The pool-owning process maps entries read-only: a stray write kills only that process."""
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    child = textwrap.dedent(
        """
        import sys
        from ember.loader import NodeTiers
        t = NodeTiers(sys.argv[1], sys.argv[2], dram_capacity_bytes=64 << 20, ssd_capacity_bytes=1 << 30)
        l = t.load("tiny")
        print(l.tier, flush=True)
        l.state_dict["model.embed_tokens.weight"].fill_(1.0)
        print("wrote", flush=True)
        """
    )
    node = tmp_path / "node"
    out = subprocess.run([sys.executable, "-c", child, str(node), f"file://{tmp_path / 'store'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "wrote" not in out.stdout
    # The shared bytes are intact: another process still gets the original weights.
    from ember.loader.tiers import NodeTiers

    tiers = NodeTiers(node, f"file://{tmp_path / 'store'}", dram_capacity_bytes=64 << 20, ssd_capacity_bytes=1 << 30)
    try:
        again = tiers.load("tiny")
        assert again.tier == "dram"
        assert _equal(again.state_dict, load_file(tiny_model_dir / "model.safetensors"))
        again.release()
    finally:
        tiers.close(destroy_dram=True)


def test_dram_lru_evicts_only_what_it_must_and_never_pinned(tmp_path, make_tiers) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    for i in range(4):
        store.push(_hf(tmp_path / f"hf{i}", 6, i), f"m{i}")  # 3.75 MiB: two 2 MiB blocks each
    tiers = make_tiers(dram=10 << 20)  # five blocks: two checkpoints and a spare block
    held = tiers.load("m0")  # stays pinned
    tiers.load("m1").release()
    assert {k.partition("@")[0] for k in tiers.dram.holdings()} == {"m0", "m1"}
    got = tiers.load("m2")
    assert got.tier == "remote"
    got.release()
    assert {k.partition("@")[0] for k in tiers.dram.holdings()} == {"m0", "m2"}  # only the LRU unpinned entry went
    tiers.load("m1").release()
    assert {k.partition("@")[0] for k in tiers.dram.holdings()} == {"m0", "m1"}
    tiers.load("m0").release()  # m0 used again: now m1 is the LRU one (but m0 is pinned anyway)
    tiers.load("m3").release()
    assert {k.partition("@")[0] for k in tiers.dram.holdings()} == {"m0", "m3"}
    assert _held(tiers) == {"m0": "dram", "m1": "ssd", "m2": "ssd", "m3": "dram"}
    assert _equal(held.state_dict, load_file(tmp_path / "hf0" / "model.safetensors"))
    held.release()
    assert not tiers.dram.evict("nope") and tiers.dram.evict(tiers.key("m0"))


def test_a_dram_entrys_last_use_is_when_its_instance_let_go(tmp_path, make_tiers) -> None:
    """LRU by last use, not by load time: m0's instance served until after m1 was loaded and let
    go, so m1 is the one a new entry evicts. Before, m0 went (loaded first), and the next
    cold start of the checkpoint just in use came from SSD."""
    store = open_store(f"file://{tmp_path / 'store'}")
    for i in range(3):
        store.push(_hf(tmp_path / f"hf{i}", 6, i), f"m{i}")  # two 2 MiB blocks each
    tiers = make_tiers(dram=10 << 20)  # two checkpoints and a spare block
    serving = tiers.load("m0")
    tiers.load("m1").release()
    serving.release()
    tiers.load("m2").release()
    assert {k.partition("@")[0] for k in tiers.dram.holdings()} == {"m0", "m2"}
    assert tiers.load("m0").tier == "dram"


def test_checkpoint_larger_than_pool_still_loads(tmp_path, make_tiers) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(_hf(tmp_path / "hf", 12, 7), "big")  # 7.5 MiB
    tiers = make_tiers(dram=4 << 20)
    ref = load_file(tmp_path / "hf" / "model.safetensors")
    for tier in ("remote", "ssd"):
        got = tiers.load("big")
        assert got.tier == tier and _equal(got.state_dict, ref)
        assert (got.model_files / "config.json").is_file()
        got.release()
    assert _held(tiers) == {"big": "ssd"} and tiers.dram.used_bytes() == 0


def test_ssd_lru_capacity_and_restart(tmp_path, make_tiers) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    for i in range(3):
        store.push(_hf(tmp_path / f"hf{i}", 2, i), f"s{i}")
    tiers = make_tiers(dram=2 << 20, ssd=4 << 20)  # the SSD holds two of the three (1.25 MiB each + 1 MiB install margin)
    for i in range(3):
        tiers.load(f"s{i}").release()
    assert {k.partition("@")[0] for k in tiers.ssd.entries()} == {"s1", "s2"}
    # A half-written entry from a dead process and an index rebuilt from disk on restart.
    (tiers.ssd.tmp / "s9.999999999.abcd").mkdir()
    (tiers.ssd.tmp / "s9.999999999.abcd" / "part-00000.bin").write_bytes(b"half")
    again = SsdTier(tiers.ssd.root, 4 << 20)
    assert {k.partition("@")[0] for k in again.entries()} == {"s1", "s2"} and not list(again.tmp.iterdir())
    again.close()


def test_bad_remote_checkpoints_leave_tiers_unchanged(tmp_path, tiny_model_dir, make_tiers, snapshot) -> None:
    root = tmp_path / "store"
    store = open_store(f"file://{root}")
    store.push(tiny_model_dir, "good")
    tiers = make_tiers()
    tiers.load("good").release()
    assert tiers.dram.evict(tiers.key("good"))
    for name in ("flipped", "truncated", "terabytes", "nopart", "outofbounds", "overlap", "dtype", "forgedsha"):
        store.push(tiny_model_dir, name)
    edits = {
        # every chunk checksum still matches: only the whole-partition sha256 can catch it
        "forgedsha": lambda d: d["partitions"][0].update(sha256="0" * 64),
        "outofbounds": lambda d: d["tensors"][-1].update(offset=d["partitions"][0]["size"]),
        "overlap": lambda d: d["tensors"][1].update(offset=d["tensors"][0]["offset"]),
        "dtype": lambda d: d["tensors"][0].update(dtype="F7"),
    }
    for name, edit in edits.items():
        doc = json.loads((root / name / "manifest.json").read_text())
        edit(doc)
        (root / name / "manifest.json").write_text(json.dumps(doc))
    part = root / "flipped" / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[4100] ^= 0x40
    part.write_bytes(data)
    (root / "truncated" / "part-00000.bin").write_bytes(data[:8192])
    doc = json.loads((root / "terabytes" / "manifest.json").read_text())
    doc["partitions"][0]["size"] = 5 << 40
    doc["partitions"][0]["chunks"] = ["0"] * ((5 << 40) // doc["chunk_bytes"])
    (root / "terabytes" / "manifest.json").write_text(json.dumps(doc))
    (root / "nopart" / "part-00000.bin").unlink()
    before = snapshot(tiers)
    cases = [
        ("flipped", IntegrityError, "checksum"),
        ("forgedsha", IntegrityError, "sha256 mismatch"),
        ("truncated", CheckpointError, "claims"),
        ("terabytes", CheckpointError, "claims"),
        ("nopart", CheckpointNotFound, "part-00000.bin"),
        ("outofbounds", CheckpointError, "out of bounds"),
        ("overlap", CheckpointError, "overlap"),
        ("dtype", CheckpointError, "unknown dtype"),
        ("absent", CheckpointNotFound, "absent"),
        ("../etc", InvalidName, "invalid"),
        ("/abs/path", InvalidName, "invalid"),
        (f"file://{root}/..", InvalidName, "invalid"),
    ]
    for ref, error, match in cases:
        with pytest.raises(error, match=match):
            tiers.load(ref)
        assert snapshot(tiers) == before, ref
    ok = tiers.load("good")  # the node keeps working
    assert ok.tier == "ssd"
    ok.release()


def test_corrupted_ssd_entry_is_dropped_and_refetched(tmp_path, tiny_model_dir, make_tiers, caplog) -> None:
    """A flipped byte in an SSD partition is never served: the entry is dropped (logged) and the
    load is served from the intact store, which also rebuilds the entry."""
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    tiers.load("tiny").release()
    tiers.dram.evict(tiers.key("tiny"))
    part = tiers.ssd.path(tiers.key("tiny")) / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(data)
    healed = tiers.load("tiny")
    assert healed.tier == "remote" and _equal(healed.state_dict, load_file(tiny_model_dir / "model.safetensors"))
    healed.release()
    assert "failed verification" in caplog.text and "part-00000.bin" in caplog.text
    assert part.read_bytes() != bytes(data)  # the entry was fetched again


def test_corrupted_everywhere_is_an_integrity_error(tmp_path, tiny_model_dir, make_tiers, snapshot) -> None:
    """No good copy anywhere (the store's bytes are bad too): IntegrityError, nothing cached."""
    store_dir = tmp_path / "store"
    open_store(f"file://{store_dir}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    part = store_dir / "tiny" / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(data)
    before = snapshot(tiers)
    with pytest.raises(IntegrityError, match="part-00000.bin"):
        tiers.load("tiny")
    assert snapshot(tiers) == before


def test_bandwidth_probe_and_env(tmp_path, tiny_model_dir, monkeypatch) -> None:
    from ember.loader import api as loader_api
    from ember.loader import load_state_dict
    from ember.loader.tiers import NodeTiers

    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path / "envnode"))
    monkeypatch.setenv("EMBER_STORE_URL", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("EMBER_DRAM_CAPACITY_BYTES", str(32 << 20))
    monkeypatch.setattr(loader_api, "_tiers", None)
    open_store(None).push(tiny_model_dir, "tiny")
    tiers = NodeTiers.from_env()
    try:
        bw = tiers.measure_bandwidth(probe_bytes=8 << 20)
        assert set(bw) == {"dram", "ssd", "remote"} and all(v > 0 for v in bw.values())
        sd = load_state_dict("tiny")
        assert _equal(sd, load_file(tiny_model_dir / "model.safetensors"))
        assert os.path.isdir(tmp_path / "envnode" / "ssd" / tiers.key("tiny"))
    finally:
        loader_api._tiers.close(destroy_dram=True)
        monkeypatch.setattr(loader_api, "_tiers", None)
        tiers.close()


@pytest.mark.parametrize("disk", ["full", "small"])
def test_bandwidth_probe_on_a_full_or_small_disk(tmp_path, disk) -> None:
    """A worker measures its tiers when it starts: an SSD tier on a disk without room for the
    probe file (full: ENOSPC) gets a fallback figure instead of failing the start, and a small
    disk (16 MiB, the probe asks 64) is probed with what leaves most of it free."""
    import shutil

    ssd = tmp_path / "node" / "ssd"
    ssd.mkdir(parents=True)
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "--mount", "--", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ssd)],
            capture_output=True).returncode != 0:
        pytest.skip("needs unshare and mount (root) for a small tmpfs under the SSD tier")
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from ember.loader.tiers import NodeTiers
        tiers = NodeTiers({str(tmp_path / "node")!r}, "file://{tmp_path / "store"}", dram_capacity_bytes=8 << 20)
        try:
            bw = tiers.measure_bandwidth(probe_bytes=64 << 20)
        finally:
            tiers.close(destroy_dram=True)
        st = os.statvfs({str(ssd)!r})
        print(json.dumps({{"bw": bw, "left": os.listdir({str(ssd / ".tmp")!r}), "free": st.f_bavail * st.f_frsize}}))
    """))
    fill = f"mkdir {ssd / '.tmp'} && dd if=/dev/zero of={ssd / 'filler'} bs=1M 2>/dev/null; " if disk == "full" else ""
    r = subprocess.run(["unshare", "--mount", "--", "sh", "-c",
                        f"mount -t tmpfs -o size=16m tmpfs {ssd} && {fill}exec {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    from ember.loader.bandwidth import FALLBACK_SSD_BPS

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["bw"]) == {"dram", "ssd", "remote"} and all(v > 0 for v in out["bw"].values())
    assert out["left"] == []  # no probe file left behind
    if disk == "full":
        assert out["bw"]["ssd"] == FALLBACK_SSD_BPS and out["free"] == 0
        assert "cannot be probed" in r.stderr
    else:
        assert out["bw"]["ssd"] != FALLBACK_SSD_BPS and "cannot be probed" not in r.stderr


def test_a_full_disk_and_a_small_dram_tier_still_load_from_the_store(tmp_path) -> None:
    """A checkpoint larger than the DRAM tier, on a node whose disk is full (SSD tier and data dir
    both): nothing can cache it, and its model files (config, tokenizer) can be written nowhere on
    disk. The load still succeeds from the store, the files kept in the node's shared memory, and
    nothing is left there once the tiers close."""
    import shutil

    node = tmp_path / "node"
    node.mkdir()
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "--mount", "--", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(node)],
            capture_output=True).returncode != 0:
        pytest.skip("needs unshare and mount (root) for a small tmpfs under the node's data dir")
    open_store(f"file://{tmp_path / 'store'}").push(_hf(tmp_path / "hf", 12, 7), "big")  # 7.5 MiB
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import json, os
        from ember.loader.tiers import NodeTiers
        tiers = NodeTiers({str(node)!r}, "file://{tmp_path / "store"}", dram_capacity_bytes=4 << 20)
        out = {{}}
        try:
            for i in range(2):
                got = tiers.load("big")
                out[f"tier{{i}}"] = got.tier
                out["config"] = json.loads((got.model_files / "config.json").read_text())
                out["files"] = str(got.model_files)
                got.release()
        finally:
            tiers.close(destroy_dram=True)
        out["left"] = os.path.exists(out.get("files", ""))
        print(json.dumps(out))
    """))
    fill = f"dd if=/dev/zero of={node / 'filler'} bs=1M 2>/dev/null; "
    r = subprocess.run(["unshare", "--mount", "--", "sh", "-c",
                        f"mount -t tmpfs -o size=16m tmpfs {node} && {fill}exec {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tier0"] == out["tier1"] == "remote"  # cached nowhere, and served both times
    assert out["config"] == json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not out["files"].startswith(str(node))
    assert out["left"] is False  # the shared-memory copy went with the tiers
    assert r.stderr.count("cannot write") == 1  # said once


def test_dram_tier_survives_a_worker_restart(tmp_path, tiny_model_dir, make_tiers) -> None:
    from ember.loader.tiers import NodeTiers

    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    first = make_tiers()
    first.load("tiny").release()
    first.close(destroy_dram=False)  # the worker exits asking to keep its pool
    again = NodeTiers(tmp_path / "node", f"file://{tmp_path / 'store'}", dram_capacity_bytes=64 << 20,
                      ssd_capacity_bytes=1 << 30, pretouch=True)
    try:
        assert not again.dram.created and again.dram.prefaulted
        got = again.load("tiny")
        assert got.tier == "dram" and _equal(got.state_dict, load_file(tiny_model_dir / "model.safetensors"))
        got.release()
    finally:
        again.close(destroy_dram=True)


@pytest.fixture
def shm_root(monkeypatch) -> Iterator[Path]:
    """A root of its own for DRAM pools on the tmpfs (EMBER_SHM_DIR): every DramTier another test
    opens meanwhile (`make test` runs two pytest processes) sweeps /dev/shm's orphans, and could take
    a test's orphan first."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pools-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    monkeypatch.setenv("EMBER_SHM_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _orphan_pool(data_dir: Path) -> Path:
    """The pool of a process that opened one for `data_dir` and died without closing it."""
    from ember.loader.shm import shm_dir_for

    child = "import sys; from ember.loader.dram import DramTier; DramTier(sys.argv[1], 4 << 20); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", child, str(data_dir)], check=True, timeout=120)
    orphan = shm_dir_for(data_dir)
    assert orphan.is_dir()
    return orphan


def test_pools_do_not_outlive_their_processes(tmp_path, make_tiers, shm_root) -> None:
    from ember.loader.shm import shm_dir_for, sweep_orphan_pools

    a = make_tiers(tmp_path / "a")
    b = make_tiers(tmp_path / "b")
    pool = shm_dir_for(tmp_path / "a")
    assert pool.is_dir() and pool.parent == shm_root
    a.close()  # the last (only) process using node a's pool: the pool goes
    assert not pool.exists()
    # A pool whose only process died without closing is swept by the next process opening a pool.
    (tmp_path / "c").mkdir()
    orphan = _orphan_pool(tmp_path / "c")
    assert sweep_orphan_pools(shm_root) == [orphan]
    assert shm_dir_for(tmp_path / "b").is_dir()  # in use by this process: kept
    b.close()


def test_a_pool_in_use_is_never_swept_even_when_its_data_dir_is_gone(tmp_path, shm_root) -> None:
    """Before, a pool whose recorded data dir did not exist was swept at once by any process
    opening a pool, from under the live process using it (seen under two pytest processes: the
    next index write failed with FileNotFoundError). Its process still has it open: it stays; once
    no process has it, it goes."""
    from ember.loader.dram import DramTier
    from ember.loader.shm import sweep_orphan_pools

    tier = DramTier(tmp_path / "never-made", 4 << 20)  # its data dir does not exist
    assert sweep_orphan_pools(shm_root) == [] and tier.dir.is_dir()
    assert tier.allocate("x", 1 << 20) is not None  # the index is still there to write
    orphan = _orphan_pool(tmp_path / "gone")  # dead, and its data dir never made: swept
    assert sweep_orphan_pools(shm_root) == [orphan]
    tier.destroy()


def test_concurrent_loads_of_one_checkpoint_are_single_flight(tmp_path, tiny_model_dir) -> None:
    """Several threads cold-starting the same checkpoint: one remote fetch, the rest DRAM hits,
    and every caller gets usable model files (regression: an SSD entry was replaced under a reader)."""
    import threading

    from ember.loader import NodeTiers, open_store

    store_url = f"file://{tmp_path / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    tiers = NodeTiers(tmp_path / "node", store_url, dram_capacity_bytes=64 << 20, ssd_capacity_bytes=1 << 30)
    results: list = []

    def go() -> None:
        loaded = tiers.load("tiny")
        results.append((loaded.tier, (loaded.model_files / "config.json").is_file()))
        loaded.release()

    try:
        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r[0] for r in results) == ["dram", "dram", "dram", "remote"]
        assert all(ok for _, ok in results)
    finally:
        tiers.close(destroy_dram=True)


@pytest.mark.parametrize("huge_pool", [False, True], ids=["staged-4k-pool", "direct-huge-pool"])
def test_ssd_loads_with_direct_io_into_either_pool_kind(tmp_path, make_tiers, monkeypatch, huge_pool) -> None:
    """Cold-style SSD loads (O_DIRECT forced): staged through huge anonymous pages for a 4 KiB pool,
    straight into a huge-page pool; both give the exact bytes and catch a corrupted chunk."""
    import ember.loader.pipeline as pipeline

    monkeypatch.setattr(pipeline, "O_DIRECT_BELOW_CACHED", 2.0)  # every file counts as cold
    src = _hf(tmp_path / "hf", 40, seed=5)
    ref = load_file(src / "model.safetensors")
    open_store(f"file://{tmp_path / 'store'}").push(src, "big")
    tiers = make_tiers(dram=128 << 20)
    tiers.dram.huge_pages = huge_pool
    tiers.load("big").release()
    assert tiers.dram.evict(tiers.key("big"))
    seen = []
    real = pipeline.read_from_fds

    def spy(fds, *a, **k):
        seen.append(([d for _, d in fds], k.get("stage_direct")))
        return real(fds, *a, **k)

    monkeypatch.setattr("ember.loader.local.read_from_fds", spy)
    loaded = tiers.load("big")
    assert loaded.tier == "ssd" and _equal(loaded.state_dict, ref)
    loaded.release()
    assert seen[-1][1] is (not huge_pool)
    if hasattr(os, "O_DIRECT") and all(seen[-1][0]):  # the file system took O_DIRECT
        assert tiers.dram.evict(tiers.key("big"))
        from ember.loader.convert import read_manifest

        entry = tiers.ssd.path(tiers.key("big"))
        biggest = max(read_manifest(entry).partitions, key=lambda p: p.size)
        at = biggest.size // 2
        with open(entry / biggest.file, "r+b") as f:  # flip one byte in the middle of a chunk
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
        healed = tiers.load("big")  # the bad SSD entry is dropped, the store serves
        assert healed.tier == "remote" and _equal(healed.state_dict, ref)
        healed.release()


def test_corrupted_dram_entry_is_set_aside_even_while_pinned(tmp_path, tiny_model_dir, make_tiers, caplog) -> None:
    """A flipped byte in the DRAM pool, or in a model file beside the entry, fails the next
    attach: the entry is taken out of service (its pinned reader keeps its mapping) and the SSD
    tier serves; the refilled entry then serves DRAM hits again."""
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    ref = load_file(tiny_model_dir / "model.safetensors")
    tiers = make_tiers()
    told: list[str] = []
    tiers.on_corrupt_dram = told.append  # the worker retires instances built on these bytes
    held = tiers.load("tiny")  # keeps the entry pinned
    entry = tiers.dram.lookup(tiers.key("tiny"))
    off, _ = entry.runs[0]
    pool = tiers.dram.rw.array()
    pool[off + 100] ^= 0x01
    again = tiers.load("tiny")
    assert again.tier == "ssd" and _equal(again.state_dict, ref)
    assert told == [held.ref]  # found by an attach, not a scrub: the refilled entry hides it later
    again.release()
    held.release()
    config = tiers.dram.lookup(tiers.key("tiny")).meta_dir / "files" / "config.json"
    config.write_text(config.read_text() + " ")  # still valid JSON, other bytes
    third = tiers.load("tiny")
    assert third.tier == "ssd" and _equal(third.state_dict, ref)
    third.release()
    fourth = tiers.load("tiny")
    assert fourth.tier == "dram"
    fourth.release()
    assert caplog.text.count("DRAM tier entry") == 2 and told == [held.ref] * 2


def test_scrub_reports_corrupted_entries(tmp_path, tiny_model_dir, make_tiers) -> None:
    """A scrub finds bytes that changed under a pinned entry, takes it out of service and tells
    on_corrupt_dram; a clean pass reports nothing."""
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    told: list[str] = []
    tiers.on_corrupt_dram = told.append
    held = tiers.load("tiny")
    assert tiers.scrub() == [] and told == []
    off, _ = tiers.dram.lookup(tiers.key("tiny")).runs[0]
    tiers.dram.rw.array()[off + 200] ^= 0x01
    assert tiers.scrub() == [held.ref] and told == [held.ref]
    assert tiers.dram.lookup(tiers.key("tiny")) is None  # out of service
    held.release()
    assert tiers.load("tiny").tier == "ssd"
