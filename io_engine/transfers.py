"""How one piece of a request reaches the file: O_DIRECT where offset, length and buffer are
page aligned, a bounce buffer for unaligned read heads and tails, buffered I/O where the file
system refuses O_DIRECT, throttles per path prefix, and one cached handle per (path, mode).
Part of :class:`~tiered.io_engine.IOEngine` (see the engine's module docstring)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from typing import Any, Generator

import numpy as np

from ..allocators import PAGE, align_up

from .errors import IOEngineError, ShortTransferError
from .jobs import _address, _Piece
from .request import Op, Request

BOUNCE_BYTES = 1 << 20


class _RetryBuffered(Exception):
    """Internal: the file cannot be opened with O_DIRECT; redo the piece buffered."""


class _Transfers:
    """Part of :class:`~tiered.io_engine.IOEngine`: running a piece's transfers."""

    # -- transfers -----------------------------------------------------------------
    # A plan is a generator yielding (write?, direct?, view, path, file_offset) transfers
    # and receiving each one's byte count, so the same alignment logic drives both the
    # thread workers and the event-loop workers.
    def _plan(self, piece: _Piece, bounce: np.ndarray) -> Generator:
        req = piece.job.request
        view = piece.job.buffer[piece.start : piece.start + piece.length]
        write = req.op is Op.WRITE
        if not isinstance(view, np.ndarray) or not self._direct_ok(req.path):
            # device buffers (the backend aligns them itself) and files without O_DIRECT
            yield from self._plain(req, write, False, view, piece.offset)
        elif write:
            aligned = piece.offset % PAGE == 0 and len(view) % PAGE == 0 and _address(view) % PAGE == 0
            yield from self._plain(req, True, aligned, view, piece.offset)
        else:
            yield from self._direct_read(req, view, piece.offset, bounce)

    def _plain(self, req: Request, write: bool, direct: bool, view, offset: int) -> Generator:
        pos, n = 0, len(view)
        while pos < n:
            got = yield (write, direct, view[pos:], req.path, offset + pos)
            if got <= 0:
                raise ShortTransferError(req.op.value, req.path, offset + pos, n - pos,
                                         "no progress" if write else "end of file")
            self._stats.transfer(req.op.value, got, direct=direct)
            pos += got

    def _direct_read(self, req: Request, view: np.ndarray, offset: int, bounce: np.ndarray) -> Generator:
        pos, n = 0, len(view)
        while pos < n:
            foff = offset + pos
            lead = foff % PAGE
            remain = n - pos
            if lead == 0 and remain >= PAGE and (_address(view) + pos) % PAGE == 0:
                body = remain - remain % PAGE
                got = yield (False, True, view[pos : pos + body], req.path, foff)
                if got <= 0:
                    raise ShortTransferError("read", req.path, foff, remain, "end of file")
                self._stats.transfer("read", got, direct=True)
                pos += got
                continue
            span = min(len(bounce), align_up(lead + remain))
            got = yield (False, True, bounce[:span], req.path, foff - lead)
            usable = min(got - lead, remain)
            if usable <= 0:
                raise ShortTransferError("read", req.path, foff, remain, "end of file")
            view[pos : pos + usable] = bounce[lead : lead + usable]
            self._stats.transfer("read", usable, direct=True, bounced=usable)
            pos += usable

    def _run_piece_sync(self, piece: _Piece, bounce: np.ndarray) -> None:
        if self._fast_read(piece):
            return
        for _attempt in range(2):
            plan = self._plan(piece, bounce)
            try:
                step = next(plan)
                while True:
                    step = plan.send(self._transfer_sync(*step))
            except StopIteration:
                return
            except _RetryBuffered:
                continue  # the file turned out not to support O_DIRECT; redo buffered

    def _fast_read(self, piece: _Piece) -> bool:
        """One aligned O_DIRECT read with no throttle: skip the plan machinery (small random reads
        are bound by per-request CPU). False when the piece needs the general path."""
        req = piece.job.request
        if req.op is not Op.READ or self._limits or not piece.length or piece.offset % PAGE or piece.length % PAGE:
            return False
        view = piece.job.buffer[piece.start : piece.start + piece.length]
        if not isinstance(view, np.ndarray) or view.ctypes.data % PAGE or not self._direct_ok(req.path):
            return False
        try:
            h = self._handle(req.path, False, True)
            got = self.backend.pread(h, view, piece.offset)
        except _RetryBuffered:
            return False
        except OSError as e:
            raise self._wrap(e, False, req.path, piece.offset, piece.length) from e
        if got <= 0:
            raise ShortTransferError("read", req.path, piece.offset, piece.length, "end of file")
        if got != piece.length:  # short: let the general path finish the rest
            if got > 0:
                self._stats.transfer("read", got, direct=True)
                piece.start += got
                piece.offset += got
                piece.length -= got
            return False
        self._stats.transfer("read", got, direct=True)
        return True

    async def _run_piece_async(self, piece: _Piece, bounce: np.ndarray) -> None:
        for _attempt in range(2):
            plan = self._plan(piece, bounce)
            try:
                step = next(plan)
                while True:
                    write, direct, view, path, off = step
                    delay = self._throttle(path, write, len(view))
                    if delay:
                        await asyncio.sleep(delay)
                    try:
                        h = self._handle(path, write, direct)
                        got = await (self.backend.apwrite(h, view, off) if write
                                     else self.backend.apread(h, view, off))
                    except OSError as e:
                        raise self._wrap(e, write, path, off, len(view)) from e
                    step = plan.send(got)
            except StopIteration:
                return
            except _RetryBuffered:
                continue

    def _transfer_sync(self, write: bool, direct: bool, view, path: str, off: int) -> int:
        delay = self._throttle(path, write, len(view))
        if delay:
            time.sleep(delay)
        try:
            h = self._handle(path, write, direct)
            return self.backend.pwrite(h, view, off) if write else self.backend.pread(h, view, off)
        except OSError as e:
            raise self._wrap(e, write, path, off, len(view)) from e

    def _wrap(self, e: OSError, write: bool, path: str, off: int, n: int) -> IOEngineError:
        return IOEngineError("write" if write else "read", path, off, n,
                             e.strerror or str(e), e.errno)

    def _throttle(self, path: str, write: bool, nbytes: int) -> float:
        if not self._limits:
            return 0.0
        path = os.path.abspath(path)
        for prefix, rb, wb in self._limits:
            if path.startswith(prefix):
                bucket = wb if write else rb
                return bucket.delay(nbytes) if bucket else 0.0
        return 0.0

    # -- file handles --------------------------------------------------------------
    def _direct_ok(self, path: str) -> bool:
        return self.direct and path not in self._no_direct and self.backend.supports_host_buffers

    def _sync_handle(self, path: str) -> Any:
        """A writable handle to fsync ``path`` through; buffered when O_DIRECT turns out unsupported."""
        try:
            return self._handle(path, True, self._direct_ok(path))
        except _RetryBuffered:
            return self._handle(path, True, False)

    def _handle(self, path: str, write: bool, direct: bool) -> Any:
        key = (path, write, direct)
        h = self._handles.get(key)
        if h is not None:
            return h
        with self._handle_lock:
            h = self._handles.get(key)
            if h is None:
                try:
                    h = self.backend.open(path, write=write, direct=direct)
                except OSError as e:
                    if direct and e.errno == errno.EINVAL:
                        self._no_direct.add(path)  # filesystem without O_DIRECT (tmpfs)
                        raise _RetryBuffered() from e
                    raise
                self._handles[key] = h
            return h
