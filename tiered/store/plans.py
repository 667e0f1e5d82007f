"""Declared futures: the keys each owner says it will read next, in order.

Workloads often know what they read next (a forward's unit order, the optimizer's chunk sweep).
An owner declares it with :meth:`TieredStore.plan`; a new plan replaces the owner's previous one.
As the owner's reads arrive the plan's position moves past them, so "how soon is this key read
again" is known exactly over the declared horizon. The host tier uses it when it must evict: it
first evicts cached copies no plan names (in the configured policy's order), then planned ones,
the one read farthest in the future first (Belady's choice over the horizon).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable, Sequence

SKIP_WINDOW = 16  # a read this many positions ahead of a plan's position moves it there (reads may reorder)


class Plan:
    """One owner's declared reads and how far it has come."""

    def __init__(self, owner: str, keys: Sequence[str]) -> None:
        self.owner = owner
        self.keys = list(keys)
        self.pos = 0
        self.at: dict[str, list[int]] = {}
        for i, k in enumerate(self.keys):
            self.at.setdefault(k, []).append(i)

    def next_use(self, key: str) -> float:
        """Positions from now to ``key``'s next planned read (inf: not planned any more)."""
        where = self.at.get(key)
        if not where:
            return math.inf
        i = bisect.bisect_left(where, self.pos)
        return where[i] - self.pos if i < len(where) else math.inf

    def advance(self, key: str) -> None:
        where = self.at.get(key)
        if not where:
            return
        i = bisect.bisect_left(where, self.pos)
        if i < len(where) and where[i] - self.pos <= SKIP_WINDOW:
            self.pos = where[i] + 1

    def remaining(self) -> Iterable[str]:
        return dict.fromkeys(self.keys[self.pos:])

    @property
    def done(self) -> bool:
        return self.pos >= len(self.keys)


class Plans:
    """Every owner's plan; thread-safe (its own lock, taken after the store's when both are)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: dict[str, Plan] = {}
        self.declared = 0  # plans declared since open, for stats

    def set(self, owner: str, keys: Sequence[str]) -> None:
        with self._lock:
            if keys:
                self._plans[owner] = Plan(owner, keys)
            else:
                self._plans.pop(owner, None)
            self.declared += 1

    def advance(self, key: str) -> None:
        """A read of ``key`` happened: every plan expecting it soon moves past it."""
        if not self._plans:
            return
        with self._lock:
            for owner, plan in list(self._plans.items()):
                plan.advance(key)
                if plan.done:
                    del self._plans[owner]

    @property
    def active(self) -> bool:
        return bool(self._plans)

    def next_use(self, key: str) -> float:
        with self._lock:
            return min((p.next_use(key) for p in self._plans.values()), default=math.inf)

    def planned_keys(self) -> dict[str, float]:
        """Every key some plan still names, with its soonest next use."""
        with self._lock:
            out: dict[str, float] = {}
            for p in self._plans.values():
                for k in p.remaining():
                    d = p.next_use(k)
                    if d < out.get(k, math.inf):
                        out[k] = d
            return out

    def stats(self) -> dict:
        with self._lock:
            return {"declared": self.declared,
                    "active": {o: {"keys": len(p.keys), "position": p.pos} for o, p in self._plans.items()}}
