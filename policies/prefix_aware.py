"""Future-aware eviction for prefix caches: keep what queued requests will read.

A KV prefix cache knows something an ordinary cache does not: the prompts of
the requests waiting in the scheduler's queue, hence the block keys they will
ask for next. This policy evicts, in order,

1. objects no queued request needs, least recently used first (plain LRU);
2. then objects queued requests do need, the one needed furthest in the
   future first (Belady's rule, restricted to the known queue).

The queue is given with :meth:`PrefixAware.set_queue` (a sequence of key
lists, soonest request first) and replaced whenever it changes. With an empty
queue the policy is exactly LRU, so it never does worse than its baseline when
nothing is known. Pure logic, like every policy: no I/O, no store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Callable

from .lru import LRU


class PrefixAware(LRU):
    """LRU's recency order (admit/touch/remove are LRU's); only the choice of victims differs."""

    name = "prefix-aware"

    def __init__(self) -> None:
        super().__init__()
        self._next_use: dict[str, int] = {}  # key -> rank of the first queued request that needs it

    def set_queue(self, queue: Sequence[Iterable[str]]) -> None:
        """The keys each pending request will read, soonest request first (replaces the old queue)."""
        nxt: dict[str, int] = {}
        for rank, keys in enumerate(queue):
            for key in keys:
                nxt.setdefault(key, rank)
        self._next_use = nxt

    def needed(self, key: str) -> bool:
        return key in self._next_use

    def victims(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str]:
        out, freed = [], 0
        later: list[tuple[int, str, int]] = []
        for key, size in self._order.items():
            if freed >= nbytes:
                return out
            if not evictable(key):
                continue
            rank = self._next_use.get(key)
            if rank is None:
                out.append(key)
                freed += size
            else:
                later.append((rank, key, size))
        # not enough unneeded objects: give up the ones needed furthest in the future first
        later.sort(key=lambda t: -t[0])
        for _rank, key, size in later:
            if freed >= nbytes:
                break
            out.append(key)
            freed += size
        return out
