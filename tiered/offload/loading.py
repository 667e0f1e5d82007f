"""Loading units: acquiring their objects, binding parameters to views, prefetching ahead."""

from __future__ import annotations

import time

import torch

from tiered.allocators import OutOfBudget
from tiered.io_engine import Priority, gather

from .. import offload_life
from .common import _WAIT, _placeholder, prefetching
from .layout import _Unit


class _Loading:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: loading, binding, prefetching."""

    def _acquire(self, u: _Unit, priority: Priority, wait: float | None = None) -> bool:
        """Start acquiring ``u``'s objects. A prefetch never waits for host memory: when
        the budget is full of pinned units it stops (False) and the unit is read on demand."""
        if priority is Priority.PREFETCH:
            wait = 0.0
            if self._pinned_bytes() + u.nbytes > self._forward_budget:
                self.stats.prefetch_skipped += 1  # beyond this model's budget: not at other owners' expense
                return False
        prefetching.active = priority is Priority.PREFETCH
        try:
            for k in u.keys:
                if k not in u.leases and k not in u.pending:
                    if self.dcache is not None:
                        u.pending[k] = self.dcache.acquire(k, priority=priority, wait=wait)
                    else:
                        u.pending[k] = self.store.acquire(k, priority=priority, wait=wait, owner=self.owner)
        except OutOfBudget:
            if priority is not Priority.PREFETCH:
                raise
            self.stats.prefetch_skipped += 1
            return False
        finally:
            prefetching.active = False
        return True

    def _pinned_bytes(self) -> int:
        """Compute-tier bytes this model's units and experts hold or are reading."""
        room = self._expert_room.nbytes if self._expert_room is not None else 0
        return sum(v.nbytes for v in self.units if v.leases or v.pending) + room + self._expert_pending_bytes()

    def _load(self, u: _Unit) -> None:
        t0 = time.perf_counter()
        ready = all(k in u.leases or (k in u.pending and u.pending[k].done()) for k in u.keys)
        try:
            self._acquire(u, Priority.DEMAND, wait=0.0)
        except OutOfBudget:
            # prefetches for a path the forward did not take hold the budget: drop them (and what
            # models dropped without detach still pin); the store has asked the other owners already
            offload_life.collect()
            self._drop_prefetches(keep=u)
            try:
                self._acquire(u, Priority.DEMAND, wait=0.0)
            except OutOfBudget:
                # the unit's own partly prefetched objects can split the free space (a unit of many
                # checkpoint tensors): give them back too and take the unit in one go. Giving the
                # leases back is not enough: the copies stay cached where they are, and acquiring
                # them again is a cache hit that pins them there again, so the rest of the unit may
                # still find no block that fits. Drop every unpinned cached copy (the unit's own
                # included) so the free space is one merged range but for what stays pinned.
                self._drop_pending(u)
                self._make_room()
                self._acquire(u, Priority.DEMAND)
        self._collect(u)
        self.stats.stall_seconds += time.perf_counter() - t0
        self.stats.unit_loads += 1
        self.stats.prefetch_hits += int(ready)
        self._bind(u)

    def _make_room(self) -> None:
        """Drop every unpinned cached copy, so that the free space is one merged range."""
        if self.dcache is not None:
            self.dcache.trim()
        self.store.trim()
        self.store.arena.rewind()

    def _collect(self, u: _Unit) -> None:
        """Wait for ``u``'s pending acquisitions; their leases become the unit's."""
        for k, f in list(u.pending.items()):
            u.leases[k] = f.result(timeout=_WAIT)
            del u.pending[k]

    def _bind(self, u: _Unit) -> None:
        # views made under torch.inference_mode() would be inference tensors, unusable by a later
        # grad-enabled forward while a resident unit stays bound: make them as ordinary tensors
        with torch.inference_mode(False):
            self._bind_views(u)

    def _bind_views(self, u: _Unit) -> None:
        if self.cuda and self.dcache is None:
            # copies made by torch's allocator: the GPU tier accounts them (never more than the tier)
            self._device_tokens[u.index] = self.compute_res.alloc(u.nbytes, wait=0.0)
        try:
            self._bind_slots(u)
        except BaseException:
            if not u.bound:  # nothing bound: _unbind would not give it back
                self._give_token(u)
            raise

    def _give_token(self, u: _Unit) -> None:
        token = self._device_tokens.pop(u.index, None)
        if token is not None:
            token.release()

    def _bind_slots(self, u: _Unit) -> None:
        if self.dcache is not None:
            # the leases are device copies already (copied ahead on the cache's stream when prefetched);
            # a strided (bundled) view is made contiguous, the layout the in-memory model has
            for s in u.slots:
                view = s.source(u.leases[s.key].tensor)
                if not view.is_contiguous():
                    view = view.contiguous()
                self._bindings.setdefault(id(s.tensor()), []).append((u, view))
                s.tensor().data = view
                u.bound.append((s, view))
            return
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for s in u.slots:
            view = s.source(u.leases[s.key].tensor)
            if s.bundle is not None and s.bundle[1] == s.bundle[0] - 1 and self._copy_stream is None:
                # a down projection read as bundled neuron rows: transposed back into the layout the
                # in-memory model has, so matmuls take the same kernels and results stay bitwise
                view = view.contiguous()
            if self._copy_stream is not None:
                # allocated on the compute stream (which frees it), filled on the copy stream
                dst = torch.empty(s.shape, dtype=s.dtype, device=self.device)
                with torch.cuda.stream(self._copy_stream):
                    dst.copy_(view, non_blocking=True)  # strided (bundled) sources land contiguous
                view = dst
            self._bindings.setdefault(id(s.tensor()), []).append((u, view))
            s.tensor().data = view
            u.bound.append((s, view))
        if self._copy_stream is not None:
            u.copied = torch.cuda.Event()
            u.copied.record(self._copy_stream)
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        else:
            self._map_storages(u)

    def _unbind(self, u: _Unit) -> None:
        with torch.inference_mode(False):
            self._unbind_views(u)

    def _unbind_views(self, u: _Unit) -> None:
        for s, _view in u.bound:
            # a tensor shared by several units (tied weights) keeps another unit's binding
            rest = [b for b in self._bindings.get(id(s.tensor()), []) if b[0] is not u]
            self._bindings[id(s.tensor())] = rest
            s.tensor().data = rest[-1][1] if rest else _placeholder(s.dtype, s.shape, self.device)
        if u.bound:
            self._give_token(u)
        u.bound.clear()

    def _wait_copies(self, u: _Unit) -> None:
        if u.copied is not None:  # host buffers may be reused or changed only after the DMA
            u.copied.synchronize()
            u.copied = None

    def _release(self, u: _Unit) -> None:
        self._wait_copies(u)
        for k, lease in u.leases.items():
            ptr = lease.tensor.untyped_storage().data_ptr()
            if self._storage_of.get(ptr, (None,))[0] is u:
                del self._storage_of[ptr]
        leases = list(u.leases.values())
        u.leases.clear()
        writing = [f for f in u.writing if not f.done()]
        u.writing = []
        if not writing:
            for lease in leases:
                lease.release()
            return
        # a put of this unit's updated objects copies from these buffers' cached versions: they stay
        # pinned until it is durable, so no reader can meanwhile fetch the replaced bytes from storage
        gather(writing).add_done_callback(lambda _f: [lease.release() for lease in leases])

    def _drop_prefetches(self, keep: _Unit | None) -> int:
        """Release every prefetched (not running, not resident) unit's copies, and the experts read
        ahead; the bytes released. A bound unit (held for a recompute's backward) or one whose
        copies backward reads is no prefetch: its memory is in use."""
        freed = self.drop_expert_prefetches()
        for v in self.units:
            if v is keep or v.active or v.resident or (v.host_resident and self.dcache is None) or v.bound \
                    or v.index in self._bw_hold:
                continue
            if v.leases or v.pending:
                freed += v.nbytes
            self._drop_pending(v)
            self._release(v)
        return freed

    def _drop_pending(self, v: _Unit) -> None:
        pending, v.pending = list(v.pending.values()), {}
        for f in pending:
            if f.cancel():
                continue
            try:
                lease = f.result(timeout=_WAIT)
            except Exception:  # noqa: BLE001 - a failed read pins nothing; its error reached (or reaches) the load
                continue
            lease.release()

    def _prefetch_after(self, u: _Unit) -> None:
        if not self.order or self.lookahead == 0:
            return
        try:
            pos = self.order.index(u.index, self._cursor)
        except ValueError:
            try:
                pos = self.order.index(u.index)
            except ValueError:
                return  # a unit not seen in the learned order: the pass will re-learn it
        self._cursor = pos + 1
        n = len(self.order)
        for j in range(1, self.lookahead + 1):
            nxt = self.units[self.order[(pos + j) % n]]
            # with the device cache a host-resident unit is prefetched too: onto the device
            if nxt is not u and not nxt.resident and (self.dcache is not None or not nxt.host_resident) \
                    and not self._acquire(nxt, Priority.PREFETCH):
                break
