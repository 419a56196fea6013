"""The worker's DRAM prefetcher (POST /internal/prefetch) on real node tiers: a repeat while one
runs starts nothing, and its `dram_keep` is the entry's once the running one ends (the latest use
sets an entry's keep; the repeat was dropped, keep and all)."""

from __future__ import annotations

import threading
import time

from ember.loader.store import open_store
from ember.platform.worker.prefetch import DramPrefetcher


def test_a_repeat_prefetch_while_one_runs_leaves_its_keep_on_the_entry(tmp_path, tiny_model_dir, make_tiers) -> None:
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    real_load = tiers.load
    entered, gate = threading.Event(), threading.Event()
    keeps: list[int] = []

    def gated(checkpoint: str, **kw):  # the first copy is still running when the repeats arrive
        keeps.append(kw["dram_keep"])
        entered.set()
        assert gate.wait(30)
        return real_load(checkpoint, **kw)

    tiers.load = gated  # type: ignore[method-assign]
    prefetcher = DramPrefetcher(tiers, None, "node-0", beat=lambda: False)  # type: ignore[arg-type]
    assert prefetcher.start("tiny", 1)
    assert entered.wait(30)
    assert prefetcher.start("tiny", 3) is False
    assert prefetcher.start("tiny", 2) is False  # the latest repeat is the latest use
    gate.set()
    deadline = time.monotonic() + 30
    while prefetcher.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetcher.running()
    entry = tiers.dram.lookup(tiers.key("tiny"))
    assert keeps == [1, 2] and entry is not None and entry.keep == 2
