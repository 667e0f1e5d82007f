"""Belady's offline optimum (MIN) with bypass: evict the object used farthest in the future.

Needs the future (``Observation.next_access``), so it only runs in the
simulator, as the upper bound every online policy is measured against. With
equal object sizes it maximises the fast tier's hit ratio; an object whose
next use is farther than every resident's is not admitted at all (bypass),
which also saves its migration traffic.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

from .base import EvictionPolicy, Key, Observation


class Belady(EvictionPolicy):
    name = "belady"
    needs_future = True

    def __init__(self) -> None:
        self._next: dict[Key, tuple[float, int, int]] = {}  # key -> (next access index, tick, nbytes)
        self._heap: list[tuple[float, int, Key]] = []  # (-next, tick, key), lazily invalidated
        self._tick = 0

    def _push(self, key: Key, nxt: float, nbytes: int) -> None:
        self._tick += 1
        self._next[key] = (nxt, self._tick, nbytes)
        heapq.heappush(self._heap, (-nxt, self._tick, key))
        if len(self._heap) > 4 * len(self._next) + 64:
            self._heap = [(-n, t, k) for k, (n, t, _s) in self._next.items()]
            heapq.heapify(self._heap)

    def admit(self, obs: Observation) -> None:
        self._push(obs.key, obs.next_access, obs.nbytes)

    def touch(self, obs: Observation) -> None:
        if obs.key in self._next:
            self._push(obs.key, obs.next_access, self._next[obs.key][2])

    def remove(self, key: Key) -> None:
        self._next.pop(key, None)

    def _farthest(self) -> float:
        heap = self._heap
        while heap:
            negn, tick, k = heap[0]
            e = self._next.get(k)
            if e is not None and e[1] == tick:
                return -negn
            heapq.heappop(heap)
        return -math.inf

    def should_admit(self, obs: Observation, free: int) -> bool:
        if obs.next_access == math.inf:
            return False  # never used again: any copy is wasted traffic
        if obs.nbytes <= free:
            return True
        return obs.next_access < self._farthest()

    def victims(self, nbytes: int, evictable: Callable[[Key], bool]) -> list[Key]:
        out: list[Key] = []
        popped: list[tuple[float, int, Key]] = []
        freed = 0
        heap = self._heap
        while freed < nbytes and heap:
            item = heapq.heappop(heap)
            e = self._next.get(item[2])
            if e is None or e[1] != item[1]:
                continue  # stale
            popped.append(item)
            if evictable(item[2]):
                out.append(item[2])
                freed += e[2]
        for item in popped:
            heapq.heappush(heap, item)
        return out

    def __contains__(self, key: Key) -> bool:
        return key in self._next

    def __len__(self) -> int:
        return len(self._next)
