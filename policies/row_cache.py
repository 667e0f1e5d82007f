"""Row-cache policies for GNN feature rows: LRU, S3-FIFO and a hybrid static+dynamic score.

Why vectorized: a minibatch touches ~10^5 rows of a 10^7-row table, so a
per-key Python call per access (the ``EvictionPolicy`` interface) costs more
than the disk. These policies take numpy arrays of row ids, one call per
minibatch, and decide with array operations.

A policy owns the *slots* of a cache (``num_slots`` rows) and the mapping
row -> slot; the caller owns the bytes. Call order per minibatch:
``lookup(rows)`` (records the access, returns slots, -1 for misses), then
``admit(misses)`` which answers the slot for each admitted row and the rows
whose slots it reuses (the caller copies those out first, e.g. into a
:class:`VictimBuffer`). Pure logic: no I/O, so :func:`simulate` replays the
same policies over id streams without data.
"""

from __future__ import annotations

import abc
from typing import Callable, Iterable

import numpy as np

_EMPTY = np.empty(0, dtype=np.int64)


def _rows(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1)


class RowCachePolicy(abc.ABC):
    """Slot bookkeeping shared by every policy; subclasses decide hits' credit and victims."""

    name = ""

    def __init__(self, num_rows: int, num_slots: int) -> None:
        if num_rows < 0 or num_slots < 0:
            raise ValueError(f"num_rows ({num_rows}) and num_slots ({num_slots}) must be >= 0")
        self.num_rows = int(num_rows)
        self.num_slots = int(num_slots)
        # one entry per row of the table (10^7+): the narrowest type that holds a slot number
        self.slot_of = np.full(self.num_rows, -1, dtype=np.int32 if self.num_slots < 2**31 else np.int64)
        self.row_of = np.full(self.num_slots, -1, dtype=np.int64)
        self._free = np.arange(self.num_slots - 1, -1, -1, dtype=np.int64)  # a stack: pop from the end
        self._nfree = self.num_slots
        self.clock = 0  # minibatches seen

    # -- caller API ----------------------------------------------------------------
    def lookup(self, rows) -> np.ndarray:
        """Slots of ``rows`` (unique ids), -1 for misses; records one access of each row."""
        rows = _rows(rows)
        self.clock += 1
        slots = self.slot_of[rows]
        hit = slots >= 0
        self._on_access(rows, slots, hit)
        return slots

    def peek(self, rows) -> np.ndarray:
        """Slots of ``rows`` without recording an access (prefetch planning)."""
        return self.slot_of[_rows(rows)]

    def admit(self, rows, *, force: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Give slots to ``rows`` (unique, not cached).

        Returns ``(slots, evicted_rows, evicted_slots)``: ``slots[i]`` is row i's
        slot or -1 when the policy declined it; the evicted rows' slots are
        reused by admitted rows, so their bytes must be copied out first.
        ``force`` admits regardless of the policy's admission test (prefetched
        rows the next minibatch needs), still bounded by ``num_slots``.
        """
        rows = _rows(rows)
        slots = np.full(len(rows), -1, dtype=np.int64)
        if not len(rows) or not self.num_slots:
            return slots, _EMPTY, _EMPTY
        if np.any(self.slot_of[rows] >= 0):
            raise ValueError("admit(): some rows are already cached")
        take = self._admission(rows, force)  # indices into rows, best first
        take = take[: self.num_slots]
        need = len(take) - self._nfree
        ev_slots = self._victims(need) if need > 0 else _EMPTY
        if len(ev_slots) < max(need, 0):  # the policy could not free enough: admit fewer
            take = take[: self._nfree + len(ev_slots)]
        ev_rows = self.row_of[ev_slots]
        self.slot_of[ev_rows] = -1
        self.row_of[ev_slots] = -1
        self._on_evict(ev_rows, ev_slots)
        self._free[self._nfree : self._nfree + len(ev_slots)] = ev_slots
        self._nfree += len(ev_slots)
        n = len(take)
        got = self._free[self._nfree - n : self._nfree][::-1].copy()
        self._nfree -= n
        new_rows = rows[take]
        self.slot_of[new_rows] = got
        self.row_of[got] = new_rows
        slots[take] = got
        self._on_insert(new_rows, got)
        return slots, ev_rows, ev_slots

    def invalidate(self, rows) -> np.ndarray:
        """Drop ``rows`` from the cache (their data changed); returns the freed slots."""
        rows = _rows(rows)
        slots = self.slot_of[rows]
        slots = slots[slots >= 0]
        if len(slots):
            gone = self.row_of[slots]
            self.slot_of[gone] = -1
            self.row_of[slots] = -1
            self._on_evict(gone, slots)
            self._free[self._nfree : self._nfree + len(slots)] = slots
            self._nfree += len(slots)
        return slots

    @property
    def occupied(self) -> int:
        return self.num_slots - self._nfree

    # -- subclass hooks ------------------------------------------------------------
    def _on_access(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        """Credit hits (and, for frequency policies, misses too)."""

    def _admission(self, rows: np.ndarray, force: bool) -> np.ndarray:
        """Indices of ``rows`` to admit, most wanted first (default: all, in order)."""
        return np.arange(len(rows))

    @abc.abstractmethod
    def _victims(self, k: int) -> np.ndarray:
        """Up to ``k`` occupied slots to free."""

    def _on_evict(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Rows left their slots (evicted or invalidated)."""

    def _on_insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Rows entered slots."""


class RowLRU(RowCachePolicy):
    """Least recently used, at minibatch granularity (ties between rows of one minibatch)."""

    name = "lru"

    def __init__(self, num_rows: int, num_slots: int, **_ignored) -> None:
        super().__init__(num_rows, num_slots)
        self._stamp = np.zeros(self.num_slots, dtype=np.int64)

    def _on_access(self, rows, slots, hit) -> None:
        self._stamp[slots[hit]] = self.clock

    def _on_insert(self, rows, slots) -> None:
        self._stamp[slots] = self.clock

    def _victims(self, k: int) -> np.ndarray:
        occ = np.flatnonzero(self.row_of >= 0)
        if k >= len(occ):
            return occ
        stamps = self._stamp[occ]
        return occ[np.argpartition(stamps, k - 1)[:k]]


class _Ring:
    """A FIFO of int64 with vectorized push/pop (a circular numpy buffer)."""

    def __init__(self, capacity: int) -> None:
        self._buf = np.empty(max(1, capacity), dtype=np.int64)
        self._head = 0
        self.size = 0

    def push(self, items: np.ndarray) -> None:
        n = len(items)
        if self.size + n > len(self._buf):
            raise OverflowError(f"ring of {len(self._buf)} overflows by {self.size + n - len(self._buf)}")
        pos = (self._head + self.size + np.arange(n)) % len(self._buf)
        self._buf[pos] = items
        self.size += n

    def pop(self, n: int) -> np.ndarray:
        n = min(n, self.size)
        pos = (self._head + np.arange(n)) % len(self._buf)
        out = self._buf[pos].copy()
        self._head = (self._head + n) % len(self._buf)
        self.size -= n
        return out

    def items(self) -> np.ndarray:
        return self._buf[(self._head + np.arange(self.size)) % len(self._buf)]

    def replace(self, items: np.ndarray) -> None:
        self._head, self.size = 0, 0
        self.push(items)


class RowS3FIFO(RowCachePolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO (10 % of slots), a main
    FIFO with 2-bit frequency reinsertion, and a ghost FIFO of rows recently evicted
    from the small queue (a ghost hit enters main directly)."""

    name = "s3fifo"

    def __init__(self, num_rows: int, num_slots: int, *, small_fraction: float = 0.1, **_ignored) -> None:
        super().__init__(num_rows, num_slots)
        self.small_cap = max(1, int(num_slots * small_fraction))
        self._small = _Ring(num_slots)
        self._main = _Ring(num_slots)
        self._freq = np.zeros(self.num_slots, dtype=np.int8)
        self._queue = np.zeros(self.num_slots, dtype=np.int8)  # 0 small, 1 main
        self.ghost_cap = max(1, num_slots - self.small_cap)
        self._ghost_seq = np.full(self.num_rows, -1, dtype=np.int64)  # row -> ghost insertion number
        self._ghost_count = 0
        self._gone = np.zeros(self.num_slots, dtype=bool)  # invalidated while queued: skip when popped

    def _in_ghost(self, rows: np.ndarray) -> np.ndarray:
        s = self._ghost_seq[rows]
        return (s >= 0) & (s >= self._ghost_count - self.ghost_cap)

    def _on_access(self, rows, slots, hit) -> None:
        h = slots[hit]
        self._freq[h] = np.minimum(self._freq[h] + 1, 3)

    def _on_insert(self, rows, slots) -> None:
        ghost = self._in_ghost(rows)
        self._freq[slots] = 0
        self._gone[slots] = False
        self._queue[slots] = ghost
        self._main.push(slots[ghost])
        self._small.push(slots[~ghost])

    def _on_evict(self, rows, slots) -> None:
        self._gone[slots] = True  # victims chosen by _victims are already dequeued

    def _victims(self, k: int) -> np.ndarray:
        out: list[np.ndarray] = []
        freed = 0
        guard = 0
        while freed < k and (self._small.size or self._main.size):
            guard += 1
            if guard > 64:  # every pass lowers frequencies; this bounds pathological loops
                break
            if self._small.size >= self.small_cap or not self._main.size:
                head = self._small.pop(max(k - freed, 1))
                head = head[~self._gone[head]]
                promote = self._freq[head] >= 1
                up = head[promote]
                self._freq[up] = 0
                self._queue[up] = 1
                self._main.push(up)
                down = head[~promote]
                rows = self.row_of[down]
                self._ghost_seq[rows] = self._ghost_count + np.arange(len(rows))
                self._ghost_count += len(rows)
                out.append(down)
                freed += len(down)
            else:
                head = self._main.pop(max(k - freed, 1))
                head = head[~self._gone[head]]
                keep = self._freq[head] > 0
                again = head[keep]
                self._freq[again] -= 1
                self._main.push(again)
                out.append(head[~keep])
                freed += int((~keep).sum())
        return np.concatenate(out) if out else _EMPTY

    def _compact(self) -> None:
        """Drop invalidated slots from the queues (rare: only after invalidate)."""
        for q in (self._small, self._main):
            items = q.items()
            q.replace(items[~self._gone[items]])

    def invalidate(self, rows) -> np.ndarray:
        slots = super().invalidate(rows)
        if len(slots):
            self._compact()
        return slots


class RowHybrid(RowCachePolicy):
    """Hybrid eviction after LSM-GNN / GIDS: keep the rows with the highest estimated
    probability of being read by the next minibatch, from a static prior and counts.

    ``static_score`` is a per-row importance known up front (in-degree, or the
    expected fetches per seed of ``tiered.gnn.scores.sampling_score``). It is
    turned into a per-minibatch probability ``p = share * rows_per_batch``
    (``share = s / sum(s)``, rows per batch measured as lookups go). The
    dynamic part counts accesses, halved every ``decay_every`` minibatches so
    the estimate follows a drifting workload. The two combine as a Bayesian
    rate estimate ``(count + prior * p) / (window + prior)``: ``prior``
    minibatches' worth of belief in the static score, so with few
    observations the score decides, and rows hotter than it predicts climb.
    A miss is admitted only when its estimate beats the lowest cached row's
    (pairwise, best first), so one-off rows of a minibatch do not flush hot
    ones; pair it with a :class:`VictimBuffer` for the recency the score lacks.
    """

    name = "hybrid"

    def __init__(self, num_rows: int, num_slots: int, *, static_score=None, prior: float = 1024.0,
                 decay_every: int = 16, **_ignored) -> None:
        super().__init__(num_rows, num_slots)
        if static_score is None:
            self.share = np.zeros(self.num_rows, dtype=np.float32)
        else:
            s = np.asarray(static_score, dtype=np.float64).reshape(-1)
            if len(s) != self.num_rows:
                raise ValueError(f"static_score has {len(s)} entries, expected one per row ({self.num_rows})")
            if not np.all(np.isfinite(s)) or np.any(s < 0):
                raise ValueError("static_score must be finite and >= 0")
            total = float(s.sum())
            self.share = (s / total).astype(np.float32) if total > 0 else np.zeros(len(s), np.float32)
        if prior < 0:
            raise ValueError(f"prior must be >= 0, got {prior}")
        self.prior = float(prior)
        self.decay_every = int(decay_every)
        self.freq = np.zeros(self.num_rows, dtype=np.float32)
        self.window = 0.0  # minibatches the counts cover (decayed like them)
        self.rows_per_batch = 0.0

    def score(self, rows: np.ndarray) -> np.ndarray:
        p = np.minimum(self.share[rows] * np.float32(max(self.rows_per_batch, 1.0)), np.float32(1.0))
        return (self.freq[rows] + np.float32(self.prior) * p) / np.float32(self.window + self.prior + 1e-9)

    def _on_access(self, rows, slots, hit) -> None:
        if self.decay_every and self.clock % self.decay_every == 0:
            self.freq *= 0.5
            self.window *= 0.5
        self.freq[rows] += 1.0
        self.window += 1.0
        n = self.clock
        self.rows_per_batch += (len(rows) - self.rows_per_batch) / min(n, 64)

    def _admission(self, rows: np.ndarray, force: bool) -> np.ndarray:
        order = np.argsort(-self.score(rows), kind="stable")
        if force:
            return order
        room = self._nfree
        if len(order) <= room:
            return order
        occ = np.flatnonzero(self.row_of >= 0)
        k = min(len(order) - room, len(occ))
        if k <= 0:
            return order[:room]
        cand = self.score(self.row_of[occ])
        low = np.sort(np.partition(cand, k - 1)[:k])  # the k lowest cached scores, ascending
        contenders = self.score(rows[order[room : room + k]])  # descending
        wins = int(np.count_nonzero(contenders > low[: len(contenders)]))
        return order[: room + wins]

    def _victims(self, k: int) -> np.ndarray:
        occ = np.flatnonzero(self.row_of >= 0)
        if k >= len(occ):
            return occ
        return occ[np.argpartition(self.score(self.row_of[occ]), k - 1)[:k]]


class VictimBuffer:
    """A FIFO of recently evicted rows (their bytes held by the caller at ``position``):
    a second chance for rows a policy dropped just before they were needed again."""

    def __init__(self, num_rows: int, capacity: int) -> None:
        self.capacity = int(capacity)
        self.pos_of = (np.full(num_rows, -1, dtype=np.int32 if self.capacity < 2**31 else np.int64)
                       if self.capacity else None)
        self.row_at = np.full(max(self.capacity, 0), -1, dtype=np.int64)
        self._next = 0  # next position to fill (wraps)

    def find(self, rows: np.ndarray) -> np.ndarray:
        """Positions of ``rows`` in the buffer, -1 when absent."""
        if not self.capacity:
            return np.full(len(rows), -1, dtype=np.int64)
        return self.pos_of[rows]

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Place ``rows`` (the newest last) and return their positions; the oldest are overwritten.
        Only the last ``capacity`` rows are kept: the others get -1."""
        rows = _rows(rows)
        out = np.full(len(rows), -1, dtype=np.int64)
        if not self.capacity or not len(rows):
            return out
        keep = rows[-self.capacity :]
        pos = (self._next + np.arange(len(keep))) % self.capacity
        old = self.row_at[pos]
        old = old[old >= 0]
        self.pos_of[old] = -1
        self.pos_of[keep] = pos
        self.row_at[pos] = keep
        self._next = int((self._next + len(keep)) % self.capacity)
        out[len(rows) - len(keep) :] = pos
        return out

    def remove(self, rows: np.ndarray) -> None:
        if not self.capacity:
            return
        pos = self.pos_of[rows]
        pos = pos[pos >= 0]
        self.row_at[pos] = -1
        self.pos_of[rows] = -1


ROW_CACHE_POLICIES: dict[str, Callable[..., RowCachePolicy]] = {
    "lru": RowLRU, "s3fifo": RowS3FIFO, "hybrid": RowHybrid,
}


def create_row_cache_policy(name: str, num_rows: int, num_slots: int, **kw) -> RowCachePolicy:
    """A row-cache policy by name (``lru``, ``s3fifo``, ``hybrid``); ``kw`` such as
    ``static_score`` go to the policies that use them."""
    try:
        cls = ROW_CACHE_POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown row-cache policy {name!r}; known: {', '.join(sorted(ROW_CACHE_POLICIES))}") from None
    return cls(num_rows, num_slots, **kw)


def simulate(policy: RowCachePolicy, batches: Iterable[np.ndarray], victims: VictimBuffer | None = None,
             *, warmup: int = 0) -> dict:
    """Replay minibatches of row ids through ``policy`` (and a victim buffer) without data.

    Each batch is de-duplicated first (a gather reads a row once per minibatch);
    returns hit rates over unique rows after ``warmup`` batches.
    """
    hits = victim_hits = total = 0
    for i, batch in enumerate(batches):
        rows = np.unique(_rows(batch))
        slots = policy.lookup(rows)
        miss = rows[slots < 0]
        vh = 0
        if victims is not None and len(miss):
            found = victims.find(miss) >= 0
            vh = int(found.sum())
            victims.remove(miss[found])
        _s, ev_rows, _es = policy.admit(miss)
        if victims is not None and len(ev_rows):
            victims.add(ev_rows)
        if i >= warmup:
            hits += int((slots >= 0).sum())
            victim_hits += vh
            total += len(rows)
    return {"rows": total, "hits": hits, "victim_hits": victim_hits,
            "hit_rate": (hits + victim_hits) / total if total else 0.0}
