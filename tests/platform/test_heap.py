"""ember.platform.heap on a real model: what the worker freezes after a load is skipped by full
collections, and an instance's model caught in a reference cycle is still collected once dropped."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.platform import heap


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # leave the test session's collector as it was


def test_a_frozen_model_is_skipped_by_full_collections_until_reclaimed(tiny_model_dir: Path,
                                                                       unfrozen_after: None) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    holder: dict[str, object] = {"model": model}
    holder["self"] = holder  # a reference cycle: only the cyclic collector can free the model now
    ref = weakref.ref(model)
    heap.settle()  # the worker, after a load
    assert heap.frozen() > 0
    del model, holder
    gc.collect()
    assert ref() is not None  # frozen: a full collection did not traverse it
    heap.reclaim()  # the worker, after dropping an instance
    assert ref() is None  # unfrozen and collected, not leaked for the life of the process
    assert heap.frozen() > 0  # what survived is frozen again


def test_a_dropped_model_is_collected_only_when_something_still_holds_it(tiny_model_dir: Path,
                                                                        unfrozen_after: None) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ref = heap.watch(model)
    heap.settle()
    del model  # its last reference: freed at once, frozen or not
    assert ref is not None and ref() is None
    assert heap.reclaim_if_held(ref) is False  # no full collection paid for it

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    holder: dict[str, object] = {"model": model}
    holder["self"] = holder
    ref = heap.watch(model)
    heap.settle()
    del model, holder
    assert ref is not None and ref() is not None  # a frozen cycle holds it
    assert heap.reclaim_if_held(ref) is True and ref() is None
