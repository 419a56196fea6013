"""The DRAM tier's retention priority: the lowest `keep` goes first, then the least recently used
(ember.loader.retention), through a real pool, and through NodeTiers loads on every path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.loader import open_store
from ember.loader.dram import DramTier
from ember.loader.retention import victim

BLOCK = 1 << 16


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DramTier]:
    """A real DRAM tier of four blocks (one entry each)."""
    tier = DramTier(tmp_path / "node", 4 * BLOCK, block_bytes=BLOCK)
    yield tier
    tier.destroy()


def _fill(tier: DramTier, name: str, keep: int = 0, *, held: bool = False):
    """A ready entry of one block with retention priority `keep`, used now; pinned if `held`."""
    entry = tier.allocate(name, BLOCK, keep=keep)
    assert entry is not None, name
    entry = tier.commit(name)
    if not held:
        tier.unpin(entry)
    return entry


def _use(tier: DramTier, name: str, keep: int | None = None) -> None:
    """A DRAM hit: pinned, marked used, released."""
    entry = tier.pin(name, keep=keep)
    assert entry is not None, name
    tier.unpin(entry)


def test_victim_takes_the_lowest_keep_then_the_least_recently_used_then_the_lowest_name() -> None:
    assert victim([]) is None
    assert victim(iter(())) is None
    assert victim([("only", 5, 1.0)]) == "only"
    assert victim([("old-kept", 1, 1.0), ("new", 0, 9.0), ("newer", 0, 10.0)]) == "new"
    assert victim([("a", 2, 1.0), ("b", 1, 5.0), ("c", 1, 3.0)]) == "c"
    assert victim([("b", 0, 2.0), ("a", 0, 2.0), ("c", 0, 2.0)]) == "a"  # a tie: by name, not input order
    assert victim((n, k, t) for n, k, t in [("z", 0, 2.0), ("y", 1, 2.0)]) == "z"


def test_dram_evicts_the_lowest_keep_first_then_lru(pool: DramTier) -> None:
    _fill(pool, "big", keep=1)  # used long ago, but a cold start of it would miss its SLO
    for name in ("a", "b", "c"):
        _fill(pool, name)
    assert set(pool.holdings()) == {"big", "a", "b", "c"}
    _fill(pool, "d")
    assert set(pool.holdings()) == {"big", "b", "c", "d"}  # the LRU keep-0 entry went, not the older keep-1 one
    _use(pool, "b")  # equal keeps: LRU still decides, so c (not b) is next
    _fill(pool, "e")
    assert set(pool.holdings()) == {"big", "b", "d", "e"}
    assert pool.lookup("big").keep == 1 and pool.lookup("e").keep == 0
    # the latest use sets the priority: big used with keep 0 is plain LRU again, and older than them all
    _use(pool, "b", keep=3)
    _use(pool, "big", keep=0)
    assert pool.lookup("b").keep == 3 and pool.lookup("big").keep == 0
    _fill(pool, "f")
    assert set(pool.holdings()) == {"big", "b", "e", "f"}  # d: the LRU of keep 0 (big was used after it)
    _use(pool, "b")  # keep None: unchanged
    assert pool.lookup("b").keep == 3


def test_a_kept_entry_goes_only_when_no_lower_keep_is_unpinned(pool: DramTier) -> None:
    _fill(pool, "kept", keep=1)
    held = [_fill(pool, n, held=True) for n in ("p", "q", "r")]  # keep 0, but in use
    assert pool.allocate("new", BLOCK) is not None  # the keep-1 entry is the only one that may go
    assert set(pool.holdings()) == {"p", "q", "r"}
    pool.abort("new")
    assert pool.allocate("more", 2 * BLOCK) is None  # pinned entries never go, whatever their keep
    assert set(pool.holdings()) == {"p", "q", "r"}
    for e in held:
        pool.unpin(e)


def test_pinned_high_keep_and_low_keep_entries_alike_never_go(pool: DramTier) -> None:
    low = _fill(pool, "low", keep=0, held=True)
    _fill(pool, "top", keep=9)
    _fill(pool, "mid", keep=1)
    _fill(pool, "one", keep=1)
    _use(pool, "one")  # mid is now the LRU of the keep-1 entries
    assert pool.allocate("x", BLOCK, keep=5) is not None
    assert set(pool.holdings()) == {"low", "top", "one"}  # low is pinned: mid (keep 1, LRU) went
    assert pool.lookup("x") is None and pool.commit("x").keep == 5
    pool.unpin(pool.lookup("x"))
    pool.unpin(low)
    _fill(pool, "y")
    assert set(pool.holdings()) == {"top", "one", "x", "y"}  # low unpinned, keep 0: first to go


def test_an_index_written_without_keep_still_loads_as_keep_0(tmp_path: Path) -> None:
    """A pool kept by a worker from before retention priorities (its index has no "keep")."""
    tier = DramTier(tmp_path / "node", 4 * BLOCK, block_bytes=BLOCK)
    try:
        for name in ("a", "b", "c"):
            _fill(tier, name)
        tier.close(keep=True)
        index_file = tier.dir / "index.json"
        index = json.loads(index_file.read_text())
        for e in index["entries"].values():
            e.pop("keep", None)
        index_file.write_text(json.dumps(index))
        tier = DramTier(tmp_path / "node", 4 * BLOCK, block_bytes=BLOCK)
        assert set(tier.holdings()) == {"a", "b", "c"}
        assert tier.lookup("a").keep == 0 and tier.pin("b").keep == 0
        tier.unpin(tier.lookup("b"))
        _fill(tier, "kept", keep=1)
        _fill(tier, "d")
        assert set(tier.holdings()) == {"b", "c", "kept", "d"}  # a: keep 0 by default, the LRU one
        _use(tier, "c", keep=2)
        assert json.loads(index_file.read_text())["entries"]["c"]["keep"] == 2
    finally:
        tier.destroy()


def test_node_tiers_load_sets_the_dram_keep_on_every_path(tmp_path, tiny_model_dir, make_tiers) -> None:
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    key = tiers.key("tiny")
    first = tiers.load("tiny", dram_keep=1)  # remote, streamed into DRAM
    assert first.tier == "remote" and tiers.dram.lookup(key).keep == 1
    first.release()
    hit = tiers.load("tiny", dram_keep=0)  # a DRAM hit: the latest use sets it
    assert hit.tier == "dram" and tiers.dram.lookup(key).keep == 0
    hit.release()
    tiers.load("tiny", dram_keep=2).release()
    assert tiers.dram.lookup(key).keep == 2
    tiers.load("tiny").release()  # a caller that says nothing: 0 (plain LRU)
    assert tiers.dram.lookup(key).keep == 0
    assert tiers.dram.evict(key)
    from_ssd = tiers.load("tiny", dram_keep=1)  # an SSD hit read into DRAM
    assert from_ssd.tier == "ssd" and tiers.dram.lookup(key).keep == 1
    from_ssd.release()
