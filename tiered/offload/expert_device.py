"""Expert units on the device-cache path (CUDA's default; ``[offload] device_cache = true``
forces it on a CPU with a ``device = "cpu"`` GPU tier).

Each routed expert is an entry of the model's :class:`~tiered.device_cache.DeviceCache`: its
object is read from storage (or found in the host tier) through the store and copied into the
GPU tier on the cache's copy stream, ahead of use when the next layer's router predicted it.
While present, the expert cache (:mod:`.expert_cache`: decayed routing frequency, then least
recent use) holds the entry's lease, so the device cache never evicts it under it; an expert
dropped by the expert cache is evicted from the device at once.

Binding: device memory cannot be committed expert by expert the way host slabs are, so a call's
experts are gathered (device to device, in ascending expert id) into *staging* tensors of
``[S, ...]`` for S experts routed to, the call's ``top_k_index`` is mapped onto those rows, and
the module's ``num_experts`` reads S during the call. The mapping keeps the experts' order, so
every kernel (eager loop, ``batched_mm``, ``grouped_mm``) visits and sums them in the same order
as in memory: results are bit for bit the in-memory model's. Staging is one buffer of the GPU
tier taken through the device cache (counted with its entries, within its limit) and within the
room for experts beside the present experts, kept while calls route to as many experts
(decoding) and for the whole call that took it, given back once the kernels reading it ran.
"""

from __future__ import annotations

import torch

from tiered.allocators import OutOfBudget, align_up
from tiered.io_engine import Priority

from .common import _ALIGN, _WAIT, prefetching
from .experts import _Bank


class _ExpertDevice:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: banks through the device cache."""

    @property
    def experts_on_device(self) -> bool:
        """Experts live in the device cache (the compute tier is the GPU tier)."""
        return self._two_level

    def _lands_in_room(self, b: _Bank) -> bool:
        """Reads ahead of ``b``'s experts land in the room for experts (not in the host tier)."""
        return b.direct or self.experts_on_device

    # -- placing -----------------------------------------------------------------------
    def _tier_of(self, key: str) -> str:
        """Where a demand placement of ``key`` finds its bytes (stats key)."""
        if key in self.dcache:
            return "compute"
        return "host" if self.store.meta(key)["in_host"] else "storage"

    def place_experts(self, b: _Bank, demand: list[int], futures: dict, count: bool = True) -> None:
        """Place ``demand`` on the device and wait for those and the prefetched ``futures``; each
        future is taken out of ``futures`` once its lease is the expert's. ``count``: in the hits
        (not for experts placed again after making way for the staging)."""
        st = self.expert_stats
        routed = [e for e in range(b.num) if b.last_use[e] == self._calls]  # this call's
        self.ensure_staging(b, routed)
        asked = set(demand)
        demand = [e for e in routed if e not in b.cached and e not in futures]  # with those that made way
        protect = {(b.index, e) for e in routed}
        for e in demand:
            tier = self._tier_of(b.keys[e])
            futures[e] = self._place_now(b.keys[e], protect)
            if count and e in asked:
                st["hits"][tier] += 1
        for e in list(futures):
            lease = futures[e].result(timeout=_WAIT)
            del futures[e]
            b.cached[e] = lease
            b.reads[e] += 1

    def _place_now(self, key: str, protect: set[tuple[int, int]]):
        """A demand placement that must find room (see :meth:`_make_way`)."""
        while True:
            try:
                return self.dcache.acquire(key, priority=Priority.DEMAND, wait=0.0)
            except OutOfBudget:
                if not self._make_way(protect):
                    self._make_room()
                    return self.dcache.acquire(key, priority=Priority.DEMAND, wait=_WAIT)

    def _make_way(self, protect: set[tuple[int, int]]) -> bool:
        """Free room in the GPU tier when what is free is in pieces too small: unheld cache entries
        go, then the least useful present expert not in ``protect``, then what was read ahead
        (units and experts). False when nothing is left to give."""
        return bool(self.dcache.trim() or self._evict_one(protect) or self._drop_prefetches(keep=None))

    def _make_room(self) -> None:
        """Merging the free room (see ``_Loading._make_room``), on the device also after the
        present experts: a unit or expert that finds the GPU tier in pieces between pinned experts
        would otherwise wait for room that never frees. The experts of the call in progress, and
        its staging (taken before its experts are placed), stay."""
        if self.experts_on_device and self.banks:
            for b in self.banks:
                for e in [e for e in b.cached if b.last_use[e] != self._calls]:
                    self._drop_expert(b, e)
            if not any(b.bound or b.in_call for b in self.banks):
                self.release_staging()
        super()._make_room()

    def place_ahead(self, nxt: _Bank, e: int) -> None:
        """Read expert ``e`` of ``nxt`` ahead onto the device (room made by the caller)."""
        prefetching.active = True
        try:
            nxt.pending[e] = self.dcache.acquire(nxt.keys[e], priority=Priority.PREFETCH, wait=0.0)
        except OutOfBudget:
            self.stats.prefetch_skipped += 1
        finally:
            prefetching.active = False

    def unplace(self, b: _Bank, e: int, lease) -> None:
        """Expert ``e`` leaves the device: its lease is released and its entry evicted."""
        if lease is not None:
            lease.release()
        self.dcache.evict(b.keys[e])

    def give_back_placement(self, b: _Bank, e: int, f) -> None:
        """A read ahead not wanted any more: waited for (its copy writes into the region), then
        taken off the device."""
        try:
            lease = f.result(timeout=_WAIT)
        except Exception:  # noqa: BLE001 - a failed placement holds nothing; a demand read reports it
            return
        self.unplace(b, e, lease)

    # -- binding -----------------------------------------------------------------------
    def staged_bytes(self) -> int:
        return self._staging.reserved if self._staging is not None else 0

    @staticmethod
    def _staging_layout(b: _Bank, n: int) -> tuple[list[int], int]:
        """Where each parameter's [n, ...] rows start in a staging buffer, and its size."""
        offsets, size = [], 0
        for a in b.attrs:
            offsets.append(size)
            size = align_up(size + n * b.slabs[a].expert_bytes, _ALIGN)
        return offsets, max(size, 1)

    def ensure_staging(self, b: _Bank, routed: list[int]) -> None:
        """A staging buffer of the GPU tier for this call, taken before its missing experts are
        placed (while the tier is least in pieces) and kept for the next calls that fit in it
        while the room for experts allows (decoding: every call), so that it is not carved again
        each layer (a buffer given back is free only once the kernels reading it ran)."""
        _, size = self._staging_layout(b, _rows(routed))
        b.in_call = True  # from here until the post-hook, _make_room keeps the staging
        room = self._expert_capacity + self._expert_prefetch_room
        if self._staging is not None and size <= self._staging.nbytes \
                and self._expert_held() + self.staged_bytes() <= room:
            return
        self.release_staging()
        protect = {(b.index, e) for e in routed}
        while self._expert_held() + size > room and self._evict_one(protect):
            pass  # the staging is part of the room for experts
        while True:
            try:  # counted by the device cache: within its limit with the entries
                self._staging = self.dcache.alloc_scratch(size, wait=0.0)
                return
            except OutOfBudget:
                if self._make_way(protect):
                    continue
                present = [e for e in routed if e in b.cached]
                if not present:
                    self._staging = self.dcache.alloc_scratch(size, wait=_WAIT)
                    return
                # the free room is in pieces between this call's own experts: one leaves the
                # device, to be placed again once the staging has its place
                self._drop_expert(b, present[-1])

    def release_staging(self) -> None:
        """The staging buffer goes back to the tier once the kernels reading it have run."""
        if self._staging is not None:
            buf, self._staging = self._staging, None
            self.dcache.release_after_use(buf)

    def stage_bank(self, b: _Bank, routed: list[int], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Bind ``b``'s parameters to its routed experts gathered in ascending id, and return the
        call's arguments with ``top_k_index`` mapped onto those rows (see the module docstring)."""
        routed = sorted(routed)
        self.ensure_staging(b, routed)
        if any(e not in b.cached for e in routed):  # made way for the staging: placed again
            self.place_experts(b, [], {}, count=False)
        n = _rows(routed)
        offsets, _ = self._staging_layout(b, n)
        with torch.inference_mode(False):
            staging = self._staging.tensor()
            for a, off, at in zip(b.attrs, b.offsets, offsets):
                s = b.slabs[a]
                rows = staging[at : at + n * s.expert_bytes].view(s.dtype).view(n, *s.shape[1:])
                if not routed:
                    rows.zero_()  # read by no token (every index is a sentinel)
                for i, e in enumerate(routed):
                    raw = b.cached[e].tensor.view(torch.uint8).reshape(-1)
                    rows[i].copy_(raw[off : off + s.expert_bytes].view(s.dtype).view(s.shape[1:]))
                b.module._parameters[a].data = rows
        b.bound = True
        if getattr(b.module, "num_experts", None) == b.num:
            b.module.num_experts, b.renumbered = n, True
        return _remap(b, routed, args, kwargs)

    def unstage_bank(self, b: _Bank) -> None:
        """After the call (parameters unbound): the module's expert count back. The staging stays
        for the next call (the kernels of the compute stream read and refill it in order)."""
        if b.renumbered:
            b.module.num_experts, b.renumbered = b.num, False
        b.in_call = False


def _rows(routed: list[int]) -> int:
    """Rows of a call's staging: one per routed expert; one unread row when none is routed (the
    kernels index a parameter of at least one expert before masking sentinels)."""
    return max(len(routed), 1)


def _remap(b: _Bank, routed: list[int], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``top_k_index`` with expert ``routed[i]`` as ``i``; anything else (a sentinel) as the
    staging's row count (the module's ``num_experts`` during the call)."""
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    n = _rows(routed)
    table = torch.full((b.num + 1,), n, dtype=index.dtype, device=index.device)
    if routed:
        table[torch.tensor(routed, dtype=torch.long, device=index.device)] = torch.arange(
            n, dtype=index.dtype, device=index.device)
    valid = (index >= 0) & (index < b.num)
    mapped = table[torch.where(valid, index, torch.full_like(index, b.num)).long()]
    if len(args) > 1:
        return (args[0], mapped, *args[2:]), kwargs
    return args, {**kwargs, "top_k_index": mapped}
