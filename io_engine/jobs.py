"""What the engine's workers pass around: a request's job, a piece of it, and the group one
``submit_many`` call shares; and the flat byte view of a caller's buffer."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .future import IOFuture
from .request import Request


@dataclass
class _Job:
    request: Request
    future: IOFuture
    buffer: Any
    remaining: int
    submitted: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    cancelled: bool = False
    error: BaseException | None = None


class _Group:
    """The requests of one :meth:`IOEngine.submit_many`: one future for all of them (the total
    byte count, or the first error once every request has ended)."""

    __slots__ = ("future", "lock", "remaining", "total", "error", "started", "cancelled")

    def __init__(self, future: IOFuture, count: int, total: int) -> None:
        self.future, self.lock = future, threading.Lock()
        self.remaining, self.total = count, total
        self.error: BaseException | None = None
        self.started = self.cancelled = False

    def start(self) -> bool:
        with self.lock:
            if not self.started:
                self.started = True
                self.cancelled = not self.future.set_running_or_notify_cancel()
            return not self.cancelled

    def end(self, err: BaseException | None) -> None:
        with self.lock:
            if err is not None and self.error is None:
                self.error = err
            self.remaining -= 1
            if self.remaining:
                return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.total)


class _Member:
    """Stands in for a job's future inside a group (the three calls the workers make)."""

    __slots__ = ("group",)

    def __init__(self, group: _Group) -> None:
        self.group = group

    def set_running_or_notify_cancel(self) -> bool:
        return self.group.start()

    def set_result(self, _n: int) -> None:
        self.group.end(None)

    def set_exception(self, err: BaseException) -> None:
        self.group.end(err)


@dataclass
class _Piece:
    priority: int
    seq: int
    job: _Job = field(compare=False)
    offset: int = field(compare=False)  # file offset
    start: int = field(compare=False)  # offset into the job's buffer
    length: int = field(compare=False)


def _as_buffer(obj: Any, writable: bool, device_ok: bool) -> Any:
    """A flat uint8 view of ``obj`` without copying (numpy for host memory, torch for device)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise ValueError("I/O buffer tensor must be contiguous")
        flat = obj.reshape(-1)
        flat = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
        if obj.device.type != "cpu":
            if not device_ok:
                raise ValueError(
                    f"I/O buffer is on {obj.device}, but this backend reads only into host memory; "
                    "use engine.backend = 'kvikio' for device buffers"
                )
            return flat
        return flat.numpy()
    arr = obj if isinstance(obj, np.ndarray) else np.frombuffer(obj, dtype=np.uint8)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        if not arr.flags.c_contiguous:
            raise ValueError("I/O buffer array must be C-contiguous")
        arr = arr.reshape(-1).view(np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError("read buffer is read-only")
    return arr


def _address(buf: Any) -> int:
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()
