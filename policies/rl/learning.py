"""What the agents learn and answer: feature rows, the learned values (one batched network call
per agent, a recency prior until an agent is warm), hindsight labels for the sampled states,
and the training steps."""

from __future__ import annotations

import time

import numpy as np

from .predictor import HORIZONS

PLACEMENT, MIGRATION = 0, 1
_H = np.asarray(HORIZONS)
#: the decision-cost clock: this thread's CPU time, so the cost split measures the agents'
#: own work even on a machine shared with other jobs (wall time also counts waiting for a core)
_cpu = time.thread_time
K = len(HORIZONS)


class Learning:
    """Mixin of :class:`~.agents.HarmoniaAgents`: its two predictors ``agents``, the ``pending``
    states awaiting labels, and the per-decision ``feat_s``/``net_s`` cost clocks."""

    # -- values ---------------------------------------------------------------------
    def _features(self, ids: np.ndarray) -> np.ndarray:
        fill = self.used[0] / self.cap[0] if self.cap[0] else 1.0
        resident = (self.loc[ids] == 0).astype(np.float32)
        return self.table.features(ids, self.clock, self.unit, fill, resident)

    def _timed_features(self, ids: np.ndarray) -> np.ndarray:
        t0 = _cpu()
        f = self._features(ids)
        self.feat_s += _cpu() - t0
        return f

    def _route(self, ids: np.ndarray) -> np.ndarray:
        return np.where(self.table.count[ids] <= 1, PLACEMENT, MIGRATION).astype(np.int8)

    def _values(self, ids: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearness of the next access, rank score) per id: one batched call per agent."""
        q = np.empty(len(ids))
        rank = np.empty(len(ids))
        route = self._route(ids)
        for a in (PLACEMENT, MIGRATION):
            sel = route == a
            if not sel.any():
                continue
            if self.ready[a]:
                t0 = _cpu()
                q[sel], rank[sel] = self.agents[a].value_and_rank(feats[sel])
                self.net_s += _cpu() - t0
            else:  # cold agent: recency prior (LRU order) until it has trained a little
                age = (self.clock - self.table.last[ids[sel]]) / self.unit
                q[sel] = (age[:, None] < _H[None, :]).mean(axis=1) * (1.0 - 1e-3 * age / (1.0 + age))
                rank[sel] = -np.log1p(age)
        return q, rank

    def _labels(self, uids: np.ndarray, clocks: np.ndarray) -> None:
        """Label the pending states of the accessed objects, and (every few batches) the
        horizons that expired; hand the rows to the agents in one add each."""
        parts = [self.pending.resolve(uids, clocks, self.unit)]
        self.since_expire += 1
        if self.since_expire >= 4:
            self.since_expire = 0
            parts.append(self.pending.expire(self.clock, self.unit))
        parts = [x for x in parts if x is not None]
        if not parts:
            return
        if len(parts) == 1:
            slots, y, m = parts[0]
        else:
            slots, y, m = (np.concatenate(z) for z in zip(*parts))
        self._emit(slots, y, m)

    # -- learning -------------------------------------------------------------------
    def _sample_prob(self) -> float:
        """Sampled fraction of accesses, so the pending states fit in ``pending`` slots."""
        per_horizon = HORIZONS[-1] * self.unit / max(self.mean_size, 1.0) * (1.0 + 0.5)
        return min(1.0, 0.5 * self.opt.pending / max(per_horizon, 1.0))

    def _sample(self, ids: np.ndarray, feats: np.ndarray) -> None:
        p = self._sample_prob()
        keep = self.rng.random(len(ids)) < p if p < 1.0 else np.ones(len(ids), bool)
        if keep.any():
            self._add_pending(ids[keep], feats[keep])

    def _add_pending(self, ids: np.ndarray, feats: np.ndarray) -> None:
        self.pending.add(ids, feats, self._route(ids), self.clock)

    def _emit(self, slots: np.ndarray, y: np.ndarray, m: np.ndarray) -> None:
        agent = self.pending.agent[slots]
        for a in (PLACEMENT, MIGRATION):
            sel = agent == a
            if sel.any():
                self.agents[a].add(self.pending.s[slots[sel]], y[sel], m[sel])
        self.stats["labels"] += len(slots)

    def _train(self, n: int) -> None:
        """Train each agent every ``train_every`` accesses (on labels the decisions produced)."""
        t0 = _cpu()
        self.since_train += n
        while self.since_train >= self.opt.train_every:
            self.since_train -= self.opt.train_every
            for a, ag in enumerate(self.agents):
                if ag.replay.size >= ag.cfg.batch:
                    ag.train_step()
                    self.stats["train_steps"] += 1
                    if ag.steps >= self.opt.warmup_steps:
                        self.ready[a] = True
        self.stats["train_s"] += _cpu() - t0
