"""The read side of a TieredCache's gather: each decode step's range reads and their buffers.

Per layer, the block parts only on storage come back with one batched range read
(``read_range_arrays``, charged to the cache's owner) into one host buffer, started up to
``READ_AHEAD`` layers ahead while earlier layers compute. Read buffers are kept across layers and
steps (within the pin limit) and belong to a read generation, so a read that ends after a reset
or close gives its buffer back instead of keeping it. A read started ahead that fails is read
again by its own layer, which raises the error before anything of the step changes.
"""

from __future__ import annotations

import time

from tiered.allocators import OutOfBudget

from ..dtypes import dtype_name
from .blocks import KVCacheError
from .plan import PAGE, READ, LayerRead, StepPlan, build_plan, layer_ranges

#: layers whose range reads are started ahead of the one gathering (host budget permitting)
READ_AHEAD = 2


class ReadsMixin:
    """Part of :class:`~tiered.kv.cache.TieredCache` (see the module docstring)."""

    def _prefetch_reads(self, l: int) -> None:
        """Without a gather thread: start the range read layer ``l``'s gather will need, so it runs
        on the I/O workers while this layer computes (none when the host budget has no room now)."""
        if self._executor is not None or self.kv is None or not self._blocks:
            return
        try:
            plan = self._step_plan()
        except Exception:  # noqa: BLE001 - the gather that needs the plan builds it again and raises
            self.counters["reads_ahead_failed"] += 1
            return
        self._read_ahead(plan, l)

    def _read_ahead(self, plan: StepPlan, l: int) -> None:
        """Start layer ``l``'s read ahead, if the host budget has room now. Optional: when it fails,
        layer ``l``'s own gather issues the read again and raises there (before its layer changes
        anything), not the layer or step that only started it early."""
        try:
            self._issue_read(plan, l, wait=0.0)
        except Exception:  # noqa: BLE001 - raised again by layer l's gather (see above)
            plan.reads[l] = None  # tried: the gather's own read issues it again
            self.counters["reads_ahead_failed"] += 1

    # -- the step plan and its reads (see tiered.kv.plan) -------------------------------------
    def _step_plan(self) -> StepPlan:
        """This step's plan, computed at its first gather (or read ahead) and kept for the step
        unless its blocks change (a spill for room on the GPU tier, an edit)."""
        key = (self._steps, self._blocks_gen, len(self._blocks), self._committed, self._geometry)
        if self._plan is None or self._plan.key != key:
            self._drop_reads()
            room = self._host_plan() // 2 if self._host is not None else 0  # what the pin limit leaves
            self._plan = build_plan(key, self._blocks, self._parts, None if self.kv is None else self.kv.store, room,
                                    self._part_shapes())
        return self._plan

    def _part_shapes(self) -> tuple:
        """(shapes, dtype name) of the cache's stored parts: ``[layers in part, 2, B, H, bs, D]`` each."""
        b, dtype = self._read_geometry()
        shapes = [[hi - lo, 2, b, self.kv_heads, self.block_size, self.head_dim] for lo, hi in self._parts]
        return shapes, dtype_name(dtype)

    def _issue_read(self, plan: StepPlan, l: int, wait: float | None) -> None:
        """Start the range read of layer ``l``'s first batch of stored blocks (once per step; again
        with ``wait`` when an earlier try found no room)."""
        if plan.reads.get(l) is not None or (l in plan.reads and not wait):
            return
        batches = self._batches(plan, l, self._first_visible_block(self._tlayers[l]))
        runs = [(j0, j1) for kind, j0, j1 in (batches[0] if batches else []) if kind == READ]
        plan.reads[l] = self._start_read(plan, l, runs, wait) if runs else None

    def _take_read(self, plan: StepPlan, l: int, runs: list) -> LayerRead:
        """The read of layer ``l``'s blocks ``runs``, once it landed (issued ahead, or now)."""
        read = plan.reads.pop(l, None)
        if read is None or read.runs != runs:
            if read is not None:
                self._forget_read(read)
            read = self._start_read(plan, l, runs, self.io_timeout)
        t0 = time.perf_counter()
        try:
            read.future.result(timeout=self.io_timeout)
        except BaseException:
            self._forget_read(read)
            raise
        self.counters["read_wait_s"] += time.perf_counter() - t0
        return read

    def _start_read(self, plan: StepPlan, l: int, runs: list, wait: float | None) -> LayerRead | None:
        """One ``read_range_arrays`` call for layer ``l``'s blocks ``runs`` into one host buffer of
        the cache's reservation; None when ``wait`` is 0 and the budget has no room now."""
        part = self._part_of[l]
        keys, which, offsets, lengths, buf_offsets, nbytes = layer_ranges(
            plan, part, l - self._parts[part][0], runs, self._read_geometry(), self._dims())
        gen = self._reads_gen  # the buffer is accounted to this generation of reads
        buf = self._landing_buffer(nbytes, 0.0)
        if buf is None:
            if not wait:
                return None
            self._drop_reads_ahead(plan)  # this layer's read comes first: they are read again later
            buf = self._landing_buffer(nbytes, wait)
        try:
            fut = self.kv.store.read_range_arrays(keys, which, offsets, lengths, buf.array, buf_offsets,
                                                  owner=self.owner)
        except BaseException:
            self._idle(buf, gen)
            raise
        self.counters["range_reads"] += 1
        self.counters["store_reads"] += len(keys)
        return LayerRead(l, runs, buf, fut, nbytes, gen)

    def _landing_buffer(self, nbytes: int, wait: float | None):
        """A host buffer of at least ``nbytes`` for a layer's read: an idle one of the cache's (kept
        across layers and steps, so reads do not make the store evict host copies each layer), or
        a new one from its reservation. Read buffers and step pins together keep to the pin limit;
        None when there is no room now and ``wait`` is 0."""
        with self._pin_lock:
            fits = [b for b in self._landing_idle if b.nbytes >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.nbytes)
                self._landing_idle.remove(buf)
                return buf
            # none fits: the idle ones are too small for the grown context, and go back to the store
            free, self._landing_idle = self._landing_idle, []
            self._landing_bytes -= sum(buf.nbytes for buf in free)
            size = -(-(nbytes + self._layer_bytes()) // PAGE) * PAGE  # a block of headroom: the context grows
            if self._landing_bytes + self._step_pinned + size > self._pin_limit():
                size = nbytes
            room = self._landing_bytes + self._step_pinned + size <= self._pin_limit()
            if room or wait:
                self._landing_bytes += size
        for buf in free:
            buf.release()
        if not (room or wait):
            return None
        try:
            return self._host.alloc(size, wait)
        except OutOfBudget as e:
            with self._pin_lock:
                self._landing_bytes -= size
            if not wait:
                return None
            raise KVCacheError(f"TieredCache {self.owner}: no host memory for a layer's read of {nbytes} bytes "
                               f"({e}); give the cache a larger host_share") from e

    def _idle(self, buf, gen: int) -> None:
        """A read buffer of generation ``gen`` is free for the next layer's read; one of an earlier
        generation (its read outlived a reset, close or edit) goes back to the store."""
        with self._pin_lock:
            if gen == self._reads_gen:
                self._landing_idle.append(buf)
                return
        buf.release()

    def _free_landing(self) -> None:
        """Give the idle read buffers back to the store and start a new generation of reads: a
        read still in flight (one that did not end within ``io_timeout``) is no longer accounted,
        and gives its buffer back to the store when it ends."""
        with self._pin_lock:
            self._reads_gen += 1
            idle, self._landing_idle = self._landing_idle, []
            self._landing_bytes = 0  # idle ones are released here, the others when their reads end
        for buf in idle:
            buf.release()

    def _forget_read(self, read: LayerRead, wait: bool = False) -> None:
        """Let go of a read nobody will copy: its buffer is idle again once the engine is done
        writing it (``wait``: wait for that here; a read that does not end in time frees its
        buffer to the store when it ends)."""
        if wait:
            try:
                read.future.result(timeout=self.io_timeout)
            except BaseException:  # noqa: BLE001 - nobody uses these bytes; the buffer is what matters
                pass  # one still running gives its buffer back when it ends (see _idle)
        read.future.add_done_callback(lambda _f: self._idle(read.buf, read.gen))

    def _drop_reads_ahead(self, plan: StepPlan) -> None:
        """Let go of the reads issued ahead (their layers read again at their gathers)."""
        reads = [r for r in plan.reads.values() if r is not None]
        plan.reads.clear()
        for read in reads:
            self._forget_read(read, wait=True)

    def _drop_reads(self, wait: bool = False) -> None:
        """Forget the step plan and the reads issued for it (an edit, a reset, a new plan);
        ``wait``: also give the read buffers back to the store (a cache that stops or changes)."""
        plan, self._plan = self._plan, None
        for read in (plan.reads.values() if plan is not None else ()):
            if read is not None:
                self._forget_read(read, wait)
        if wait:
            self._free_landing()

    def _read_geometry(self) -> tuple:
        b, dtype, _device = self._geometry
        return b, dtype

    def _dims(self) -> tuple:
        return self.kv_heads, self.block_size, self.head_dim

    def _layer_bytes(self) -> int:
        """Bytes of one layer of one block (K and V)."""
        return 2 * self._token_bytes() * self.block_size
