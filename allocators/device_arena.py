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

from dataclasses import dataclass

from .arena import NO_OWNER, Arena
from .budget import OutOfBudget

DEVICE_ALIGN = 512


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

    __slots__ = ("_arena", "offset", "nbytes", "reserved", "owner", "_released")

    def __init__(self, arena: "DeviceArena", offset: int, nbytes: int, reserved: int, owner: str = NO_OWNER) -> None:
        self._arena = arena
        self.offset = offset
        self.nbytes = nbytes
        self.reserved = reserved
        self.owner = owner
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
            self._arena._free(self.offset, self.reserved, self.owner)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DeviceBuffer {self._arena.device} offset={self.offset} nbytes={self.nbytes}>"


class DeviceArena(Arena):
    """A fixed region of device memory reserved in ``open()`` and returned in ``close()``."""

    def __init__(self, capacity: int, device: str = "cuda:0", *, alignment: int = DEVICE_ALIGN) -> None:
        super().__init__(capacity, alignment, f"device arena on {device}")
        self.device = str(device)
        self._region = None

    def open(self) -> "DeviceArena":
        if self._region is not None:
            return self
        import torch

        try:
            self._region = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            raise OutOfBudget(f"{self.name}: cannot reserve {self.capacity} bytes: {e}") from e
        self._reset()
        return self

    def close(self) -> None:
        """Drop the region. Outstanding buffers must not be used afterwards."""
        self._region = None

    def __enter__(self) -> "DeviceArena":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._region is not None

    def _buffer(self, offset: int, nbytes: int, reserved: int, owner: str) -> DeviceBuffer:
        return DeviceBuffer(self, offset, nbytes, reserved, owner)

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
            raise RuntimeError(f"{self.name} is closed")
        return self._region[offset : offset + nbytes]

    def stats(self) -> DeviceArenaStats:
        with self._cond:
            return DeviceArenaStats(self.device, self.capacity, self._in_use, self._peak,
                                    self._free_list.largest(), self._buffers)
