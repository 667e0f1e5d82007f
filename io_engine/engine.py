"""The asynchronous I/O engine: requests in, futures out.

Call order (as in torch.distributed.checkpoint, written down so it is kept):
``open()`` starts the workers -> ``submit()``/``read()``/``write()`` any number
of times from any thread or event loop -> ``close()`` drains queued work
and stops the workers. Nothing runs in ``__init__`` and nothing relies on
``__del__``.

A request is split into ``chunk``-sized pieces that go on one priority heap
(demand reads before prefetches before write-back, FIFO within a priority);
worker threads (or, for an async backend, coroutines on the engine's own
event loop) take pieces off it, so one large read is spread over all
workers and many requests are in flight at once (a kernel-queue backend,
``native``/``aio``, has one driver thread instead that keeps up to
``queue_depth`` pieces in flight: see batch.py). A request's future
completes when its last piece does; its first error fails it with the
file, offset and size named.

O_DIRECT: a piece whose file offset, length and buffer address are 4 KiB
aligned goes straight between the caller's buffer and the device. Unaligned
head/tail bytes of a read go through an aligned per-worker bounce buffer,
still with O_DIRECT, so reads never silently use the page cache; unaligned
writes go through the page cache and are counted as ``buffered_bytes`` (the
store only issues aligned writes). Files on filesystems without O_DIRECT
(tmpfs) fall back to buffered I/O, counted the same way.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import os
import threading
import time
from typing import Any

from ..allocators import PAGE, align_up, aligned_empty

from .backends import Backend, create_backend
from .errors import EngineClosed, IOEngineError
from .future import IOFuture
from .jobs import _as_buffer, _Group, _Job, _Member, _Piece
from .request import Op, Priority, Request
from .stats import EngineStats
from .throttle import TokenBucket
from .transfers import BOUNCE_BYTES, _Transfers

MIN_PIECE = 2 << 20  # smallest piece a large request is split into


class IOEngine(_Transfers):
    """See the module docstring. ``queue_depth`` caps transfers in flight for an
    async backend and for a kernel-queue one (``native``, ``aio``); for the threads
    backend the in-flight count is ``workers``."""

    def __init__(
        self,
        backend: str | Backend = "threads",
        *,
        workers: int = 4,
        queue_depth: int = 32,
        chunk: int = 8 << 20,
        direct: bool = True,
    ) -> None:
        if workers < 1 or queue_depth < 1:
            raise ValueError(f"workers ({workers}) and queue_depth ({queue_depth}) must be >= 1")
        if chunk <= 0 or chunk % PAGE:
            raise ValueError(f"chunk must be a positive multiple of {PAGE}, got {chunk}")
        self._backend_spec = backend
        self.backend: Backend | None = backend if isinstance(backend, Backend) else None
        self.workers = workers
        self.queue_depth = queue_depth
        self.chunk = chunk
        self.direct = direct
        self._heap: list[_Piece] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._open = False
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_wake: asyncio.Event | None = None
        self._handles: dict[tuple[str, bool, bool], Any] = {}
        self._no_direct: set[str] = set()
        self._handle_lock = threading.Lock()
        self._limits: list[tuple[str, TokenBucket | None, TokenBucket | None]] = []
        self._stats = EngineStats()

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> "IOEngine":
        if self._open:
            return self
        if self.backend is None:
            self.backend = create_backend(self._backend_spec)  # type: ignore[arg-type]
        self.backend.start(self.workers)
        self._closing = False
        self._open = True
        if getattr(self.backend, "submits_batches", False):
            self._threads = [self._start_driver()]
        elif self.backend.is_async:
            ready = threading.Event()
            t = threading.Thread(target=self._run_loop, args=(ready,), name="tiered-io-loop", daemon=True)
            t.start()
            if not ready.wait(30):
                raise RuntimeError("I/O engine event loop did not start within 30 s")
            self._threads = [t]
        else:
            self._threads = [
                threading.Thread(target=self._worker, name=f"tiered-io-{i}", daemon=True)
                for i in range(self.workers)
            ]
            for t in self._threads:
                t.start()
        return self

    def _start_driver(self) -> threading.Thread:
        """One thread submitting and reaping through the backend's kernel queue (see batch.py);
        the queue is made here so that a kernel refusing it fails ``open()``."""
        from .batch import BatchDriver

        try:
            queue = self.backend.queue(self.queue_depth)
        except BaseException:
            self._open = False
            self.backend.stop()
            raise
        driver = BatchDriver(self, self.queue_depth)
        t = threading.Thread(target=driver.run, args=(queue,), name="tiered-io-ring", daemon=True)
        t.start()
        return t

    def close(self, timeout: float = 60.0) -> None:
        """Finish queued work, stop workers, close files."""
        if not self._open:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_wake.set)
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                raise RuntimeError(f"I/O worker {t.name} did not stop within {timeout} s")
        self._threads = []
        self._loop = None
        with self._handle_lock:
            for h in self._handles.values():
                self.backend.close(h)
            self._handles.clear()
        self.backend.stop()
        self._open = False

    def __enter__(self) -> "IOEngine":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._open

    # -- submission ----------------------------------------------------------------
    def submit(self, request: Request) -> IOFuture:
        self._check_accepting(f"{request.op.value} of {request.path}")
        buf = self._buffer_of(request)
        fut = IOFuture(f"{request.op.value} {request.path}@{request.offset}+{request.length}")
        self._enqueue([(request, buf, fut)])
        return fut

    def submit_many(self, requests) -> IOFuture:
        """Submit many requests at once; one future for all (their total bytes, or the first error
        after every request ended). For thousands of small reads (GNN feature rows) it saves the
        per-request future, callback and wake-up; the transfers run exactly as with :meth:`submit`.
        Every buffer is checked before any request is queued."""
        requests = list(requests)
        self._check_accepting(f"{len(requests)} requests")
        fut = IOFuture(f"{len(requests)} requests")
        if not requests:
            fut.set_result(0)
            return fut
        bufs = [self._buffer_of(r) for r in requests]
        member = _Member(_Group(fut, len(requests), sum(r.length for r in requests)))
        if getattr(self.backend, "submits_batches", False) and self._enqueue_read_batch(requests, bufs, member):
            return fut
        self._enqueue([(r, buf, member) for r, buf in zip(requests, bufs)])
        return fut

    def _enqueue_read_batch(self, requests: list, bufs: list, member: "_Member") -> bool:
        """Queue small aligned O_DIRECT reads as one heap entry that the batch driver hands to the
        kernel whole (see batch.ReadBatch); False when the batch does not qualify."""
        from .batch import ReadBatch

        batch = ReadBatch.build(self, requests, bufs, member)
        if batch is None:
            return False
        with self._cond:
            heapq.heappush(self._heap, (batch.priority, next(self._seq), batch))
            self._cond.notify()
        return True

    def _check_accepting(self, what: str) -> None:
        if not self._open or self._closing:
            raise EngineClosed(f"I/O engine is not open ({what})")

    def _buffer_of(self, request: Request) -> Any:
        buf = _as_buffer(request.buffer, request.op is Op.READ, self.backend.supports_device_buffers)
        if len(buf) < request.length:
            raise ValueError(
                f"{request.op.value} of {request.length} bytes at offset {request.offset} of "
                f"{request.path}: buffer holds only {len(buf)} bytes"
            )
        return buf

    def _enqueue(self, jobs: list) -> None:
        """Split each (request, buffer, future) into pieces on the heap, under one lock, one wake-up."""
        now = time.perf_counter()
        pieces = 0
        with self._cond:
            for request, buf, fut in jobs:
                step = self._piece_size(request.length)
                starts = range(0, request.length, step) if request.length else (0,)
                job = _Job(request, fut, buf, len(starts), now)
                for st in starts:
                    piece = _Piece(int(request.priority), next(self._seq), job,
                                   request.offset + st, st, min(step, request.length - st))
                    heapq.heappush(self._heap, (piece.priority, piece.seq, piece))
                pieces += len(starts)
            self._cond.notify(pieces)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_wake.set)

    def _piece_size(self, length: int) -> int:
        """``chunk``, or less so that a single request still keeps every worker busy
        (never below MIN_PIECE: the device merges larger requests better)."""
        spread = align_up(-(-length // self.workers)) if length else self.chunk
        return min(self.chunk, max(MIN_PIECE, spread))

    def read(self, path, offset: int, buffer, length: int | None = None,
             priority: Priority = Priority.DEMAND) -> IOFuture:
        n = len(_as_buffer(buffer, True, True)) if length is None else length
        return self.submit(Request(Op.READ, os.fspath(path), offset, n, buffer, priority))

    def write(self, path, offset: int, buffer, length: int | None = None,
              priority: Priority = Priority.WRITEBACK, sync: bool = False) -> IOFuture:
        n = len(_as_buffer(buffer, False, True)) if length is None else length
        return self.submit(Request(Op.WRITE, os.fspath(path), offset, n, buffer, priority, sync))

    def fsync(self, path) -> None:
        """Make ``path``'s data durable now (blocking; used for files written in many requests)."""
        path = os.fspath(path)
        if not os.path.exists(path):  # the writable handle would create it
            raise IOEngineError("fsync", path, 0, 0, "no such file", errno.ENOENT)
        self.backend.fsync(self._sync_handle(path))

    def forget(self, path) -> None:
        """Close cached handles of ``path`` (call before deleting or renaming it)."""
        path = os.fspath(path)
        with self._handle_lock:
            for key in [k for k in self._handles if k[0] == path]:
                self.backend.close(self._handles.pop(key))

    def set_bandwidth_limit(self, prefix, read: int | None = None, write: int | None = None) -> None:
        """Throttle transfers on files under ``prefix`` to ``read``/``write`` bytes per second."""
        prefix = os.path.join(os.path.abspath(os.fspath(prefix)), "")
        self._limits = [x for x in self._limits if x[0] != prefix]
        self._limits.append((prefix, TokenBucket(read) if read else None, TokenBucket(write) if write else None))

    def stats(self) -> dict:
        s = self._stats.summary()
        s["backend"] = self.backend.name if self.backend else str(self._backend_spec)
        s["pending_pieces"] = len(self._heap)
        return s

    def reset_stats(self) -> None:
        self._stats.reset()

    # -- workers -------------------------------------------------------------------
    def _next_piece(self) -> _Piece | None:
        with self._cond:
            while not self._heap:
                if self._closing:
                    return None
                self._cond.wait()
            return heapq.heappop(self._heap)[2]

    def _worker(self) -> None:
        bounce = aligned_empty(BOUNCE_BYTES)
        while (piece := self._next_piece()) is not None:
            if not self._begin(piece.job):
                self._end(piece, None)
                continue
            err = None
            try:
                self._run_piece_sync(piece, bounce)
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                err = e
            self._end(piece, err)

    def _run_loop(self, ready: threading.Event) -> None:
        from concurrent.futures import ThreadPoolExecutor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        executor = ThreadPoolExecutor(max_workers=self.queue_depth, thread_name_prefix="tiered-aio")
        loop.set_default_executor(executor)  # asyncio's default pool is min(32, cpus+4) threads
        self._loop = loop
        self._async_wake = asyncio.Event()

        async def worker() -> None:
            bounce = aligned_empty(BOUNCE_BYTES)
            while True:
                with self._cond:
                    piece = heapq.heappop(self._heap)[2] if self._heap else None
                    done = piece is None and self._closing
                if done:
                    return
                if piece is None:
                    self._async_wake.clear()
                    await self._async_wake.wait()
                    continue
                if not self._begin(piece.job):
                    self._end(piece, None)
                    continue
                err = None
                try:
                    await self._run_piece_async(piece, bounce)
                except BaseException as e:  # noqa: BLE001
                    err = e
                self._end(piece, err)

        async def main() -> None:
            ready.set()
            await asyncio.gather(*(worker() for _ in range(self.queue_depth)))

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
            executor.shutdown(wait=True)

    def _begin(self, job: _Job) -> bool:
        """Mark the job started; False when it was cancelled or already failed."""
        with job.lock:
            if not job.started:
                job.started = True
                if not job.future.set_running_or_notify_cancel():
                    job.cancelled = True
            return not job.cancelled and job.error is None

    def _end(self, piece: _Piece, err: BaseException | None) -> None:
        job = piece.job
        with job.lock:
            if err is not None and job.error is None:
                job.error = err
            job.remaining -= 1
            last = job.remaining == 0
        if not last:
            return
        req = job.request
        if job.cancelled:
            self._stats.finished(req.op.value, 0, 0.0, error=False, cancelled=True)
            return
        if job.error is None and req.sync and req.op is Op.WRITE:
            try:
                self.backend.fsync(self._sync_handle(req.path))
            except OSError as e:
                job.error = IOEngineError("fsync", req.path, req.offset, req.length, os.strerror(e.errno or 0) or str(e), e.errno)
            except BaseException as e:  # noqa: BLE001 - never kill the worker; the caller gets it
                job.error = e
        self._stats.finished(req.op.value, req.length, time.perf_counter() - job.submitted,
                             error=job.error is not None, cancelled=False)
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(req.length)
