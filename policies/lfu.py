"""Least-frequently-used eviction (ties: least recently used first)."""

from __future__ import annotations

import heapq
from typing import Callable

from .base import EvictionPolicy, Key, Observation


class LFU(EvictionPolicy):
    """Counts accesses while resident (starting from the observation's count).

    A heap of (count, tick, key) with lazy invalidation keeps both touch and
    victim selection O(log n), so millions of accesses replay quickly.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._entry: dict[Key, tuple[int, int, int]] = {}  # key -> (count, tick, nbytes)
        self._heap: list[tuple[int, int, Key]] = []
        self._tick = 0

    def _push(self, key: Key, count: int, nbytes: int) -> None:
        self._tick += 1
        self._entry[key] = (count, self._tick, nbytes)
        heapq.heappush(self._heap, (count, self._tick, key))
        if len(self._heap) > 4 * len(self._entry) + 64:
            self._heap = [(c, t, k) for k, (c, t, _n) in self._entry.items()]
            heapq.heapify(self._heap)

    def admit(self, obs: Observation) -> None:
        self._push(obs.key, max(1, obs.count), obs.nbytes)

    def touch(self, obs: Observation) -> None:
        e = self._entry.get(obs.key)
        if e is not None:
            self._push(obs.key, max(e[0] + 1, obs.count), e[2])

    def remove(self, key: Key) -> None:
        self._entry.pop(key, None)

    def victims(self, nbytes: int, evictable: Callable[[Key], bool]) -> list[Key]:
        out: list[Key] = []
        skipped: list[tuple[int, int, Key]] = []
        freed = 0
        heap = self._heap
        while freed < nbytes and heap:
            item = heapq.heappop(heap)
            c, t, k = item
            e = self._entry.get(k)
            if e is None or e[1] != t:
                continue  # stale
            skipped.append(item)  # victims() only proposes: the entry stays until remove()
            if evictable(k):
                out.append(k)
                freed += e[2]
        for item in skipped:
            heapq.heappush(heap, item)
        return out

    def __contains__(self, key: Key) -> bool:
        return key in self._entry

    def __len__(self) -> int:
        return len(self._entry)
