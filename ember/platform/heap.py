"""Keeping CPython's full garbage collections off the request path of the gateway and the workers.

A full (generation 2) collection traverses every tracked object in the process while holding
the GIL. After a worker has built a model (torch, transformers and the module tree) that is
hundreds of thousands of objects: on this 2-core machine one such collection stopped the worker
for 191 ms, in the middle of steady warm traffic, a minute after its first load (`ember bench
gateway`, 160 req/s: every request in flight then, direct or through the gateway, took 200+ ms).

The gateway's full collections took 67-72 ms each at 320 req/s. So both processes move what
exists after startup (and the worker after each load) into the interpreter's permanent
generation (`gc.freeze`, O(1)): later full collections traverse only objects made since.
Frozen objects are still freed when their last reference goes (a closed instance's model
does: measured on the tiny model), but never by the cyclic collector. So when an instance is
dropped the worker checks its model went; only if something still holds it (a reference cycle)
is everything unfrozen, collected once and frozen again: a full collection stops the process as
long as the one avoided (160-190 ms here), so it is not paid at every unload.

Loads and drops run on threads of their own; the calls here are serialised by a lock.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

__all__ = ["frozen", "reclaim", "reclaim_if_held", "settle", "watch"]

_lock = threading.Lock()


def settle() -> None:
    """After startup or a load (a model was just built): a full collection, then freeze what is
    left, so no garbage is ever frozen. Only the first one (at startup, before serving) traverses
    the imports (160 ms here); later ones traverse only what came since the last freeze (about 1 ms
    after a load, measured after the tiny model and after an 80-layer Llama built on meta)."""
    with _lock:
        gc.collect()
        gc.freeze()


def reclaim() -> None:
    """An instance was just closed: make everything collectable again, collect it all once,
    freeze what survives."""
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def watch(obj: Any) -> weakref.ref[Any] | None:
    """A weak reference to check later whether `obj` went (None if it cannot have one)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def reclaim_if_held(ref: weakref.ref[Any] | None) -> bool:
    """After an instance was closed and forgotten: `reclaim` only if its model is still alive.
    True when a collection ran."""
    if ref is None or ref() is None:
        return False
    reclaim()
    return True


def frozen() -> int:
    """Objects in the permanent generation (exported as a metric, read by tests)."""
    return gc.get_freeze_count()
