"""Best-fit allocation of byte ranges with coalescing on free.

Shared by the host arena (ranges of memory) and the store's storage tiers
(ranges of a file), so both keep fragmentation bounded the same way.
"""

from __future__ import annotations

import bisect


class FreeList:
    """Free ranges of ``[0, capacity)``; not thread-safe (callers hold their own lock)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._offsets: list[int] = [0] if capacity else []
        self._sizes: dict[int, int] = {0: capacity} if capacity else {}
        self.free_bytes = capacity
        self._cursor = 0

    def take(self, size: int, *, high: bool = False, next_fit: bool = False) -> int | None:
        """Offset of a free range of ``size`` bytes (best fit), or None.

        ``high`` takes the range from the end of the highest free block that
        fits instead: keeping small, long-lived ranges at the top stops them
        from splitting the space large ranges need. ``next_fit`` takes the first
        fitting block at or after the end of the previous next-fit range
        (wrapping around): for buffers freed in the order they were taken, as
        when weights stream through a budget, the pool behaves as a ring and
        does not fragment.
        """
        if high:
            return self._take_high(size)
        if next_fit:
            return self._take_next(size)
        best, best_size = None, 0
        for off in self._offsets:
            s = self._sizes[off]
            if s >= size and (best is None or s < best_size):
                best, best_size = off, s
                if s == size:
                    break
        if best is None:
            return None
        self._remove(best)
        if best_size > size:
            self._insert(best + size, best_size - size)
        self.free_bytes -= size
        return best

    def _take_next(self, size: int) -> int | None:
        i = bisect.bisect_left(self._offsets, self._cursor)
        # a free block that contains the cursor counts as "after" it
        if i > 0 and self._offsets[i - 1] + self._sizes[self._offsets[i - 1]] > self._cursor:
            i -= 1
        n = len(self._offsets)
        for j in range(n + 1):  # the first block twice: from the cursor, then (wrapped) from its start
            off = self._offsets[(i + j) % n] if n else 0
            if not n:
                break
            s = self._sizes[off]
            start = max(off, self._cursor) if j == 0 else off
            if off + s - start >= size:
                self._carve(off, s, start, size)
                self._cursor = start + size
                return start
        return None

    def _carve(self, off: int, s: int, start: int, size: int) -> None:
        self._remove(off)
        if start > off:
            self._insert(off, start - off)
        if off + s > start + size:
            self._insert(start + size, off + s - start - size)
        self.free_bytes -= size

    def _take_high(self, size: int) -> int | None:
        for off in reversed(self._offsets):
            s = self._sizes[off]
            if s >= size:
                if s == size:
                    self._remove(off)
                else:
                    self._sizes[off] = s - size
                self.free_bytes -= size
                return off + s - size
        return None

    def give(self, offset: int, size: int) -> None:
        """Return a range; merges with free neighbours."""
        if size <= 0:
            return
        self.free_bytes += size
        if self.free_bytes == self.capacity:
            self._cursor = 0  # empty again: next-fit restarts at the bottom
        i = bisect.bisect_left(self._offsets, offset)
        if i < len(self._offsets):
            nxt = self._offsets[i]
            if nxt < offset + size:
                raise RuntimeError(f"range {offset}+{size} overlaps free range at {nxt}")
            if nxt == offset + size:
                size += self._sizes[nxt]
                self._remove(nxt)
        if i > 0:
            prev = self._offsets[i - 1]
            end = prev + self._sizes[prev]
            if end > offset:
                raise RuntimeError(f"range {offset}+{size} overlaps free range at {prev}")
            if end == offset:
                self._sizes[prev] += size
                return
        self._insert(offset, size)

    def mark_used(self, offset: int, size: int) -> None:
        """Carve a known-used range out of the free space (rebuilding state from a manifest)."""
        i = bisect.bisect_right(self._offsets, offset) - 1
        if i < 0:
            raise RuntimeError(f"range {offset}+{size} is not free")
        start = self._offsets[i]
        s = self._sizes[start]
        if offset + size > start + s:
            raise RuntimeError(f"range {offset}+{size} is not free")
        self._carve(start, s, offset, size)

    def rewind(self) -> None:
        """Point next-fit at the largest free block, so a run of allocations lands together."""
        if self._offsets:
            self._cursor = max(self._offsets, key=self._sizes.__getitem__)

    def largest(self) -> int:
        return max(self._sizes.values(), default=0)

    def _insert(self, offset: int, size: int) -> None:
        bisect.insort(self._offsets, offset)
        self._sizes[offset] = size

    def _remove(self, offset: int) -> None:
        del self._offsets[bisect.bisect_left(self._offsets, offset)]
        del self._sizes[offset]
