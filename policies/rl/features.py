"""Per-object access history and the feature vectors the agents see.

Time is measured as a *byte clock* (bytes accessed so far) in units of the
fast tier's capacity, so every feature is scale-free: the same network sees
"re-used after a tenth of a cache's worth of traffic" the same way on a
4 MiB and on a 4 GiB tier, and no per-trace constant is needed.
"""

from __future__ import annotations

import math

import numpy as np

from ..base import KINDS

#: inter-access gaps remembered per object (LRB's "deltas")
N_GAPS = 8
#: half-lives (fast-tier capacities of traffic) of the decayed access counts (LRFU-style,
#: LRB's "EDCs"): from a sixteenth of a cache's worth of traffic to sixteen caches' worth
FREQ_HALF_LIVES = (0.0625, 0.25, 1.0, 4.0, 16.0)
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
FEATURE_NAMES = (
    ("log_size", "log_count", "age", "since_first")
    + tuple(f"gap{i}" for i in range(N_GAPS))
    + tuple(f"has_gap{i}" for i in range(N_GAPS))
    + ("ewma_gap", "write", "resident", "fill")
    + tuple(f"freq_h{h:g}" for h in FREQ_HALF_LIVES)
    + tuple(f"kind_{k}" for k in KINDS)
    # stream context at the object's last access: the accesses just before it (requests
    # touch several objects in a row, which tend to share their fate)
    + ("ctx_reuse", "pred_count", "pred_gap", "pred_has_gap")
)
#: weight of the latest access in the stream's re-access average (ctx_reuse)
CTX_ALPHA = 0.125
N_FEATURES = len(FEATURE_NAMES)
#: every feature lies in [0, FEATURE_MAX] (the gymnasium observation bounds)
FEATURE_MAX = 4.0


def kind_index(kind: str) -> int:
    """Index of ``kind`` in :data:`policies.base.KINDS`; unknown kinds count as blobs."""
    return _KIND_INDEX.get(kind, _KIND_INDEX["blob"])


def _squash(x: np.ndarray) -> np.ndarray:
    """Distances in capacities -> roughly [0, 1]: fine resolution well below one capacity."""
    return np.log2(1.0 + 64.0 * x) / 12.0


class ObjectTable:
    """Dense per-object history, indexed by a small integer id per key.

    Grows by doubling; all feature computation is vectorised over ids so a
    batch of candidates costs one numpy pass and one network call.
    """

    def __init__(self, initial: int = 1024) -> None:
        self.ids: dict[object, int] = {}
        self.keys: list[object] = []
        n = max(16, initial)
        self.nbytes = np.zeros(n, np.float64)
        self.kind = np.zeros(n, np.int16)
        self.count = np.zeros(n, np.float64)
        self.last = np.zeros(n, np.float64)  # byte clock of the last access
        self.first = np.zeros(n, np.float64)
        self.gaps = np.zeros((n, N_GAPS), np.float64)  # most recent first, byte-clock units
        self.ngaps = np.zeros(n, np.int8)
        self.ewma = np.zeros(n, np.float64)
        self.write = np.zeros(n, np.float32)
        self.freq = np.zeros((n, len(FREQ_HALF_LIVES)), np.float64)  # decayed counts at ``last``
        self.ctx = np.zeros((n, 4), np.float32)  # stream context at the last access (features)
        self._pred = -1  # id of the previous access in the stream
        self._reuse = 0.0  # EWMA over the stream of "was a re-access"
        self._free: list[int] = []  # ids of forgotten keys, reused before new ones

    _hl = np.asarray(FREQ_HALF_LIVES)

    def __len__(self) -> int:
        return len(self.keys)

    def _grow(self) -> None:
        n = 2 * len(self.nbytes)
        for name in ("nbytes", "kind", "count", "last", "first", "ngaps", "ewma", "write"):
            old = getattr(self, name)
            new = np.zeros(n, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        for name in ("gaps", "freq", "ctx"):
            old = getattr(self, name)
            new = np.zeros((n, old.shape[1]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def id_of(self, key: object) -> int | None:
        return self.ids.get(key)

    def record(self, key: object, nbytes: int, kind: str, write: bool, clock: float,
               capacity: float) -> tuple[int, bool]:
        """Account one access at ``clock``; returns (id, first time seen)."""
        i = self.ids.get(key)
        new = i is None
        if new:
            i = len(self.keys)
            if i >= len(self.nbytes):
                self._grow()
            self.ids[key] = i
            self.keys.append(key)
            self.first[i] = clock
            self.last[i] = clock
        else:
            gap = clock - self.last[i]
            self.gaps[i, 1:] = self.gaps[i, :-1]
            self.gaps[i, 0] = gap
            self.ngaps[i] = min(N_GAPS, self.ngaps[i] + 1)
            self.ewma[i] = gap if self.count[i] <= 1 else 0.7 * self.ewma[i] + 0.3 * gap
            self.last[i] = clock
            self.freq[i] *= 2.0 ** (-gap / (max(capacity, 1.0) * self._hl))
        self.freq[i] += 1.0
        p = self._pred
        c = self.ctx[i]
        c[0] = self._reuse
        if p >= 0:
            c[1] = math.log2(1.0 + self.count[p]) / 16.0
            if self.ngaps[p] > 0:
                c[2] = math.log2(1.0 + 64.0 * self.gaps[p, 0] / max(capacity, 1.0)) / 12.0
                c[3] = 1.0
            else:
                c[2] = c[3] = 0.0
        else:
            c[1:] = 0.0
        self._reuse += CTX_ALPHA * ((0.0 if new else 1.0) - self._reuse)
        self._pred = i
        self.nbytes[i] = nbytes
        self.kind[i] = kind_index(kind)
        self.count[i] += 1
        self.write[i] = 1.0 if write else 0.0
        return i, new

    def ids_for(self, keys) -> tuple[list[int], int]:
        """Dense ids of ``keys`` (new keys get the next ids, in order); also how many were new."""
        ids = self.ids
        get = ids.get
        out = [get(k) for k in keys]
        if None not in out:
            return out, 0
        made = 0
        for j, i in enumerate(out):
            if i is None:
                k = keys[j]
                i = get(k)
                if i is None:
                    if self._free:
                        i = ids[k] = self._free.pop()
                        self.keys[i] = k
                    else:
                        i = ids[k] = len(self.keys)
                        self.keys.append(k)
                    made += 1
                out[j] = i
        while len(self.keys) > len(self.nbytes):
            self._grow()
        return out, made

    def forget(self, key: object) -> int | None:
        """Drop ``key``'s history; its id (returned) is reused by a later new key."""
        i = self.ids.pop(key, None)
        if i is None:
            return None
        self.keys[i] = None
        for a in (self.nbytes, self.kind, self.count, self.last, self.first, self.gaps, self.ngaps,
                  self.ewma, self.write, self.freq, self.ctx):
            a[i] = 0
        if self._pred == i:
            self._pred = -1
        self._free.append(i)
        return i

    def record_batch(self, ids: np.ndarray, nbytes: np.ndarray, kinds: np.ndarray, writes: np.ndarray,
                     clocks: np.ndarray, capacity: float) -> np.ndarray:
        """Account a batch of accesses (``ids`` from :meth:`ids_for`, ``clocks`` ascending): the
        same history as :meth:`record` per access, vectorised. Repeated ids are applied in rounds
        (each round touches an id at most once, in stream order); the stream context of an access
        is read at the end of the batch (a batch's worth of staleness). Returns the first-time mask."""
        n = len(ids)
        first = self.count[ids] == 0
        cap = max(float(capacity), 1.0)
        idl = ids.tolist()
        if len(set(idl)) == n:  # the common case: one round
            new = first
            self._round(ids, clocks, cap)
        else:
            seen: dict[int, int] = {}
            occ = np.empty(n, np.int64)
            for j, i in enumerate(idl):
                occ[j] = seen[i] = seen.get(i, -1) + 1
            new = first & (occ == 0)
            for r in range(int(occ.max()) + 1):
                sel = occ == r
                self._round(ids[sel], clocks[sel], cap)
        self.nbytes[ids] = nbytes
        self.kind[ids] = kinds
        self.write[ids] = writes
        # stream context: the re-access EWMA before each access, and its predecessor's history
        reuse = []
        r = self._reuse
        for x in new.tolist():
            reuse.append(r)
            r += CTX_ALPHA * ((0.0 if x else 1.0) - r)
        self._reuse = r
        pred = np.empty(n, np.int64)
        pred[0] = self._pred
        pred[1:] = ids[:-1]
        self._pred = int(ids[-1])
        c = np.zeros((n, 4), np.float32)
        c[:, 0] = reuse
        ok = pred >= 0
        p = pred[ok]
        c[ok, 1] = np.log2(1.0 + self.count[p]) / 16.0
        hasg = self.ngaps[p] > 0
        c[ok, 2] = np.where(hasg, np.log2(1.0 + 64.0 * self.gaps[p, 0] / cap) / 12.0, 0.0)
        c[ok, 3] = hasg
        self.ctx[ids] = c  # a repeated id keeps its last access's context (numpy: last write wins)
        return new

    def _round(self, ids: np.ndarray, clocks: np.ndarray, cap: float) -> None:
        """One access each to distinct ``ids`` at ``clocks``."""
        seen = self.count[ids] > 0
        if seen.any():
            o, c = ids[seen], clocks[seen]
            gap = c - self.last[o]
            g = self.gaps[o]
            g[:, 1:] = g[:, :-1]
            g[:, 0] = gap
            self.gaps[o] = g
            self.ngaps[o] = np.minimum(N_GAPS, self.ngaps[o] + 1)
            self.ewma[o] = np.where(self.count[o] <= 1, gap, 0.7 * self.ewma[o] + 0.3 * gap)
            self.freq[o] *= 2.0 ** (-gap[:, None] / (cap * self._hl[None, :]))
        if not seen.all():
            f, c = ids[~seen], clocks[~seen]
            self.first[f] = c
        self.last[ids] = clocks
        self.freq[ids] += 1.0
        self.count[ids] += 1

    def decayed_freq(self, ids: np.ndarray, clock: float, capacity: float, j: int) -> np.ndarray:
        """Access counts of ``ids`` decayed to ``clock`` with half-life FREQ_HALF_LIVES[j]."""
        age = (clock - self.last[ids]) / max(float(capacity), 1.0)
        return self.freq[ids, j] * 2.0 ** (-age / self._hl[j])

    def features(self, ids: np.ndarray, clock: float, capacity: float, fill: float,
                 resident: np.ndarray) -> np.ndarray:
        """Feature matrix (len(ids), N_FEATURES) as float32, at byte clock ``clock``.

        (Gaps an object has not had yet are stored as 0, and squash(0) = 0: no masking needed.)"""
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        cap = max(float(capacity), 1.0)
        out = np.zeros((n, N_FEATURES), np.float32)
        ng = self.ngaps[ids]
        # distances in capacities: age, since first access, the gaps, their EWMA -> one squash
        d = np.empty((n, 3 + N_GAPS))
        last = self.last[ids]
        d[:, 0] = clock - last
        d[:, 1] = clock - self.first[ids]
        d[:, 2:2 + N_GAPS] = self.gaps[ids]
        d[:, 2 + N_GAPS] = self.ewma[ids]
        d *= 64.0 / cap
        d += 1.0
        sq = np.log2(d)
        sq /= 12.0
        out[:, 2:4 + N_GAPS] = sq[:, :2 + N_GAPS]
        out[:, 0] = np.log2(np.maximum(self.nbytes[ids], 1.0)) / 32.0
        out[:, 1] = np.log2(1.0 + self.count[ids]) / 16.0
        out[:, 4 + N_GAPS:4 + 2 * N_GAPS] = np.arange(N_GAPS)[None, :] < ng[:, None]
        o = 4 + 2 * N_GAPS
        out[:, o] = sq[:, 2 + N_GAPS]
        out[:, o + 1] = self.write[ids]
        out[:, o + 2] = resident
        out[:, o + 3] = fill
        f = self.freq[ids] * np.exp2((last - clock)[:, None] / (cap * self._hl[None, :]))
        f += 1.0
        out[:, o + 4:o + 4 + len(FREQ_HALF_LIVES)] = np.log2(f) / 8.0
        k = o + 4 + len(FREQ_HALF_LIVES)
        out[np.arange(n), k + self.kind[ids]] = 1.0
        k += len(KINDS)
        out[:, k:k + 4] = self.ctx[ids]
        return np.clip(out, 0.0, FEATURE_MAX, out=out)

    def features_reference(self, ids: np.ndarray, clock: float, capacity: float, fill: float,
                           resident: np.ndarray) -> np.ndarray:
        """:meth:`features` written plainly, one column group at a time (tests compare the two)."""
        ids = np.asarray(ids, np.int64)
        n = len(ids)
        cap = max(float(capacity), 1.0)
        out = np.zeros((n, N_FEATURES), np.float32)
        out[:, 0] = np.log2(np.maximum(self.nbytes[ids], 1.0)) / 32.0
        out[:, 1] = np.log2(1.0 + self.count[ids]) / 16.0
        out[:, 2] = _squash((clock - self.last[ids]) / cap)
        out[:, 3] = _squash((clock - self.first[ids]) / cap)
        ng = self.ngaps[ids]
        has = np.arange(N_GAPS)[None, :] < ng[:, None]
        out[:, 4:4 + N_GAPS] = np.where(has, _squash(self.gaps[ids] / cap), 0.0)
        out[:, 4 + N_GAPS:4 + 2 * N_GAPS] = has
        o = 4 + 2 * N_GAPS
        out[:, o] = np.where(ng > 0, _squash(self.ewma[ids] / cap), 0.0)
        out[:, o + 1] = self.write[ids]
        out[:, o + 2] = resident
        out[:, o + 3] = fill
        age = (clock - self.last[ids]) / cap
        f = self.freq[ids] * 2.0 ** (-age[:, None] / self._hl[None, :])
        out[:, o + 4:o + 4 + len(FREQ_HALF_LIVES)] = np.log2(1.0 + f) / 8.0
        k = o + 4 + len(FREQ_HALF_LIVES)
        out[np.arange(n), k + self.kind[ids].astype(np.int64)] = 1.0
        k += len(KINDS)
        out[:, k:k + 4] = self.ctx[ids]
        return np.clip(out, 0.0, FEATURE_MAX, out=out)


def discount(distance_in_capacities: np.ndarray | float, half_life: float) -> np.ndarray | float:
    """gamma^distance with gamma chosen so the value halves every ``half_life`` capacities."""
    return np.exp(-math.log(2.0) * np.asarray(distance_in_capacities) / half_life)
