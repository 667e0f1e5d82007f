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
