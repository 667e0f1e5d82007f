"""Gathers: a minibatch's rows from the row cache, the rest read from the chunks' objects.

The rows not cached are planned into few page-aligned reads (``gather.py``) and read in
rounds of ``scratch_bytes``, each round one :meth:`TieredStore.read_ranges` call: the store
verifies every block read (``checksum_block``) against the crc32 recorded when the chunk was put (chunks
imported in place from a ``.npy`` file are checked by file identity instead), counts the
bytes and holds the chunks' extents until the reads are done. Prefetches read the next
minibatch's rows into the caches at prefetch priority.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tiered.allocators import OutOfBudget, align_up
from tiered.io_engine import IOFuture, Priority, gather

from .attrs import _Attr
from .gather import PAGE, Layout, plan_reads, rows_from, split_rounds, unique_rows
from .indexing import _is_identity, _normalize_index


def _layout(a: _Attr) -> Layout:
    """Chunk c of ``a`` is object ``a.keys[c]``. A stored chunk starts at 0 of its own object (its
    extent is page aligned); a chunk read in place starts at its offset in the ``.npy`` file, so
    that the planner's pages are the file's. Reads stop at the object's end (a stored one may
    read up to its 4 KiB-padded end)."""
    n = -(-a.num_rows // a.chunk_rows) if a.num_rows else 0
    sizes = np.array([a.chunk_nbytes(c) for c in range(n)], dtype=np.int64)
    if a.tier == "external":
        base = int(a.external["offset"]) + np.arange(n, dtype=np.int64) * a.chunk_rows * a.row_bytes
        limit = base + sizes
    else:
        base = np.zeros(n, dtype=np.int64)
        limit = -(-np.maximum(sizes, 1) // 4096) * 4096
    return Layout(a.num_rows, a.row_bytes, a.chunk_rows, base, np.arange(n, dtype=np.int64), limit)


def _round_ranges(plan, key_base: np.ndarray, i: int, j: int) -> tuple:
    """Reads [i, j) of ``plan`` as read_range_arrays ranges: (chunk index, offset in the chunk's
    object, offset in the round's scratch, length). A read of an in-place chunk may start on the
    file page before the chunk: that part is not the object's, so it is skipped (the planner's
    row positions stay valid)."""
    which = plan.file[i:j]
    off = plan.offset[i:j] - key_base[which]
    at = plan.buf_offset[i:j] - plan.buf_offset[i]
    n = plan.length[i:j]
    before = np.minimum(off, 0)
    if before.any():
        off, at, n = off - before, at - before, n + before
    return which, off, at, n


def _noted(e: BaseException, a: _Attr) -> BaseException:
    note = f"while reading rows of feature attribute {a.label}"
    if note not in getattr(e, "__notes__", ()):
        e.add_note(note)
    return e


class _Gathers:
    """Part of :class:`~tiered.gnn.TieredFeatureStore` (see its docstring)."""

    def _ready(self, a: _Attr) -> None:
        """Open the zarr array or lay out the chunks, and make the row cache, once per attribute."""
        with a.lock:
            if a.tier == "zarr":
                if a.zarr is None:
                    import zarr

                    a.zarr = zarr.open_array(a.zarr_path, mode="r")
            elif a.layout is None:
                a.layout = _layout(a)
            if a.cache is None:
                self._make_cache(a)

    def _read_rows(self, a: _Attr, rows: np.ndarray, priority: Priority,
                   sink: Callable[[slice, np.ndarray], None]) -> IOFuture:
        """Read sorted unique ``rows`` from storage; ``sink(sel, data)`` receives them in
        consecutive slices of ``rows`` as rounds complete (on an engine thread)."""
        out = IOFuture(f"read {len(rows)} rows of {a.label}")
        if not len(rows):
            out.set_result(0)
            return out
        if a.tier == "zarr":  # zarr does its own I/O (decompression included), in this thread
            data = np.ascontiguousarray(a.zarr.oindex[(rows,)]).reshape(len(rows), -1).view(np.uint8)
            sink(slice(0, len(rows)), data)
            out.set_result(len(rows))
            return out
        keys, layout = list(a.keys), a.layout  # an update may replace them meanwhile
        plan = plan_reads(rows, layout, merge_gap=self.merge_gap, max_read=max(self.max_read, a.block),
                          page=a.block or PAGE)
        rounds = split_rounds(plan, self.scratch_bytes)
        need = max(int(plan.buf_offset[j - 1] - plan.buf_offset[i] + align_up(int(plan.length[j - 1])))
                   for i, j in rounds)
        # a prefetch never waits for memory: it is skipped instead (the rows are read on demand)
        wait = 0.0 if priority is Priority.PREFETCH else self.store.host_wait
        buf = self._host.alloc(need, wait)
        scratch = buf.padded
        with self._lock:
            self.reads["requests"] += len(plan)
            self.reads["bytes"] += int(plan.length.sum())
            self.reads["rows"] += len(rows)
        key_base = layout.chunk_offset

        def submit(k: int) -> None:
            i, j = rounds[k]
            # one store call per round, the ranges as arrays (thousands of small reads: per-range
            # tuples, checks and engine requests were the gather's main Python cost)
            which, off, at, n = _round_ranges(plan, key_base, i, j)
            used, which = np.unique(which, return_inverse=True)  # hold only the chunks this round reads
            self.store.read_range_arrays([keys[c] for c in used.tolist()], which, off, n, scratch, at,
                                         owner=self.owner, priority=priority).add_done_callback(
                lambda g: finished(k, g))

        # finished() reaches the next round, the sink and the plan through this list, emptied when
        # the reads end: the engine's futures may sit in reference cycles until the garbage
        # collector runs (numpy-heavy loops seldom trigger it), and their callbacks must not keep
        # a minibatch's rows alive until then
        live = [submit, sink, plan, scratch]
        nrows = len(rows)

        def finished(k: int, g) -> None:
            try:
                g.result()
                submit_, sink_, plan_, scratch_ = live
                i, j = rounds[k]
                lo, hi = np.searchsorted(plan_.row_run, [i, j], side="left")
                sink_(slice(int(lo), int(hi)),
                      rows_from(scratch_, plan_.row_pos[lo:hi] - int(plan_.buf_offset[i]), a.row_bytes))
                if k + 1 < len(rounds):
                    submit_(k + 1)
                    return
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                live.clear()
                buf.release()
                out.set_exception(_noted(e, a))
                return
            live.clear()
            buf.release()
            out.set_result(nrows)

        try:
            submit(0)  # the store may read a chunk's checksum table first, in this thread
        except BaseException as e:
            live.clear()
            buf.release()
            raise _noted(e, a)
        return out

    def _wait_inflight(self, a: _Attr, rows: np.ndarray) -> None:
        """Wait for running prefetches that read any of ``rows`` (so they are not read twice)."""
        with a.lock:
            waits = [f for r, f in a.inflight if not f.done() and np.isin(rows, r, assume_unique=True).any()]
        if waits:
            _done, not_done = concurrent.futures.wait(waits, timeout=self.timeout)
            if not_done:
                raise TimeoutError(f"{a.label}: prefetch still running after {self.timeout} s")

    def _start_gather(self, a: _Attr, uniq: np.ndarray) -> tuple[np.ndarray, tuple, IOFuture]:
        """Serve ``uniq`` from the cache and start reading the rest; returns (rows as bytes,
        (mask of rows that were not in cache slots, the cache they may enter), future of the reads)."""
        self._ready(a)
        out = np.empty((len(uniq), a.row_bytes), dtype=np.uint8)
        if not len(uniq):
            f = IOFuture("empty gather")
            f.set_result(0)
            return out, (np.zeros(0, dtype=bool), None), f
        self._wait_inflight(a, uniq)
        with a.lock:
            cache = a.cache if a.cache is not None else self._make_cache(a)  # dropped under pressure
            found = cache.lookup(uniq, out)
            offer = cache.policy.peek(uniq) < 0  # misses and victim-buffer hits
        miss = np.flatnonzero(~found)

        def sink(sel: slice, data: np.ndarray) -> None:
            out[miss[sel]] = data

        return out, (offer, cache), self._read_rows(a, uniq[miss], Priority.DEMAND, sink)

    def _finish_gather(self, a: _Attr, uniq: np.ndarray, out: np.ndarray, offer: tuple, fut: IOFuture) -> None:
        fut.result(timeout=self.timeout)
        mask, cache = offer
        if mask.any():
            with a.lock:
                if a.cache is cache:  # rows read before an update, reset or close must not enter a new cache
                    cache.admit(uniq[mask], out[mask])

    def gather_rows(self, group_name, attr_name: str, index) -> torch.Tensor:
        """``x[index]`` of attribute (``group_name``, ``attr_name``) as a new CPU tensor."""
        if (w := self._reader()) is not None:
            return w.gather(group_name, attr_name, index)
        return self._gather_many([(self._attr(group_name, attr_name), index)])[0]

    def _gather_many(self, items: list[tuple[_Attr, Any]]) -> list[torch.Tensor]:
        """Gather several (attribute, index) pairs, with every attribute's reads in flight at once
        and each distinct index de-duplicated once."""
        norm: dict[int, tuple] = {}
        started = []
        try:
            for a, index in items:
                key = id(index)
                if key not in norm or norm[key][0] != a.num_rows:
                    ids, out_shape = _normalize_index(index, a.num_rows, a.label)
                    norm[key] = (a.num_rows, ids, out_shape, *unique_rows(ids))
                _n, ids, out_shape, uniq, inv = norm[key]
                started.append((a, uniq, inv, out_shape, *self._start_gather(a, uniq)))
        except BaseException:
            for _a, _u, _i, _s, _o, _m, f in started:  # never free buffers under running reads
                concurrent.futures.wait([f], timeout=self.timeout)
            raise
        results = []
        errors = []
        for a, uniq, inv, out_shape, out, offer, fut in started:
            try:
                self._finish_gather(a, uniq, out, offer, fut)
            except BaseException as e:  # noqa: BLE001 - raised below once every read is done
                errors.append(e)
                continue
            if not len(uniq):
                results.append(torch.empty((*out_shape, *a.row_shape), dtype=a.dtype))
                continue
            rows = torch.from_numpy(out).view(a.dtype) if a.dtype != torch.uint8 else torch.from_numpy(out)
            rows = rows.reshape(len(uniq), *a.row_shape)
            res = rows.index_select(0, torch.from_numpy(inv.reshape(-1))) if len(inv) != len(uniq) or not _is_identity(inv) else rows
            results.append(res.reshape(*out_shape, *a.row_shape))
        if errors:
            raise errors[0]
        return results

    # -- declared futures ------------------------------------------------------------
    def plan(self, batches, group_name=None, attr_names: Sequence[str] | None = None) -> None:
        """Declare the minibatches (node ids) about to be gathered, in order: the store learns
        which chunk objects they read and when (``TieredStore.plan`` for owner :attr:`owner`), so
        its host eviction keeps them and its governor can move them ahead. A new call replaces
        the previous declaration; ``plan([])`` withdraws it. :func:`tiered.gnn.window` calls it."""
        self._check_open()
        self._declare([k for index in batches for k in self.chunk_keys(index, group_name, attr_names)])

    def chunk_keys(self, index, group_name=None, attr_names: Sequence[str] | None = None) -> list[str]:
        """The store objects a gather of ``index`` reads, in order (attributes on the zarr tier
        read none)."""
        self._check_open()
        names = attr_names if attr_names is not None else [n for (g, n) in self._attrs if g == group_name]
        keys: list[str] = []
        for a in (self._attr(group_name, n) for n in names):
            if a.tier != "zarr" and a.keys:
                ids, _shape = _normalize_index(index, a.num_rows, a.label)
                keys.extend(a.keys[int(c)] for c in np.unique(ids // a.chunk_rows))
        return keys

    def _declare(self, keys: list[str]) -> None:
        self.store.plan(keys, owner=self.owner)
        self._planned = bool(keys)

    def _withdraw_plan(self) -> None:
        """Withdraw a declared plan, if any, while the feature store and its store are open."""
        if self._planned and self._opened and self.store.is_open:
            self.store.plan([], owner=self.owner)
            self._planned = False

    # -- prefetch ------------------------------------------------------------------
    def prefetch(self, index, group_name=None, attr_names: Sequence[str] | None = None) -> IOFuture:
        """Start reading the rows ``index`` (the next minibatch's node ids) that are not cached,
        at prefetch priority, into the row caches; returns a future of the rows read.

        Call it while the current minibatch computes: a later gather of those
        rows waits for the read instead of issuing its own. Attributes on the
        zarr tier are skipped (zarr reads are synchronous).
        """
        self._check_open()
        names = attr_names if attr_names is not None else [n for (g, n) in self._attrs if g == group_name]
        futs = []
        for name in names:
            a = self._attr(group_name, name)
            if a.tier == "zarr":
                continue
            futs.append(self._prefetch_attr(a, index))
        total = IOFuture("prefetch")
        g = gather(futs, "prefetch")

        def done(f) -> None:
            if f.exception() is not None:
                total.set_exception(f.exception())
            else:
                total.set_result(sum(f.result()))

        g.add_done_callback(done)
        return total

    def _prefetch_attr(self, a: _Attr, index) -> IOFuture:
        """Start reading the rows of ``index`` that are neither cached nor being read. The rows
        are registered as in flight under the attribute lock, and read outside it: the store
        may read a chunk's checksum table in this thread, and the completions of earlier
        prefetches (on the engine's threads) need the lock."""
        self._ready(a)
        ids, _shape = _normalize_index(index, a.num_rows, a.label)
        uniq = np.unique(ids)
        with a.lock:
            if a.cache is None:
                self._make_cache(a)
            want = uniq[~a.cache.contains(uniq)]
            for r, f in a.inflight:
                if len(want) and not f.done():
                    want = want[~np.isin(want, r, assume_unique=True)]
            cache = a.cache
            done = IOFuture(f"prefetch {len(want)} rows of {a.label}")
            entry = (want, done)
            a.inflight.append(entry)

        def sink(sel: slice, data: np.ndarray) -> None:
            with a.lock:
                if a.cache is cache:
                    cache.counters.prefetched += cache.admit(want[sel], data, force=True)

        def finish(f) -> None:
            with a.lock:
                a.inflight = [e for e in a.inflight if e is not entry]
            if f.exception() is not None:
                done.set_exception(f.exception())
            else:
                done.set_result(f.result())

        try:
            fut = self._read_rows(a, want, Priority.PREFETCH, sink)
        except OutOfBudget:  # no scratch free now: skip; the rows are read on demand
            with self._lock:
                self.reads["prefetch_skipped"] += 1
            fut = IOFuture(f"prefetch of {a.label} skipped (no scratch memory)")
            fut.set_result(0)
        except BaseException as e:
            with a.lock:
                a.inflight = [x for x in a.inflight if x is not entry]
            done.set_exception(e)
            raise
        fut.add_done_callback(finish)
        return done
