"""One aligned (and, with CUDA, pinned) host arena, carved into exact-size buffers.

Why an arena: O_DIRECT needs 4 KiB-aligned buffers, CUDA wants pinned memory
for asynchronous copies, and the virtio/NVMe drivers merge a large read into
few device requests only when its pages are physically contiguous. One
mapping made up front, backed by transparent huge pages (2 MiB physically
contiguous pieces) and page-locked once with ``cudaHostRegister``, gives all
three; torch's pinned allocator instead rounds every buffer up to a power of
two and pins each one separately.

Buffers are handed out best-fit from a free list that coalesces on release,
so a steady mix of sizes does not grow fragmentation; they are zero-copy
numpy/torch views of the arena. The arena is the byte budget of the host
tier: an allocation that does not fit waits (up to a timeout) or fails.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from .arena import NO_OWNER, Arena

PAGE = 4096
HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def align_up(n: int, alignment: int = PAGE) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class ArenaStats:
    capacity: int
    in_use: int
    peak: int
    free: int
    largest_free: int
    fragmentation: float  # 1 - largest free block / total free; 0 when free space is one block
    buffers: int
    hugepages: bool
    pinned: bool


class HostBuffer:
    """An exact-size, aligned slice of a :class:`HostArena`.

    ``array`` is a uint8 numpy view (what the I/O engine reads into);
    ``tensor(dtype, shape)`` reinterprets the same bytes without copying.
    Views must not be used after ``release()``: the bytes go back to the pool.
    """

    __slots__ = ("_arena", "offset", "nbytes", "reserved", "owner", "array", "_released")

    def __init__(self, arena: "HostArena", offset: int, nbytes: int, reserved: int, owner: str = NO_OWNER) -> None:
        self._arena = arena
        self.offset = offset
        self.nbytes = nbytes
        self.reserved = reserved
        self.owner = owner
        self.array = arena._view(offset, nbytes)
        self._released = False

    @property
    def address(self) -> int:
        return self._arena.address + self.offset

    @property
    def padded(self) -> np.ndarray:
        """The buffer rounded up to whole pages: what an O_DIRECT write needs."""
        return self._arena._view(self.offset, self.reserved)

    def tensor(self, dtype=None, shape=None):
        import torch

        t = torch.from_numpy(self.array)
        if dtype is not None and dtype != torch.uint8:
            t = t.view(dtype)
        if shape is not None:
            t = t.view(shape)
        return t

    def release(self) -> None:
        if self._released:
            raise RuntimeError(f"host buffer at offset {self.offset} released twice")
        self._released = True
        self.array = None
        self._arena._free(self.offset, self.reserved, self.owner)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "HostBuffer":
        return self

    def __exit__(self, *exc) -> None:
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        return f"HostBuffer(offset={self.offset}, nbytes={self.nbytes})"


class HostArena(Arena):
    """A fixed-capacity host memory pool (see module docstring).

    ``pin``: ``"auto"`` pins when torch sees a CUDA device, ``True`` requires
    it, ``False`` never pins. ``hugepages``: advise transparent huge pages, so
    the arena is physically contiguous per 2 MiB once touched. ``prefault``:
    touch every page now (commits the memory; benchmarks want it, a large
    default budget does not).
    Memory is mapped in ``open()`` (or ``__enter__``), not in ``__init__``.
    """

    def __init__(
        self,
        capacity: int,
        *,
        alignment: int = PAGE,
        hugepages: bool = True,
        pin: bool | str = "auto",
        prefault: bool = False,
        name: str = "host",
    ) -> None:
        if alignment <= 0 or alignment & (alignment - 1) or alignment % PAGE:
            raise ValueError(f"alignment must be a power of two multiple of {PAGE}, got {alignment}")
        super().__init__(capacity, alignment, name)
        self.hugepages = hugepages
        self._pin_request = pin
        self.prefault = prefault
        #: buffers up to this size come from the top of the arena, large ones from the bottom
        self.small_buffer = max(self.alignment, min(1 << 20, self.capacity // 64))
        self.pinned = False
        self._mmap: mmap.mmap | None = None
        self._base: np.ndarray | None = None
        self.address = 0

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> "HostArena":
        if self._mmap is not None:
            return self
        slack = HUGE_PAGE if self.hugepages else 0
        mm = mmap.mmap(-1, self.capacity + slack, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(mm, dtype=np.uint8)
        start = (-raw.ctypes.data) % HUGE_PAGE if self.hugepages else 0
        if self.hugepages:
            try:
                mm.madvise(mmap.MADV_HUGEPAGE, start, self.capacity)
            except (OSError, AttributeError, ValueError):
                self.hugepages = False
        base = raw[start : start + self.capacity]
        if self.prefault:
            base[::PAGE] = 0  # commit the memory now, so the first I/O is not slowed by faults
        self._mmap = mm
        self._base = base
        self.address = base.ctypes.data
        self._reset()
        self._pin()
        return self

    def close(self) -> None:
        """Unpin and drop the arena. Outstanding buffers become invalid."""
        if self._mmap is None:
            return
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.address)
            self.pinned = False
        self._base = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # views still alive elsewhere; the mapping goes when the last one does
        self._mmap = None

    def __enter__(self) -> "HostArena":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _pin(self) -> None:
        if self._pin_request is False:
            return
        try:
            import torch

            have_cuda = torch.cuda.is_available()
        except ImportError:
            have_cuda = False
        if not have_cuda:
            if self._pin_request is True:
                raise RuntimeError(f"{self.name}: pin=True but no CUDA device is available")
            return
        import torch

        err = int(torch.cuda.cudart().cudaHostRegister(self.address, self.capacity, 1))
        if err != 0:
            raise RuntimeError(f"{self.name}: cudaHostRegister of {self.capacity} bytes failed (cudaError {err})")
        self.pinned = True

    def populate(self) -> bool:
        """Fault every page of the arena in now, without changing any byte (Linux 5.14+
        ``MADV_POPULATE_WRITE``; safe while buffers are in use), so later copies into it do not
        run into page faults. False where the kernel cannot (nothing is done)."""
        if self._mmap is None:
            raise RuntimeError(f"{self.name}: arena is not open")
        start = self.address - np.frombuffer(self._mmap, dtype=np.uint8).ctypes.data
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE, start, self.capacity)
        except (OSError, ValueError):
            return False
        return True

    # -- the Arena hooks ---------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._base is not None

    def _take(self, reserved: int) -> int | None:
        small = reserved <= self.small_buffer
        return self._free_list.take(reserved, high=small, next_fit=not small)

    def _buffer(self, offset: int, nbytes: int, reserved: int, owner: str) -> HostBuffer:
        return HostBuffer(self, offset, nbytes, reserved, owner)

    def _view(self, offset: int, nbytes: int) -> np.ndarray:
        if self._base is None:
            raise RuntimeError(f"{self.name}: arena is closed")
        return self._base[offset : offset + nbytes]

    # -- reporting -----------------------------------------------------------------
    def stats(self) -> ArenaStats:
        with self._cond:
            free = self.capacity - self._in_use
            largest = self._largest_free()
            frag = 0.0 if free == 0 else 1.0 - largest / free
            return ArenaStats(
                capacity=self.capacity, in_use=self._in_use, peak=self._peak, free=free,
                largest_free=largest, fragmentation=frag, buffers=self._buffers,
                hugepages=self.hugepages, pinned=self.pinned,
            )

    def hugepage_bytes(self) -> int:
        """Bytes of this process backed by transparent huge pages (from /proc)."""
        return anon_hugepage_bytes()


def anon_hugepage_bytes() -> int:
    """Anonymous memory of this process backed by transparent huge pages (from /proc)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def aligned_empty(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 array of its own mapping (for small private scratch buffers)."""
    mm = mmap.mmap(-1, align_up(max(nbytes, 1)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, dtype=np.uint8)[:nbytes]
