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
        self._next: dict[Key, tuple[float, int]] = {}  # key -> (next access index, nbytes)
        self._heap: list[tuple[float, Key]] = []  # (-next, key), lazily invalidated

    def _push(self, key: Key, nxt: float, nbytes: int) -> None:
        self._next[key] = (nxt, nbytes)
        heapq.heappush(self._heap, (-nxt, key))
        if len(self._heap) > 4 * len(self._next) + 64:
            self._heap = [(-n, k) for k, (n, _s) in self._next.items()]
            heapq.heapify(self._heap)

    def admit(self, obs: Observation) -> None:
        self._push(obs.key, obs.next_access, obs.nbytes)

    def touch(self, obs: Observation) -> None:
        if obs.key in self._next:
            self._push(obs.key, obs.next_access, self._next[obs.key][1])

    def remove(self, key: Key) -> None:
        self._next.pop(key, None)

    def _farthest(self) -> float:
        heap = self._heap
        while heap:
            negn, k = heap[0]
            e = self._next.get(k)
            if e is not None and e[0] == -negn:
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
        popped: list[tuple[float, Key]] = []
        freed = 0
        heap = self._heap
        while freed < nbytes and heap:
            item = heapq.heappop(heap)
            e = self._next.get(item[1])
            if e is None or e[0] != -item[0]:
                continue
            popped.append(item)
            if evictable(item[1]):
                out.append(item[1])
                freed += e[1]
        for item in popped:
            heapq.heappush(heap, item)
        return out

    def __contains__(self, key: Key) -> bool:
        return key in self._next

    def __len__(self) -> int:
        return len(self._next)
