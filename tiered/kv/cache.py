"""TieredCache: a transformers ``Cache`` whose KV lives in blocks across device, host and storage.

Why this shape. Attention at layer *l* needs that layer's whole K and V as
one tensor, but nothing else does, so only the layers being computed need
their full context on the compute device. The cache keeps

* *blocks*: the K/V of ``block_size`` tokens for **all** layers in one tensor
  ``[layers, 2, batch, kv_heads, block_size, head_dim]`` (one large read);
  recent blocks stay on the compute device, older ones are put into the
  :class:`~tiered.TieredStore` (a host-arena copy, durable on storage; the
  store's policy decides which host copies to drop) when the device budget
  is exceeded;
* per layer, the *tail*: tokens since the last full-block commit;
* ``lookahead + 1`` *staging slots*: contiguous buffers into which a layer's
  blocks are gathered for its attention. While layer *l* computes, a worker
  thread gathers layer *l+1* (after the last layer, layer 0 of the next step)
  into the next slot, reading blocks from the store as needed.

What attention sees is a contiguous ``[batch, kv_heads, tokens, head_dim]``
tensor holding exactly the values ``DynamicCache`` would hold, so generated
tokens and logits are the same bit for bit.

The device budget covers resident blocks, staging slots and tails; blocks
are spilled (oldest first, through an eviction policy) to stay within it.
A prefill with a budget does not hold the prompt's K/V on the device until
its last layer: right after each layer's attention, the full blocks of its
new tokens are copied into host block buffers, and at the last layer those
blocks go to the store without ever being whole on the device.

Prefix reuse: :meth:`TieredCache.load_prefix` finds the longest run of the
prompt's full blocks in the :class:`~tiered.kv.prefix.KVStore` and loads them
(verified by checksum; a bad block is deleted and recomputed), so the model
only runs on the rest; full blocks of the prompt computed here are saved.

Prefix keys: a block is saved only under the chained hash of the tokens it
holds. A ``Cache`` sees K/V, never token ids, so the cache watches the model
given as ``model=`` (a forward pre-hook records the ids of each forward given
this cache, :mod:`tiered.kv.tokens`); once a step's ids are unknown, or the
tokens leave the prompt given to ``load_prefix``, nothing more is saved.

Layers follow transformers' layer plan (:mod:`tiered.kv.layers`): KV-shared
layers hold nothing; sliding-window layers hand attention what
``DynamicSlidingWindowLayer`` would (their last ``window - 1`` tokens and the
new ones) and their staging slot holds only their window; their K/V stays in
the blocks with the other layers' (a stored prefix must hold every layer). Crop, batch
edits and ``copy.deepcopy`` are in :mod:`tiered.kv.edit`.

Call order: ``TieredCache(config, kv, model=model)`` -> ``open()`` (starts the
gather thread) or ``with`` -> ``load_prefix(ids)`` (optional) ->
``model.generate(ids, cache=cache)`` or manual forwards -> ``close()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer

from policies import Observation, create_eviction_policy

from ..sizes import parse_size
from ..store import ChecksumError, StoreError
from . import edit
from .layers import LayerPlan, plan_layers
from .prefix import KVStore, KVStoreError
from .tokens import TokenLog

log = logging.getLogger("tiered.kv")


class KVCacheError(RuntimeError):
    """Misuse of a TieredCache, or a budget it cannot keep; the message says which."""


@dataclass
class _Block:
    index: int
    data: torch.Tensor | None = None  # [L, 2, B, H, bs, D] on the compute device, when resident
    keys: list[str] | None = None  # store keys of its parts (layer ranges), once it has a stored copy
    prefix: bool = False  # keys are shared prefix blocks (kept when the cache closes)
    saving: list | None = None  # puts in flight

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers holding KV, kv_heads, head_dim) of a decoder config."""
    plan = _plan(config)
    return len(plan.rows), plan.kv_heads, plan.head_dim


def _plan(config) -> LayerPlan:
    try:
        return plan_layers(config)
    except ValueError as e:
        raise KVCacheError(str(e)) from e


def _release_lease(f) -> None:
    """Done-callback for a read nobody will consume (an error stopped the loop): unpin it."""
    if not f.cancelled() and f.exception() is None:
        f.result().release()


def _cat_into(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """``torch.cat(parts, dim=-2, out=out)`` for parts that fill ``out`` exactly: cat would resize a
    mismatched ``out`` (a view of a slot: the slot keeps uninitialised memory) with only a warning."""
    if sum(p.shape[-2] for p in parts) != out.shape[-2] or any(
            p.shape[:-2] != out.shape[:-2] or p.dtype != out.dtype for p in parts):
        raise KVCacheError(f"TieredCache: gathering {[(p.dtype, tuple(p.shape)) for p in parts]} into a slot of "
                           f"{out.dtype}{tuple(out.shape)}: the stored blocks do not match the cache's rows/dtype")
    torch.cat(parts, dim=-2, out=out)


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


class TieredCache(Cache):
    """See the module docstring.

    ``kv``: a :class:`KVStore` (spills and prefix reuse), or None for a cache with
    no store (then ``device_budget`` must be None). ``device_budget``: bytes of KV
    (blocks + staging + tails) allowed on the compute device; None: unlimited.
    ``lookahead``: layers gathered ahead of the computing one on the gather thread
    (0: gather on demand in the compute thread; "auto": 1 where CUDA is available,
    else 0 -- on a CPU the gather is a memcpy competing with the compute for the
    same cores, measured faster in the compute thread on 2 cores; the store reads
    of the next layer are still issued ahead, while this layer computes).
    ``read_window``: store blocks read ahead while gathering a layer.
    ``model``: the model whose forwards feed this cache; while the cache is open, the
    input ids of its forwards are recorded, so that a computed block is saved as a
    prefix only under the hash of the tokens it holds. Without it (or once a step's
    ids are not known) computed blocks are not saved; stored prefixes still load.
    """

    def __init__(self, config, kv: KVStore | None = None, *, block_size: int | None = None,
                 device_budget: int | str | None = None, lookahead: int | str = "auto", read_window: int = 8,
                 device_policy: str = "lru", io_timeout: float = 120.0, model: torch.nn.Module | None = None) -> None:
        plan = _plan(config)
        self._settings = dict(config=config, kv=kv, block_size=block_size, device_budget=device_budget,
                              lookahead=lookahead, read_window=read_window, device_policy=device_policy,
                              io_timeout=io_timeout, model=model)
        self.num_layers, self.kv_heads, self.head_dim = len(plan.rows), plan.kv_heads, plan.head_dim
        self._tlayers = [TieredLayer(self, row, plan.windows[i], i in plan.shared) for row, i in enumerate(plan.rows)]
        it = iter(self._tlayers)
        super().__init__(layers=[DummyLayer() if t == "dummy" else next(it) for t in plan.types])
        self.kv = kv
        self.block_size = block_size or (kv.block_size if kv is not None else 256)
        self._parts = kv.parts(self.num_layers) if kv is not None else [(0, self.num_layers)]
        self._part_of = [next(i for i, (lo, hi) in enumerate(self._parts) if lo <= l < hi)
                         for l in range(self.num_layers)]
        if kv is not None and self.block_size != kv.block_size:
            raise KVCacheError(f"TieredCache: block_size {self.block_size} differs from the KVStore's "
                               f"{kv.block_size}")
        self.device_budget = None if device_budget is None else parse_size(device_budget,
                                                                           where="TieredCache device_budget")
        if self.device_budget is not None and kv is None:
            raise KVCacheError("TieredCache: a device_budget needs a KVStore to spill blocks to")
        if lookahead == "auto":
            lookahead = 1 if torch.cuda.is_available() else 0
        if not isinstance(lookahead, int) or lookahead < 0:
            raise KVCacheError(f"TieredCache: lookahead must be an int >= 0 or 'auto', got {lookahead!r}")
        self.lookahead = lookahead
        self.read_window = max(1, read_window)
        self.io_timeout = io_timeout
        self._device_policy_name = device_policy
        self._model = model
        self._tokens = TokenLog()
        self._session = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the pid lets KVStore sweep dead sessions
        self._executor: ThreadPoolExecutor | None = None
        self._opened = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._device_policy = create_eviction_policy(self._device_policy_name)
        self._blocks: list[_Block] = []
        self._committed = 0  # tokens in full blocks
        self._geometry: tuple | None = None  # (batch, dtype, device) once the first update ran
        self._slots: list[list[torch.Tensor | None]] = [[None, None] for _ in range(self.lookahead + 1)]
        self._turn = 0  # slot of the next update call
        self._pending: deque = deque()  # scheduled gathers: (layer, tokens, slot, future)
        self._compute_stream = None  # CUDA: the stream the model runs on (slots are used there)
        self._gather_stream = None  # CUDA: gathers copy on their own stream, ordered by events
        self._staging = None  # CUDA: where host blocks land before the cat into a slot (gather stream only)
        self._host_blocks: dict[int, torch.Tensor] = {}  # prefill: block index -> [L, 2, B, H, bs, D] on the host
        self._step_leases: dict = {}  # (block index, part) -> Lease pinned for this step's layers
        self._step_pinned = 0
        self._hashes: list[str] = []  # chained hashes of the declared prompt's full blocks
        self._prefix_rows = 1  # batch rows the loaded prefix stands for (batch_repeat_interleave before a step)
        self._prefix_dtype = None  # dtype of the loaded prefix blocks (checked at the first update)
        self._tokens.reset()
        for layer in self._tlayers:
            layer.reset()
            layer.is_initialized = False
        self.counters = {"gather_wait_s": 0.0, "gathers": 0, "gathers_prefetched": 0, "spilled_blocks": 0,
                         "spilled_bytes": 0, "store_reads": 0, "prefix_tokens_loaded": 0,
                         "prefix_blocks_saved": 0, "device_peak": 0}

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> "TieredCache":
        if not self._opened:
            if self.lookahead:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiered-kv-gather")
            if self._model is not None:
                self._tokens.watch(self._model, self)
            self._opened = True
        return self

    def close(self) -> None:
        """Wait for gathers and saves, delete this cache's session blocks, stop the thread.

        Raises the first error of a prefix save (the cache's tokens were right; only
        the stored copy failed)."""
        if not self._opened:
            return
        try:
            self._drop_all()
        finally:
            self._tokens.unwatch()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._opened = False

    def __enter__(self) -> "TieredCache":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        """Forget every token (a new request); the thread keeps running."""
        self._drop_all()

    # -- edits transformers makes between steps (see tiered.kv.edit) ----------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (assisted and prompt-lookup decoding)."""
        edit.crop(self, tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes row ``beam_idx[i]``."""
        edit.select_rows(self, edit.row_index(self._batch(), beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        edit.select_rows(self, edit.row_index(self._batch(), indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        edit.select_rows(self, torch.arange(self._batch()).repeat_interleave(repeats))

    def __deepcopy__(self, memo: dict) -> "TieredCache":
        """A cache of its own (same settings, KVStore and model) holding the same tokens; open if this one is."""
        return edit.copy_cache(self)

    def _clone_empty(self) -> "TieredCache":
        return TieredCache(**self._settings)

    def _batch(self) -> int:
        if self._geometry is not None:
            return self._geometry[0]
        return self._prefix_rows if self._blocks else 0

    def _drop_all(self) -> None:
        errors = []
        for _l, _t, _s, fut in self._pending:
            try:
                fut.result(timeout=self.io_timeout)
            except BaseException as e:  # noqa: BLE001 - re-raised below after cleanup
                errors.append(e)
        self._pending.clear()
        self._host_blocks.clear()
        if self._gather_stream is not None:  # the slots are freed next: no copy may still write them
            self._gather_stream.synchronize()
        self._release_step_leases()
        for b in self._blocks:
            for f in b.saving or ():
                try:
                    f.result(timeout=self.io_timeout)
                except BaseException as e:  # noqa: BLE001 - re-raised below after cleanup
                    errors.append(e)
            for key in b.keys or ():
                if b.prefix:
                    self.kv.unhold(key)
                elif key in self.kv.store:
                    self.kv.store.delete(key)
        self._reset_state()
        if errors:
            raise errors[0]

    def _check_open(self) -> None:
        if not self._opened:
            raise KVCacheError("TieredCache is not open: call open() or use it as a context manager")

    # -- geometry and budget ------------------------------------------------------------
    def _init_geometry(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._check_open()
        b, h, _t, d = k.shape
        if (h, d) != (self.kv_heads, self.head_dim) or v.shape[1] != h or v.shape[-1] != d:
            raise KVCacheError(f"TieredCache: K/V of shape {tuple(k.shape)}/{tuple(v.shape)} do not match the "
                               f"config's {self.kv_heads} KV heads of {self.head_dim} dims")
        if self._geometry is None:
            self._check_prefix_rows(b)
            if self._blocks and self._prefix_dtype not in (None, k.dtype):
                raise KVCacheError(f"TieredCache: the loaded prefix blocks are {self._prefix_dtype}, the model's "
                                   f"K/V are {k.dtype}")
            self._geometry = (1 if self._blocks else b, k.dtype, k.device)  # loaded blocks hold one row
            if k.is_cuda:
                self._compute_stream = torch.cuda.current_stream(k.device)
                self._gather_stream = torch.cuda.Stream(k.device)
            for blk in self._blocks:  # blocks loaded before the first update: check them now
                self._check_block(blk)
            if self._blocks and b != 1:  # repeat the loaded row to the batch
                edit.select_rows(self, torch.zeros(b, dtype=torch.long), prefer_resident=True)
        elif self._geometry != (b, k.dtype, k.device):
            raise KVCacheError(f"TieredCache: layer K/V are {b}x{k.dtype} on {k.device}, the cache holds "
                               f"{self._geometry[0]}x{self._geometry[1]} on {self._geometry[2]}")

    def _check_prefix_rows(self, batch: int) -> None:
        """The first update feeds ``batch`` rows onto a loaded prefix of one row: they must all continue
        it (``batch_repeat_interleave`` asked for it, or each row is the declared prompt, as beam search
        and ``num_return_sequences`` feed it)."""
        if self._blocks and batch != self._prefix_rows and not self._tokens.rows_are_prompt(batch):
            raise KVCacheError(
                f"TieredCache: the loaded prefix is one row (repeated to {self._prefix_rows}), the forward feeds "
                f"{batch} rows that are not each the prompt given to load_prefix (or their tokens are unknown: "
                f"no model= watched, or inputs other than input_ids); call cache.batch_repeat_interleave({batch}) "
                "after load_prefix to continue the prefix in every row")

    def _check_block(self, blk: _Block) -> None:
        if blk.data is not None:
            b, dtype, device = self._geometry
            want = (self.num_layers, 2, b, self.kv_heads, self.block_size, self.head_dim)
            if tuple(blk.data.shape) != want or blk.data.dtype != dtype:
                raise KVCacheError(f"TieredCache: loaded block {blk.index} is {blk.data.dtype}"
                                   f"{tuple(blk.data.shape)}, expected {dtype}{want}")
            if blk.data.device != device:
                blk.data = blk.data.to(device)

    def _token_bytes(self) -> int:
        b, dtype, _ = self._geometry
        return b * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def device_bytes(self) -> dict:
        """Bytes on the compute device: resident blocks, staging slots, tails."""
        blocks = sum(b.nbytes for b in self._blocks)
        staging = sum(t.numel() * t.element_size() for s in self._slots for t in s if t is not None)
        tails = sum(2 * (layer.tail_k.numel() * layer.tail_k.element_size())
                    for layer in self._tlayers if layer.tail_k is not None)
        return {"blocks": blocks, "staging": staging, "tails": tails, "total": blocks + staging + tails}

    def _enforce_budget(self) -> None:
        """After a step's last layer (no gather in flight): size the staging slots for the next
        decode step, then spill blocks until everything fits the budget."""
        span = max(self._committed + layer.tail_len + 1 - self._slot_start(layer) for layer in self._tlayers)
        for slot in range(len(self._slots)):
            self._reserve(slot, span)  # grows (by a block of headroom) only when needed
        used = self.device_bytes()
        self.counters["device_peak"] = max(self.counters["device_peak"], used["total"])
        if self.device_budget is None:
            return
        over = used["total"] - self.device_budget
        if over <= 0:
            return
        by_key = {f"b{b.index}": b for b in self._blocks if b.data is not None}
        for name in self._device_policy.victims(over, lambda k: k in by_key):
            self._spill(by_key[name])
            self._device_policy.remove(name)
        rest = used["staging"] + used["tails"]
        if rest > self.device_budget:
            raise KVCacheError(
                f"TieredCache: device budget {self.device_budget} bytes is smaller than the attention staging "
                f"({used['staging']} bytes: {self.lookahead + 1} slots of one layer's "
                f"{self._committed} tokens) plus tails ({used['tails']} bytes); raise device_budget or lower lookahead")

    def _spill(self, blk: _Block) -> None:
        """Move a resident block off the device: it must be readable from the store first."""
        if blk.keys is None:
            blk.keys = [self.kv.session_key(self._session, blk.index, p) for p in self._parts]
            blk.saving = [self.kv.store.put(k, blk.data[lo:hi], kind="kv") for k, (lo, hi) in zip(blk.keys, self._parts)]
        for f in blk.saving or ():
            f.result(timeout=self.io_timeout)  # visible (and durable) before the device copy goes
        blk.saving = None
        self.counters["spilled_blocks"] += 1
        self.counters["spilled_bytes"] += blk.nbytes
        blk.data = None

    # -- the update path -------------------------------------------------------------------
    def _update(self, l: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_open()
        layer = self._tlayers[l]
        n_new = k.shape[-2]
        if k.shape[0] != self._geometry[0]:
            raise KVCacheError(f"TieredCache: K/V for {k.shape[0]} rows, the cache holds {self._geometry[0]}; "
                               "to continue a cache with more rows (num_return_sequences), call "
                               "cache.batch_repeat_interleave(n) first")
        if l == 0:
            self._tokens.step(n_new, k.shape[0])
        t = layer.tail_len
        total = self._committed + t + n_new
        slot = self._take_gather(l, total)
        kk, vv, lo = self._views(slot, l, total)
        start = self._committed + t
        kk[:, :, start - lo:].copy_(k)
        vv[:, :, start - lo:].copy_(v)
        if layer.window is not None:  # what DynamicSlidingWindowLayer returns, in tensors of its own
            keep = min(start, layer.window - 1)
            kk, vv = kk[:, :, start - keep - lo:].clone(), vv[:, :, start - keep - lo:].clone()
        elif layer.shared:  # later layers attend to it (KV sharing): the next gather gets a new slot
            self._slots[slot] = [None, None]
        # else: attention consumes the returned K/V before the next layer's update, and a gather
        # overwrites this slot only after that (CUDA: after an event recorded at that update)
        if layer.tail_k is None:
            layer.tail_k, layer.tail_v = k, v
        else:
            layer.tail_k = torch.cat([layer.tail_k, k], dim=-2)
            layer.tail_v = torch.cat([layer.tail_v, v], dim=-2)
        if n_new > 1 and self.device_budget is not None and layer.tail_len >= self.block_size:
            self._stage_to_host(layer)
            self.counters["device_peak"] = max(self.counters["device_peak"], self.device_bytes()["total"])
        if l == self.num_layers - 1:
            self._commit()
            self._enforce_budget()
            self._schedule(0, 1)
            self._prefetch_reads(0)
        else:
            self._schedule(l + 1, n_new)
            if self._part_of[l + 1] != self._part_of[l]:
                self._prefetch_reads(l + 1)
        return kk, vv

    def _stage_to_host(self, layer: TieredLayer) -> None:
        """Prefill under a budget: move the full blocks of ``layer``'s tail into host block buffers
        (its attention already has them in its slot), so the device holds only the remainder."""
        bs = self.block_size
        full = layer.tail_len // bs
        b, dtype, _device = self._geometry
        base = len(self._blocks) + layer.staged
        for j in range(full):
            host = self._host_blocks.get(base + j)
            if host is None:
                host = self._host_blocks[base + j] = torch.empty(
                    (self.num_layers, 2, b, self.kv_heads, bs, self.head_dim), dtype=dtype)
            host[layer.index, 0].copy_(layer.tail_k[:, :, j * bs:(j + 1) * bs])
            host[layer.index, 1].copy_(layer.tail_v[:, :, j * bs:(j + 1) * bs])
        rest = layer.tail_len - full * bs
        if rest:
            layer.tail_k = layer.tail_k[:, :, full * bs:].clone()
            layer.tail_v = layer.tail_v[:, :, full * bs:].clone()
        else:
            layer.tail_k = layer.tail_v = None
        layer.staged += full

    def _prefetch_reads(self, l: int) -> None:
        """Without a gather thread: start the store reads layer ``l``'s gather will need, so they
        run on the I/O workers while this layer computes (a part already in host costs a lookup)."""
        if self._executor is not None or self.kv is None:
            return
        part = self._part_of[l]
        remote = [b for b in self._blocks if b.data is None and (b.index, part) not in self._step_leases]
        for b in remote[:self._window()]:
            self.kv.store.prefetch(b.keys[part])

    def _slot_start(self, layer: TieredLayer) -> int:
        """The first token a slot holds for ``layer``'s next update: 0, or for a sliding layer the first
        of the block its window starts in (so a sliding layer's slot is the size of its window)."""
        return self._first_visible_block(layer) * self.block_size

    def _views(self, slot: int, l: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Layer ``l``'s K and V in ``slot`` for its update to ``tokens`` tokens, and the first token
        they hold (``[batch, kv_heads, tokens - first, head_dim]`` each)."""
        b, _dtype, _device = self._geometry
        lo = self._slot_start(self._tlayers[l])
        pair = self._reserve(slot, tokens - lo)
        need = b * self.kv_heads * (tokens - lo) * self.head_dim
        shape = (b, self.kv_heads, tokens - lo, self.head_dim)
        return pair[0][:need].view(shape), pair[1][:need].view(shape), lo

    def _reserve(self, slot: int, tokens: int) -> list:
        """Slot ``slot``, grown to hold ``tokens`` tokens if it is smaller."""
        b, dtype, device = self._geometry
        need = b * self.kv_heads * tokens * self.head_dim
        pair = self._slots[slot]
        if pair[0] is None or pair[0].numel() < need:
            grow = need + b * self.kv_heads * self.block_size * self.head_dim  # a block of headroom
            # CUDA: owned by the compute stream (which reads it): a grown slot is freed only after its
            # attention ran, and the gather stream writes it only after an event of that stream
            owner = (torch.cuda.stream(self._compute_stream) if self._compute_stream is not None
                     else contextlib.nullcontext())
            with owner:
                pair[0] = torch.empty(grow, dtype=dtype, device=device)
                pair[1] = torch.empty(grow, dtype=dtype, device=device)
        return pair

    def _take_gather(self, l: int, tokens: int) -> int:
        """The slot holding layer ``l``'s committed blocks and tail, laid out for ``tokens``."""
        slot = self._turn
        self._turn = (self._turn + 1) % len(self._slots)
        hit = False
        while self._pending:
            pl, pt, ps, fut = self._pending[0]
            t0 = time.perf_counter()
            done = fut.result(timeout=self.io_timeout)  # it writes into a slot: wait either way
            self._pending.popleft()  # (after the wait: a timed-out gather stays known to _drop_all)
            self._after_gather(done)
            if pl == l and pt == tokens and ps == slot:
                self.counters["gather_wait_s"] += time.perf_counter() - t0
                hit = True
                break
        if not hit:
            self._pending.clear()  # out of order: later prefetches were planned for other slots
            t0 = time.perf_counter()
            self._views(slot, l, tokens)  # sized before the event (see _schedule)
            self._after_gather(self._gather(l, slot, tokens, self._compute_event()))
            self.counters["gather_wait_s"] += time.perf_counter() - t0
        else:
            self.counters["gathers_prefetched"] += 1
        self.counters["gathers"] += 1
        return slot

    def _schedule(self, first: int, n_new: int) -> None:
        """Plan gathers for layers ``first..`` so that ``lookahead`` are queued."""
        if self._executor is None:
            return
        queued = {p[0] for p in self._pending}
        nxt = first
        while len(self._pending) < self.lookahead and nxt < self.num_layers:
            if nxt not in queued:
                slot = (self._turn + len(self._pending)) % len(self._slots)
                tokens = self._committed + self._tlayers[nxt].tail_len + n_new
                # the slot is sized here, on the compute thread, before the event: memory the
                # allocator hands out later could still be used by compute kernels queued after it
                self._views(slot, nxt, tokens)
                fut = self._executor.submit(self._gather, nxt, slot, tokens, self._compute_event())
                self._pending.append((nxt, tokens, slot, fut))
            nxt += 1

    def _compute_event(self):
        """CUDA: an event after everything queued on the compute stream so far (a gather
        overwrites a slot only after the attention that last read it, and reads tails and
        resident blocks only after the kernels that wrote them)."""
        if self._compute_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._compute_stream)
        return event

    def _after_gather(self, done) -> None:
        """CUDA: the compute stream waits for a gather's copies (no host synchronisation)."""
        if done is not None:
            self._compute_stream.wait_event(done)

    def _gather(self, l: int, slot: int, tokens: int, after=None):
        """Copy layer ``l``'s blocks and tail into ``slot``; on CUDA on the gather stream, after
        the compute-stream event ``after``; returns the event that ends its copies (CUDA) or None."""
        if self._gather_stream is None:
            self._gather_copy(l, slot, tokens)
            return None
        with torch.cuda.stream(self._gather_stream):
            if after is not None:
                self._gather_stream.wait_event(after)
            self._gather_copy(l, slot, tokens)
            done = torch.cuda.Event()
            done.record(self._gather_stream)
        return done

    def _gather_copy(self, l: int, slot: int, tokens: int) -> None:
        """Copy layer ``l``'s blocks (device or store) and tail into ``slot`` laid out for ``tokens``.

        Sources are copied with one ``torch.cat(out=)`` per run of blocks (the GIL is
        released for the whole copy, so the gather thread barely slows the compute
        thread's Python). A stored part that spans several layers stays pinned for
        the step (one read and one acquire per step, not per layer) while half the
        host tier allows.
        """
        kk, vv, lo = self._views(slot, l, tokens)
        bs = self.block_size
        part = self._part_of[l]
        lo_p, hi_p = self._parts[part]
        at = l - lo_p
        keep = hi_p - lo_p > 1 and l < hi_p - 1  # later layers of this part still need it this step
        first = lo // bs
        blocks = self._blocks[first:]
        remote = [b for b in blocks if b.data is None and (b.index, part) not in self._step_leases]
        futs: dict[int, Future] = {}
        issued = 0
        window = self._window()
        held: list = []  # leases to release once their run is copied
        run_k: list[torch.Tensor] = []
        run_v: list[torch.Tensor] = []
        run_pair: list[torch.Tensor | None] = []  # a host block's [2, B, H, n, D] (K and V together), or None
        in_staging = 0  # host blocks of the current run (they land in the staging buffer)
        run_lo = lo  # a sliding layer's slot holds nothing before its window

        def issue() -> None:
            nonlocal issued
            while issued < len(remote) and len(futs) + len(held) < window:
                b = remote[issued]
                futs[b.index] = self.kv.store.acquire(b.keys[part])
                issued += 1

        def flush(upto: int) -> None:
            nonlocal run_lo
            if run_k and all(t.device == kk.device for t in run_k):
                _cat_into(run_k, kk[:, :, run_lo - lo:upto - lo])
                _cat_into(run_v, vv[:, :, run_lo - lo:upto - lo])
            elif run_k:  # host blocks into a device slot: through a device staging buffer
                # a stored block's K and V of this layer are one contiguous [2, B, H, n, D] range of its
                # pinned host copy: one async copy per block lands it in staging, then one cat per K and V
                # fills the slot (a copy straight into the strided slot would cost a temporary, a copy and
                # a kernel per K and per V)
                pairs = [p for p in run_pair if p is not None]
                staging = self._staging_for(pairs, kk.device) if pairs else None
                ks, vs, i = [], [], 0
                for tk, tv, pair in zip(run_k, run_v, run_pair):
                    if pair is None:  # on the device already (a resident block, the tail), or a strided view
                        ks.append(tk.to(kk.device, non_blocking=True))
                        vs.append(tv.to(kk.device, non_blocking=True))
                        continue
                    dst = staging[i][:, :, :, :pair.shape[-2]]
                    dst.copy_(pair, non_blocking=True)  # async from the pinned arena
                    ks.append(dst[0])
                    vs.append(dst[1])
                    i += 1
                _cat_into(ks, kk[:, :, run_lo - lo:upto - lo])
                _cat_into(vs, vv[:, :, run_lo - lo:upto - lo])
                if kk.is_cuda:  # the leases are released next: their bytes must have crossed (this waits
                    torch.cuda.current_stream(kk.device).synchronize()  # for the gather stream only)
            run_k.clear()
            run_v.clear()
            run_pair.clear()
            for lease in held:
                lease.release()
            held.clear()
            run_lo = upto

        try:
            issue()
            for b in blocks:
                if b.data is not None:
                    src = b.data[l]
                    pair = None
                else:
                    lease = self._step_leases.get((b.index, part))
                    if lease is None:
                        f = futs.pop(b.index)
                        try:
                            lease = f.result(timeout=self.io_timeout)
                        except BaseException:
                            f.add_done_callback(_release_lease)  # a read still in flight unpins when it lands
                            raise
                        self.counters["store_reads"] += 1
                        nbytes = lease.tensor.numel() * lease.tensor.element_size()
                        if keep and self._step_pinned + nbytes <= self._pin_limit():
                            self._step_leases[(b.index, part)] = lease
                            self._step_pinned += nbytes
                        else:
                            held.append(lease)
                    src = lease.tensor[at]
                    pair = src if src.device != kk.device and src.is_contiguous() else None
                run_k.append(src[0])
                run_v.append(src[1])
                run_pair.append(pair)
                in_staging += pair is not None
                if len(held) >= max(1, window // 2) or in_staging >= self.read_window:  # staging's capacity
                    flush((b.index + 1) * bs)
                    in_staging = 0
                issue()
            layer = self._tlayers[l]
            if layer.tail_k is not None:
                run_k.append(layer.tail_k)
                run_v.append(layer.tail_v)
                run_pair.append(None)
            flush(self._committed + layer.tail_len)
        finally:
            for lease in held:
                lease.release()
            for f in futs.values():  # an error left reads in flight: release what they pin
                f.add_done_callback(_release_lease)
            if l == hi_p - 1:  # the part's last layer: its step pins are done
                self._release_step_leases(part)
            self._staging = None  # transient: held only while a gather runs

    def _first_visible_block(self, layer: TieredLayer) -> int:
        """The first block this step's attention of ``layer`` sees: 0, or for a sliding layer the
        block holding the oldest of its last ``window - 1`` tokens (its tail is not yet updated)."""
        if layer.window is None:
            return 0
        return max(0, self._committed + layer.tail_len - (layer.window - 1)) // self.block_size

    def _staging_for(self, pairs: list[torch.Tensor], device) -> torch.Tensor:
        """A device buffer for ``pairs`` ([2, B, H, <= block, D] each): at most ``read_window``
        blocks of one layer, outside the device budget while a gather runs (like the temporaries
        of a direct copy into the strided slot would be); used only on the gather stream, so
        reusing it within the gather is ordered behind the previous cat."""
        shape = (len(pairs), *pairs[0].shape[:-2], self.block_size, pairs[0].shape[-1])
        if self._staging is None or self._staging.shape[0] < len(pairs) or self._staging.shape[1:] != shape[1:] \
                or self._staging.dtype != pairs[0].dtype:
            self._staging = None  # one buffer at a time
            self._staging = torch.empty(shape, dtype=pairs[0].dtype, device=device)
        return self._staging

    def _pin_limit(self) -> int:
        arena = self.kv.store.arena
        return arena.capacity // 2 if arena is not None else 0

    def _release_step_leases(self, part: int | None = None) -> None:
        for key in [k for k in self._step_leases if part is None or k[1] == part]:
            lease = self._step_leases.pop(key)
            self._step_pinned -= lease.tensor.numel() * lease.tensor.element_size()
            lease.release()

    def _commit(self) -> None:
        """After the last layer: turn every full block of the tails into an all-layer block."""
        self._release_step_leases()  # normally none left: every part's last layer released its own
        bs = self.block_size
        got = [layer.staged * bs + layer.tail_len for layer in self._tlayers]
        if any(n != got[0] for n in got) or any(layer.staged != self._tlayers[0].staged for layer in self._tlayers):
            raise KVCacheError("TieredCache: layers received different numbers of tokens in one step "
                               f"({got})")
        self._commit_host_blocks(self._tlayers[0].staged)
        tail = self._tlayers[0].tail_len
        full = tail // bs
        if not full:
            return
        b, dtype, device = self._geometry
        for j in range(full):
            index = len(self._blocks)
            data = torch.empty((self.num_layers, 2, b, self.kv_heads, bs, self.head_dim), dtype=dtype, device=device)
            for l, layer in enumerate(self._tlayers):
                data[l, 0].copy_(layer.tail_k[:, :, j * bs:(j + 1) * bs])
                data[l, 1].copy_(layer.tail_v[:, :, j * bs:(j + 1) * bs])
            blk = _Block(index, data)
            self._save_prefix(blk)
            self._blocks.append(blk)
            self._device_policy.admit(Observation(f"b{index}", blk.nbytes, "kv", "write", "device"))
        for layer in self._tlayers:
            rest = tail - full * bs
            if rest:
                layer.tail_k = layer.tail_k[:, :, full * bs:].clone()
                layer.tail_v = layer.tail_v[:, :, full * bs:].clone()
            else:
                layer.tail_k = layer.tail_v = None
        self._committed += full * bs

    def _save_prefix(self, blk: _Block) -> None:
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
        futs = [self.kv.save(k, blk.data[lo:hi]) for k, (lo, hi) in zip(blk.keys, self._parts)]
        blk.prefix, blk.saving = True, [f for f in futs if f is not None]
        if blk.saving:
            self.counters["prefix_blocks_saved"] += 1

    def _commit_host_blocks(self, count: int) -> None:
        """The blocks a prefill staged on the host become stored blocks (never resident)."""
        for _ in range(count):
            index = len(self._blocks)
            blk = _Block(index, self._host_blocks.pop(index))
            self._save_prefix(blk)
            self._spill(blk)  # readable from the store by the next step's gathers
            self._blocks.append(blk)
        for layer in self._tlayers:
            layer.staged = 0
        self._committed += count * self.block_size

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
        ids = input_ids[0]
        self._hashes = self.kv.hashes(ids)
        limit = (ids.numel() - 1) // self.block_size
        n = self.kv.match(self._hashes[:limit], self._parts)
        todo = [(i, p, self.kv.block_key(h, p)) for i, h in enumerate(self._hashes[:n]) for p in self._parts]
        futs = deque()
        loaded: list[_Block] = []
        nxt = 0
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
                    fut.add_done_callback(_release_lease)
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
                    loaded.append(_Block(i, keys=keys, prefix=True))
                    keys = []
                if nxt < len(todo):
                    futs.append(self._acquire(todo[nxt][2]))
                    nxt += 1
        finally:
            for f in futs:
                f.add_done_callback(_release_lease)
        self._blocks = loaded
        self._committed = len(loaded) * self.block_size
        self._tokens.start(ids, self._committed)
        self._prefix_rows = 1
        if self._model is None and len(self._hashes) > len(loaded):
            log.warning("TieredCache.load_prefix: no model= to watch, so the cache cannot know which tokens "
                        "it computes; the prompt's computed blocks will not be saved")
        self.counters["prefix_tokens_loaded"] += self._committed
        with self.kv._lock:
            self.kv.stats["hit_blocks"] += len(loaded)
            self.kv.stats["miss_blocks"] += len(self._hashes) - len(loaded)
            self.kv.stats["loaded_bytes"] += sum(
                self.kv.store.meta(k)["nbytes"] for b in loaded for k in b.keys)
        return self._committed

    def _window(self) -> int:
        """Blocks read ahead: ``read_window``, at most what half the host tier can pin at once."""
        if self.kv is None:
            return self.read_window
        arena = self.kv.store.arena
        b = self._geometry[0] if self._geometry else 1
        layers = max(hi - lo for lo, hi in self._parts)
        part = layers * 2 * b * self.kv_heads * self.block_size * self.head_dim * 4
        return max(1, min(self.read_window * len(self._parts), arena.capacity // (2 * part) if arena else 1))

    def _acquire(self, key: str) -> Future:
        """store.acquire, with a key deleted meanwhile (evicted, found corrupt) as a failed future."""
        try:
            return self.kv.store.acquire(key)
        except KeyError as e:
            f: Future = Future()
            f.set_exception(e)
            return f

    def stats(self) -> dict:
        out = dict(self.counters)
        out["tokens"] = self.get_seq_length()
        out["blocks"] = len(self._blocks)
        out["resident_blocks"] = sum(1 for b in self._blocks if b.data is not None)
        out["device_bytes"] = self.device_bytes() if self._geometry else None
        out["device_budget"] = self.device_budget
        return out
