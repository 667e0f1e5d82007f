"""One KV-holding layer's view of a :class:`~tiered.kv.cache.TieredCache`, as transformers calls it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from .blocks import KVCacheError

if TYPE_CHECKING:
    from .cache import TieredCache


class TieredLayer(CacheLayerMixin):
    """One KV-holding layer's view of a :class:`TieredCache`: its tail of tokens since the last commit.

    ``window``: the sliding window of a sliding-attention layer (None: full attention).
    Such a layer's tokens are still kept in the blocks (a stored prefix needs every
    layer), but attention is handed exactly what ``DynamicSlidingWindowLayer`` hands
    it: the last ``window - 1`` cached tokens and the new ones, with the same mask sizes.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, cache: "TieredCache", index: int, window: int | None = None, shared: bool = False) -> None:
        super().__init__()
        self._cache = cache
        self.index = index  # row in a block (KV-shared layers have none)
        self.window = window
        self.shared = shared  # later layers read the K/V it returns (KV sharing): never handed a reused slot
        self.is_sliding = window is not None
        self.tail_k: torch.Tensor | None = None
        self.tail_v: torch.Tensor | None = None
        self.staged = 0  # full blocks of this step's tokens moved to host buffers (committed at the last layer)

    @property
    def tail_len(self) -> int:
        return 0 if self.tail_k is None else self.tail_k.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._cache._init_geometry(key_states, value_states)
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._cache._update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen = self.get_seq_length()
        if self.window is None:
            return seen + query_length, 0
        # DynamicSlidingWindowLayer's sizes: the last window - 1 cached tokens are visible
        return min(seen, self.window - 1) + query_length, max(seen - self.window + 1, 0)

    def get_seq_length(self) -> int:
        return self._cache._committed + self.staged * self._cache.block_size + self.tail_len

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self.tail_k = self.tail_v = None
        self.staged = 0

    def _whole_cache_only(self, *_args, **_kwargs) -> None:
        raise KVCacheError("TieredCache: crop, reorder_cache and the batch operations apply to all layers "
                           "at once; call them on the TieredCache, not on one of its layers")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _whole_cache_only
