"""A KV cache that grows by blocks, for a batch whose finished rows leave it.

transformers' `DynamicCache` concatenates every step's keys and values onto the cache: each layer
allocates a new tensor per step and copies the whole cache into it (at 128 rows × 200 positions in
bf16, 0.25 ms per tensor, 15 ms per SmolLM2 decode step). On a CPU the freed blocks stay in glibc's
heap, and the 541-prompt IFEval evaluation grew from 1.6 to 3.9 GB chunk after chunk
(benchmarks/history/speed.md). Reserving the whole length once and handing attention a view of the filled
part does not serve: a view whose rows are further apart than its length is not contiguous, and
oneDNN's bf16 matmul then falls back to a kernel 6× slower (2.36 vs 0.37 ms for the same
scores). `StaticCache` attends over all of its reserved length at every step. `BlockLayer` keeps
each layer's keys and values contiguous with a length rounded up to a block: a new token is written
in place, the cache is copied only when a block fills, and attention runs over the block's length,
its unfilled tail masked (transformers pads the attention mask to `get_mask_sizes`; the tail is
zeros, so masked positions add exact zeros). Dropping rows moves the rows that stay but sit beyond
the new batch size into the places of the rows that left (`fill_holes` gives that order) and keeps
a prefix, which is contiguous: a step where a few rows finish copies a few rows. Any other order
(such as the copies of a prompt's cache for its k samples) is honoured by gathering anew.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

BLOCK = 32  # positions added to the cache at a time


class BlockLayer(DynamicLayer):
    """Keys and values of one layer, contiguous, grown `block` positions at a time and written in place."""

    def __init__(self, block: int = BLOCK) -> None:
        super().__init__()
        self.block, self.length = block, 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[3]))
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[3]))
        self.is_initialized = True

    def rounded(self, length: int) -> int:
        return -(-length // self.block) * self.block

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self.keys, self.values = (self._grown(t, self.rounded(end)) for t in (self.keys, self.values))
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys, self.values

    def _grown(self, cache: Tensor, capacity: int) -> Tensor:
        grown = cache.new_zeros((*cache.shape[:2], capacity, cache.shape[3]))
        grown[:, :, :self.length] = cache[:, :, :self.length]
        return grown

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.rounded(self.length + query_length), 0

    def batch_select_indices(self, indices: Tensor) -> None:
        if not self.is_initialized:
            return
        kept = len(indices)
        if kept > len(self.keys):
            self.keys, self.values = self.keys[indices], self.values[indices]
            return
        moved = (indices != torch.arange(kept, device=indices.device)).nonzero().squeeze(1)
        if len(moved):  # the right side is gathered before it is written, so any order is safe
            self.keys[moved] = self.keys[indices[moved]]
            self.values[moved] = self.values[indices[moved]]
        self.keys, self.values = self.keys[:kept], self.values[:kept]


def layer_types(config: PretrainedConfig) -> list[str]:
    return get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0]


def full_attention(config: PretrainedConfig) -> bool:
    """Every layer attends over the whole sequence (no sliding-window or chunked layers)."""
    return all(kind == "full_attention" for kind in layer_types(config))


def block_cache(config: PretrainedConfig) -> Cache:
    """A cache of `BlockLayer`s, or transformers' `DynamicCache` for models with sliding-window or
    chunked attention layers (which it keeps short on its own)."""
    if not full_attention(config):
        return DynamicCache(config=config)
    return Cache(layers=[BlockLayer() for _ in layer_types(config)])


def right_aligned(caches: list[Cache], rows: list[Tensor], n_rows: int) -> Cache:
    """One cache of `n_rows` rows from block caches of fewer rows and other lengths: cache i's rows go
    to rows `rows[i]`, right-aligned (the positions before a shorter cache stay zeros, for the caller's
    mask to leave out), as if the rows had been prefilled left-padded in one batch."""
    length = max(cache.get_seq_length() for cache in caches)
    merged = Cache(layers=[BlockLayer() for _ in caches[0].layers])
    for i, layer in enumerate(merged.layers):
        first = caches[0].layers[i]
        shape = (n_rows, first.keys.shape[1], layer.rounded(length), first.keys.shape[3])
        layer.lazy_initialization(first.keys, first.values)
        layer.keys, layer.values, layer.length = first.keys.new_zeros(shape), first.values.new_zeros(shape), length
        for cache, index in zip(caches, rows):
            part = cache.layers[i]
            layer.keys[index, :, length - part.length:length] = part.keys[:, :, :part.length]
            layer.values[index, :, length - part.length:length] = part.values[:, :, :part.length]
    return merged


def fill_holes(keep: Tensor, rows: int) -> Tensor:
    """The kept rows (ascending indices among `rows`) in an order where each keeps its place unless it
    sits beyond the new batch size, in which case it takes the place of a row that left."""
    kept = len(keep)
    order = torch.arange(kept, device=keep.device)
    leaving = torch.ones(rows, dtype=torch.bool, device=keep.device)
    leaving[keep] = False
    order[leaving[:kept]] = keep[keep >= kept]
    return order
