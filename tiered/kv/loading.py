"""Prefix reuse of a TieredCache: a prompt's stored blocks loaded, its computed blocks saved.

A block is saved only under the chained hash of the tokens it holds (known from the watched
model's input ids, :mod:`tiered.kv.tokens`); a loaded block is verified by checksum, and one that
fails is deleted and recomputed.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future

import torch

from ..store import ChecksumError, StoreError
from .blocks import Block, KVCacheError, release_lease
from .prefix import KVStoreError

log = logging.getLogger("tiered.kv")


class PrefixMixin:
    """Part of :class:`~tiered.kv.cache.TieredCache` (see the module docstring)."""

    def _save_prefix(self, blk: Block) -> None:
        """A full block of the declared prompt is saved as its prefix if the tokens it holds are
        known to be the prompt's (held before the save: the save's room-making must not evict a
        sibling part). Once the cache's tokens leave the prompt, nothing more is saved under it."""
        if blk.index >= len(self._hashes) or self._geometry[0] != 1:
            return
        if self._tokens.block(blk.index, self.block_size, self.kv.identity) != self._hashes[blk.index]:
            del self._hashes[blk.index:]
            return
        blk.keys = [self.kv.block_key(self._hashes[blk.index], p) for p in self._parts]
        for key in blk.keys:
            self.kv.hold(key)
        futs = [self.kv.save(k, blk.part(i, lo, hi)) for i, (k, (lo, hi)) in enumerate(zip(blk.keys, self._parts))]
        blk.prefix, blk.saving = True, [f for f in futs if f is not None]
        if blk.saving:
            self.counters["prefix_blocks_saved"] += 1

    # -- prefix reuse ------------------------------------------------------------------------
    def load_prefix(self, input_ids: torch.Tensor) -> int:
        """Load the prompt's longest stored prefix of full blocks; returns its length in tokens.

        Call on an empty cache, then run the model on the whole prompt
        (``generate`` skips the cached tokens) or on ``input_ids[:, n:]``. At
        least one token is always left to compute. Full blocks of this prompt
        computed later are saved to the store. A block that fails its checksum
        is deleted and it and the blocks after it are recomputed. The prefix is
        one row: a first step of several rows (beam search, ``num_return_sequences``)
        continues it in each when each row is this prompt, or after
        ``batch_repeat_interleave(n)``; other rows are refused.
        """
        self._check_open()
        if self.kv is None or self.kv.identity is None:
            raise KVCacheError("load_prefix needs a KVStore with a model identity")
        if self._committed or any(layer.tail_len for layer in self._tlayers):
            raise KVCacheError("load_prefix: the cache already holds tokens; call reset() first")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise KVCacheError(f"load_prefix: expected input_ids of shape (1, n), got {tuple(input_ids.shape)}")
        for _l, _t, _s, fut in self._pending:
            fut.result(timeout=self.io_timeout)
        self._pending.clear()
        self._drop_reads(wait=True)
        ids = input_ids[0]
        self._hashes = self.kv.hashes(ids)
        limit = (ids.numel() - 1) // self.block_size
        n = self.kv.match(self._hashes[:limit], self._parts)
        todo = [(i, p, self.kv.block_key(h, p)) for i, h in enumerate(self._hashes[:n]) for p in self._parts]
        futs = deque()
        loaded: list[Block] = []
        nxt = 0
        self._host_plan(refresh=True)
        window = self._window()
        while nxt < len(todo) and len(futs) < window:
            futs.append(self._acquire(todo[nxt][2]))
            nxt += 1
        keys: list[str] = []
        try:
            for i, (lo, hi), key in todo:
                fut = futs.popleft()
                try:
                    lease = fut.result(timeout=self.io_timeout)
                except TimeoutError:  # slow, not bad: recompute this time, keep the block
                    fut.add_done_callback(release_lease)
                    break
                except KeyError:  # evicted meanwhile (e.g. by another cache): nothing to forget
                    break
                except (ChecksumError, StoreError, OSError) as e:  # damaged or unreadable: forget, recompute
                    self.kv.note_corrupt(key, e)
                    break
                try:
                    want = (hi - lo, 2, 1, self.kv_heads, self.block_size, self.head_dim)
                    shape, dtype = tuple(lease.tensor.shape), lease.tensor.dtype
                    if shape != want:
                        raise KVStoreError(f"KV block {key!r} is {dtype}{shape}, expected {want} for this model")
                    if self._geometry is not None and dtype != self._geometry[1]:
                        raise KVStoreError(f"KV block {key!r} is {dtype}, the cache holds {self._geometry[1]}")
                    if self._prefix_dtype is not None and dtype != self._prefix_dtype:
                        raise KVStoreError(f"KV block {key!r} is {dtype}, the blocks before it {self._prefix_dtype}")
                    self._prefix_dtype = dtype
                finally:
                    lease.release()
                keys.append(key)
                if len(keys) == len(self._parts):  # every part of block i checked
                    for k in keys:
                        self.kv.hold(k)
                    loaded.append(Block(i, keys=keys, prefix=True))
                    keys = []
                if nxt < len(todo):
                    futs.append(self._acquire(todo[nxt][2]))
                    nxt += 1
        finally:
            for f in futs:
                f.add_done_callback(release_lease)
        self._blocks = loaded
        self._committed = len(loaded) * self.block_size
        self._tokens.start(ids, self._committed)
        self._prefix_rows = 1
        if self._model is None and len(self._hashes) > len(loaded):
            log.warning("TieredCache.load_prefix: no model= to watch, so the cache cannot know which tokens "
                        "it computes; the prompt's computed blocks will not be saved")
        self.counters["prefix_tokens_loaded"] += self._committed
        self.kv.record_load(len(loaded), len(self._hashes) - len(loaded),
                            sum(self.kv.store.meta(k)["nbytes"] for b in loaded for k in b.keys))
        return self._committed

    def _acquire(self, key: str) -> Future:
        """store.acquire, with a key deleted meanwhile (evicted, found corrupt) as a failed future."""
        try:
            return self.kv.store.acquire(key, owner=self.owner)
        except KeyError as e:
            f: Future = Future()
            f.set_exception(e)
            return f
