"""Demand-filled cache hierarchy: a migration policy built from one eviction policy per tier.

How every classic cache works, generalised to N tiers: the accessed object is
promoted to the fastest tier (unless that tier's eviction policy declines it:
bypass), victims are demoted one tier down, cascading to the backing tier.
LRU, LFU, ARC, S3-FIFO and Belady's optimum differ only in the
:class:`~policies.base.EvictionPolicy` ranking plugged in here.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from .base import EvictionPolicy, Key, MigrationPolicy, Move, Observation, PlacementPolicy, TierModel


class CachingMigration(MigrationPolicy, PlacementPolicy):
    """Promote on access, demote victims down the hierarchy; decisions ordered so each fits.

    Also the placement policy: a new object goes to the fastest tier while it
    has free room (a read only if the ranking admits it), else to the backing tier --
    write-allocate without evicting at placement time; evictions happen in
    :meth:`decide`, where their moves can be ordered.
    """

    def __init__(self, name: str, factory: Callable[[], EvictionPolicy]) -> None:
        self.name = name
        self._factory = factory
        self.levels: list[EvictionPolicy] = []
        self.needs_future = bool(getattr(factory(), "needs_future", False))

    def reset(self, tiers: Sequence[TierModel]) -> None:
        super().reset(tiers)
        self.back = len(tiers) - 1
        self.levels = [self._factory() for _ in range(self.back)]
        for lvl, t in zip(self.levels, tiers):
            lvl.resize(t.capacity)
        self.cap = [float(t.capacity) for t in tiers[: self.back]]
        self.free = list(self.cap)
        self.where: dict[Key, int] = {}
        self.size: dict[Key, int] = {}
        self.last: dict[Key, Observation] = {}  # what a demoted object was last seen as

    def _place(self, key: Key, size: int, level: int, obs: Observation, moves: list[Move], pinned: Key) -> bool:
        """Put ``key`` on ``level``, first demoting victims there (their moves come first).

        ``pinned`` (the accessed object) is never chosen as a victim. Returns
        False, with nothing changed for ``key``, when the level cannot make room.
        """
        if level >= self.back:
            self.where.pop(key, None)
            moves.append(Move(key, self.back))
            return True
        lvl = self.levels[level]
        lvl.admit(obs)
        self.free[level] -= size
        if self.free[level] < 0:
            for v in self._victims(level, int(-self.free[level]), key, pinned):
                lvl.remove(v)
                vs = self.size[v]
                self.free[level] += vs
                vo = self.last[v]
                if not self._place(v, vs, level + 1, vo, moves, pinned):
                    self._place(v, vs, self.back, vo, moves, pinned)
                if self.free[level] >= 0:
                    break
            if self.free[level] < 0:
                lvl.remove(key)
                self.free[level] += size
                return False
        self.where[key] = level
        moves.append(Move(key, level))
        return True

    def place(self, obs: Observation, tiers: Iterable[tuple[str, int, int]]) -> str | None:
        tiers = list(tiers)
        if len(tiers) > 1 and self.levels:
            name, _cap, free = tiers[0]
            if free >= obs.nbytes and (obs.op == "write" or self.levels[0].should_admit(obs, int(free))):
                return name
        return tiers[-1][0] if tiers else None

    def _victims(self, level: int, nbytes: int, key: Key, pinned: Key) -> list[Key]:
        """Objects of ``level`` to demote, in order, to free ``nbytes`` for ``key`` (never it or ``pinned``)."""
        return self.levels[level].victims(nbytes, lambda x: x != key and x != pinned)

    def decide(self, batch: Sequence[Observation]) -> list[Move]:
        moves: list[Move] = []
        for obs in batch:
            self._access(obs, self._follow(obs), moves)
        return moves

    def locate(self, key: Key, tier: int, nbytes: int) -> None:
        own = self.where.pop(key, self.back)
        if own < self.back:
            self.levels[own].remove(key)
            self.free[own] += self.size.get(key, nbytes)
        self.size[key] = nbytes
        obs = self.last.setdefault(key, Observation(key, nbytes, tier_index=tier))
        if 0 <= tier < self.back:
            self.levels[tier].admit(obs)
            self.free[tier] -= nbytes
            self.where[key] = tier

    def _follow(self, obs: Observation) -> int:
        """Record ``obs``; the level its object is on, the caller's truth (it wins where we differ)."""
        k = obs.key
        t = obs.tier_index
        back = self.back
        own = self.where.get(k, back)
        self.size[k] = size = obs.nbytes
        self.last[k] = obs
        if own != t:  # the caller placed or moved it: follow the truth
            if own < back:
                self.levels[own].remove(k)
                self.free[own] += size
            if 0 <= t < back:
                self.levels[t].admit(obs)
                self.free[t] -= size
                self.where[k] = t
            else:
                self.where.pop(k, None)
            own = t if 0 <= t < back else back
        return own

    def _access(self, obs: Observation, own: int, moves: list[Move]) -> None:
        """Promote the accessed object to tier 0 unless the ranking declines it (bypass)."""
        k, size = obs.key, obs.nbytes
        if own == 0:
            self.levels[0].touch(obs)
            return
        if size > self.cap[0] or not self.levels[0].should_admit(obs, int(self.free[0])):
            if own < self.back:
                self.levels[own].touch(obs)
            return
        self._promote(k, size, obs, own, moves)

    def _promote(self, k: Key, size: int, obs: Observation, own: int, moves: list[Move]) -> bool:
        """Move ``k`` from level ``own`` to tier 0, demoting victims first; False if no room."""
        placed = self._place(k, size, 0, obs, moves, k)
        if placed and own < self.back:
            self.levels[own].remove(k)  # its move to tier 0 is the last one: room until then
            self.free[own] += size
        return placed

    def forget(self, key: Key) -> None:
        level = self.where.pop(key, None)
        if level is not None and level < self.back:
            self.levels[level].remove(key)
            self.free[level] += self.size.get(key, 0)
        self.size.pop(key, None)
        self.last.pop(key, None)
