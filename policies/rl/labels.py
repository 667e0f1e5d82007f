"""Sampled states awaiting their hindsight labels (see :mod:`.predictor`), vectorised.

A ring of ``capacity`` states; each remembers its object, the byte clock it was taken
at, which agent learns from it and how many horizons have already expired (labelled 0).
Per object, its pending states form a chain through ``prev`` (absolute positions,
strictly decreasing), so resolving the states of a batch's objects is a few numpy passes
over the chains rather than a Python list per object.

Positions are absolute (ever-increasing); slot = position % capacity. A position below
``tail[-1]`` has had every horizon expire and its slot may be reused, which is why a
chain walk stops there and checks the slot still holds its object.
"""

from __future__ import annotations

import numpy as np

from .predictor import HORIZONS

_H = np.asarray(HORIZONS)
K = len(HORIZONS)


class PendingLabels:
    def __init__(self, capacity: int, n_features: int) -> None:
        P = self.capacity = int(capacity)
        self.s = np.zeros((P, n_features), np.float32)
        self.clock = np.zeros(P)
        self.id = np.full(P, -1, np.int64)
        self.agent = np.zeros(P, np.int8)
        self.stage = np.zeros(P, np.int8)  # horizons already labelled 0 (expired without access)
        self.prev = np.full(P, -1, np.int64)  # the object's previous pending position
        self.n = 0  # states ever added (absolute position of the next one)
        self.tail = [0] * K  # per horizon: first absolute position not yet expired
        self.head = np.full(1024, -1, np.int64)  # per object: its latest pending position

    def _ensure(self, n: int) -> None:
        if n > len(self.head):
            head = np.full(max(n, 2 * len(self.head)), -1, np.int64)
            head[: len(self.head)] = self.head
            self.head = head

    def add(self, ids: np.ndarray, feats: np.ndarray, agents: np.ndarray, clock: float) -> int:
        """States of distinct objects ``ids`` taken at ``clock``; returns how many fit (a full
        ring drops new states rather than mislabel old ones)."""
        P = self.capacity
        n = min(len(ids), P - (self.n - self.tail[-1]))
        if n <= 0:
            return 0
        ids = ids[:n]
        self._ensure(int(ids.max()) + 1)
        pos = self.n + np.arange(n)
        slots = pos % P
        self.s[slots] = feats[:n]
        self.clock[slots] = clock
        self.id[slots] = ids
        self.agent[slots] = agents[:n]
        self.stage[slots] = 0
        self.prev[slots] = self.head[ids]
        self.head[ids] = pos
        self.n += n
        return n

    def resolve(self, ids: np.ndarray, clocks: np.ndarray, unit: float):
        """Distinct objects ``ids`` were accessed at ``clocks``: label every horizon of their
        pending states not yet labelled. Returns (slots, y, mask) or None."""
        if len(ids) == 0 or self.n == 0:
            return None
        self._ensure(int(ids.max()) + 1)
        pos = self.head[ids]
        self.head[ids] = -1
        floor = self.tail[-1]
        got_s, got_c = [], []
        live = pos >= floor
        while live.any():
            pos, ids, clocks = pos[live], ids[live], clocks[live]
            slots = pos % self.capacity
            mine = self.id[slots] == ids
            got_s.append(slots[mine])
            got_c.append(clocks[mine])
            pos = self.prev[slots]
            live = (pos >= floor) & mine
        if not got_s:
            return None
        slots = np.concatenate(got_s)
        if len(slots) == 0:
            return None
        d = (np.concatenate(got_c) - self.clock[slots]) / unit
        y = (d[:, None] < _H[None, :]).astype(np.float32)
        m = (np.arange(K)[None, :] >= self.stage[slots][:, None]).astype(np.float32)
        self.id[slots] = -1
        return slots, y, m

    def drop(self, i: int) -> None:
        """Object ``i`` is gone: its pending states are never labelled (its id may be reused)."""
        if i >= len(self.head) or self.head[i] < 0:
            return
        pos = int(self.head[i])
        self.head[i] = -1
        while pos >= self.tail[-1]:
            slot = pos % self.capacity
            if self.id[slot] != i:
                break
            self.id[slot] = -1
            pos = int(self.prev[slot])

    def _first_after(self, lo: int, hi: int, limit: float) -> int:
        """First absolute position in [lo, hi) whose clock is > ``limit`` (clocks ascend)."""
        if lo >= hi:
            return lo
        P = self.capacity
        a, b = lo % P, hi % P
        if a < b or b == 0:  # one contiguous stretch of slots
            end = b if b else P
            return lo + int(np.searchsorted(self.clock[a:end], limit, side="right"))
        k = int(np.searchsorted(self.clock[a:], limit, side="right"))
        if k < P - a:
            return lo + k
        return lo + (P - a) + int(np.searchsorted(self.clock[:b], limit, side="right"))

    def expire(self, clock: float, unit: float):
        """Horizons that passed with no access: label 0 for that horizon (one row each).
        Returns (slots, y, mask) or None."""
        P = self.capacity
        out_s, out_k = [], []
        for k in range(K):
            lo = self.tail[k]
            hi = self._first_after(lo, self.n, clock - HORIZONS[k] * unit)
            if hi == lo:
                continue
            self.tail[k] = hi
            slots = np.arange(lo, hi) % P
            alive = slots[self.id[slots] >= 0]
            if len(alive) == 0:
                continue
            self.stage[alive] = k + 1
            out_s.append(alive)
            out_k.append(np.full(len(alive), k))
            if k == K - 1:
                self.id[alive] = -1  # every horizon labelled: the state is done
        if not out_s:
            return None
        slots = np.concatenate(out_s)
        ks = np.concatenate(out_k)
        y = np.zeros((len(slots), K), np.float32)
        m = np.zeros((len(slots), K), np.float32)
        m[np.arange(len(slots)), ks] = 1.0
        return slots, y, m
