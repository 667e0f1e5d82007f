"""The victim queue: fast-tier residents sampled at random (LRB-style sampled eviction), ranked
once by one expert, and consumed as victims over several decisions."""

from __future__ import annotations

import numpy as np

from ..base import Move
from .experts import LEARNED, N_EXPERTS


class VictimQueue:
    """Mixin of :class:`~.agents.HarmoniaAgents`: the queue ``vq_*`` (ranked by :meth:`_refresh`,
    consumed by :meth:`_victims_for` and :meth:`_take`) and the evictions it leads to."""

    # -- the victim queue: residents ranked once, consumed over several decisions ----------
    def _victims_for(self, need: float, inbatch: set) -> tuple[list[tuple], float] | None:
        """The next victims freeing ``need`` bytes (none when ``need`` <= 0) as (id, value,
        size, expert or blame, features or None), and their summed value; None when the fast
        tier cannot make room. Skips queue entries no longer valid (gone from the fast tier,
        accessed since ranked, or in this batch); ranks a fresh sample when the queue runs out
        (at most ``max_refreshes`` times a decision)."""
        got: list[tuple] = []
        lost = 0.0
        taken = set()
        loc, last = self.loc, self.table.last
        if need > 0 and self.clock - self.vq_clock > self.opt.queue_age * self.unit and self._refreshes == 0:
            self._refresh(inbatch)  # the ranking's values age: a queue ranked long ago is redone
        while need > 0:
            ids, k, since = self.vq_ids, self.vq_pos, self.vq_clock
            while k < self.vq_end and not (loc[ids[k]] == 0 and last[ids[k]] <= since):
                k += 1
            self.vq_pos = k  # leading entries already gone: skipped for good
            while need > 0 and k < self.vq_end:
                v = ids[k]
                if loc[v] == 0 and last[v] <= since and v not in inbatch and v not in taken:
                    taken.add(v)
                    got.append((v, float(self.vq_val[k]), self.vq_size[k],
                                self.vq_expert if self.vq_blame is None else self.vq_blame[:, k],
                                None if self.vq_feats is None else self.vq_feats[k]))
                    lost += float(self.vq_val[k])
                    need -= self.vq_size[k]
                k += 1
            if need > 0 and (self._refreshes >= self.opt.max_refreshes or not self._refresh(inbatch | taken)):
                return None
        return got, lost

    def _take(self, victims: list[tuple], moves: list[Move]) -> float:
        """Evict ``victims`` (from :meth:`_victims_for`); the bytes freed."""
        freed = 0.0
        for v, _val, size, expert, feats in victims:
            moves.append(self._evict(v, expert))
            freed += size
            if feats is not None:
                self._taken.append((v, feats))
        return freed

    def _refresh(self, inbatch: set) -> bool:
        """Rank a fresh sample of ``candidates`` fast-tier residents by one expert's order (the
        learned one: one feature pass and one network call per agent); its first
        ``1 / victim_share`` become the victim queue, consumed over the next decisions."""
        self._refreshes += 1
        self.stats["refreshes"] += 1
        pool = self._sample_fast(self.opt.candidates)
        if inbatch and len(pool):
            pool = np.asarray([v for v in pool.tolist() if v not in inbatch], np.int64)
        if len(pool) == 0:
            return False
        e = self._pick_expert() if self.opt.experts and not self.opt.blend else (-1 if self.opt.experts else LEARNED)
        size = self.table.nbytes[pool]
        valued, val, rank, pf = self._pool_values(pool, size, e)
        order, blame = self._rank(e, pool, size, val, rank)
        self.vq_ids = pool[order].tolist()
        self.vq_val = val[order]
        self.vq_valued = valued
        self.vq_size = size[order].tolist()
        self.vq_feats = None
        if self.training:
            self.vq_feats = pf[order] if pf is not None else self._timed_features(pool[order])
            if self.opt.idle_samples:
                self._learn_idle(pool, order, pf)
        self.vq_blame = blame
        self.vq_expert = e
        self.vq_pos, self.vq_end = 0, len(self.vq_ids)
        self.vq_clock = self.clock
        return True

    def _pool_values(self, pool: np.ndarray, size: np.ndarray, e: int) -> tuple:
        """(valued, latency saved per resident, rank score, feature rows) of the sampled ``pool``
        for expert ``e`` (-1: the blend); without learned values: zeros, and None for the rest."""
        # the learned values are needed to rank (learned expert), to bypass (its decisions, or
        # admission experts), and to keep the write reserve (victims worth less than a write)
        valued = e <= LEARNED or self.opt.admission_experts or self.opt.writeback_cost or self._reserve() > 0
        if not valued:
            return False, np.zeros(len(pool)), None, None
        pf = self._timed_features(pool)
        q, rank = self._values(pool, pf)
        val = q * self._benefit(size)  # seconds of latency saved, expected
        if self.opt.writeback_cost:
            val += np.where(self.dirty[pool], self._writeback_cost(size), 0.0)
        return True, val, rank, pf

    def _rank(self, e: int, pool: np.ndarray, size: np.ndarray, val: np.ndarray, rank) -> tuple:
        """(positions in ``pool`` of the victims, evict first; their blame per expert, or None):
        expert ``e``'s order, or (``e`` < 0) the experts' rankings blended by their weights."""
        psize = np.maximum(size, 1.0)
        if e >= 0:
            order = np.argsort(self._expert_key(e, pool, psize, val, rank), kind="stable")
            return order[: max(1, len(order) // self.opt.victim_share)], None
        m = max(len(pool) - 1, 1)  # each expert's ranking, 0 = evict first
        r = np.stack([np.argsort(np.argsort(self._expert_key(x, pool, psize, val, rank), kind="stable"),
                                 kind="stable") / m for x in range(N_EXPERTS)])
        order = np.argsort(self.w @ r, kind="stable")
        order = order[: max(1, len(order) // self.opt.victim_share)]
        return order, (1.0 - r)[:, order]  # per expert and victim: how much it wanted the object out

    def _learn_idle(self, pool: np.ndarray, order: np.ndarray, pf: np.ndarray | None) -> None:
        """Sample a few of the ranked residents not queued as victims: idle residents' states are
        what eviction compares, so learn about them too (the victims taken are always sampled,
        in _take)."""
        chosen = np.zeros(len(pool), bool)
        chosen[order] = True
        rest = np.flatnonzero(~chosen)
        pick = rest[self.rng.random(len(rest)) < self.opt.idle_samples / max(len(rest), 1)]
        pick = pick[self.rng.random(len(pick)) < self._sample_prob()]
        if len(pick):
            self._add_pending(pool[pick], pf[pick] if pf is not None else self._timed_features(pool[pick]))

    def _evict(self, vid: int, expert) -> Move:
        """Demote ``vid``; remember who wanted it out (an expert index, or a blame per expert)."""
        if vid in self.ahist:  # admitted against the learned bypass, left unused: "admit all" pays
            self._admission_regret(0, self.ahist.pop(vid))
        if self.dirty[vid]:
            self.busy[self.back] += self.table.nbytes[vid] / self.tiers[self.back].write_bw
        self._move(vid, self.back)
        if self.opt.experts:
            h = self.hist
            h.pop(vid, None)
            h[vid] = (expert, self.clock)
            limit = max(64, self.nres[0])
            while len(h) > limit:
                del h[next(iter(h))]
        return Move(self.table.keys[vid], self.back)

    def _flush_taken(self) -> None:
        """The victims' states are the decision boundary: always learned from (one add)."""
        if self._taken and self.training:
            ids = np.fromiter((v for v, _ in self._taken), np.int64, len(self._taken))
            self._add_pending(ids, np.stack([f for _, f in self._taken]))
        self._taken = []

    def _sample_fast(self, n: int) -> np.ndarray:
        """Up to ``n`` distinct fast-tier residents at random, drawn from a snapshot of the
        tier's ids (rebuilt every 8 draws, or when a third of a draw has left the tier), so
        drawing costs O(n), not a pass over every object."""
        for attempt in (0, 1):
            ids = self._fast_ids
            if attempt or self._fast_age >= 8 or len(ids) == 0:
                ids = self._fast_ids = np.flatnonzero(self.loc[: len(self.table)] == 0)
                self._fast_age = 0
            if len(ids) == 0:
                return ids
            self._fast_age += 1
            pick = ids if len(ids) <= n else np.unique(ids[self.rng.integers(0, len(ids), size=n)])
            pick = pick[self.loc[pick] == 0]
            if attempt or 3 * len(pick) >= 2 * min(n, len(ids)):
                return pick
        return pick
