"""Full disks under the tiers (a small tmpfs in a private mount namespace): a tier that cannot write
costs its own copy, never another tier's entry nor the load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ember.loader import open_store
from tests.platform.smalldisk import on_small_disk


def _fill(directory: Path) -> None:
    """Write a filler file until the file system holding `directory` is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _on_small_shm(tmp_path, shm, test) -> None:  # noqa: ANN001
    """Run `test(tiers)` on node tiers whose shared-memory dir is a 3 MiB tmpfs at `shm` (the
    caller points EMBER_SHM_DIR there); the tiers and any filler go afterwards."""
    from ember.loader.tiers import NodeTiers

    def body(why_not: str) -> None:
        if why_not:
            pytest.skip(why_not)
        tiers = NodeTiers(tmp_path / "node", f"file://{tmp_path / 'store'}", dram_capacity_bytes=2 << 20)
        try:
            test(tiers)
        finally:
            tiers.close(destroy_dram=True)
            with_filler = shm / "filler"
            if with_filler.exists():
                os.unlink(with_filler)

    on_small_disk(shm, "3m", body)


def test_full_shm_keeps_the_ssd_entry_and_serves_it(tmp_path, tiny_model_dir, monkeypatch) -> None:
    """/dev/shm full: the DRAM tier cannot take the model files of an SSD hit. The (valid) SSD
    entry stays and serves the load from private memory; no DRAM entry is left behind."""
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    shm = tmp_path / "shm"
    monkeypatch.setenv("EMBER_SHM_DIR", str(shm))

    def test(tiers) -> None:  # noqa: ANN001
        key = tiers.key("tiny")
        tiers.load("tiny").release()
        assert tiers.dram.evict(key) and tiers.ssd.path(key) is not None
        _fill(shm)
        got = tiers.load("tiny")
        assert got.tier == "ssd" and got.state_dict
        assert json.loads((got.model_files / "config.json").read_text())
        assert tiers.ssd.path(key) is not None  # the SSD copy was fine: kept
        assert tiers.dram.used_bytes() == 0  # the DRAM entry given up, its blocks free
        got.release()

    _on_small_shm(tmp_path, shm, test)


@pytest.mark.parametrize("when", ["before", "files"])
def test_full_shm_serves_a_store_load_without_caching_it_in_dram(tmp_path, tiny_model_dir, monkeypatch, caplog,
                                                                 when) -> None:
    """/dev/shm full during a load from the store (before the DRAM entry is made, or when its model
    files are written beside it): the load serves from memory without a DRAM entry, as a full SSD
    disk does, and says so once in the log; the SSD tier still caches it, and nothing of a DRAM
    entry is left behind."""
    import logging

    import ember.loader.remote as remote

    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "again")
    shm = tmp_path / "shm"
    monkeypatch.setenv("EMBER_SHM_DIR", str(shm))
    if when == "files":  # the pool's index still has room: the model files beside the entry fill it
        real = remote.write_model_files

        def fill_first(directory, raw, files, manifest=True):
            if str(directory).startswith(str(shm)):
                _fill(shm)
            return real(directory, raw, files, manifest)

        monkeypatch.setattr(remote, "write_model_files", fill_first)

    def test(tiers) -> None:  # noqa: ANN001
        if when == "before":
            _fill(shm)
        with caplog.at_level(logging.WARNING, logger="ember.loader"):
            for name in ("tiny", "again"):
                got = tiers.load(name)
                assert got.tier == "remote" and got.state_dict
                assert json.loads((got.model_files / "config.json").read_text())
                assert not str(got.model_files).startswith(str(shm))
                assert tiers.ssd.path(tiers.key(name)) is not None  # the SSD tier cached it
                assert tiers.dram.lookup(tiers.key(name)) is None and tiers.dram.used_bytes() == 0
                got.release()
        assert sorted(p.name for p in (tiers.dram.dir / "meta").iterdir()) == []
        said = [r for r in caplog.records if "DRAM tier" in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(said) == 1, [r.getMessage() for r in caplog.records]

    _on_small_shm(tmp_path, shm, test)
