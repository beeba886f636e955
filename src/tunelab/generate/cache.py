"""A KV cache allocated once per batch: no torch.cat of every layer's keys and values at every step.

transformers' `DynamicLayer` grows by `torch.cat([keys, new], dim=-2)`: each decoding step copies the whole
cache of every layer (2 x layers copies of [B, H_kv, T, D]) and leaves the old blocks to the allocator, whose
growing sizes fragment the heap. `PreallocatedLayer` writes the new positions into a buffer of the batch's
final length (prompt width + max_new_tokens) and hands attention a VIEW of the filled prefix: the same values
in the same shape as DynamicLayer's tensors, so attention computes exactly what it computes with
transformers' default cache (tests/generate/test_generate_engine.py checks greedy outputs token for token).

Only plain full-attention layers, and sliding-window layers whose window is longer than the batch's final length
(Mistral's 4096), are replaced; shorter sliding windows, linear-attention or other special layers keep
transformers' own classes (hybrid models stay correct, at their usual speed).
"""

from __future__ import annotations

import functools

import torch


def _dynamic_layer_class():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _PreallocatedMixin:
    """Keys/values in [B, H_kv, capacity, D] buffers; `keys`/`values` are views of the first `length` positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.append(key_states, value_states)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H_kv, t, D] new positions after the filled prefix; the keys and values of the whole prefix."""
        t = key_states.shape[-2]
        if self.length + t > self.capacity:
            raise RuntimeError(f"KV cache full: {self.length} + {t} positions > capacity {self.capacity}")
        self._k[:, :, self.length: self.length + t].copy_(key_states)
        self._v[:, :, self.length: self.length + t].copy_(value_states)
        self.length += t
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only rows `indices` (finished rows dropped): one copy of the cache."""
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times (one prompt's cache shared by its sampled completions)."""
        if self.is_initialized:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


@functools.lru_cache(maxsize=1)
def _preallocated_class():
    """PreallocatedLayer subclasses transformers' DynamicLayer (built lazily: transformers imports slowly)."""
    return type("PreallocatedLayer", (_PreallocatedMixin, _dynamic_layer_class()), {})


def preallocated_layers(cache) -> list | None:
    """The cache's layers when every one is a filled PreallocatedLayer (what generate/llama.py's lean step
    writes into directly), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not _preallocated_class() or not layer.is_initialized for layer in layers):
        return None
    return list(layers)


def make_cache(model_config, capacity: int):
    """A transformers `DynamicCache` for `model_config` whose full-attention layers are preallocated for
    `capacity` positions. Falls back to transformers' own DynamicCache if its layer layout is unexpected."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    cache = DynamicCache(config=model_config)
    dynamic, prealloc = _dynamic_layer_class(), _preallocated_class()

    def full(layer) -> bool:  # a sliding window longer than the batch masks nothing: a full-attention layer
        return type(layer) is dynamic or (type(layer) is DynamicSlidingWindowLayer and layer.sliding_window > capacity)

    if cache.layers:
        cache.layers = [prealloc(capacity) if full(layer) else layer for layer in cache.layers]
    elif getattr(cache, "layer_class_to_replicate", None) is dynamic:
        cache.layer_class_to_replicate = functools.partial(prealloc, capacity)  # type: ignore[assignment]
    return cache
