"""S3-FIFO (Yang et al., SOSP 2023), byte-sized: a small probationary FIFO, a main FIFO, a ghost FIFO.

New objects enter the small queue (10% of the budget); those touched again
before they reach its head move to the main queue, the rest are evicted and
remembered in the ghost queue, and a ghost hit enters the main queue
directly. The main queue reinserts objects with a non-zero (capped) access
count, decrementing it. Quick demotion of one-hit objects is what makes it
beat LRU on block and web traces.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .base import EvictionPolicy, Key, Observation


class S3FIFO(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, capacity: float | None = None, small_fraction: float = 0.1) -> None:
        self.small: OrderedDict[Key, int] = OrderedDict()
        self.main: OrderedDict[Key, int] = OrderedDict()
        self.ghost: OrderedDict[Key, int] = OrderedDict()
        self.freq: dict[Key, int] = {}
        self.sb = self.mb = self.gb = 0
        self.c = capacity
        self.small_fraction = small_fraction

    def resize(self, capacity: float) -> None:
        self.c = capacity

    def _cap(self) -> float:
        if self.c is None or self.c == float("inf"):
            return float(max(1, self.sb + self.mb))
        return float(self.c)

    def admit(self, obs: Observation) -> None:
        k, s = obs.key, obs.nbytes
        if k in self.small or k in self.main:
            self.touch(obs)
            return
        self.freq[k] = 0
        if k in self.ghost:
            self.gb -= self.ghost.pop(k)
            self.main[k] = s
            self.mb += s
        else:
            self.small[k] = s
            self.sb += s

    def touch(self, obs: Observation) -> None:
        f = self.freq.get(obs.key)
        if f is not None and f < 3:
            self.freq[obs.key] = f + 1

    def remove(self, key: Key) -> None:
        if key in self.small:
            s = self.small.pop(key)
            self.sb -= s
            self.ghost[key] = s
            self.gb += s
            limit = self._cap()
            while self.ghost and self.gb > limit:
                self.gb -= self.ghost.popitem(last=False)[1]
        elif key in self.main:
            self.mb -= self.main.pop(key)
        else:
            return
        del self.freq[key]

    def victims(self, nbytes: int, evictable: Callable[[Key], bool]) -> list[Key]:
        """Runs the queue transitions (small -> main, main reinsertion) while choosing.

        Victims are moved to the head of their queue so a caller that drops
        only some of them finds the rest first next time.
        """
        out: list[Key] = []
        chosen: set[Key] = set()
        freed = 0
        small_target = self.small_fraction * self._cap()
        budget = 4 * (len(self.small) + len(self.main)) + 8  # every object passes at most 4 times
        sb_left = self.sb
        while freed < nbytes and budget > 0 and (self.small or self.main):
            budget -= 1
            if self.small and (sb_left > small_target or not self.main):
                k, s = next(iter(self.small.items()))
                if k in chosen:
                    if not self.main:
                        break
                    sb_left = 0  # only chosen ones left in small: take from main
                    continue
                if self.freq[k] > 0:
                    self.small.pop(k)
                    self.sb -= s
                    sb_left -= s
                    self.main[k] = s
                    self.mb += s
                    self.freq[k] = 0
                    continue
                self.small.move_to_end(k)  # scanned
                sb_left -= s
                if evictable(k):
                    out.append(k)
                    chosen.add(k)
                    freed += s
            else:
                k, s = next(iter(self.main.items()))
                if k in chosen:
                    break
                self.main.move_to_end(k)
                if self.freq[k] > 0:
                    self.freq[k] -= 1
                    continue
                if evictable(k):
                    out.append(k)
                    chosen.add(k)
                    freed += s
        for k in reversed(out):
            (self.small if k in self.small else self.main).move_to_end(k, last=False)
        return out

    def __contains__(self, key: Key) -> bool:
        return key in self.small or key in self.main

    def __len__(self) -> int:
        return len(self.small) + len(self.main)
