"""The gather side of a TieredCache: a layer's blocks and tail copied into its staging slot.

Once per decode step a plan (:mod:`tiered.kv.plan`) says where each block's parts are: resident
on the device, a host copy in the store, or only on storage. Per layer, the parts on storage
come back with one batched range read (``read_range_arrays``, charged to the cache's owner) into
one host buffer, started ahead while earlier layers compute, and land in the slot with one
strided copy per K and V; host copies, resident blocks and the tail are copied with one cat
per K and V. A host copy of a part that spans several layers stays pinned for the step while
the cache's host budget allows (see :mod:`tiered.kv.memory`). On CUDA gathers copy on their own
stream, ordered by events; host bytes cross to the device in one copy per read.
"""

from __future__ import annotations

import contextlib
import time

import torch

from tiered.allocators import OutOfBudget

from .blocks import KVCacheError, blocks_into, cat_into, release_lease
from .plan import HOST, READ, read_views
from .reads import READ_AHEAD, ReadsMixin



def _aligned(n: int) -> int:
    """``n`` rounded up to 256 bytes (where a device view of a staging buffer may start)."""
    return -(-n // 256) * 256


class GatherMixin(ReadsMixin):
    """Part of :class:`~tiered.kv.cache.TieredCache` (see the module docstring)."""

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
        """Copy layer ``l``'s blocks (device, host copies, storage) and tail into ``slot`` laid out
        for ``tokens``, in one batch (or a few when the cache's host budget cannot hold the whole
        layer's reads at once): per run of blocks read from storage one strided copy per K and V,
        per run of other sources one ``torch.cat(out=)`` per K and V (the GIL is released for
        each whole copy).

        Where each block is comes from the step's plan (:mod:`tiered.kv.plan`). The blocks read
        from storage arrive with one range read per batch into one host buffer (started ahead,
        while earlier layers compute). A host copy of a part that spans several layers stays
        pinned for the step (one acquire per step, not per layer) while half the host tier allows.
        """
        kk, vv, lo = self._views(slot, l, tokens)
        part = self._part_of[l]
        lo_p, hi_p = self._parts[part]
        with self._pin_lock:  # host pressure lets go of the other parts' step pins only
            self._gathering = part
        plan = self._step_plan() if self._blocks else None
        try:
            if plan is not None:
                if self._batches(plan, l, lo // self.block_size):
                    self._issue_read(plan, l, wait=self.io_timeout)  # before reads ahead take the room
                for ahead in range(l + 1, min(l + 1 + READ_AHEAD, self.num_layers)):
                    self._read_ahead(plan, ahead)  # overlaps this layer's copy and compute
            batches = self._batches(plan, l, lo // self.block_size) or [[]]
            start = lo
            for i, batch in enumerate(batches):
                start = self._copy_batch(plan, l, batch, kk, vv, lo, start, last=i == len(batches) - 1)
        finally:
            if l == hi_p - 1:  # the part's last layer: its step pins are done
                self._release_step_leases(part)
            with self._pin_lock:
                self._gathering = None
            self._free_staging()  # transient: held only while a gather runs

    def _batches(self, plan, l: int, first: int) -> list:
        """Layer ``l``'s block runs from ``first`` (``(kind, j0, j1)``), in batches whose reads and
        host copies fit half the cache's host budget (normally one batch: the whole layer)."""
        if plan is None:
            return []
        got = plan.batches.get((l, first))
        if got is None:
            got = plan.batches[(l, first)] = self._split_batches(plan, l, first)
        return got

    def _split_batches(self, plan, l: int, first: int) -> list:
        part = self._part_of[l]
        layer = self._layer_bytes()
        cost = {READ: layer, HOST: layer * (self._parts[part][1] - self._parts[part][0])}
        cap = self._pin_limit() // 2 if self._host is not None else 0  # a batch: half of what pins may take
        batches, cur, used = [], [], 0
        for kind, j0, j1 in plan.segments(part, first):
            each = cost.get(kind, 0)
            while each and used + (j1 - j0) * each > cap and j1 > j0:
                take = min(j1 - j0, max(0, (cap - used) // each))
                if not take and not cur:
                    take = 1  # one block at least
                if take:
                    cur.append((kind, j0, j0 + take))
                    j0 += take
                batches.append(cur)
                cur, used = [], 0
            if j1 > j0:
                cur.append((kind, j0, j1))
                used += (j1 - j0) * each
        if cur:
            batches.append(cur)
        return batches

    def _copy_batch(self, plan, l: int, batch: list, kk, vv, lo: int, start: int, last: bool) -> int:
        """Copy one batch of layer ``l``'s runs (``last``: and its tail) into the slot from token
        ``start``; returns the token it ended at."""
        bs = self.block_size
        part = self._part_of[l]
        at = l - self._parts[part][0]
        keep = self._parts[part][1] - self._parts[part][0] > 1 and l < self._parts[part][1] - 1
        reads = [(j0, j1) for kind, j0, j1 in batch if kind == READ]
        read = self._take_read(plan, l, reads) if reads else None
        held: list = []  # host leases to release once copied
        try:
            host = [j for kind, j0, j1 in batch if kind == HOST for j in range(j0, j1)]
            leases = self._host_leases(plan, part, host, keep, held)
            on_device = kk.device.type != "cpu"
            staged = self._stage(read, [leases[j].tensor[at] for j in host], kk.device) \
                if on_device and (read is not None or host) else None
            views = iter(read_views(read, self._read_geometry(), self._dims(), staged and staged[0])) if read else None
            host_at = iter(staged[1]) if staged else None
            ks, vs = [], []  # sources of the cat from token ``start`` (host copies, resident blocks, tail)

            def flush(upto: int) -> None:
                nonlocal start
                if ks:
                    cat_into(ks, kk[:, :, start - lo:upto - lo])
                    cat_into(vs, vv[:, :, start - lo:upto - lo])
                    self.counters["gather_copies"] += 2
                    ks.clear()
                    vs.clear()
                start = upto

            for kind, j0, j1 in batch:
                if kind == READ:  # the run's blocks in one copy per K and V
                    flush(j0 * bs)
                    k, v = next(views)
                    blocks_into(k, kk[:, :, j0 * bs - lo:j1 * bs - lo])
                    blocks_into(v, vv[:, :, j0 * bs - lo:j1 * bs - lo])
                    self.counters["gather_copies"] += 2
                    start = j1 * bs
                    continue
                for j in range(j0, j1):
                    src = (next(host_at) if host_at else leases[j].tensor[at]) if kind == HOST \
                        else self._blocks[j].data[l]
                    ks.append(src[0])
                    vs.append(src[1])
            end = batch[-1][2] * bs if batch else start
            layer = self._tlayers[l]
            if last and layer.tail_k is not None:
                ks.append(layer.tail_k)
                vs.append(layer.tail_v)
                end = self._committed + layer.tail_len
            flush(end)
            if kk.is_cuda and (read is not None or host):  # host bytes must have crossed before they go
                torch.cuda.current_stream(kk.device).synchronize()  # (waits for the gather stream only)
            return end
        finally:
            for lease in held:
                lease.release()
            if read is not None:
                self._idle(read.buf, read.gen)  # for the next layer's read

    def _host_leases(self, plan, part: int, host: list, keep: bool, held: list) -> dict:
        """Leases of the host copies of ``part`` for block positions ``host`` (step pins reused;
        the others acquired together, then kept for the step while the pin limit allows, else
        added to ``held`` for the caller to release)."""
        out, futs = {}, {}
        for j in host:
            lease = self._step_leases.get((j, part))
            if lease is not None:
                out[j] = lease
            else:
                futs[j] = self.kv.store.acquire(plan.keys[part][j], owner=self.owner)
        try:
            for j in list(futs):
                f = futs.pop(j)
                try:
                    lease = f.result(timeout=self.io_timeout)
                except BaseException:
                    f.add_done_callback(release_lease)  # a read still in flight unpins when it lands
                    raise
                self.counters["store_reads"] += 1
                nbytes = lease.tensor.numel() * lease.tensor.element_size()
                if not (keep and self._pin_for_step((j, part), lease, nbytes)):
                    held.append(lease)
                out[j] = lease
        finally:
            for f in futs.values():  # an error left reads in flight: release what they pin
                f.add_done_callback(release_lease)
        return out

    def _stage(self, read, host: list, device) -> tuple:
        """CUDA: host bytes onto the device before the cat: the read buffer in one async copy, each
        host copy in one; returns (the read's device bytes or None, the host copies' device views)."""
        nbytes = sum(_aligned(t.numel() * t.element_size()) for t in host)
        nbytes += _aligned(read.nbytes) if read is not None else 0
        staging = self._staging_for(nbytes, device)
        dev_read = None
        at = 0
        if read is not None:
            dev_read = staging[:read.nbytes]
            dev_read.copy_(read.buf.tensor()[:read.nbytes], non_blocking=True)  # async from the pinned arena
            at = _aligned(read.nbytes)
        out = []
        for t in host:
            n = t.numel() * t.element_size()
            dst = staging[at:at + n].view(t.dtype).view(t.shape)
            dst.copy_(t, non_blocking=True)
            out.append(dst)
            at += _aligned(n)
        return dev_read, out

    def _first_visible_block(self, layer) -> int:
        """The first block this step's attention of ``layer`` sees: 0, or for a sliding layer the
        block holding the oldest of its last ``window - 1`` tokens (its tail is not yet updated)."""
        if layer.window is None:
            return 0
        return max(0, self._committed + layer.tail_len - (layer.window - 1)) // self.block_size

    def _staging_for(self, nbytes: int, device) -> torch.Tensor:
        """CUDA: a device buffer of ``nbytes`` (uint8) where a batch's host bytes land before the
        cat into a slot, outside the device budget while a gather runs (like the temporaries of a
        direct copy into the strided slot would be); used only on the gather stream, so reusing
        it within the gather is ordered behind the previous cat."""
        if self._staging is None or self._staging.numel() < nbytes:
            self._free_staging()  # one buffer at a time
            try:  # on the gather thread: the tier's room, or a wait for it (never a spill here)
                self._staging = self._device.empty((nbytes,), torch.uint8, device, wait=self.io_timeout)
            except OutOfBudget as e:
                raise KVCacheError(f"TieredCache {self.owner}: no device memory for the gather's staging "
                                   f"({e}); give the cache a device_budget (its share of the tier)") from e
        return self._staging[:nbytes]

    def _free_staging(self) -> None:
        staging, self._staging = self._staging, None
        self._device.free(staging)

    def _pin_for_step(self, key: tuple, lease, nbytes: int) -> bool:
        """Keep ``lease`` pinned for the step's later layers of its part while the pins fit the
        pin limit; False: the caller releases it after its copy."""
        with self._pin_lock:
            if self._step_pinned + self._landing_bytes + nbytes > self._pin_limit():
                return False
            self._step_leases[key] = lease
            self._step_pinned += nbytes
            return True

    def _pin_limit(self) -> int:
        """Bytes a step keeps pinned, host copies pinned for the step and read buffers together:
        half the cache's host budget (the other half is for a batch's host copies and the puts
        of spilled blocks)."""
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
        store can then evict those copies; a later layer reads them again) and of the idle read
        buffers (a later read takes a new one). Allocates nothing."""
        with self._pin_lock:
            keys = [k for k in self._step_leases if k[1] != self._gathering]
            leases = [self._step_leases.pop(k) for k in keys]
            freed = sum(lease.tensor.numel() * lease.tensor.element_size() for lease in leases)
            self._step_pinned -= freed
            idle, self._landing_idle = self._landing_idle, []
            self._landing_bytes -= sum(buf.nbytes for buf in idle)
        for lease in leases:
            lease.release()
        for buf in idle:
            buf.release()
        return freed + sum(buf.nbytes for buf in idle)

    def _part_bytes(self) -> int:
        """Bytes of the largest stored part of a block (at 4 bytes an element, the widest dtype kept)."""
        b = self._geometry[0] if self._geometry else 1
        layers = max(hi - lo for lo, hi in self._parts)
        return layers * 2 * b * self.kv_heads * self.block_size * self.head_dim * 4

    def _window(self) -> int:
        """Blocks a prefix load reads ahead: ``read_window`` per part, at most what half the
        cache's host budget can pin at once."""
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
