"""crc32 of stored bytes, per segment: one checksum scheme for the store and the checkpoints.

Objects are checksummed, and read, in segments of :data:`SEGMENT` bytes: each segment is its own
engine request, verified by the worker that read it, so checking a large object runs on all
workers at once instead of after the whole read on one thread.
"""

from __future__ import annotations

import zlib

try:  # ISA-L's crc32: the same values as zlib's (formats do not change), ~3x faster, drops the GIL
    from isal.isal_zlib import crc32
except ImportError:  # optional accelerator
    crc32 = zlib.crc32

SEGMENT = 8 << 20


def segments(lead: int, nbytes: int) -> int:
    """How many segments hold ``nbytes`` starting ``lead`` bytes into a buffer (at least one)."""
    return max(1, -(-(lead + nbytes) // SEGMENT))


def segment_checksums(data, lead: int = 0) -> list[int]:
    """crc32 of the object's bytes in each SEGMENT of its buffer (``data`` starts at ``lead``)."""
    return [crc32(data[max(0, i * SEGMENT - lead) : (i + 1) * SEGMENT - lead])
            for i in range(segments(lead, len(data)))]


def block_crcs(data, block: int) -> list[int]:
    """crc32 of each ``block`` bytes of the contiguous buffer ``data`` (the last may be shorter).

    One C-level pass (map over memoryview slices): a Python loop that slices and indexes per
    block cost twice as much as the checksums themselves for 4 KiB blocks."""
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    n = len(mv)
    if n <= block:
        return [crc32(mv)]
    return list(map(crc32, map(mv.__getitem__, map(slice, range(0, n, block), range(block, n + block, block)))))
