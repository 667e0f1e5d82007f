"""The engine's driver for kernel-queue backends: one thread, up to ``queue_depth`` pieces in flight.

The driver takes pieces off the engine's priority heap only while it has a
free slot, so a demand read still overtakes queued prefetches and write-back
(the kernel sees at most ``queue_depth`` transfers; the heap holds the rest).
Each loop turn stages the next transfer of every piece that is ready, hands
them all to the kernel in one syscall that also collects completions, and
feeds each completion back into its piece: the same alignment plans, short
transfer loops, bounce buffers, throttles and error wrapping as the worker
threads (``IOEngine._plan``), just without a thread per transfer. An aligned
O_DIRECT read without a throttle skips the plan (one transfer, checked here).

Futures complete, and their callbacks run, on the driver thread; so does the
fdatasync of a ``sync=True`` write (blocking the queue meanwhile, as it blocks
one worker of the threads backend; the store syncs through ``engine.fsync``). While
transfers are in flight the driver waits in the kernel at most ``POLL``
seconds before looking at the heap again, which bounds how long a request
from another thread waits for a free slot to be noticed.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..allocators import PAGE, aligned_empty
from .errors import EngineClosed, ShortTransferError
from .future import IOFuture
from .request import Op, Priority, Request

if TYPE_CHECKING:
    from .engine import IOEngine
    from .jobs import _Member, _Piece

POLL = 0.001
_NO_BOUNCE = np.empty(0, dtype=np.uint8)
_READ = Op.READ
#: largest read a ReadBatch carries: a request the engine would not split into pieces
BATCH_READ_MAX = 2 << 20


def _addr(view: np.ndarray) -> int:
    """The buffer's address (the ctypes route is ~3x faster than ``.ctypes.data``; read-only views
    cannot take it)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return view.ctypes.data


class ReadBatch:
    """The reads of one ``submit_many`` as one heap entry: each is one aligned O_DIRECT transfer into
    its own buffer, so the driver stages as many as it has free slots for in one submission and puts
    the rest back on the heap under the same (priority, sequence) place. A read that comes back
    short continues as an ordinary piece; an error or end of file ends that read with its error."""

    __slots__ = ("member", "requests", "bufs", "addrs", "priority", "next", "submitted")

    def __init__(self, member: "_Member", requests: list, bufs: list, addrs: list, priority: int) -> None:
        self.member, self.requests, self.bufs, self.addrs = member, requests, bufs, addrs
        self.priority, self.next = priority, 0
        self.submitted = time.perf_counter()

    @classmethod
    def build(cls, engine: "IOEngine", requests: list, bufs: list, member: "_Member") -> "ReadBatch | None":
        if engine._limits:
            return None
        prio = requests[0].priority
        limit = min(engine.chunk, BATCH_READ_MAX)
        paths: set[str] = set()
        addrs = []
        for r, b in zip(requests, bufs):
            n = r.length
            if (r.op is not _READ or r.priority != prio or not n or n > limit or r.offset % PAGE or n % PAGE
                    or not isinstance(b, np.ndarray)):
                return None
            a = _addr(b)
            if a % PAGE:
                return None
            addrs.append(a)
            paths.add(r.path)
        if not all(engine._direct_ok(p) for p in paths):
            return None
        return cls(member, requests, bufs, addrs, int(prio))


class ArrayReadBatch:
    """Many aligned O_DIRECT reads given as arrays (:func:`submit_read_arrays`): one heap entry
    and one future, and no Python object per read. Only the driver thread touches it once
    queued: it stages reads into free slots, counts completions, and completes the future
    once (with the total bytes, or the first error after every read ended)."""

    __slots__ = ("future", "paths", "path_idx", "offsets", "lengths", "addrs", "buf", "buf_offsets",
                 "priority", "next", "submitted", "remaining", "total", "error", "started",
                 "ok_reads", "ok_bytes", "latencies")

    def __init__(self, future: IOFuture, paths: list, path_idx: list, offsets: list, lengths: list,
                 addrs: list, buf: np.ndarray, buf_offsets: list, priority: int) -> None:
        self.future, self.paths, self.path_idx = future, paths, path_idx
        self.offsets, self.lengths, self.addrs = offsets, lengths, addrs
        self.buf, self.buf_offsets, self.priority = buf, buf_offsets, priority
        self.next, self.submitted = 0, time.perf_counter()
        self.remaining, self.total = len(offsets), sum(lengths)
        self.error: BaseException | None = None
        self.started = False
        self.ok_reads = self.ok_bytes = 0  # whole reads, counted into the engine's stats at the end
        self.latencies: list[float] = []

    def request(self, k: int) -> Request:
        """Read ``k`` as an ordinary request (for the rare read that leaves the fast path)."""
        n, at = self.lengths[k], self.buf_offsets[k]
        return Request(Op.READ, self.paths[self.path_idx[k]], self.offsets[k], n, self.buf[at: at + n],
                       Priority(self.priority))

    def end_one(self, err: BaseException | None, stats) -> None:
        """One read ended (driver thread only); the last one completes the future."""
        if err is not None and self.error is None:
            self.error = err
        self.remaining -= 1
        if self.remaining:
            return
        if self.ok_reads:
            with stats._lock:
                c = stats.ops["read"]
                c.chunks += self.ok_reads
                c.direct_bytes += self.ok_bytes
                c.requests += self.ok_reads
                c.bytes += self.ok_bytes
                c.latencies.extend(self.latencies)
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.total)


class _ArrayMember:
    """A read of an ArrayReadBatch that continues as an ordinary engine job (short read, or a file
    that refused O_DIRECT): the job's future calls back into the batch."""

    __slots__ = ("batch", "stats")

    def __init__(self, batch: ArrayReadBatch, stats) -> None:
        self.batch, self.stats = batch, stats

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, _n: int) -> None:
        self.batch.end_one(None, self.stats)

    def set_exception(self, err: BaseException) -> None:
        self.batch.end_one(err, self.stats)


def submit_read_arrays(engine: "IOEngine", paths: list, path_idx: np.ndarray, offsets: np.ndarray,
                       lengths: np.ndarray, buf: np.ndarray, buf_offsets: np.ndarray,
                       priority: Priority = Priority.DEMAND) -> IOFuture | None:
    """Queue read i, bytes ``[offsets[i], offsets[i] + lengths[i])`` of ``paths[path_idx[i]]`` into
    ``buf[buf_offsets[i]:]``, as one heap entry of a kernel-queue engine; one future for all
    (total bytes, or the first error after every read ended). The checks are numpy calls, not a
    Python loop per read. None (nothing queued) when the engine cannot take them so: not a
    kernel-queue backend, a bandwidth limit, a read not 4 KiB aligned (file offset, length,
    buffer address) or above the batch limit, or a file without O_DIRECT; use ``submit_many``."""
    if not getattr(engine.backend, "submits_batches", False) or engine._limits or not len(offsets):
        return None
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.writeable:
        raise ValueError("submit_read_arrays: buf must be a writable 1-D uint8 numpy array")
    offsets, lengths = np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    buf_offsets, path_idx = np.asarray(buf_offsets, dtype=np.int64), np.asarray(path_idx, dtype=np.int64)
    if not (len(offsets) == len(lengths) == len(buf_offsets) == len(path_idx)):
        raise ValueError("submit_read_arrays: offsets, lengths, buf_offsets and path_idx differ in length")
    if (offsets < 0).any() or (buf_offsets < 0).any() or int((buf_offsets + lengths).max()) > len(buf):
        raise ValueError(f"submit_read_arrays: a read falls outside the file or the {len(buf)}-byte buffer")
    if (path_idx < 0).any() or int(path_idx.max()) >= len(paths):
        raise ValueError(f"submit_read_arrays: path_idx must index the {len(paths)} paths")
    addrs = _addr(buf) + buf_offsets
    if ((offsets | lengths | addrs) % PAGE).any() or (lengths <= 0).any():
        return None
    if int(lengths.max()) > min(engine.chunk, BATCH_READ_MAX) or not all(engine._direct_ok(p) for p in paths):
        return None
    engine._check_accepting(f"{len(offsets)} reads")
    fut = IOFuture(f"{len(offsets)} reads of {paths[0]}" + (" and others" if len(paths) > 1 else ""))
    batch = ArrayReadBatch(fut, list(paths), path_idx.tolist(), offsets.tolist(), lengths.tolist(),
                           addrs.tolist(), buf, buf_offsets.tolist(), int(priority))
    with engine._cond:
        if engine._closing:
            raise EngineClosed(f"I/O engine is not open ({len(offsets)} reads)")
        heapq.heappush(engine._heap, (batch.priority, next(engine._seq), batch))
        engine._cond.notify()
    return fut


class _Slot:
    """One piece in flight: its plan (None on the fast path), the transfer staged or running."""

    __slots__ = ("tag", "piece", "plan", "step", "bounce", "attempt", "batch", "index")

    def __init__(self, tag: int) -> None:
        self.tag = tag
        self.batch: ReadBatch | None = None  # a read of a ReadBatch (its ``index``) instead of a piece
        self.index = 0
        self.piece: _Piece | None = None
        self.plan = None
        self.step: tuple | None = None  # (write, direct, view, path, offset)
        self.bounce: np.ndarray | None = None
        self.attempt = 0


class BatchDriver:
    """Runs an open engine's pieces through ``engine.backend.queue(depth)``; see the module docstring."""

    def __init__(self, engine: "IOEngine", depth: int) -> None:
        from .transfers import BOUNCE_BYTES, _RetryBuffered

        self.e, self.depth = engine, depth
        self._bounce_bytes, self._retry = BOUNCE_BYTES, _RetryBuffered
        self._slots = [_Slot(i) for i in range(depth)]
        self._free = list(range(depth - 1, -1, -1))
        self._staged: list[tuple] = []  # kernel ops for the next submission
        self._delayed: list[tuple[float, int, int]] = []  # (ready time, seq, tag): throttled transfers
        self._seq = itertools.count()

    # -- the loop -------------------------------------------------------------------------
    def run(self, queue: Any) -> None:
        """Serve pieces until the engine closes and nothing is left; closes ``queue`` at the end."""
        try:
            while (pieces := self._take()) is not None:
                try:
                    self._turn(queue, pieces)
                except BaseException as err:  # noqa: BLE001 - a broken queue must not leave futures pending
                    self._fail_all(err)
        finally:
            queue.close()

    def _turn(self, queue: Any, entries: list) -> None:
        for i, entry in enumerate(entries):
            if not self._free:  # a batch took the slots: the rest go back, in their places
                self._requeue(entries[i:])
                break
            item = entry[2]
            if type(item) is ReadBatch:
                self._start_batch(item, entry)
            elif type(item) is ArrayReadBatch:
                self._start_arrays(item, entry)
            else:
                self._start(item)
        self._release_delayed()
        busy = self.depth - len(self._free)
        idle_heap = not self.e._heap or not self._free
        timeout = self._wait_time() if busy and idle_heap else None
        for tag, res in queue.submit_and_wait(self._flush(), timeout):
            self._complete(self._slots[tag], res)

    def _fail_all(self, err: BaseException) -> None:
        self._staged.clear()
        self._delayed.clear()
        for slot in self._slots:
            if slot.piece is not None:
                self._finish(slot, err)
            elif type(slot.batch) is ArrayReadBatch:
                self._array_end(slot, err)
            elif slot.batch is not None:
                self._batch_end(slot, err)

    def _requeue(self, entries: list) -> None:
        with self.e._cond:
            for entry in entries:
                heapq.heappush(self.e._heap, entry)

    def _take(self) -> list | None:
        """Heap entries for the free slots; blocks only when nothing is in flight; None once closed
        and drained."""
        e = self.e
        with e._cond:
            while True:
                if e._heap and self._free:
                    return [heapq.heappop(e._heap) for _ in range(min(len(self._free), len(e._heap)))]
                if len(self._free) < self.depth:
                    return []
                if e._closing:
                    return None
                e._cond.wait()

    def _wait_time(self) -> float:
        if not self._delayed:
            return POLL
        return min(POLL, max(0.0, self._delayed[0][0] - time.monotonic()))

    def _flush(self) -> list[tuple]:
        ops, self._staged = self._staged, []
        return ops

    # -- pieces ---------------------------------------------------------------------------------
    def _start(self, piece: "_Piece") -> None:
        e = self.e
        if not e._begin(piece.job):
            e._end(piece, None)
            return
        slot = self._slots[self._free.pop()]
        slot.piece, slot.attempt = piece, 0
        req = piece.job.request
        view = piece.job.buffer[piece.start: piece.start + piece.length]
        if (req.op is _READ and not e._limits and piece.length and not piece.offset % PAGE
                and not piece.length % PAGE and isinstance(view, np.ndarray) and not _addr(view) % PAGE
                and e._direct_ok(req.path)):
            self._stage(slot, (False, True, view, req.path, piece.offset))
        else:
            self._new_plan(slot)

    def _new_plan(self, slot: _Slot) -> None:
        """Start (or, after an O_DIRECT open was refused, restart) the piece's general plan."""
        piece = slot.piece
        if piece.job.request.op is _READ and slot.bounce is None:
            slot.bounce = aligned_empty(self._bounce_bytes)
        slot.plan = self.e._plan(piece, slot.bounce if slot.bounce is not None else _NO_BOUNCE)
        slot.attempt += 1
        self._advance(slot, None)

    def _advance(self, slot: _Slot, got: int | None) -> None:
        """Feed the plan the last transfer's count (None: first step) and stage its next transfer."""
        try:
            step = next(slot.plan) if got is None else slot.plan.send(got)
        except StopIteration:
            self._finish(slot, None)
            return
        except BaseException as err:  # noqa: BLE001 - delivered through the future
            self._finish(slot, err)
            return
        delay = self.e._throttle(step[3], step[0], len(step[2]))
        slot.step = step
        if delay:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), slot.tag))
        else:
            self._stage(slot, step)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            slot = self._slots[heapq.heappop(self._delayed)[2]]
            self._stage(slot, slot.step)

    def _stage(self, slot: _Slot, step: tuple) -> None:
        write, direct, view, path, off = step
        slot.step = step
        try:
            handle = self.e._handle(path, write, direct)
        except self._retry:  # the file cannot take O_DIRECT: redo the piece buffered
            if slot.attempt >= 2:
                self._finish(slot, OSError("O_DIRECT refused twice"))
            else:
                self._new_plan(slot)
            return
        except OSError as err:
            self._finish(slot, self.e._wrap(err, write, path, off, len(view)))
            return
        except BaseException as err:  # noqa: BLE001
            self._finish(slot, err)
            return
        self._staged.append((slot.tag, write, handle, _addr(view), len(view), off))

    # -- reads of a ReadBatch ------------------------------------------------------------------
    def _start_batch(self, batch: ReadBatch, entry: tuple) -> None:
        """Stage as many of the batch's reads as there are free slots; requeue the rest in its place."""
        e = self.e
        if batch.next == 0 and not batch.member.group.start():
            for r in batch.requests:
                e._stats.finished("read", 0, 0.0, error=False, cancelled=True)
            return
        handles: dict[str, Any] = {}
        k, stop = batch.next, min(len(batch.requests), batch.next + len(self._free))
        reqs, addrs, staged, free, slots = batch.requests, batch.addrs, self._staged, self._free, self._slots
        while k < stop:
            r = reqs[k]
            h = handles.get(r.path)
            if h is None:
                h = handles[r.path] = self._batch_handle(batch, k)
                if h is None:  # the rest went to the ordinary path
                    return
            slot = slots[free.pop()]
            slot.batch, slot.index = batch, k
            staged.append((slot.tag, False, h, addrs[k], r.length, r.offset))
            k += 1
        batch.next = k
        if k < len(reqs):
            self._requeue([entry])

    def _batch_handle(self, batch: ReadBatch, k: int) -> Any:
        """The O_DIRECT handle of read ``k``'s file; None (after queueing reads ``k``.. as ordinary
        requests) when the file cannot be opened so (no O_DIRECT there, or an open error)."""
        try:
            return self.e._handle(batch.requests[k].path, False, True)
        except (OSError, self._retry):
            rest = range(k, len(batch.requests))
            batch.next = len(batch.requests)
            self.e._enqueue([(batch.requests[i], batch.bufs[i], batch.member) for i in rest])
            return None

    def _complete_batch_read(self, slot: _Slot, res: int) -> None:
        batch = slot.batch
        r = batch.requests[slot.index]
        if res == r.length:
            slot.batch = None
            self._free.append(slot.tag)
            self.e._stats.whole_direct_read(res, time.perf_counter() - batch.submitted)
            batch.member.group.end(None)
        elif res < 0:
            err = OSError(-res, _strerror(-res))
            self._batch_end(slot, self.e._wrap(err, False, r.path, r.offset, r.length))
        elif res == 0:
            self._batch_end(slot, ShortTransferError("read", r.path, r.offset, r.length, "end of file"))
        else:  # short: the rest continues as an ordinary piece in this slot
            from .jobs import _Job, _Piece

            self.e._stats.transfer("read", res, direct=True)
            job = _Job(r, batch.member, batch.bufs[slot.index], 1, batch.submitted, started=True)
            slot.batch, slot.piece, slot.attempt = None, _Piece(batch.priority, 0, job, r.offset + res, res,
                                                                r.length - res), 0
            self._new_plan(slot)

    def _batch_end(self, slot: _Slot, err: BaseException | None) -> None:
        batch, r = slot.batch, slot.batch.requests[slot.index]
        slot.batch = None
        self._free.append(slot.tag)
        self.e._stats.finished("read", r.length, time.perf_counter() - batch.submitted,
                               error=err is not None, cancelled=False)
        batch.member.group.end(err)

    # -- reads of an ArrayReadBatch ---------------------------------------------------------------
    def _start_arrays(self, batch: ArrayReadBatch, entry: tuple) -> None:
        """Stage as many of the batch's reads as there are free slots (list slices, no per-read
        objects); requeue the rest in its place."""
        if not batch.started:
            batch.started = True
            if not batch.future.set_running_or_notify_cancel():  # cancelled before any read started
                with self.e._stats._lock:
                    self.e._stats.ops["read"].cancelled += len(batch.offsets)
                return
        k = batch.next
        stop = min(len(batch.offsets), k + len(self._free))
        handles = []
        for path in batch.paths:
            try:
                handles.append(self.e._handle(path, False, True))
            except (OSError, self._retry):  # no O_DIRECT (or no file): these reads go the ordinary way
                handles.append(None)
        if any(h is None for h in handles):
            self._arrays_to_jobs(batch, k)
            return
        free, slots = self._free, self._slots
        tags = [free.pop() for _ in range(stop - k)]
        for tag, i in zip(tags, range(k, stop)):
            s = slots[tag]
            s.batch, s.index = batch, i
        if len(handles) == 1:
            fds = itertools.repeat(handles[0])
        else:
            fds = [handles[p] for p in batch.path_idx[k:stop]]
        self._staged.extend(zip(tags, itertools.repeat(False), fds, batch.addrs[k:stop], batch.lengths[k:stop],
                                batch.offsets[k:stop]))
        batch.next = stop
        if stop < len(batch.offsets):
            self._requeue([entry])

    def _arrays_to_jobs(self, batch: ArrayReadBatch, k: int) -> None:
        """Queue reads ``k``.. of the batch as ordinary requests (the engine's general path)."""
        batch.next = len(batch.offsets)
        member = _ArrayMember(batch, self.e._stats)
        reqs = [batch.request(i) for i in range(k, len(batch.offsets))]
        self.e._enqueue([(r, r.buffer, member) for r in reqs])

    def _complete_array_read(self, slot: _Slot, res: int) -> None:
        batch, k = slot.batch, slot.index
        n = batch.lengths[k]
        if res == n:
            slot.batch = None
            self._free.append(slot.tag)
            batch.ok_reads += 1
            batch.ok_bytes += n
            batch.latencies.append(time.perf_counter() - batch.submitted)
            batch.end_one(None, self.e._stats)
            return
        path, off = batch.paths[batch.path_idx[k]], batch.offsets[k]
        if res < 0:
            self._array_end(slot, self.e._wrap(OSError(-res, _strerror(-res)), False, path, off, n))
        elif res == 0:
            self._array_end(slot, ShortTransferError("read", path, off, n, "end of file"))
        else:  # short: the rest continues as an ordinary piece in this slot
            from .jobs import _Job, _Piece

            self.e._stats.transfer("read", res, direct=True)
            req = batch.request(k)
            job = _Job(req, _ArrayMember(batch, self.e._stats), req.buffer, 1, batch.submitted, started=True)
            slot.batch, slot.piece, slot.attempt = None, _Piece(batch.priority, 0, job, off + res, res, n - res), 0
            self._new_plan(slot)

    def _array_end(self, slot: _Slot, err: BaseException) -> None:
        batch = slot.batch
        slot.batch = None
        self._free.append(slot.tag)
        self.e._stats.finished("read", batch.lengths[slot.index], time.perf_counter() - batch.submitted,
                               error=True, cancelled=False)
        batch.end_one(err, self.e._stats)

    # -- completions ------------------------------------------------------------------------------
    def _complete(self, slot: _Slot, res: int) -> None:
        if slot.batch is not None:
            if type(slot.batch) is ArrayReadBatch:
                self._complete_array_read(slot, res)
            else:
                self._complete_batch_read(slot, res)
            return
        write, direct, view, path, off = slot.step
        if res < 0:
            err = OSError(-res, _strerror(-res))
            if slot.plan is not None:
                slot.plan.close()
            self._finish(slot, self.e._wrap(err, write, path, off, len(view)))
        elif slot.plan is not None:
            self._advance(slot, res)
        elif res == len(view):  # fast path, whole
            self.e._stats.transfer("read", res, direct=True)
            self._finish(slot, None)
        elif res == 0:
            self._finish(slot, ShortTransferError("read", path, off, len(view), "end of file"))
        else:  # fast path, short: the general plan reads the rest
            self.e._stats.transfer("read", res, direct=True)
            piece = slot.piece
            piece.start, piece.offset, piece.length = piece.start + res, piece.offset + res, piece.length - res
            self._new_plan(slot)

    def _finish(self, slot: _Slot, err: BaseException | None) -> None:
        piece = slot.piece
        slot.piece = slot.plan = slot.step = None
        self._free.append(slot.tag)
        self.e._end(piece, err)


def _strerror(code: int) -> str:
    import os

    return os.strerror(code)
