"""Kernel submission queues over raw syscalls (ctypes): io_uring, and Linux AIO where io_uring is missing.

Neither liburing nor libaio is needed: both are thin wrappers over these
syscalls, so the only requirement is a kernel that allows them (io_uring can
be compiled out, disabled by ``kernel.io_uring_disabled`` or blocked by a
container's seccomp filter; AIO by ``fs.aio-max-nr``). A queue takes a batch
of positional reads/writes, hands all of them to the kernel in one syscall,
and returns the completions as ``(tag, result)`` pairs (bytes, or ``-errno``).

io_uring's rings are shared memory read and written without atomics here:
correct on x86-64's total store order (the kernel publishes a completion's
tail after its entry; we publish the submission tail after the entries and
then enter the kernel), not on weaker memory models, so elsewhere it is AIO.
A queue belongs to one thread.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from typing import Any, Sequence

# (tag, write?, fd, buffer address, byte count, file offset)
RawOp = tuple[int, bool, int, int, int, int]

_MACHINE = platform.machine()
# io_uring has the same numbers on every architecture; AIO's differ
_NR = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209,
               "io_uring_setup": 425, "io_uring_enter": 426},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4,
                "io_uring_setup": 425, "io_uring_enter": 426},
}.get(_MACHINE)

_libc: Any = None


def _syscall(name: str, *args) -> int:
    """The syscall's result, or OSError with its errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    r = _libc.syscall(ctypes.c_long(_NR[name]), *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return r


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def set(self, seconds: float) -> None:
        self.tv_sec = int(seconds)
        self.tv_nsec = int((seconds - int(seconds)) * 1e9)


# -- io_uring ---------------------------------------------------------------------------------
_IORING_OP_READ, _IORING_OP_WRITE = 22, 23
_IORING_ENTER_GETEVENTS, _IORING_ENTER_EXT_ARG = 1, 8
_IORING_FEAT_SINGLE_MMAP, _IORING_FEAT_EXT_ARG = 1, 1 << 8
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_SQE = struct.Struct("<BBHiQQIIQ")  # opcode flags ioprio fd off addr len rw_flags user_data (of a 64-byte entry)
_CQE = struct.Struct("<Qi")  # user_data res (of a 16-byte entry)
_SQE_BYTES, _CQE_BYTES = 64, 16


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
        # io_sqring_offsets
        ("sq_head", ctypes.c_uint32), ("sq_tail", ctypes.c_uint32), ("sq_ring_mask", ctypes.c_uint32),
        ("sq_ring_entries", ctypes.c_uint32), ("sq_flags", ctypes.c_uint32), ("sq_dropped", ctypes.c_uint32),
        ("sq_array", ctypes.c_uint32), ("sq_resv1", ctypes.c_uint32), ("sq_user_addr", ctypes.c_uint64),
        # io_cqring_offsets
        ("cq_head", ctypes.c_uint32), ("cq_tail", ctypes.c_uint32), ("cq_ring_mask", ctypes.c_uint32),
        ("cq_ring_entries", ctypes.c_uint32), ("cq_overflow", ctypes.c_uint32), ("cq_cqes", ctypes.c_uint32),
        ("cq_flags", ctypes.c_uint32), ("cq_resv1", ctypes.c_uint32), ("cq_user_addr", ctypes.c_uint64),
    ]


class _GeteventsArg(ctypes.Structure):
    _fields_ = [("sigmask", ctypes.c_uint64), ("sigmask_sz", ctypes.c_uint32),
                ("min_wait_usec", ctypes.c_uint32), ("ts", ctypes.c_uint64)]


_U32 = struct.Struct("<I")


class UringQueue:
    """An io_uring of ``depth`` entries; at most ``depth`` operations in flight (the caller keeps that)."""

    mechanism = "io_uring"

    def __init__(self, depth: int) -> None:
        p = _Params()
        self.fd = _syscall("io_uring_setup", ctypes.c_uint32(depth), ctypes.byref(p))
        try:
            if not p.features & _IORING_FEAT_EXT_ARG:
                raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_EXT_ARG (kernel < 5.11)")
            self._map(p)
        except BaseException:
            os.close(self.fd)
            raise
        self.depth = depth
        self._ts = _Timespec()
        self._arg = _GeteventsArg(0, 0, 0, ctypes.addressof(self._ts))

    def _map(self, p: _Params) -> None:
        sq_size = p.sq_array + p.sq_entries * 4
        cq_size = p.cq_cqes + p.cq_entries * _CQE_BYTES
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if p.features & _IORING_FEAT_SINGLE_MMAP:
            self._sq = self._cq = mmap.mmap(self.fd, max(sq_size, cq_size), flags, prot, offset=_OFF_SQ_RING)
        else:
            self._sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
            self._cq = mmap.mmap(self.fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
        self._sqes = mmap.mmap(self.fd, p.sq_entries * _SQE_BYTES, flags, prot, offset=_OFF_SQES)
        # the params hold offsets into the rings; the masks are read from there
        self._sq_head, self._sq_tail = p.sq_head, p.sq_tail
        self._sq_mask = _U32.unpack_from(self._sq, p.sq_ring_mask)[0]
        self._cq_head, self._cq_tail, self._cqes = p.cq_head, p.cq_tail, p.cq_cqes
        self._cq_mask = _U32.unpack_from(self._cq, p.cq_ring_mask)[0]
        for i in range(p.sq_entries):  # submission slot i always names entry i
            _U32.pack_into(self._sq, p.sq_array + 4 * i, i)
        self._tail = _U32.unpack_from(self._sq, self._sq_tail)[0]

    def submit_and_wait(self, ops: Sequence[RawOp], timeout: float | None) -> list[tuple[int, int]]:
        """Queue ``ops`` and enter the kernel once: submit them, and when ``timeout`` is not None
        wait up to that long for at least one completion. Returns every completion available."""
        tail, mask, sqes = self._tail, self._sq_mask, self._sqes
        for tag, write, fd, addr, n, off in ops:
            _SQE.pack_into(sqes, (tail & mask) * _SQE_BYTES, _IORING_OP_WRITE if write else _IORING_OP_READ,
                           0, 0, fd, off, addr, n, 0, tag)
            tail = (tail + 1) & 0xFFFFFFFF
        if ops:
            self._tail = tail
            _U32.pack_into(self._sq, self._sq_tail, tail)
        pending = (tail - _U32.unpack_from(self._sq, self._sq_head)[0]) & 0xFFFFFFFF
        if pending or (timeout is not None and not self._ready()):
            self._enter(pending, timeout)
        return self._reap()

    def _ready(self) -> bool:
        cq = self._cq
        return _U32.unpack_from(cq, self._cq_tail)[0] != _U32.unpack_from(cq, self._cq_head)[0]

    def _enter(self, to_submit: int, timeout: float | None) -> None:
        flags, argp, argsz = 0, None, 0
        if timeout is not None:
            self._ts.set(timeout)
            flags, argp, argsz = _IORING_ENTER_GETEVENTS | _IORING_ENTER_EXT_ARG, ctypes.byref(self._arg), 24
        try:
            _syscall("io_uring_enter", ctypes.c_uint(self.fd), ctypes.c_uint(to_submit),
                     ctypes.c_uint(1 if timeout is not None else 0), ctypes.c_uint(flags), argp,
                     ctypes.c_size_t(argsz))
        except OSError as e:
            if e.errno not in (errno.ETIME, errno.EINTR, errno.EAGAIN, errno.EBUSY):
                raise

    def _reap(self) -> list[tuple[int, int]]:
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head)[0]
        tail = _U32.unpack_from(cq, self._cq_tail)[0]
        out = []
        mask, base = self._cq_mask, self._cqes
        while head != tail:
            out.append(_CQE.unpack_from(cq, base + (head & mask) * _CQE_BYTES))
            head = (head + 1) & 0xFFFFFFFF
        if out:
            _U32.pack_into(cq, self._cq_head, head)
        return out

    def close(self) -> None:
        for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
            m.close()
        os.close(self.fd)


# -- Linux AIO --------------------------------------------------------------------------------
_IOCB = struct.Struct("<QIIHhIQQqQII")  # data key rw_flags opcode reqprio fildes buf nbytes offset reserved2 flags resfd
_EVENT = struct.Struct("<QQqq")  # data obj res res2
_IOCB_CMD_PREAD, _IOCB_CMD_PWRITE = 0, 1


class AioQueue:
    """A Linux AIO context of ``depth`` entries (truly asynchronous for O_DIRECT; buffered
    transfers complete inside ``io_submit``, which is still correct)."""

    mechanism = "aio"

    def __init__(self, depth: int) -> None:
        self._ctx = ctypes.c_ulong(0)
        _syscall("io_setup", ctypes.c_uint(depth), ctypes.byref(self._ctx))
        self.depth = depth
        self._iocbs = ctypes.create_string_buffer(_IOCB.size * depth)
        base = ctypes.addressof(self._iocbs)
        self._addr = [base + _IOCB.size * i for i in range(depth)]
        self._ptrs = (ctypes.c_void_p * depth)()
        self._events = ctypes.create_string_buffer(_EVENT.size * depth)
        self._ts = _Timespec()

    def submit_and_wait(self, ops: Sequence[RawOp], timeout: float | None) -> list[tuple[int, int]]:
        """As :meth:`UringQueue.submit_and_wait`; ``tag`` must be below ``depth`` (it picks the iocb)."""
        out: list[tuple[int, int]] = []
        for i, (tag, write, fd, addr, n, off) in enumerate(ops):
            _IOCB.pack_into(self._iocbs, tag * _IOCB.size, tag, 0, 0,
                            _IOCB_CMD_PWRITE if write else _IOCB_CMD_PREAD, 0, fd, addr, n, off, 0, 0, 0)
            self._ptrs[i] = self._addr[tag]
        done = 0
        while done < len(ops):
            try:
                done += _syscall("io_submit", self._ctx, ctypes.c_long(len(ops) - done),
                                 ctypes.byref(self._ptrs, done * ctypes.sizeof(ctypes.c_void_p)))
            except OSError as e:  # the first remaining iocb was refused: complete it with the error
                out.append((ops[done][0], -(e.errno or errno.EIO)))
                done += 1
        if out:
            timeout = None
        self._ts.set(timeout or 0.0)
        try:
            got = _syscall("io_getevents", self._ctx, ctypes.c_long(0 if timeout is None else 1),
                           ctypes.c_long(self.depth), self._events, ctypes.byref(self._ts))
        except OSError as e:
            if e.errno != errno.EINTR:
                raise
            got = 0
        for i in range(got):
            data, _obj, res, _res2 = _EVENT.unpack_from(self._events, i * _EVENT.size)
            out.append((data, res))
        return out

    def close(self) -> None:
        _syscall("io_destroy", self._ctx)


# -- what this machine allows -----------------------------------------------------------------
_REASONS: dict[str, str | None] = {}


def unavailable_reason(mechanism: str) -> str | None:
    """Why ``mechanism`` ("io_uring" or "aio") cannot run here (probed once), or None."""
    if mechanism not in _REASONS:
        _REASONS[mechanism] = _probe(mechanism)
    return _REASONS[mechanism]


def _probe(mechanism: str) -> str | None:
    if _NR is None:
        return f"no syscall table for {_MACHINE} (x86_64 and aarch64 only)"
    if mechanism == "io_uring" and _MACHINE != "x86_64":
        return f"io_uring's shared rings are read without barriers here, which needs x86-64 (this is {_MACHINE})"
    try:
        q = UringQueue(2) if mechanism == "io_uring" else AioQueue(2)
    except OSError as e:
        return f"the kernel refused {mechanism} ({e.strerror or e}; disabled, blocked by seccomp, or too old)"
    q.close()
    return None


def open_queue(mechanism: str, depth: int) -> UringQueue | AioQueue:
    return UringQueue(depth) if mechanism == "io_uring" else AioQueue(depth)
