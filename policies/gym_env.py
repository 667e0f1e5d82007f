"""The fast-tier admission/eviction problem as a ``gymnasium.Env``, over a trace in numpy arrays.

For training one's own agents (e.g. with stable-baselines3). One step is one
access that missed the fast tier; hits in between are served automatically.
The agent sees the accessed object's features and those of ``candidates``
fast-tier residents sampled at random (least recently used first), the same
features :mod:`policies.rl` learns from, and answers:

* ``0`` -- leave the object on the slow tier (bypass);
* ``j >= 1`` -- promote it, evicting candidate ``j - 1`` first and then, if
  more room is needed, the other candidates in the order shown (an action
  naming an empty candidate slot evicts in that order only).

Reward: minus the latency (microseconds) of every access served since the
previous decision, this miss included, minus ``migration_penalty`` times the
time the promotion's write takes on the fast tier. Latencies come from the
two :class:`~policies.base.TierModel` cost models (``latency + size/bw``,
no queueing). The episode ends at the end of the trace.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .base import KINDS, TierModel
from .rl.features import FEATURE_MAX, N_FEATURES, ObjectTable


def _default_tiers(capacity: float) -> tuple[TierModel, TierModel]:
    # the simulator's defaults (host RAM over NVMe), see policies.sim.default_tiers
    return (TierModel("host", capacity, 1e-6, 10e9, 10e9), TierModel("nvme", math.inf, 80e-6, 3e9, 2e9))


class TieredCacheEnv(gym.Env):
    """Admission + victim choice for a fast tier over a slow one, one step per fast-tier miss."""

    metadata = {"render_modes": []}

    def __init__(self, key, size, op=None, kind=None, *, fast_fraction: float = 0.08,
                 fast_capacity: float | None = None, tiers: tuple[TierModel, TierModel] | None = None,
                 candidates: int = 8, migration_penalty: float = 1.0) -> None:
        key = np.asarray(key)
        size = np.asarray(size)
        n = key.shape[0]
        if key.ndim != 1 or n == 0:
            raise ValueError(f"key: expected a non-empty 1-D array, got shape {key.shape}")
        if size.shape != key.shape:
            raise ValueError(f"size: expected shape {key.shape} like key, got {size.shape}")
        if size.min() < 1:
            raise ValueError(f"size: expected sizes >= 1 byte, got {int(size.min())}")
        op = np.zeros(n, np.uint8) if op is None else np.asarray(op, np.uint8)
        kind = np.full(n, KINDS.index("blob"), np.uint8) if kind is None else np.asarray(kind, np.uint8)
        for name, a, hi in (("op", op, 2), ("kind", kind, len(KINDS))):
            if a.shape != key.shape or (a.size and a.max() >= hi):
                raise ValueError(f"{name}: expected shape {key.shape} with values < {hi}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        uniq, dense = np.unique(key, return_inverse=True)
        self._key = dense.reshape(-1).astype(np.int64)
        obj = np.zeros(len(uniq), np.int64)
        np.maximum.at(obj, self._key, size.astype(np.int64))
        self._obj_size = obj
        self._op, self._kind = op, kind
        if tiers is None:
            cap = fast_capacity if fast_capacity is not None else max(1.0, fast_fraction * float(obj.sum()))
            tiers = _default_tiers(cap)
        if len(tiers) != 2 or not (0 < tiers[0].capacity < math.inf):
            raise ValueError("tiers: expected (fast tier with finite capacity > 0, slow tier)")
        self.tiers = tuple(tiers)
        self.capacity = float(tiers[0].capacity)
        self.candidates = int(candidates)
        self.migration_penalty = float(migration_penalty)
        self.observation_space = spaces.Box(0.0, FEATURE_MAX, shape=((1 + candidates) * N_FEATURES,), dtype=np.float32)
        self.action_space = spaces.Discrete(candidates + 1)

    # -- costs in microseconds ----------------------------------------------------------
    def _lat(self, t: int, nbytes: float, write: bool) -> float:
        m = self.tiers[t]
        return 1e6 * (m.latency_s + nbytes / (m.write_bw if write else m.read_bw))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._table = ObjectTable()
        self._fast: dict[int, None] = {}  # resident ids (table ids), insertion order
        self._used = 0.0
        self._clock = 0.0
        self._i = 0
        self._pending_lat = 0.0
        self._cand = np.zeros(0, np.int64)
        self._done = not self._advance()
        return self._obs(), {"index": self._i}

    def _features(self, ids: np.ndarray, resident: float) -> np.ndarray:
        return self._table.features(ids, self._clock, self.capacity, self._used / self.capacity,
                                    np.full(len(ids), resident, np.float32))

    def _advance(self) -> bool:
        """Serve accesses up to the next fast-tier miss; False at the end of the trace."""
        while self._i < len(self._key):
            i = self._i
            k = int(self._key[i])
            nb = float(self._obj_size[k])
            w = bool(self._op[i])
            tid, _ = self._table.record(k, nb, KINDS[self._kind[i]], w, self._clock, self.capacity)
            self._clock += nb
            if tid in self._fast:
                self._fast[tid] = self._fast.pop(tid)  # most recent last
                self._pending_lat += self._lat(0, nb, w)
                self._i += 1
                continue
            self._pending_lat += self._lat(1, nb, w)
            self._cur = tid
            res = np.fromiter(self._fast, np.int64, len(self._fast))
            if len(res) > self.candidates:
                res = np.sort(self.np_random.choice(res, self.candidates, replace=False))
            # oldest access first: sort candidates by last access time
            self._cand = res[np.argsort(self._table.last[res], kind="stable")] if len(res) else res
            return True
        return False

    def _obs(self) -> np.ndarray:
        out = np.zeros(((1 + self.candidates), N_FEATURES), np.float32)
        if not self._done:
            out[0] = self._features(np.asarray([self._cur]), 0.0)[0]
            if len(self._cand):
                out[1:1 + len(self._cand)] = self._features(self._cand, 1.0)
        return out.reshape(-1)

    def step(self, action):
        if self._done:
            raise RuntimeError("step() after the episode ended; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        a = int(action)
        penalty = 0.0
        nb = float(self._table.nbytes[self._cur])
        if a > 0 and nb <= self.capacity:
            order = list(self._cand)
            if a - 1 < len(order):
                order.insert(0, order.pop(a - 1))
            order += [k for k in self._fast if k not in set(order)]  # then LRU order
            for v in order:
                if self._used + nb <= self.capacity:
                    break
                del self._fast[int(v)]
                self._used -= self._table.nbytes[v]
            self._fast[self._cur] = None
            self._used += nb
            penalty = self.migration_penalty * self._lat(0, nb, True)
        reward = -(self._pending_lat + penalty)
        self._pending_lat = 0.0
        self._i += 1
        self._done = not self._advance()
        if self._done:  # hits after the last miss still count
            reward -= self._pending_lat
            self._pending_lat = 0.0
        return self._obs(), float(reward), self._done, False, {"index": self._i, "fill": self._used / self.capacity}
