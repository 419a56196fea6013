"""The SSD tier under concurrent loads and failures: what an instance uses stays there, commits
that fail cost only the SSD copy, reservations keep to the byte budget, nothing is left behind."""

from __future__ import annotations

import errno
import json

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
