"""The gather side of a TieredCache: a layer's blocks and tail copied into its staging slot.

Resident blocks and tails are copied on the device; stored blocks are read through the store
(charged to the cache's owner) into pinned host copies, ``read_window`` ahead, and copied in runs.
A stored part that spans several layers stays pinned for the step while the cache's host budget
allows (see :mod:`tiered.kv.memory`). On CUDA gathers copy on their own stream, ordered by events.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future

import torch

from allocators import OutOfBudget

from .blocks import KVCacheError, cat_into, release_lease


class GatherMixin:
    """Part of :class:`~tiered.kv.cache.TieredCache` (see the module docstring)."""

    def _prefetch_reads(self, l: int) -> None:
        """Without a gather thread: start the store reads layer ``l``'s gather will need, so they
        run on the I/O workers while this layer computes (a part already in host costs a lookup)."""
        if self._executor is not None or self.kv is None:
            return
        part = self._part_of[l]
        remote = [b for b in self._blocks if b.data is None and (b.index, part) not in self._step_leases]
        for b in remote[:self._window()]:
            self.kv.store.prefetch(b.keys[part], owner=self.owner)

    def _slot_start(self, layer) -> int:
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
                for i in range(2):
                    old, pair[i] = pair[i], None
                    self._retire(old)  # attention may still read the K/V returned from it
                    pair[i] = self._dev_empty((grow,), dtype)
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
        with self._pin_lock:  # host pressure lets go of the other parts' step pins only
            self._gathering = part
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
                futs[b.index] = self.kv.store.acquire(b.keys[part], owner=self.owner)
                issued += 1

        def flush(upto: int) -> None:
            nonlocal run_lo
            if run_k and all(t.device == kk.device for t in run_k):
                cat_into(run_k, kk[:, :, run_lo - lo:upto - lo])
                cat_into(run_v, vv[:, :, run_lo - lo:upto - lo])
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
                cat_into(ks, kk[:, :, run_lo - lo:upto - lo])
                cat_into(vs, vv[:, :, run_lo - lo:upto - lo])
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
                            f.add_done_callback(release_lease)  # a read still in flight unpins when it lands
                            raise
                        self.counters["store_reads"] += 1
                        nbytes = lease.tensor.numel() * lease.tensor.element_size()
                        if not (keep and self._pin_for_step((b.index, part), lease, nbytes)):
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
                f.add_done_callback(release_lease)
            if l == hi_p - 1:  # the part's last layer: its step pins are done
                self._release_step_leases(part)
            with self._pin_lock:
                self._gathering = None
            self._free_staging()  # transient: held only while a gather runs

    def _first_visible_block(self, layer) -> int:
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
            self._free_staging()  # one buffer at a time
            try:  # on the gather thread: the tier's room, or a wait for it (never a spill here)
                self._staging = self._device.empty(shape, pairs[0].dtype, device, wait=self.io_timeout)
            except OutOfBudget as e:
                raise KVCacheError(f"TieredCache {self.owner}: no device memory for the gather's staging "
                                   f"({e}); give the cache a device_budget (its share of the tier)") from e
        return self._staging

    def _free_staging(self) -> None:
        staging, self._staging = self._staging, None
        self._device.free(staging)

    def _pin_for_step(self, key: tuple, lease, nbytes: int) -> bool:
        """Keep ``lease`` pinned for the step's later layers of its part while the pins fit the
        pin limit; False: the caller releases it after its copy."""
        with self._pin_lock:
            if self._step_pinned + nbytes > self._pin_limit():
                return False
            self._step_leases[key] = lease
            self._step_pinned += nbytes
            return True

    def _pin_limit(self) -> int:
        """Bytes of stored blocks a step keeps pinned: half the cache's host budget (the other
        half is for the reads in flight and the puts of spilled blocks)."""
        return self._host_plan() // 2

    def _release_step_leases(self, part: int | None = None) -> None:
        with self._pin_lock:
            keys = [k for k in self._step_leases if part is None or k[1] == part]
            leases = [self._step_leases.pop(k) for k in keys]
            self._step_pinned -= sum(lease.tensor.numel() * lease.tensor.element_size() for lease in leases)
        for lease in leases:
            lease.release()

    def _host_pressure(self, nbytes: int) -> int:
        """``on_pressure`` of the host reservation: let go of step pins no gather is using (the
        store can then evict those copies; a later layer reads them again). Allocates nothing."""
        with self._pin_lock:
            keys = [k for k in self._step_leases if k[1] != self._gathering]
            leases = [self._step_leases.pop(k) for k in keys]
            freed = sum(lease.tensor.numel() * lease.tensor.element_size() for lease in leases)
            self._step_pinned -= freed
        for lease in leases:
            lease.release()
        return freed

    def _part_bytes(self) -> int:
        """Bytes of the largest stored part of a block (at 4 bytes an element, the widest dtype kept)."""
        b = self._geometry[0] if self._geometry else 1
        layers = max(hi - lo for lo, hi in self._parts)
        return layers * 2 * b * self.kv_heads * self.block_size * self.head_dim * 4

    def _window(self) -> int:
        """Blocks read ahead: ``read_window`` per part, at most what half the cache's host budget
        can pin at once."""
        if self.kv is None or self._host is None:
            return self.read_window
        return max(1, min(self.read_window * len(self._parts), self._host_plan() // (2 * self._part_bytes())))

    def _host_plan(self, refresh: bool = False) -> int:
        """The host budget the cache plans with (:meth:`HostMemory.budget`), read once a step:
        other owners' shares change rarely, and asking the store per layer costs a lock round."""
        if self._host is None:
            return 0
        if refresh or self._host_budget is None:
            self._host_budget = self._host.budget()
        return self._host_budget
