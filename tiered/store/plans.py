"""Declared futures: the keys each owner says it will read next, in order.

Workloads often know what they read next (a forward's unit order, the optimizer's chunk sweep).
An owner declares it with :meth:`TieredStore.plan`; a new plan replaces the owner's previous one.
As the owner's demand reads arrive (prefetches are not reads) the plan's position moves past
them, so "how soon is this key read again" is known exactly over the next ``HORIZON`` keys of
each plan. The host tier uses it when it must evict: it first evicts cached copies no plan names
within the horizon (in the configured policy's order), then planned ones, the one read farthest
in the future first (Belady's choice over the horizon; see ``_host_victims`` for how the plans
of several owners are ranked).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Sequence

SKIP_WINDOW = 16  # a read this many positions ahead of a plan's position moves it there (reads may reorder)
HORIZON = 1024  # keys of each plan ranked by their next read; farther ones count as unplanned


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

    def advance(self, key: str) -> bool:
        """A read of ``key``: move past its next occurrence when it is near, or when it is the
        key's last one (reads the store never saw, e.g. served from a device cache, must not
        freeze the plan). True when the position moved."""
        where = self.at.get(key)
        if not where:
            return False
        i = bisect.bisect_left(where, self.pos)
        if i < len(where) and (where[i] - self.pos <= SKIP_WINDOW or i == len(where) - 1):
            self.pos = where[i] + 1
            return True
        return False

    @property
    def done(self) -> bool:
        return self.pos >= len(self.keys)


class Plans:
    """Every owner's plan; thread-safe (its own lock, taken after the store's when both are)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plans: dict[str, Plan] = {}
        self.declared = 0  # plans declared since open, for stats
        self._changes = 0  # bumped when a plan is set or moves: near() is cached between changes
        self._near: tuple[int, dict[str, tuple[int, str]]] = (-1, {})

    def set(self, owner: str, keys: Sequence[str]) -> None:
        with self._lock:
            if keys:
                self._plans[owner] = Plan(owner, keys)
            else:
                self._plans.pop(owner, None)
            self.declared += 1
            self._changes += 1

    def advance(self, key: str) -> None:
        """A read of ``key`` happened: every plan expecting it soon moves past it."""
        if not self._plans:
            return
        with self._lock:
            for owner, plan in list(self._plans.items()):
                if plan.advance(key):
                    self._changes += 1
                    if plan.done:
                        del self._plans[owner]

    @property
    def active(self) -> bool:
        return bool(self._plans)

    def near(self) -> dict[str, tuple[int, str]]:
        """Keys within ``HORIZON`` of some plan's position: (positions to the next read, owner),
        the soonest over the plans; rebuilt only after a plan was set or moved."""
        with self._lock:
            if self._near[0] == self._changes:
                return self._near[1]
            out: dict[str, tuple[int, str]] = {}
            for owner, p in self._plans.items():
                for d, k in enumerate(p.keys[p.pos:p.pos + HORIZON]):
                    if k not in out or d < out[k][0]:
                        out[k] = (d, owner)
            self._near = (self._changes, out)
            return out

    def stats(self) -> dict:
        with self._lock:
            return {"declared": self.declared,
                    "active": {o: {"keys": len(p.keys), "position": p.pos} for o, p in self._plans.items()}}
