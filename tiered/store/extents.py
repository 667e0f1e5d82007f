"""Storage tiers: one data file carved into 4 KiB-aligned extents; freed extents give their
blocks back to the filesystem."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from allocators import FreeList

from ..config import TierSpec
from .objects import DATA_FILE


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class _StorageTier:
    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.path = Path(spec.path)
        self.data_file = str(self.path / DATA_FILE)
        self.space = FreeList(spec.capacity // 4096 * 4096)  # a hard budget: round down
        self.objects = 0

    @property
    def used(self) -> int:
        return self.space.capacity - self.space.free_bytes

    def release(self, offset: int, length: int, punch: bool = True) -> None:
        """Return an extent to the free space and (``punch``) its blocks to the filesystem."""
        self.space.give(offset, length)
        if punch:
            punch_hole(self.data_file, offset, length)


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
