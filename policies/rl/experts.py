"""The eviction and admission experts, weighted by regret (LeCaR-style, Vietri et al.
HotStorage'18; CACHEUS, Rodriguez et al. FAST'21): which expert ranks the victims, each
expert's eviction order, and the weights an expert loses when an object it evicted (or
bypassed, or admitted in vain) shows it wrong."""

from __future__ import annotations

import math

import numpy as np

LEARNED, LRU, LFU, LRU2 = 0, 1, 2, 3  # eviction experts
N_EXPERTS = 4


class Experts:
    """Mixin of :class:`~.agents.HarmoniaAgents`: expert weights ``w`` (eviction) and ``aw``
    (admission: admit all, learned bypass), and the histories ``hist``, ``bhist``, ``ahist``
    their regret is charged from (set by ``reset``)."""

    def _expert_key(self, e: int, pool: np.ndarray, psize: np.ndarray, val: np.ndarray, rank) -> np.ndarray:
        """Expert ``e``'s eviction key over ``pool``: lowest first out."""
        if e == LEARNED:  # farthest predicted next access (lowest value) per byte first
            return rank - np.log(psize) if self.opt.rank_logit else val / psize
        if e == LRU:  # least recently used first
            return self.table.last[pool]
        if e == LFU:  # fewest accesses per byte, decayed (4 capacities half-life)
            return self.table.decayed_freq(pool, self.clock, self.unit, 3) / psize
        # LRU-2 (O'Neil et al.): oldest second-to-last access first, one-timers before all
        return np.where(self.table.ngaps[pool] > 0, self.table.last[pool] - self.table.gaps[pool, 0], -1.0)

    # -- experts (LeCaR-style regret weighting) ---------------------------------------
    def _pick_expert(self) -> int:
        if not self.opt.experts:
            return LEARNED
        w = self.w.tolist()  # (rng.choice with p= costs ~10x this for four experts)
        r = self.rng.random() * sum(w)
        for e, x in enumerate(w):
            r -= x
            if r < 0.0:
                return e
        return len(w) - 1

    def _remember(self, h: dict, i: int) -> None:
        h.pop(i, None)
        h[i] = self.clock
        limit = max(64, self.nres[0])
        while len(h) > limit:
            del h[next(iter(h))]

    def _admission_regret(self, expert: int, since: float) -> None:
        r = 0.005 ** ((self.clock - since) / self.unit)
        self.aw[expert] *= math.exp(-self.opt.regret_rate * r)
        self.aw /= self.aw.sum()
        np.maximum(self.aw, 0.01, out=self.aw)

    def _regret(self, i: int) -> None:
        """An object evicted by an expert came back: that expert pays, the sooner the more."""
        e, c = self.hist.pop(i)
        r = 0.005 ** ((self.clock - c) / self.unit)
        if isinstance(e, np.ndarray):
            self.w *= np.exp(-self.opt.regret_rate * r * e)
        else:
            self.w[e] *= math.exp(-self.opt.regret_rate * r)
        self.w /= self.w.sum()
        np.maximum(self.w, 0.01, out=self.w)

    def _bypass(self, i: int) -> bool:
        """The candidate does not beat its victims by the learned values (Belady's bypass rule):
        whether "learned bypass" (True) or "admit all" makes this decision."""
        if self.opt.admission_experts:  # follow one by their own regret weights (LeCaR-style)
            if self.rng.random() < self.aw[1] / self.aw.sum():
                self._remember(self.bhist, i)
                self.stats["bypasses"] += 1
                return True
            self._remember(self.ahist, i)
            return False
        e = self.vq_expert
        if e == LEARNED or (e < 0 and self.rng.random() < self.w[LEARNED]):
            self.stats["bypasses"] += 1  # the learned expert bypasses; heuristics admit all
            return True
        return False
