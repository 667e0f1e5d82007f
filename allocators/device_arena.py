"""One pre-reserved region of device memory, carved into exact-size buffers.

The GPU tier must not call ``cudaMalloc`` (or grow torch's caching
allocator) per object in the hot path: that fragments device memory and
stalls on synchronising frees. The arena reserves ``capacity`` bytes once in
``open()`` as a single ``uint8`` tensor and hands out views of it, placed by
the same :class:`FreeList` the host arena and the storage tiers use. Buffer
offsets are aligned (512 B by default) so a view can be reinterpreted as any
dtype. The device may be ``"cpu"``: the arena then behaves identically, which
is what lets its logic be tested on machines without a GPU.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .budget import OutOfBudget
from .freelist import FreeList

DEVICE_ALIGN = 512


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class DeviceArenaStats:
    device: str
    capacity: int
    in_use: int
    peak: int
    largest_free: int
    buffers: int


class DeviceBuffer:
    """``nbytes`` of the arena at ``offset``; give it back with ``release()`` (or ``with``)."""

    __slots__ = ("_arena", "offset", "nbytes", "reserved", "_released")

    def __init__(self, arena: "DeviceArena", offset: int, nbytes: int, reserved: int) -> None:
        self._arena = arena
        self.offset = offset
        self.nbytes = nbytes
        self.reserved = reserved
        self._released = False

    def tensor(self, dtype=None, shape=None):
        """A view of the buffer as ``dtype`` with ``shape`` (default: flat uint8)."""
        import torch

        raw = self._arena._view(self.offset, self.nbytes)
        if dtype is None or dtype == torch.uint8:
            out = raw
        else:
            out = raw.view(dtype)
        return out if shape is None else out.view(shape)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._arena._free(self.offset, self.reserved)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DeviceBuffer {self._arena.device} offset={self.offset} nbytes={self.nbytes}>"


class DeviceArena:
    """A fixed region of device memory reserved in ``open()`` and returned in ``close()``."""

    def __init__(self, capacity: int, device: str = "cuda:0", *, alignment: int = DEVICE_ALIGN) -> None:
        if capacity <= 0:
            raise ValueError(f"device arena on {device}: capacity must be > 0, got {capacity}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"device arena on {device}: alignment must be a power of two, got {alignment}")
        self.device = str(device)
        self.alignment = alignment
        self.capacity = _align(int(capacity), alignment)
        self._region = None
        self._free_list = FreeList(0)
        self._cond = threading.Condition()
        self._in_use = 0
        self._peak = 0
        self._buffers = 0

    def open(self) -> "DeviceArena":
        if self._region is not None:
            return self
        import torch

        try:
            self._region = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            raise OutOfBudget(f"device arena on {self.device}: cannot reserve {self.capacity} bytes: {e}") from e
        self._free_list = FreeList(self.capacity)
        return self

    def close(self) -> None:
        """Drop the region. Outstanding buffers must not be used afterwards."""
        self._region = None

    def __enter__(self) -> "DeviceArena":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def alloc(self, nbytes: int, timeout: float | None = 0.0) -> DeviceBuffer:
        """A buffer of exactly ``nbytes``; waits up to ``timeout`` s for space (None: forever)."""
        if self._region is None:
            raise RuntimeError(f"device arena on {self.device} is not open")
        if nbytes < 0:
            raise ValueError(f"device arena on {self.device}: cannot allocate {nbytes} bytes")
        reserved = _align(max(nbytes, 1), self.alignment)
        if reserved > self.capacity:
            raise OutOfBudget(f"device arena on {self.device}: {nbytes} bytes requested, "
                              f"the arena holds {self.capacity} bytes")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (offset := self._free_list.take(reserved)) is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise OutOfBudget(
                        f"device arena on {self.device}: no free block of {reserved} bytes "
                        f"({self.capacity - self._in_use} of {self.capacity} free, "
                        f"largest free block {self._free_list.largest()})")
                self._cond.wait(remaining)
            self._in_use += reserved
            self._peak = max(self._peak, self._in_use)
            self._buffers += 1
        return DeviceBuffer(self, offset, nbytes, reserved)

    def try_alloc(self, nbytes: int) -> DeviceBuffer | None:
        try:
            return self.alloc(nbytes, timeout=0)
        except OutOfBudget:
            return None

    def _free(self, offset: int, size: int) -> None:
        with self._cond:
            self._free_list.give(offset, size)
            self._in_use -= size
            self._buffers -= 1
            self._cond.notify_all()

    def offset_of(self, t) -> int | None:
        """Where tensor ``t`` starts in the region, or None when it is not a view of it."""
        region = self._region
        if region is None or t.device != region.device:
            return None
        if t.untyped_storage().data_ptr() != region.untyped_storage().data_ptr():
            return None
        return t.data_ptr() - region.data_ptr()

    def _view(self, offset: int, nbytes: int):
        if self._region is None:
            raise RuntimeError(f"device arena on {self.device} is closed")
        return self._region[offset : offset + nbytes]

    @property
    def in_use(self) -> int:
        return self._in_use

    def stats(self) -> DeviceArenaStats:
        with self._cond:
            return DeviceArenaStats(self.device, self.capacity, self._in_use, self._peak,
                                    self._free_list.largest(), self._buffers)
