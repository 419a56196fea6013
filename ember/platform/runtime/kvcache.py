"""The engine's batched KV cache: one cache for all running sequences of an instance, laid out
over the model's own attention (transformers' Cache API), no attention kernel of ours.

Rows are sequences, right-aligned: row i holds its tokens in columns [pad[i], n) and zeros
(masked out by the attention mask) before. A decode step appends one column for every row;
a new group of sequences (prefilled together) is merged in by re-aligning to the longer length;
finished rows are dropped and all-pad columns on the left trimmed in the same copy. Each layer
writes into a buffer with spare columns, so a decode step is an in-place write, not the
concatenation (a copy of the whole cache per token) that transformers' DynamicLayer does.

`kv_bytes_per_token` is the budget's unit: layers x KV heads x head dim x 2 (K and V) x dtype bytes.
"""

from __future__ import annotations

from typing import Any

from ember.loader.model import kv_bytes_per_token  # noqa: F401 - the budget's unit, re-exported

GROW = 64  # spare columns allocated when a layer's buffer must grow


def make_cache(config: Any) -> Any:
    """An empty batched cache the model's forward accepts (a DynamicCache of our layers)."""
    from transformers.cache_utils import Cache, DynamicCache

    class _Cache(DynamicCache):
        def __init__(self) -> None:  # every layer full-length; sliding windows stay correct (see module doc)
            Cache.__init__(self, layer_class_to_replicate=_layer_class())

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
        """K/V of one layer in a buffer [B, heads, capacity, head_dim]; `n` columns are used."""

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
                self._resize(key_states, need + GROW)
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

        def select(self, rows: Any, drop_left: int) -> None:
            """Keep `rows` and the columns from `drop_left` on (one copy)."""
            n = self.n - drop_left
            k = self.kbuf.index_select(0, rows)[:, :, drop_left:self.n]
            v = self.vbuf.index_select(0, rows)[:, :, drop_left:self.n]
            self.kbuf = torch.zeros((k.shape[0], k.shape[1], n + GROW, k.shape[3]), dtype=k.dtype, device=k.device)
            self.vbuf = torch.zeros_like(self.kbuf)
            self.kbuf[:, :, :n] = k
            self.vbuf[:, :, :n] = v
            self.n = n
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

        def merge(self, other: Any) -> None:
            """Append `other`'s rows below ours, both right-aligned to the longer length."""
            n = max(self.n, other.n)
            b1, b2 = self.kbuf.shape[0], other.kbuf.shape[0]
            shape = (b1 + b2, self.kbuf.shape[1], n + GROW, self.kbuf.shape[3])
            k = torch.zeros(shape, dtype=self.kbuf.dtype, device=self.kbuf.device)
            v = torch.zeros_like(k)
            k[:b1, :, n - self.n:n] = self.kbuf[:, :, :self.n]
            v[:b1, :, n - self.n:n] = self.vbuf[:, :, :self.n]
            k[b1:, :, n - other.n:n] = other.kbuf[:, :, :other.n]
            v[b1:, :, n - other.n:n] = other.vbuf[:, :, :other.n]
            self.kbuf, self.vbuf, self.n = k, v, n
            self.keys, self.values = k[:, :, :n], v[:, :, :n]

    _LAYER = SlotLayer
    return SlotLayer


def cache_len(cache: Any) -> int:
    return cache.layers[0].n if cache is not None and cache.layers else 0


def cache_select(cache: Any, rows: Any, drop_left: int) -> None:
    for layer in cache.layers:
        if layer.is_initialized:
            layer.select(rows, drop_left)


def cache_merge(cache: Any, other: Any) -> None:
    if len(cache.layers) != len(other.layers):
        raise RuntimeError("caches of different depth cannot be merged")
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        if theirs.is_initialized:
            mine.merge(theirs)


def cache_nbytes(cache: Any) -> int:
    """Bytes the cache's buffers hold now (capacity included)."""
    if cache is None:
        return 0
    return sum(2 * layer.kbuf.numel() * layer.kbuf.element_size() for layer in cache.layers
               if layer.is_initialized and layer.kbuf is not None)
