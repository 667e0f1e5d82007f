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

The store owns every byte: the cache is its owner ``kv/<cache_id>``, and its
host memory (prefill block buffers, the reads and spills of its blocks) and,
where the store has a GPU tier on the K/V's device, its device memory come
from the store's tiers, charged to that owner (:mod:`tiered.kv.memory`).

The device budget (the cache's share of the GPU tier, or a private budget
without one) covers resident blocks, staging slots and tails; blocks are
spilled (oldest first, through an eviction policy) to stay within it. A
prefill with a budget does not hold the prompt's K/V on the device until its
last layer: right after each layer's attention, the full blocks of its new
tokens are copied into host block buffers, and at the last layer those
buffers are handed to the store's puts without ever being whole on the
device (:mod:`tiered.kv.budget`).

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
the blocks with the other layers' (a stored prefix must hold every layer).

Modules: the layer view in :mod:`tiered.kv.tiered_layer`, gathers in
:mod:`tiered.kv.gather`, budgets and spills in :mod:`tiered.kv.budget`, the
store memory in :mod:`tiered.kv.memory`, prefix load and save in
:mod:`tiered.kv.loading`, crop, batch edits and ``copy.deepcopy`` in
:mod:`tiered.kv.edit`.

Call order: ``TieredCache(config, kv, model=model)`` -> ``open()`` (starts the
gather thread) or ``with`` -> ``load_prefix(ids)`` (optional) ->
``model.generate(ids, cache=cache)`` or manual forwards -> ``close()``.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.cache_utils import Cache, DummyLayer

from tiered.policies import Observation, create_eviction_policy

from ..sizes import parse_size
from . import edit
from .blocks import Block, KVCacheError
from .budget import BudgetMixin
from .gather import GatherMixin
from .layers import LayerPlan, plan_layers
from .loading import PrefixMixin
from .memory import DeviceMemory, HostMemory, owner_name, weak_callback
from .prefix import KVStore
from .tiered_layer import TieredLayer
from .tokens import TokenLog


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers holding KV, kv_heads, head_dim) of a decoder config."""
    plan = _plan(config)
    return len(plan.rows), plan.kv_heads, plan.head_dim


def _plan(config) -> LayerPlan:
    try:
        return plan_layers(config)
    except ValueError as e:
        raise KVCacheError(str(e)) from e


class TieredCache(BudgetMixin, GatherMixin, PrefixMixin, Cache):
    """See the module docstring.

    ``kv``: a :class:`KVStore` (spills and prefix reuse), or None for a cache with
    no store (then ``device_budget`` must be None).
    ``cache_id``: the cache is the store's owner ``kv/<cache_id>`` (default: a short
    unique id; a ``copy.deepcopy`` gets one of its own): every byte it takes from the
    store is charged to it (``store.owners()``), and the config's ``[owners.kv]``
    shares apply to it.
    ``host_share``: its guaranteed share of the store's host tier (a size, or "25%");
    None: the config's share, else elastic (it competes for what other owners'
    shares leave, and lets go of pinned blocks when another owner needs room).
    ``device_budget``: bytes of KV (blocks + staging + tails) allowed on the compute
    device. Where the store has a GPU tier on the K/V's device (``store.device_tier``),
    it is the cache's share of that tier (a size, or "25%" of the tier), and the
    blocks, slots and tails are the tier's buffers (None: the config's share, else
    elastic: blocks are spilled when
    the tier has no room or another owner asks for some). Without a GPU tier it is a
    private budget of PyTorch-allocated tensors (None: unlimited).
    ``lookahead``: layers gathered ahead of the computing one on the gather thread
    (0: gather on demand in the compute thread; "auto": 1 where CUDA is available,
    else 0 -- on a CPU the gather is a memcpy competing with the compute for the
    same cores, measured faster in the compute thread on 2 cores; the store reads
    of the next layer are still issued ahead, while this layer computes).
    ``read_window``: stored blocks a prefix load reads ahead (a decode step reads each layer's
    stored blocks in one batched read, the next two layers' started ahead, within the host budget).
    ``model``: the model whose forwards feed this cache; while the cache is open, the
    input ids of its forwards are recorded, so that a computed block is saved as a
    prefix only under the hash of the tokens it holds. Without it (or once a step's
    ids are not known) computed blocks are not saved; stored prefixes still load.
    """

    def __init__(self, config, kv: KVStore | None = None, *, block_size: int | None = None,
                 device_budget: int | str | None = None, lookahead: int | str = "auto", read_window: int = 8,
                 device_policy: str = "lru", io_timeout: float = 120.0, model: torch.nn.Module | None = None,
                 cache_id: str | None = None, host_share: int | str | None = None) -> None:
        plan = _plan(config)
        self._settings = dict(config=config, kv=kv, block_size=block_size, device_budget=device_budget,
                              lookahead=lookahead, read_window=read_window, device_policy=device_policy,
                              io_timeout=io_timeout, model=model, host_share=host_share)
        try:
            self.owner = owner_name(cache_id)
        except ValueError as e:
            raise KVCacheError(f"TieredCache cache_id: {e}") from None
        self.host_share = host_share
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
        self._device_share = device_budget  # a share of the GPU tier may be a percentage of it
        percent = isinstance(device_budget, str) and device_budget.strip().endswith("%")
        self.device_budget = None if device_budget is None or percent else parse_size(
            device_budget, where="TieredCache device_budget")
        if device_budget is not None and kv is None:
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
        self._host: HostMemory | None = None  # the host reservation, while open
        self._host_closer = None
        self._host_budget: int | None = None  # the host budget planned with this step (_host_plan)
        self._pin_lock = threading.Lock()  # step pins: the gather and another owner's on_pressure
        self._reads_gen = 0  # bumped when read buffers are given back: a later-ending read releases its own
        self._reset_state()

    def _reset_state(self) -> None:
        self._device_policy = create_eviction_policy(self._device_policy_name)
        self._blocks: list[Block] = []
        self._committed = 0  # tokens in full blocks
        self._geometry: tuple | None = None  # (batch, dtype, device) once the first update ran
        self._slots: list[list[torch.Tensor | None]] = [[None, None] for _ in range(self.lookahead + 1)]
        self._turn = 0  # slot of the next update call
        self._pending: deque = deque()  # scheduled gathers: (layer, tokens, slot, future)
        self._compute_stream = None  # CUDA: the stream the model runs on (slots are used there)
        self._gather_stream = None  # CUDA: gathers copy on their own stream, ordered by events
        self._staging = None  # CUDA: where host blocks land before the cat into a slot (gather stream only)
        self._host_blocks: dict[int, tuple] = {}  # prefill: block index -> (HostBuffer, [L, 2, B, H, bs, D])
        self._table_room: dict[int, list] = {}  # prefill: block index -> per part, room for its put's checksum table
        self._plan = None  # this step's gather plan (tiered.kv.plan.StepPlan), with its reads in flight
        self._landing_idle: list = []  # host buffers for layers' range reads, idle (kept across steps)
        self._landing_bytes = 0  # bytes of the read buffers, idle or in use
        self._steps = 0  # forwards whose last layer ran
        self._blocks_gen = 0  # bumped whenever a block's device copy changes (the plan is then stale)
        self._step_leases: dict = {}  # (block position, part) -> Lease of a host copy pinned for this step
        self._step_pinned = 0
        self._gathering = None  # the part a gather is copying (its step pins stay under pressure)
        self._device = DeviceMemory()  # chosen at the first update (the K/V's device)
        self._device_closer = lambda: None
        self._device_wanted = 0  # bytes another owner asked the GPU tier for (spilled after the step)
        self._retired: list = []  # slot tensors freed at the next step (see _retire)
        self._hashes: list[str] = []  # chained hashes of the declared prompt's full blocks
        self._prefix_rows = 1  # batch rows the loaded prefix stands for (batch_repeat_interleave before a step)
        self._prefix_dtype = None  # dtype of the loaded prefix blocks (checked at the first update)
        self._tokens.reset()
        for layer in self._tlayers:
            layer.reset()
            layer.is_initialized = False
        self.counters = {"gather_wait_s": 0.0, "gathers": 0, "gathers_prefetched": 0, "spilled_blocks": 0,
                         "spilled_bytes": 0, "store_reads": 0, "range_reads": 0, "reads_ahead_failed": 0, "read_wait_s": 0.0, "gather_copies": 0, "prefix_tokens_loaded": 0,
                         "prefix_blocks_saved": 0, "device_peak": 0, "host_blocks_refused": 0}

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> "TieredCache":
        if not self._opened:
            if self.lookahead:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiered-kv-gather")
            if self.kv is not None:
                self._host = HostMemory(self.kv.store, self.owner, self.host_share, weak_callback(self._host_pressure))
                self._host_closer = weakref.finalize(self, self._host.close)  # an unclosed cache gives it back
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
            if self._host_closer is not None:
                self._host_closer()
                self._host, self._host_closer, self._host_budget = None, None, None
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
        return TieredCache(**self._settings)  # an owner of its own

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
        self._drop_host_blocks()
        if self._gather_stream is not None:  # the slots are freed next: no copy may still write them
            self._gather_stream.synchronize()
        self._release_step_leases()
        self._drop_reads(wait=True)
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
        self._free_device()
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
            self._open_device(k.device)
            for blk in self._blocks:  # blocks loaded before the first update: check them now
                self._check_block(blk)
            if self._blocks and b != 1:  # repeat the loaded row to the batch
                edit.select_rows(self, torch.zeros(b, dtype=torch.long), prefer_resident=True)
        elif self._geometry != (b, k.dtype, k.device):
            raise KVCacheError(f"TieredCache: layer K/V are {b}x{k.dtype} on {k.device}, the cache holds "
                               f"{self._geometry[0]}x{self._geometry[1]} on {self._geometry[2]}")

    def _open_device(self, device: torch.device) -> None:
        """Take the cache's device memory: the store's GPU tier when it is on ``device``."""
        self._device = DeviceMemory.for_kv(None if self.kv is None else self.kv.store, device,
                                           self._device_share, self.owner, weak_callback(self._device_pressure))
        if not self._device.shared and self.device_budget is None and self._device_share is not None:
            raise KVCacheError(f"TieredCache: device_budget {self._device_share!r} is a share of the store's GPU "
                               f"tier, but the store has none on {device}; give a size")
        self._device_closer = weakref.finalize(self, self._device.close)  # an unclosed cache gives it back
        if self._compute_stream is not None:
            self._device.streams = [self._compute_stream, self._gather_stream]

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

    def _check_block(self, blk: Block) -> None:
        if blk.data is not None:
            b, dtype, device = self._geometry
            want = (self.num_layers, 2, b, self.kv_heads, self.block_size, self.head_dim)
            if tuple(blk.data.shape) != want or blk.data.dtype != dtype:
                raise KVCacheError(f"TieredCache: loaded block {blk.index} is {blk.data.dtype}"
                                   f"{tuple(blk.data.shape)}, expected {dtype}{want}")
            if blk.data.device != device:
                blk.data = blk.data.to(device)


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
            self._host_plan(refresh=True)
            self._free_retired()  # the previous forward is over
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
            for t in self._slots[slot]:
                self._retire(t)
            self._slots[slot] = [None, None]
        # else: attention consumes the returned K/V before the next layer's update, and a gather
        # overwrites this slot only after that (CUDA: after an event recorded at that update)
        self._append_tail(layer, k, v)
        if n_new > 1 and self._budget() is not None and layer.tail_len >= self.block_size:
            self._stage_to_host(layer)
            self.counters["device_peak"] = max(self.counters["device_peak"], self.device_bytes()["total"])
        if l == self.num_layers - 1:
            self._commit()
            self._enforce_budget()
            self._steps += 1  # the next step plans anew (host copies come and go)
            self._schedule(0, 1)
            self._prefetch_reads(0)
        else:
            self._schedule(l + 1, n_new)
            if self._part_of[l + 1] != self._part_of[l]:
                self._prefetch_reads(l + 1)
        return kk, vv


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
        b, dtype, _device = self._geometry
        for j in range(full):
            index = len(self._blocks)
            data = self._dev_empty((self.num_layers, 2, b, self.kv_heads, bs, self.head_dim), dtype)
            for l, layer in enumerate(self._tlayers):
                data[l, 0].copy_(layer.tail_k[:, :, j * bs:(j + 1) * bs])
                data[l, 1].copy_(layer.tail_v[:, :, j * bs:(j + 1) * bs])
            blk = Block(index, data)
            self._save_prefix(blk)
            self._blocks.append(blk)
            self._device_policy.admit(Observation(f"b{index}", blk.nbytes, "kv", "write", "device"))
        for layer in self._tlayers:
            rest = tail - full * bs
            if rest:
                self._set_tail(layer, layer.tail_k[:, :, full * bs:].clone(), layer.tail_v[:, :, full * bs:].clone())
            else:
                self._set_tail(layer, None, None)
        self._committed += full * bs


    def stats(self) -> dict:
        out = dict(self.counters)
        out["tokens"] = self.get_seq_length()
        out["blocks"] = len(self._blocks)
        out["resident_blocks"] = sum(1 for b in self._blocks if b.data is not None)
        out["device_bytes"] = self.device_bytes() if self._geometry else None
        out["device_budget"] = self._budget() if self._geometry else self.device_budget
        out["owner"] = self.owner
        out["host_pinned"] = self._step_pinned  # stored blocks pinned for this step's later layers
        out["device_tier"] = self._device.shared  # blocks, slots and tails are buffers of the store's GPU tier
        return out
