"""Scheduled migration: Belady's choice over the futures workloads declare, a heuristic beyond them.

Workloads that know what they read next declare it (``MigrationPolicy.plan``: an owner's keys in
read order). Over that horizon the next use of every planned object is known exactly, so the
policy makes Belady's decisions there:

* evict (demote) first the objects no plan names, in the fallback eviction policy's order, then
  planned ones, the one whose next planned read is farthest first;
* promote an accessed planned object unless every object it would displace is read sooner
  (bypass, as MIN does), and an accessed unplanned object only when that displaces no planned one;
* after each batch, fetch the next ``prefetch`` planned objects of each plan into tier 0 ahead of
  their reads when there is room or something read later (or never planned) to demote.

Plan positions advance as the planned keys are read; a read up to :data:`SKIP_WINDOW` positions
ahead (reads may reorder slightly), or of a key's last planned occurrence, moves the position
there, as the store's own plans do, and the reads it jumped over stay expected until they arrive
(or fall out of the window). With no plan active the policy is exactly
:class:`~policies.cache.CachingMigration` with the fallback ranking: same decisions, same code.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

from .base import EvictionPolicy, Key, Move, Observation
from .cache import CachingMigration

SKIP_WINDOW = 16  # as tiered/store/plans.py: a read this far ahead of a plan's position moves it there
DEFAULT_PREFETCH = 4  # planned reads per plan fetched ahead of use


class _Plan:
    """One owner's declared reads and how far they have come.

    A read up to :data:`SKIP_WINDOW` positions ahead, or of the key's last planned occurrence
    however far (as the store's plans: reads a policy never saw must not freeze the plan), moves
    the position past it; the reads it jumped over (the last :data:`SKIP_WINDOW` of them) stay
    expected, in their order and before everything after the position, until
    they arrive or fall out of the window, so a late read consumes its own position instead of
    jumping into a later repetition.
    """

    __slots__ = ("keys", "pos", "at", "late")

    def __init__(self, keys: Sequence[Key]) -> None:
        self.keys = list(keys)
        self.pos = 0
        self.at: dict[Key, list[int]] = {}
        self.late: dict[Key, list[int]] = {}  # key -> positions jumped over, still expected
        for i, k in enumerate(self.keys):
            self.at.setdefault(k, []).append(i)

    def next_use(self, key: Key) -> float:
        """Plan positions from now to ``key``'s next planned read (inf: not planned any more)."""
        late = self.late.get(key)
        if late:
            return late[0] - self.pos  # negative: overdue
        where = self.at.get(key)
        if not where:
            return math.inf
        i = bisect.bisect_left(where, self.pos)
        return where[i] - self.pos if i < len(where) else math.inf

    def advance(self, key: Key) -> None:
        late = self.late.get(key)
        if late:
            late.pop(0)
            if not late:
                del self.late[key]
            return
        where = self.at.get(key)
        if not where:
            return
        i = bisect.bisect_left(where, self.pos)
        if i < len(where) and (where[i] - self.pos <= SKIP_WINDOW or i == len(where) - 1):
            for j in range(max(self.pos, where[i] - SKIP_WINDOW), where[i]):
                self.late.setdefault(self.keys[j], []).append(j)
            self.pos = where[i] + 1
            if self.late:
                self._forget_late()

    def _forget_late(self) -> None:
        """Jumped-over reads that never came within the window are no longer expected."""
        oldest = self.pos - SKIP_WINDOW
        for k in [k for k, js in self.late.items() if js[0] < oldest]:
            js = [j for j in self.late[k] if j >= oldest]
            if js:
                self.late[k] = js
            else:
                del self.late[k]

    @property
    def done(self) -> bool:
        return self.pos >= len(self.keys) and not self.late


class ScheduledMigration(CachingMigration):
    """See the module docstring. ``fallback`` builds the eviction ranking used beyond the plans."""

    def __init__(self, fallback: Callable[[], EvictionPolicy], *, prefetch: int = DEFAULT_PREFETCH,
                 name: str = "schedule") -> None:
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"policy {name!r}: prefetch must be an integer >= 0, got {prefetch!r}")
        super().__init__(name, fallback)
        self.prefetch = prefetch
        self._plans: dict[str, _Plan] = {}

    def reset(self, tiers) -> None:
        super().reset(tiers)
        self._plans = {}

    def plan(self, owner: str, keys: Sequence[Key]) -> None:
        if len(keys):
            self._plans[owner] = _Plan(keys)
        else:
            self._plans.pop(owner, None)

    # -- the horizon ----------------------------------------------------------------------
    def _next_use(self, key: Key) -> float:
        best = math.inf
        for p in self._plans.values():
            d = p.next_use(key)
            if d < best:
                best = d
        return best

    def _advance(self, key: Key) -> None:
        for owner, p in list(self._plans.items()):
            p.advance(key)
            if p.done:
                del self._plans[owner]

    def _upcoming(self) -> list[tuple[float, Key]]:
        """The next ``prefetch`` planned reads of every plan, soonest first, each key once."""
        soon: dict[Key, float] = {}
        for p in self._plans.values():
            for k in [*p.late, *p.keys[p.pos:p.pos + self.prefetch]]:
                if k not in soon:
                    soon[k] = self._next_use(k)
        return sorted(((d, k) for k, d in soon.items()), key=lambda x: x[0])

    # -- decisions ------------------------------------------------------------------------
    def place(self, obs, tiers):
        if not self._plans or obs.op == "write":
            return super().place(obs, tiers)
        tiers = list(tiers)
        if len(tiers) > 1 and self.levels:
            name, _cap, free = tiers[0]
            planned = self._next_use(obs.key) < math.inf
            if free >= obs.nbytes and (planned or self.levels[0].should_admit(obs, int(free))):
                return name
        return tiers[-1][0] if tiers else None

    def decide(self, batch: Sequence[Observation]) -> list[Move]:
        if not self._plans:
            return super().decide(batch)
        moves: list[Move] = []
        for obs in batch:
            own = self._follow(obs)
            if obs.op == "read":
                self._advance(obs.key)
            if self._plans:
                self._scheduled_access(obs, own, moves)
            else:
                self._access(obs, own, moves)
        if self._plans and self.prefetch:
            self._fetch_ahead(moves)
        return moves

    def _scheduled_access(self, obs: Observation, own: int, moves: list[Move]) -> None:
        k, size = obs.key, obs.nbytes
        if own == 0:
            self.levels[0].touch(obs)
            return
        d = self._next_use(k)
        admit = size <= self.cap[0] and (d < math.inf or self.levels[0].should_admit(obs, int(self.free[0])))
        if not admit or not self._room(k, size, d):
            if own < self.back:
                self.levels[own].touch(obs)
            return
        self._promote(k, size, obs, own, moves)

    def _fetch_ahead(self, moves: list[Move]) -> None:
        for d, k in self._upcoming():
            size = self.size.get(k)
            own = self.where.get(k, self.back)
            if size is None or own == 0 or size > self.cap[0]:
                continue  # never seen (its size is unknown), already there, or too big
            if self._room(k, size, d):
                self._promote(k, size, self.last[k], own, moves)

    def _room(self, key: Key, size: int, d: float) -> bool:
        """Whether tier 0 can take ``key`` (next read in ``d``) by demoting only objects that no
        plan names or that are read later than it (what :meth:`_victims` would pick first)."""
        need = size - self.free[0]
        if need <= 0:
            return True
        freed = 0
        for v in self._victims(0, int(need), key, key):
            nu = self._next_use(v)
            if nu < math.inf and nu <= d:
                return False  # it would displace a planned object read no later than itself
            freed += self.size[v]
            if freed >= need:
                return True
        return False

    def _victims(self, level: int, nbytes: int, key: Key, pinned: Key) -> list[Key]:
        """Unplanned objects in the fallback's order, then planned ones, farthest read first."""
        if not self._plans:
            return super()._victims(level, nbytes, key, pinned)
        next_use = self._next_use
        out = self.levels[level].victims(
            nbytes, lambda x: x != key and x != pinned and next_use(x) == math.inf)
        freed = sum(self.size[v] for v in out)
        if freed >= nbytes:
            return out
        planned = [(next_use(x), x) for x, lv in self.where.items()
                   if lv == level and x != key and x != pinned and next_use(x) < math.inf]
        planned.sort(key=lambda x: x[0], reverse=True)
        return out + [x for _d, x in planned]
