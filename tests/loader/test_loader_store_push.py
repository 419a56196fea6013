"""Pushing a name already in a file:// store replaces it whole, even with pushes racing."""

from __future__ import annotations

import threading
from pathlib import Path

from ember.loader import open_store


def test_concurrent_pushes_of_one_name(tmp_path: Path, tiny_converted: Path) -> None:
    """Three pushes of one name at once, several times, while a reader reads its manifest: every
    push succeeds (one raised a raw OSError: ENOTEMPTY, or CheckpointNotFound), the reader never
    finds the name missing, and nothing is left beside it."""
    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_converted, "m")
    errors: list[BaseException] = []
    missing: list[int] = []
    done = threading.Event()

    def push() -> None:
        try:
            store.push(tiny_converted, "m")
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    def read() -> None:
        while not done.is_set():
            if not store.exists("m"):
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(6):
            pushers = [threading.Thread(target=push) for _ in range(3)]
            for t in pushers:
                t.start()
            for t in pushers:
                t.join()
    finally:
        done.set()
        reader.join()
    assert errors == []
    assert not missing
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".push")) == ["m"]
    assert [i.name for i in store.list()] == ["m"]


def test_a_remove_waits_for_a_push_of_the_name(tmp_path: Path, tiny_converted: Path, monkeypatch) -> None:
    """A remove that comes while a push is installing the name (between its look at what is there
    and its swap) waits for the push, then removes what it installed: the push neither fails (a raw
    FileNotFoundError: the remove had moved the old version away under it) nor leaves anything
    beside the name."""
    import ember.loader.swap as swap
    from ember.errors import CheckpointNotFound

    store = open_store(f"file://{tmp_path / 'store'}")
    store.push(tiny_converted, "m")
    removed: list[BaseException | None] = []
    removers: list[threading.Thread] = []
    real = swap._exchange

    def remove_meanwhile(a: Path, b: Path) -> bool:
        def remove() -> None:
            try:
                store.remove("m")
                removed.append(None)
            except CheckpointNotFound as e:
                removed.append(e)

        remover = threading.Thread(target=remove)
        removers.append(remover)
        remover.start()
        remover.join(1.0)  # done at once unless the push's lock holds it off
        monkeypatch.setattr(swap, "_exchange", real)
        return real(a, b)

    monkeypatch.setattr(swap, "_exchange", remove_meanwhile)
    store.push(tiny_converted, "m")  # raised FileNotFoundError when the remove did not wait
    removers[0].join(30)
    assert removed == [None] and not store.exists("m")
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".push")) == []
