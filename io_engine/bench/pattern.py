"""The data the benchmark writes: every 4 KiB block carries its own file offset."""

from __future__ import annotations

import numpy as np

from ...allocators import PAGE

from .common import BenchError

_BLOCK_U64 = PAGE // 8  # uint64 words per 4 KiB block: each block starts with its file offset


class Pattern:
    """Random payload; the first 8 bytes of every 4 KiB block hold that block's file offset.

    Each window of the file is the payload with its own offsets stamped in, so
    a read from the wrong place, a short read or no read at all is caught by
    comparing the stamps (all of them) and a few sampled payload blocks.
    """

    def __init__(self, window: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.window = window
        self.payload = np.frombuffer(rng.bytes(window), dtype=np.uint8)
        self.block_offsets = np.arange(window // PAGE, dtype=np.uint64) * PAGE
        nblocks = window // PAGE
        picks = rng.choice(nblocks, size=min(8, nblocks), replace=False)
        self.samples = sorted(int(b) * PAGE for b in picks)

    def fill(self, slot: np.ndarray) -> None:
        slot[:] = self.payload[: len(slot)]

    def stamp(self, slot: np.ndarray, file_offset: int, n: int) -> None:
        nblk = n // PAGE
        slot[: nblk * PAGE].view(np.uint64)[::_BLOCK_U64] = self.block_offsets[:nblk] + np.uint64(file_offset)

    def verify(self, slot: np.ndarray, file_offset: int, n: int, path: str) -> int:
        """Raise BenchError unless ``slot[:n]`` is what was written at ``file_offset``; return blocks checked."""
        nblk = n // PAGE
        got = slot[: nblk * PAGE].view(np.uint64)[::_BLOCK_U64]
        want = self.block_offsets[:nblk] + np.uint64(file_offset)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            raise BenchError(
                f"{path}: block at file offset {file_offset + bad * PAGE} read back stamped "
                f"{int(got[bad])}: the read did not return that block"
            )
        for p in self.samples:
            if p + PAGE <= n and not np.array_equal(slot[p + 8 : p + PAGE], self.payload[p + 8 : p + PAGE]):
                raise BenchError(f"{path}: payload at file offset {file_offset + p} differs from what was written")
        return nblk
