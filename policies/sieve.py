"""SIEVE (Zhang et al., NSDI 2024), byte-sized: one FIFO queue, a visited bit per object, a hand.

New objects enter at the head; a hit only sets the object's visited bit (no reordering, so a
hit costs a dict lookup). To make room, the hand walks from the tail (oldest) toward the head:
a visited object has its bit cleared and is passed over (it stays where it is), an unvisited one
is evicted; the hand keeps its place between evictions and wraps to the tail at the head. Objects
that are never hit again leave after one pass, which is what makes it beat LRU on web and block
traces at the cost of a FIFO.
"""

from __future__ import annotations

from typing import Callable

from .base import EvictionPolicy, Key, Observation


class SIEVE(EvictionPolicy):
    name = "sieve"

    def __init__(self) -> None:
        self._size: dict[Key, int] = {}
        self._visited: dict[Key, bool] = {}
        self._newer: dict[Key, Key | None] = {}  # toward the head
        self._older: dict[Key, Key | None] = {}  # toward the tail
        self._head: Key | None = None  # newest
        self._tail: Key | None = None  # oldest
        self._hand: Key | None = None  # where the next scan starts (None: the tail)

    def admit(self, obs: Observation) -> None:
        k = obs.key
        if k in self._size:
            self._size[k] = obs.nbytes
            self._visited[k] = True
            return
        self._size[k] = obs.nbytes
        self._visited[k] = False
        self._older[k], self._newer[k] = self._head, None
        if self._head is not None:
            self._newer[self._head] = k
        self._head = k
        if self._tail is None:
            self._tail = k

    def touch(self, obs: Observation) -> None:
        if obs.key in self._visited:
            self._visited[obs.key] = True

    def remove(self, key: Key) -> None:
        if key not in self._size:
            return
        older, newer = self._older.pop(key), self._newer.pop(key)
        if self._hand == key:
            self._hand = newer
        if older is not None:
            self._newer[older] = newer
        else:
            self._tail = newer
        if newer is not None:
            self._older[newer] = older
        else:
            self._head = older
        del self._size[key], self._visited[key]

    def victims(self, nbytes: int, evictable: Callable[[Key], bool]) -> list[Key]:
        """Walk the hand (clearing visited bits) until ``nbytes`` of unvisited, evictable objects
        are named; at most two passes, so pinned or all-visited queues end the walk."""
        out: list[Key] = []
        freed, steps, limit = 0, 0, 2 * len(self._size)
        node = self._hand if self._hand is not None else self._tail
        chosen: set[Key] = set()
        while freed < nbytes and steps < limit and node is not None:
            steps += 1
            if node not in chosen:
                if self._visited[node]:
                    self._visited[node] = False
                elif evictable(node):
                    out.append(node)
                    chosen.add(node)
                    freed += self._size[node]
            node = self._newer[node]
            if node is None:
                node = self._tail
        self._hand = node
        return out

    def __contains__(self, key: Key) -> bool:
        return key in self._size

    def __len__(self) -> int:
        return len(self._size)
