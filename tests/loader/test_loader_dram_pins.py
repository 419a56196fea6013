"""DRAM tier pins: a release unpins exactly the entry its load pinned, and an entry taken out of
service (quarantined by an attach or a scrub) gives its blocks back with its last pin."""

from __future__ import annotations

import json

import torch

from ember.loader import open_store


def _entries(tiers) -> dict:
    return json.loads((tiers.dram.dir / "index.json").read_text())["entries"]


def _flip(tiers, ref: str) -> None:
    """Flip a byte of the DRAM entry of `ref` (a bit flip in memory)."""
    off, _ = tiers.dram.lookup(tiers.key(ref)).runs[0]
    tiers.dram.rw.array()[off + 100] ^= 0xFF


def test_release_after_quarantine_keeps_the_replacement_pinned(tmp_path, tiny_model_dir, other_model_dir,
                                                               make_tiers) -> None:
    """A's entry fails B's attach and is set aside; B gets a new entry. A's release must not take
    B's pin: another checkpoint then evicts nothing B uses, and A's set-aside blocks come back."""
    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_model_dir, "tiny")
    store.push(other_model_dir, "other")
    tiers = make_tiers(dram=4 << 20)  # two 2 MiB blocks: one tiny model each
    a = tiers.load("tiny")
    _flip(tiers, "tiny")
    b = tiers.load("tiny")
    assert b.tier == "ssd"
    a.release()
    assert not any("!bad-" in name for name in _entries(tiers))  # its last pin went: dropped
    assert tiers.dram.lookup(tiers.key("tiny")) is not None  # B's entry, still pinned by B
    before = {k: v.clone() for k, v in b.state_dict.items()}
    c = tiers.load("other")
    assert c.tier == "remote" and tiers.dram.lookup(tiers.key("other")) is not None  # took A's block
    assert all(torch.equal(before[k], b.state_dict[k]) for k in before)  # B's bytes untouched
    b.release()
    c.release()
    assert all(not e.get("pins") for e in _entries(tiers).values())


def test_scrubbed_entry_blocks_return_with_its_last_release(tmp_path, tiny_model_dir, other_model_dir,
                                                            make_tiers) -> None:
    """A scrub sets aside an entry its instance pins; once that instance releases, the blocks are
    free and another checkpoint is cached in them."""
    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_model_dir, "tiny")
    store.push(other_model_dir, "other")
    tiers = make_tiers(dram=2 << 20)  # one block
    retired: list[str] = []
    tiers.on_corrupt_dram = retired.append
    a = tiers.load("tiny")
    _flip(tiers, "tiny")
    assert tiers.scrub() == [a.ref] == retired
    a.release()
    assert _entries(tiers) == {} and tiers.dram.used_bytes() == 0
    c = tiers.load("other")
    assert list(tiers.dram.holdings()) == [tiers.key("other")]
    c.release()


def test_single_flight_locks_are_forgotten_after_the_loads(tmp_path, tiny_model_dir, other_model_dir,
                                                          make_tiers) -> None:
    """The per-checkpoint lock that makes concurrent loads single-flight goes with the last load
    using it: a worker loading many checkpoints over its life does not keep one per checkpoint."""
    import threading

    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_model_dir, "tiny")
    store.push(other_model_dir, "other")
    tiers = make_tiers()
    got: list = []
    threads = [threading.Thread(target=lambda n=n: got.append(tiers.load(n))) for n in ("tiny", "other") * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(g.tier for g in got).count("remote") == 2
    assert tiers._name_locks == {}
    for g in got:
        g.release()
