"""The engine's batched KV cache: one cache for all running sequences of an instance, laid out
over the model's own attention (transformers' Cache API), no attention kernel of ours.

Rows are sequences, right-aligned: row i holds its tokens in columns [pad[i], n) and zeros
(masked out by the attention mask) before. A decode step appends one column for every row;
a new group of sequences (prefilled together) is merged in by re-aligning to the longer length;
finished rows are dropped and all-pad columns on the left trimmed in the same copy. Each layer
writes into a buffer with spare columns, so a decode step is an in-place write, not the
concatenation (a copy of the whole cache per token) that transformers' DynamicLayer does.

Bytes: a layer's buffer never has more columns than `max_len`, the longest prompt + max_tokens
among its rows (the engine passes it to `make_cache`, `cache_select` and `cache_merge`), so the
cache holds at most rows x max_len tokens: the footprint the engine admits against its budget,
which is what the placement books on the device. Spare columns are taken from that bound, never
added to it. Merge and select copy one layer at a time and let go of the old buffers of that layer
before the next, so their transient peak is the new cache plus about two layers' worth (an
L-layer model: the budget x (1 + 2/L) at most), not old + new + merged copies of the whole cache.

`kv_bytes_per_token` is the budget's unit: layers x KV heads x head dim x 2 (K and V) x dtype bytes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ember.loader.model import kv_bytes_per_token  # noqa: F401 - the budget's unit, re-exported

GROW = 64  # spare columns allocated when a layer's buffer must grow


def make_cache(config: Any, max_len: int) -> Any:
    """An empty batched cache the model's forward accepts (a DynamicCache of our layers) whose rows
    never hold more than `max_len` tokens (the longest prompt + max_tokens among them)."""
    from transformers.cache_utils import Cache, DynamicCache

    class _Cache(DynamicCache):
        def __init__(self) -> None:  # every layer full-length; sliding windows stay correct (see module doc)
            Cache.__init__(self, layer_class_to_replicate=partial(_layer_class(), max_len=max_len))

    return _Cache()


_LAYER: Any = None


def _layer_class() -> Any:
    """Built on first use, so importing this module does not import transformers."""
    global _LAYER
    if _LAYER is not None:
        return _LAYER
    import torch
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """K/V of one layer in a buffer [B, heads, capacity, head_dim]; `n` columns are used and
        capacity <= `max_len`."""

        def __init__(self, max_len: int) -> None:
            super().__init__()
            self.max_len = max_len

        def _capacity(self, n: int) -> int:
            """Columns to allocate for `n` used ones: spare room for decode steps, within `max_len`."""
            if n > self.max_len:
                raise RuntimeError(f"KV cache row of {n} tokens exceeds its bound of {self.max_len}")
            return min(n + GROW, self.max_len)

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            self.device = key_states.device
            self.kbuf = self.vbuf = None
            self.n = 0
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            need = self.n + q
            if self.kbuf is None or need > self.kbuf.shape[-2]:
                self._resize(key_states, self._capacity(need))
            self.kbuf[:, :, self.n:need] = key_states
            self.vbuf[:, :, self.n:need] = value_states
            self.n = need
            self.keys, self.values = self.kbuf[:, :, :need], self.vbuf[:, :, :need]
            return self.keys, self.values

        def _resize(self, like: Any, capacity: int) -> None:
            b, h, _, d = like.shape
            k = torch.zeros((b, h, capacity, d), dtype=like.dtype, device=like.device)
            v = torch.zeros_like(k)
            if self.kbuf is not None and self.n:
                k[:, :, :self.n] = self.kbuf[:, :, :self.n]
                v[:, :, :self.n] = self.vbuf[:, :, :self.n]
            self.kbuf, self.vbuf = k, v

        def get_seq_length(self) -> int:
            return self.n if self.is_initialized else 0

        def select(self, rows: Any, drop_left: int, max_len: int) -> None:
            """Keep `rows` and the columns from `drop_left` on; rows now hold at most `max_len` tokens."""
            n = self.n - drop_left
            self.max_len = max_len
            self.keys = self.values = None
            # one of K/V at a time, each old buffer let go once copied (bounds the transient peak)
            self.kbuf = self._rows_of(self.kbuf, rows, drop_left, n)
            self.vbuf = self._rows_of(self.vbuf, rows, drop_left, n)
            self.n = n
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

        def _rows_of(self, buf: Any, rows: Any, drop_left: int, n: int) -> Any:
            kept = buf[:, :, drop_left:drop_left + n].index_select(0, rows)
            capacity = self._capacity(n)
            if capacity == n:
                return kept
            out = torch.zeros((kept.shape[0], kept.shape[1], capacity, kept.shape[3]), dtype=kept.dtype,
                              device=kept.device)
            out[:, :, :n] = kept
            return out

        def merge(self, other: Any, max_len: int) -> None:
            """Append `other`'s rows below ours, both right-aligned to the longer length; rows now hold
            at most `max_len` tokens. `other` gives up its buffers."""
            n = max(self.n, other.n)
            self.max_len = max_len
            self.keys = self.values = other.keys = other.values = None
            self.kbuf, other.kbuf = self._stack(self.kbuf, self.n, other.kbuf, other.n, n), None
            self.vbuf, other.vbuf = self._stack(self.vbuf, self.n, other.vbuf, other.n, n), None
            self.n = n
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

        def _stack(self, mine: Any, n_mine: int, theirs: Any, n_theirs: int, n: int) -> Any:
            b1 = mine.shape[0]
            buf = torch.zeros((b1 + theirs.shape[0], mine.shape[1], self._capacity(n), mine.shape[3]),
                              dtype=mine.dtype, device=mine.device)
            buf[:b1, :, n - n_mine:n] = mine[:, :, :n_mine]
            buf[b1:, :, n - n_theirs:n] = theirs[:, :, :n_theirs]
            return buf

    _LAYER = SlotLayer
    return SlotLayer


def cache_len(cache: Any) -> int:
    return cache.layers[0].n if cache is not None and cache.layers else 0


def cache_select(cache: Any, rows: Any, drop_left: int, max_len: int) -> None:
    """Keep `rows` (and the columns from `drop_left` on), whose longest need is `max_len` tokens."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.select(rows, drop_left, max_len)


def cache_merge(cache: Any, other: Any, max_len: int) -> None:
    """Append `other`'s rows (it is emptied); `max_len`: the longest need among all rows now."""
    if len(cache.layers) != len(other.layers):
        raise RuntimeError("caches of different depth cannot be merged")
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        if theirs.is_initialized:
            mine.merge(theirs, max_len)


def cache_nbytes(cache: Any) -> int:
    """Bytes the cache's buffers hold now (capacity included)."""
    if cache is None:
        return 0
    return sum(2 * layer.kbuf.numel() * layer.kbuf.element_size() for layer in cache.layers
               if layer.is_initialized and layer.kbuf is not None)
