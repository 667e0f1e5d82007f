"""The memory a TieredCache takes: all of it from its store, charged to its owner ``kv/<id>``.

Host: one reservation of the store's host tier. Its share is ``host_share=``, else the config's
``[owners.kv]`` entry, else 0 (elastic: the cache competes for what the other owners' shares leave
free). The prefill's host block buffers are allocated from it, the store's reads and puts of the
cache's blocks are charged to the same owner, and the stored blocks a decode step keeps pinned are
let go when another owner needs room (``on_pressure``).

Device: where the store has a GPU tier (``store.device_tier``) and the K/V are on that tier's
device, resident blocks, staging slots and tails are buffers of the tier, reserved under the same
owner with ``device_budget`` as the share, so an offloaded model and KV caches share one GPU
budget. Where the store has no GPU tier (or the K/V are on another device), they come from
PyTorch's allocator under the cache's private ``device_budget``.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
import weakref

import torch

from allocators import OutOfBudget

KV_OWNER = "kv"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")


def owner_name(cache_id: str | None) -> str:
    """``kv/<cache_id>``; a short unique id when None."""
    if cache_id is None:
        cache_id = uuid.uuid4().hex[:8]
    if not isinstance(cache_id, str) or not _ID.fullmatch(cache_id):
        raise ValueError(f"KV owner id {cache_id!r}: expected letters, digits, '_', '.', '-' or '/', "
                         "starting with a letter or digit")
    return f"{KV_OWNER}/{cache_id}"


def weak_callback(method):
    """``method`` (bound) as an ``on_pressure`` callback that does not keep its object alive."""
    ref = weakref.WeakMethod(method)

    def call(nbytes: int) -> int:
        bound = ref()
        return 0 if bound is None else bound(nbytes)

    return call


class HostMemory:
    """The cache's reservation of the store's host tier (see the module docstring)."""

    def __init__(self, store, owner: str, share: int | str | None, on_pressure) -> None:
        self.store = store
        self.owner = owner
        self.res = store.reserve("host", share, owner=owner, on_pressure=on_pressure)

    def budget(self) -> int:
        """Bytes the cache plans its host use within: its guaranteed share, or (elastic) what the
        tier keeps for no one (its capacity less the other owners' shares)."""
        mine = self.res.reserved
        if mine:
            return mine
        others = sum(tiers.get("host", {}).get("reserved", 0)
                     for owner, tiers in self.store.owners().items() if owner != self.owner)
        return max(0, self.store.arena.capacity - others)

    def alloc(self, nbytes: int, wait: float | None = None):
        return self.res.alloc(nbytes, wait)

    def close(self) -> None:
        self.res.close()


def tier_device(store) -> torch.device | None:
    """The device of the store's GPU tier, or None when it has none."""
    name = store.device_tier
    if name is None:
        return None
    return torch.device(store.config.tier(name).device or "cuda:0")


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class DeviceMemory:
    """Where the cache's device tensors come from: a reservation of the store's GPU tier (``res``),
    or PyTorch's allocator (``res`` None: a private budget).

    Tensors handed out by :meth:`empty` go back with :meth:`free`. On CUDA a freed buffer is given
    back to the tier only once the kernels queued before the free on ``streams`` have run (an
    event per stream), so another owner never gets bytes a queued kernel still reads or writes.
    """

    def __init__(self, res=None) -> None:
        self.res = res
        self.streams: list = []  # CUDA: the streams that use the cache's tensors
        self._bufs: dict[int, object] = {}  # data_ptr -> DeviceBuffer
        self._deferred: list = []  # (events, DeviceBuffer) freed while kernels may still use them
        self._lock = threading.Lock()

    @classmethod
    def for_kv(cls, store, device: torch.device, share, owner: str, on_pressure=None) -> "DeviceMemory":
        """The GPU tier's reservation when ``store`` has one on ``device``; else private."""
        tier = None if store is None else tier_device(store)
        if tier is None or not same_device(tier, device):
            return cls(None)
        return cls(store.reserve(store.device_tier, share, owner=owner, on_pressure=on_pressure))

    @property
    def shared(self) -> bool:
        """True when the tensors are buffers of the store's GPU tier."""
        return self.res is not None

    def budget(self, private: int | None) -> int | None:
        """The bytes the cache keeps its device tensors within: the tier share (None when
        elastic: the tier's room decides), or the private budget."""
        if self.res is None:
            return private
        return self.res.reserved or None

    def held(self) -> int | None:
        """Bytes of the tier charged to the cache (aligned, deferred frees included); None: private."""
        return None if self.res is None else self.res.held

    def empty(self, shape, dtype: torch.dtype, device, wait: float = 0.0) -> torch.Tensor:
        """An uninitialised tensor; on the tier, raises OutOfBudget when no room is found within ``wait``."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if self.res is None or nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        self._reap(wait_all=False)
        try:
            buf = self.res.alloc(nbytes, wait)
        except OutOfBudget:
            if not self._reap(wait_all=True):
                raise
            buf = self.res.alloc(nbytes, wait)
        t = buf.tensor()[:nbytes].view(dtype).view(shape)
        with self._lock:
            self._bufs[t.data_ptr()] = buf
        return t

    def owns(self, t: torch.Tensor) -> bool:
        """True when ``t`` is the whole of a tensor :meth:`empty` returned (not a part of one)."""
        with self._lock:
            buf = self._bufs.get(t.data_ptr())
        return buf is not None and t.is_contiguous() and t.numel() * t.element_size() == buf.nbytes

    def free(self, t: torch.Tensor | None) -> None:
        """Give back a tensor :meth:`empty` returned (others, e.g. the model's own K/V, are ignored)."""
        if self.res is None or t is None or t.numel() == 0:
            return
        with self._lock:
            buf = self._bufs.pop(t.data_ptr(), None)
        if buf is None:
            return
        if t.is_cuda and self.streams:
            events = []
            for s in self.streams:
                e = torch.cuda.Event()
                e.record(s)
                events.append(e)
            with self._lock:
                self._deferred.append((events, buf))
        else:
            buf.release()

    def _reap(self, wait_all: bool) -> bool:
        """Release deferred buffers whose kernels ran (``wait_all``: wait for them all); True if any."""
        with self._lock:
            items, self._deferred = self._deferred, []
        done, keep = [], []
        for events, buf in items:
            if wait_all:
                for e in events:
                    e.synchronize()
            (done if all(e.query() for e in events) else keep).append(buf)
        if keep:
            with self._lock:
                self._deferred.extend(keep)
        for buf in done:
            buf.release()
        return bool(done)

    def close(self) -> None:
        """Give every buffer back and end the reservation (the cache holds none of its tensors now)."""
        if self.res is None:
            return
        self._reap(wait_all=True)
        with self._lock:
            bufs, self._bufs = list(self._bufs.values()), {}
        if bufs and self.streams:
            for s in self.streams:
                s.synchronize()
        for buf in bufs:
            buf.release()
        self.res.close()
        self.res = None
