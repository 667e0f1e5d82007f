"""Storage tiers: one data file carved into 4 KiB-aligned extents; freed extents give their
blocks back to the filesystem."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from tiered.allocators import FreeList

from ..config import TierSpec
from .objects import DATA_FILE


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class _StorageTier:
    """One storage tier: its data file's free space (a hard budget), and what each owner holds
    there. An owner may hold a share that other owners' extents may not take."""

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.path = Path(spec.path)
        self.data_file = str(self.path / DATA_FILE)
        self.space = FreeList(spec.capacity // 4096 * 4096)  # a hard budget: round down
        self.objects = 0
        self._owner_of: dict[int, tuple[str, int]] = {}  # extent offset -> (owner, length)
        self.held: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.shares: dict[str, int] = {}

    @property
    def used(self) -> int:
        return self.space.capacity - self.space.free_bytes

    def held_back(self, owner: str) -> int:
        """Free bytes kept for the unused shares of owners other than ``owner``."""
        return sum(max(0, s - self.held.get(o, 0)) for o, s in self.shares.items() if o != owner)

    def room_for(self, owner: str) -> int:
        """The largest extent ``owner`` could take now (free space less others' unused shares)."""
        return max(0, min(self.space.largest(), self.space.capacity - self.used - self.held_back(owner)))

    def take(self, size: int, owner: str) -> int | None:
        """An extent of ``size`` bytes charged to ``owner``, or None (no room, or only room that
        other owners' shares keep)."""
        if self.used + size + self.held_back(owner) > self.space.capacity:
            return None
        offset = self.space.take(size)
        if offset is not None:
            self._charge(offset, size, owner)
        return offset

    def mark_used(self, offset: int, length: int, owner: str) -> None:
        """An extent found in the manifest (raises RuntimeError when it overlaps another)."""
        self.space.mark_used(offset, length)
        self._charge(offset, length, owner)

    def give(self, offset: int, length: int) -> None:
        """Return an extent to the free space, without touching its blocks."""
        self.space.give(offset, length)
        owner, _n = self._owner_of.pop(offset, (None, 0))
        if owner is not None:
            self.held[owner] -= length

    def release(self, offset: int, length: int, punch: bool = True) -> None:
        """Return an extent to the free space and (``punch``) its blocks to the filesystem."""
        self.give(offset, length)
        if punch:
            punch_hole(self.data_file, offset, length)

    def _charge(self, offset: int, length: int, owner: str) -> None:
        self._owner_of[offset] = (owner, length)
        held = self.held[owner] = self.held.get(owner, 0) + length
        self.peak[owner] = max(self.peak.get(owner, 0), held)


def punch_hole(path: str, offset: int, length: int) -> bool:
    """Deallocate a freed extent's blocks (the file keeps its size), so deleted objects give
    their disk space back; False where the filesystem or platform cannot (space is still
    reused by later extents)."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _fallocate():
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def file_identity(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)
