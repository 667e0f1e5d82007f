"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003), byte-sized.

Two LRU lists -- T1 (seen once recently) and T2 (seen at least twice) -- and
their ghost lists B1/B2 of recently evicted keys; a hit in a ghost list moves
the target size ``p`` of T1 towards the list that would have hit. Sizes are
in bytes so objects of different sizes share one budget.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .base import EvictionPolicy, Key, Observation


class ARC(EvictionPolicy):
    name = "arc"

    def __init__(self, capacity: float | None = None) -> None:
        self.t1: OrderedDict[Key, int] = OrderedDict()
        self.t2: OrderedDict[Key, int] = OrderedDict()
        self.b1: OrderedDict[Key, int] = OrderedDict()
        self.b2: OrderedDict[Key, int] = OrderedDict()
        self.t1b = self.t2b = self.b1b = self.b2b = 0
        self.p = 0.0
        self.c = capacity

    def resize(self, capacity: float) -> None:
        self.c = capacity

    def _cap(self) -> float:
        # without a known capacity, the resident bytes stand in for it
        if self.c is None or self.c == float("inf"):
            return float(max(1, self.t1b + self.t2b))
        return float(self.c)

    def admit(self, obs: Observation) -> None:
        k, s = obs.key, obs.nbytes
        c = self._cap()
        if k in self.b1:
            self.p = min(c, self.p + max(1.0, self.b2b / max(1, self.b1b)) * s)
            self.b1b -= self.b1.pop(k)
            self.t2[k] = s
            self.t2b += s
        elif k in self.b2:
            self.p = max(0.0, self.p - max(1.0, self.b1b / max(1, self.b2b)) * s)
            self.b2b -= self.b2.pop(k)
            self.t2[k] = s
            self.t2b += s
        elif k not in self.t1 and k not in self.t2:
            self.t1[k] = s
            self.t1b += s

    def touch(self, obs: Observation) -> None:
        k = obs.key
        if k in self.t1:
            s = self.t1.pop(k)
            self.t1b -= s
            self.t2[k] = s
            self.t2b += s
        elif k in self.t2:
            self.t2.move_to_end(k)

    def remove(self, key: Key) -> None:
        c = self._cap()
        if key in self.t1:
            s = self.t1.pop(key)
            self.t1b -= s
            self.b1[key] = s
            self.b1b += s
        elif key in self.t2:
            s = self.t2.pop(key)
            self.t2b -= s
            self.b2[key] = s
            self.b2b += s
        else:
            return
        while self.b1 and self.t1b + self.b1b > c:
            self.b1b -= self.b1.popitem(last=False)[1]
        while self.b2 and self.t1b + self.t2b + self.b1b + self.b2b > 2 * c:
            self.b2b -= self.b2.popitem(last=False)[1]

    def victims(self, nbytes: int, evictable: Callable[[Key], bool]) -> list[Key]:
        out: list[Key] = []
        freed = 0
        t1b = self.t1b
        it1, it2 = iter(self.t1.items()), iter(self.t2.items())
        n1, n2 = next(it1, None), next(it2, None)
        while freed < nbytes and (n1 is not None or n2 is not None):
            if n1 is not None and (n2 is None or t1b > self.p):
                k, s = n1
                n1 = next(it1, None)
                from_t1 = True
            else:
                k, s = n2
                n2 = next(it2, None)
                from_t1 = False
            if evictable(k):
                out.append(k)
                freed += s
                if from_t1:
                    t1b -= s
        return out

    def __contains__(self, key: Key) -> bool:
        return key in self.t1 or key in self.t2

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)
