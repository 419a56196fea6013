"""The SSD tier under concurrent loads and failures: what an instance uses stays there, commits
that fail cost only the SSD copy, reservations keep to the byte budget, nothing is left behind."""

from __future__ import annotations

import errno
import json
import os

from ember.loader import open_store


def test_failed_ssd_commit_still_gives_model_files(tmp_path, tiny_model_dir, make_tiers, monkeypatch) -> None:
    """No DRAM entry (a pool of 0 bytes) and an SSD commit that fails (a full disk): the load
    serves from memory with model files that exist, not the thrown-away temporary entry's."""
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers(dram=0)

    def full(name, tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiers.ssd, "commit", full)
    got = tiers.load("tiny")
    assert got.tier == "remote"
    assert json.loads((got.model_files / "config.json").read_text())
    assert tiers.ssd.path(tiers.key("tiny")) is None and list(tiers.ssd.tmp.iterdir()) == []
    got.release()


def test_fallback_model_files_go_with_their_instance(tmp_path, tiny_model_dir, make_tiers, monkeypatch) -> None:
    """Model files no tier holds (no DRAM entry, an SSD commit that fails) are written for the load
    that needs them: each load its own directory (another instance of the checkpoint keeps its
    files when one goes), removed when its instance releases the checkpoint; at the next start, the
    directories of processes that died before releasing are swept, those of live processes kept."""
    import subprocess
    import sys

    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers(dram=0)

    def full(name, tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiers.ssd, "commit", full)
    first, second = tiers.load("tiny"), tiers.load("tiny")
    assert first.tier == second.tier == "remote" and first.model_files != second.model_files
    first.release()
    assert not first.model_files.exists()
    assert json.loads((second.model_files / "config.json").read_text())  # the other instance's files stay
    second.release()
    assert not second.model_files.exists()
    fallback = tmp_path / "node" / "files"
    assert list(fallback.iterdir()) == []

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    key = tiers.key("tiny")
    stale = [fallback / f"{key}.{dead}.0a1b2c3d", fallback / key]  # a dead process's; one from before pids
    live = fallback / f"{key}.{os.getpid()}.4e5f6a7b"
    for d in stale + [live]:
        (d / "files").mkdir(parents=True)
    again = make_tiers(tmp_path / "node")
    assert again.data_dir / "files" == fallback
    assert sorted(fallback.iterdir()) == [live]


def _two(tmp_path, tiny_model_dir, other_model_dir) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_model_dir, "a")
    store.push(other_model_dir, "b")


def test_ssd_entry_being_read_is_not_evicted(tmp_path, tiny_model_dir, other_model_dir, make_tiers,
                                             monkeypatch) -> None:
    """An SSD room for one checkpoint: while `a` is read from the SSD tier, a load of `b` makes
    room. It must not evict `a` from under its reader (which then found its files missing: the
    entry counted corrupt and fetched again, or served with model files that no longer exist)."""
    import threading

    import ember.loader.local as local

    _two(tmp_path, tiny_model_dir, other_model_dir)
    tiers = make_tiers(ssd=2 << 20)
    tiers.load("a").release()
    assert tiers.dram.evict(tiers.key("a"))
    real = local.copy_meta
    other: list = []

    def meanwhile(src, meta_dir):
        t = threading.Thread(target=lambda: other.append(tiers.load("b")))
        t.start()
        t.join()
        return real(src, meta_dir)

    monkeypatch.setattr(local, "copy_meta", meanwhile)
    got = tiers.load("a")
    assert got.tier == "ssd" and other[0].tier == "remote"
    assert json.loads((got.model_files / "config.json").read_text())
    assert tiers.dram.lookup(tiers.key("a")) is not None  # cached in DRAM as a read from SSD is
    got.release()
    other[0].release()


def test_model_files_in_the_ssd_tier_stay_while_used(tmp_path, tiny_model_dir, other_model_dir,
                                                     make_tiers) -> None:
    """No DRAM entry (a pool of 0 bytes): an instance's model files are in its SSD entry. Another
    checkpoint's load, or an eviction, must not delete them while the instance holds them; once
    it lets go they go."""
    _two(tmp_path, tiny_model_dir, other_model_dir)
    tiers = make_tiers(dram=0, ssd=2 << 20)
    for tier in ("remote", "ssd"):
        a = tiers.load("a")
        assert a.tier == tier and a.model_files.is_relative_to(tiers.ssd.root)
        b = tiers.load("b")
        assert json.loads((a.model_files / "config.json").read_text())
        b.release()
        a.release()
    a = tiers.load("a")
    assert tiers.evict(a.ref)["ssd"] and tiers.ssd.path(tiers.key("a")) is None  # hidden now
    assert json.loads((a.model_files / "config.json").read_text())  # ... yet still there
    a.release()
    assert not a.model_files.exists()  # gone with its last pin


def test_concurrent_loads_keep_to_the_ssd_budget(tmp_path, tiny_model_dir, other_model_dir, make_tiers,
                                                 monkeypatch) -> None:
    """An SSD room for one checkpoint and two loads from the store at once: the second sees the
    first's reservation and does not cache its copy, so the tier never holds more than its
    budget (before, each counted only installed entries and both were installed)."""
    import threading

    import ember.loader.remote as remote

    _two(tmp_path, tiny_model_dir, other_model_dir)
    cap = 2 << 20
    tiers = make_tiers(ssd=cap)
    real = remote.download_partitions
    other: list = []
    started = threading.Event()

    def meanwhile(*args, **kwargs):
        if not started.is_set():
            started.set()
            t = threading.Thread(target=lambda: other.append(tiers.load("b")), daemon=True)
            t.start()
            t.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, "download_partitions", meanwhile)
    a = tiers.load("a")
    assert a.tier == other[0].tier == "remote"
    assert tiers.ssd.used_bytes() <= cap and list(tiers.ssd.entries()) == [tiers.key("a")]
    assert list(tiers.ssd.tmp.iterdir()) == []
    a.release()
    other[0].release()


def test_probe_file_of_a_killed_worker_is_swept(tmp_path) -> None:
    """A worker killed while probing the SSD tier's bandwidth leaves its probe file in .tmp; the
    next start removes it (the sweep skipped files: it only removed directories)."""
    import subprocess
    import sys

    from ember.loader.ssd import SsdTier

    root = tmp_path / "ssd"
    SsdTier(root, 1 << 30).close()
    killed = ("import os, sys; from ember.loader import bandwidth\n"
              "os.unlink = lambda path: os._exit(9)  # killed where the probe would be removed\n"
              "bandwidth._probe_file(sys.argv[1], 4 << 20, 1)\n")
    subprocess.run([sys.executable, "-c", killed, str(root / ".tmp")], timeout=60)
    assert [p.is_file() for p in (root / ".tmp").iterdir()] == [True]
    SsdTier(root, 1 << 30).close()
    assert list((root / ".tmp").iterdir()) == []
