"""The bytes of a row cache: slots and a victim buffer, host buffers of the feature store's
reservation (so the host tier's one budget accounts for feature rows under the store's owner).

The decisions (which rows stay) are a ``policies.row_cache`` policy's; this
class only moves bytes. Not thread-safe: the feature store calls it under its
attribute lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from allocators import HostBuffer, OutOfBudget
from policies.row_cache import RowCachePolicy, VictimBuffer


@dataclass
class CacheCounters:
    lookups: int = 0  # unique rows looked up
    hits: int = 0
    victim_hits: int = 0
    admitted: int = 0
    evicted: int = 0
    prefetched: int = 0  # rows brought in by prefetch

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["hit_rate"] = (self.hits + self.victim_hits) / self.lookups if self.lookups else 0.0
        return d


class RowCache:
    """``num_slots`` rows of ``row_bytes`` plus a victim buffer of ``victim_rows`` rows."""

    def __init__(self, policy: RowCachePolicy, row_bytes: int, victim_rows: int = 0) -> None:
        self.policy = policy
        self.row_bytes = int(row_bytes)
        self.victims = VictimBuffer(policy.num_rows, victim_rows)
        self.counters = CacheCounters()
        self._bufs: list = []
        self.data: np.ndarray | None = None
        self.victim_data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return (self.policy.num_slots + self.victims.capacity) * self.row_bytes

    def open(self, alloc: Callable[[int], HostBuffer], name: str) -> "RowCache":
        """Take the cache's memory with ``alloc(nbytes)`` (a reservation's, failing at once with
        OutOfBudget if it does not fit; the message names the cache)."""
        try:
            for rows in (self.policy.num_slots, self.victims.capacity):
                buf = alloc(rows * self.row_bytes) if rows else None
                self._bufs.append(buf)
        except OutOfBudget as e:
            self.close()
            raise OutOfBudget(f"row cache of {name}: {self.nbytes} bytes do not fit the host tier ({e})") from e
        slots, victims = self._bufs
        self.data = slots.array.reshape(-1, self.row_bytes) if slots else np.empty((0, self.row_bytes), np.uint8)
        self.victim_data = (victims.array.reshape(-1, self.row_bytes) if victims
                            else np.empty((0, self.row_bytes), np.uint8))
        return self

    def close(self) -> None:
        for b in self._bufs:
            if b is not None:
                b.release()
        self._bufs = []
        self.data = self.victim_data = None

    def drop_victims(self) -> int:
        """Give the victim buffer's memory back (its rows are the cache's coldest); returns the
        bytes released. The slots stay."""
        if len(self._bufs) < 2 or self._bufs[1] is None:
            return 0
        buf, self._bufs[1] = self._bufs[1], None
        freed = self.victims.capacity * self.row_bytes
        self.victims = VictimBuffer(self.policy.num_rows, 0)
        self.victim_data = np.empty((0, self.row_bytes), np.uint8)
        buf.release()
        return freed

    def lookup(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy cached rows (slots, then victim buffer) into ``out`` (one row per entry of
        ``rows``); returns the mask of rows found. Records the access with the policy."""
        slots = self.policy.lookup(rows)
        hit = slots >= 0
        out[hit] = self.data[slots[hit]]
        found = hit.copy()
        nh = int(hit.sum())
        vh = 0
        if self.victims.capacity:
            miss = np.flatnonzero(~hit)
            pos = self.victims.find(rows[miss])
            inv = pos >= 0
            if inv.any():
                out[miss[inv]] = self.victim_data[pos[inv]]
                found[miss[inv]] = True
                vh = int(inv.sum())
        c = self.counters
        c.lookups += len(rows)
        c.hits += nh
        c.victim_hits += vh
        return found

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """Mask of rows present (slots or victim buffer), without recording an access."""
        found = self.policy.peek(rows) >= 0
        if self.victims.capacity:
            found |= self.victims.find(rows) >= 0
        return found

    def admit(self, rows: np.ndarray, data: np.ndarray, *, force: bool = False) -> int:
        """Offer ``rows`` (unique) with their bytes; the policy picks which enter.
        Rows already cached are skipped. Returns how many were admitted."""
        fresh = self.policy.peek(rows) < 0
        if not fresh.all():
            rows, data = rows[fresh], data[fresh]
        if not len(rows):
            return 0
        slots, ev_rows, ev_slots = self.policy.admit(rows, force=force)
        if len(ev_rows) and self.victims.capacity:
            pos = self.victims.add(ev_rows)
            keep = pos >= 0
            self.victim_data[pos[keep]] = self.data[ev_slots[keep]]
        took = slots >= 0
        if took.any():
            self.data[slots[took]] = data[took]
            if self.victims.capacity:
                self.victims.remove(rows[took])  # the slot copy is the one that counts now
        self.counters.admitted += int(took.sum())
        self.counters.evicted += len(ev_rows)
        return int(took.sum())

    def invalidate(self, rows: np.ndarray) -> None:
        self.policy.invalidate(rows)
        self.victims.remove(rows)
