"""Least-recently-used eviction: the baseline every other policy is compared with."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .base import EvictionPolicy, Observation


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, int] = OrderedDict()  # key -> nbytes, oldest first

    def admit(self, obs: Observation) -> None:
        self._order[obs.key] = obs.nbytes
        self._order.move_to_end(obs.key)

    def touch(self, obs: Observation) -> None:
        if obs.key in self._order:
            self._order.move_to_end(obs.key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str]:
        out, freed = [], 0
        for key, size in self._order.items():
            if freed >= nbytes:
                break
            if evictable(key):
                out.append(key)
                freed += size
        return out

    def __contains__(self, key: str) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)
