"""Trace-driven simulator: replay columnar accesses through a placement + migration policy.

Pure numpy + Python, no I/O: the same policy objects that run in the store
run here, against :class:`~policies.base.TierModel` cost models. Input is
five equally long arrays (the trace file's columns, see :mod:`traces.format`,
but this module never imports ``traces``):

    time  float64 seconds   key  int64 object id   size  int64 bytes
    op    uint8 (0 read, 1 write, index into OPS)  kind  uint8 (index into KINDS)

Model (documented so results can be judged):

* Tiers fastest first; the last is the *backing* tier and always holds a copy
  of every object (unbounded in the simulator). Objects on faster tiers are
  exclusive cached copies; each object lives on exactly one tier.
* An object's size is the largest size any of its events names.
* Each tier is one device with a FIFO queue for its bandwidth: an access
  served from tier ``t`` occupies the device for ``size / bandwidth`` from
  when it has arrived and the device is free, and completes ``latency_s``
  later (latency is pipelined, as on an SSD with many requests in flight);
  its latency is completion minus arrival.
* Migrations are background transfers that occupy the source (read) and the
  destination (write) devices' bandwidth, so wasteful promotion delays later
  accesses; a migrated object is usable once its bytes have arrived (an
  access to it waits, the device's queue does not).
  A move of an object just served by the current batch skips the source read
  (its bytes are in memory: fill on miss); a move of a clean object to the
  backing tier is free (its copy is there) and migrates no bytes; writes
  served on a cache tier make the object dirty until written back.
* Arrivals: open loop at trace times, or closed loop (one client issuing the
  next access when the previous completes, never earlier than its trace
  time) -- the right model for traces without meaningful timestamps.

Declared futures: ``prepare(..., plans=)`` takes ``(at, owner, keys)`` triples (``keys`` in the
key column's ids); the simulator calls ``policy.plan(owner, keys)`` before event ``at``, between
decisions (the batch is cut there), as the store's governor does live. Plan keys the trace never
accesses keep ids of their own (``n_keys`` and up): a policy never sees them in an observation.

Call order: see :class:`policies.base.MigrationPolicy`. New objects are
placed by the placement policy (default: the policy itself if it is also a
:class:`PlacementPolicy`, else :class:`~policies.base.Backing`).
"""

from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .base import (
    KINDS, OPS, Backing, MigrationPolicy, Observation, Outcome, PlacementPolicy, PolicyError,
    TierModel,
)

__all__ = ["SimResult", "default_tiers", "deliver_plans", "prepare", "simulate", "Prepared"]

GB = 1e9


def default_tiers(footprint: int, fast_fraction: float = 0.08, *, fast_bytes: int | None = None) -> tuple[TierModel, ...]:
    """A host-RAM cache over an NVMe drive, the fast tier ``fast_fraction`` of ``footprint``.

    Speeds are typical datasheet figures (DRAM copy ~10 GB/s, ~1 us; NVMe
    ~3 GB/s read, ~2 GB/s write, ~80 us); replace them with ``tiered probe``
    numbers for a given machine.
    """
    cap = int(fast_bytes if fast_bytes is not None else max(1, footprint * fast_fraction))
    return (
        TierModel("host", cap, latency_s=1e-6, read_bw=10 * GB, write_bw=10 * GB),
        TierModel("nvme", math.inf, latency_s=80e-6, read_bw=3 * GB, write_bw=2 * GB),
    )


@dataclass(frozen=True)
class Prepared:
    """Per-event arrays derived once per trace and shared by every policy's replay."""

    time: np.ndarray  # float64, seconds from the first event
    key: np.ndarray  # int64 dense ids 0..n_keys-1
    size: np.ndarray  # int64 event size
    op: np.ndarray  # uint8
    kind: np.ndarray  # uint8
    obj_size: np.ndarray  # int64 per dense id: the largest size of the object
    prev: np.ndarray  # int64 index of the key's previous access, -1 if none
    next: np.ndarray  # float64 index of the key's next access, inf if none
    count: np.ndarray  # int64 accesses of the key so far, this one included
    original_keys: np.ndarray  # the input key of each dense id
    #: declared plans, ``(at, owner, keys)`` in order of ``at``: before event ``at`` the owner declared
    #: it reads ``keys`` (dense ids) next
    plans: tuple[tuple[int, str, tuple[int, ...]], ...] = ()

    @property
    def n(self) -> int:
        return int(self.key.shape[0])

    @property
    def n_keys(self) -> int:
        return int(self.obj_size.shape[0])

    @property
    def footprint(self) -> int:
        return int(self.obj_size.sum())


def prepare(time, key, size, op, kind, plans=None) -> Prepared:
    """Validate the columns and derive the per-event history arrays (vectorised).

    ``plans``: ``(at, owner, keys)`` triples (see the module docstring), ``at`` non-decreasing in
    ``0..n`` (``n``: after the last event).
    """
    cols = {"time": np.asarray(time, dtype=np.float64), "key": np.asarray(key),
            "size": np.asarray(size), "op": np.asarray(op), "kind": np.asarray(kind)}
    n = cols["time"].shape[0]
    for name, a in cols.items():
        if a.ndim != 1 or a.shape[0] != n:
            raise ValueError(f"column {name!r}: expected a 1-D array of {n} events, got shape {a.shape}")
    if n and not np.all(np.isfinite(cols["time"])):
        raise ValueError("column 'time': expected finite seconds")
    size_a = cols["size"].astype(np.int64)
    if n and size_a.min() < 0:
        raise ValueError(f"column 'size': expected sizes >= 0, got {int(size_a.min())}")
    op_a = cols["op"].astype(np.uint8)
    if n and op_a.max() >= len(OPS):
        raise ValueError(f"column 'op': expected values < {len(OPS)} ({'/'.join(OPS)}), got {int(op_a.max())}")
    kind_a = cols["kind"].astype(np.uint8)
    if n and kind_a.max() >= len(KINDS):
        raise ValueError(f"column 'kind': expected values < {len(KINDS)}, got {int(kind_a.max())}")
    uniq, dense = np.unique(cols["key"], return_inverse=True)
    dense = dense.astype(np.int64).reshape(-1)
    obj_size = np.zeros(uniq.shape[0], dtype=np.int64)
    np.maximum.at(obj_size, dense, size_a)
    order = np.argsort(dense, kind="stable")
    ks = dense[order]
    same = ks[1:] == ks[:-1]
    prev = np.full(n, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    nxt = np.full(n, np.inf)
    nxt[order[:-1][same]] = order[1:][same]
    # position within its key's group = index in sorted order - start of the group
    starts = np.ones(n, dtype=bool)
    if n:
        starts[1:] = ~same
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    count = np.empty(n, dtype=np.int64)
    count[order] = np.arange(n) - group_start + 1
    t = cols["time"] - (cols["time"][0] if n else 0.0)
    dense_plans = _dense_plans(plans or (), uniq, n)
    return Prepared(t, dense, size_a, op_a, kind_a, obj_size, prev, nxt, count, uniq, dense_plans)


def _dense_plans(plans, uniq: np.ndarray, n: int) -> tuple[tuple[int, str, tuple[int, ...]], ...]:
    """Plans with their keys as dense ids; keys never accessed get ids from ``len(uniq)`` on."""
    out = []
    extra: dict[int, int] = {}
    last = 0
    for j, (at, owner, keys) in enumerate(plans):
        at = int(at)
        if not last <= at <= n:
            raise ValueError(f"plan {j} (owner {owner!r}): at = {at}; expected {last} <= at <= {n} "
                             "(non-decreasing event indices)")
        last = at
        ids = np.asarray(keys, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(uniq, ids)
        found = pos < uniq.shape[0]
        found[found] = uniq[pos[found]] == ids[found]
        dense = pos.tolist()
        for i in np.flatnonzero(~found).tolist():
            dense[i] = extra.setdefault(int(ids[i]), int(uniq.shape[0]) + len(extra))
        out.append((at, str(owner), tuple(dense)))
    return tuple(out)


@dataclass
class SimResult:
    """Per-access latencies and totals of one replay."""

    policy: str
    tier_names: tuple[str, ...]
    latency_s: np.ndarray  # float64 per access
    served: np.ndarray  # int8 tier index per access
    bytes_migrated: int
    migrations: int
    total_time_s: float  # simulated: last completion, migrations included
    wall_s: float  # host seconds the replay took
    decisions: int = 0  # decide() calls
    peak_used: tuple[int, ...] = ()  # most bytes each tier held at once
    extra: dict = field(default_factory=dict)

    def summary(self, start: int = 0, stop: int | None = None) -> dict:
        """Hit ratio per tier, mean/p99 latency (us) over accesses ``[start, stop)``."""
        lat = self.latency_s[start:stop]
        srv = self.served[start:stop]
        n = max(1, lat.shape[0])
        hits = np.bincount(srv.astype(np.int64), minlength=len(self.tier_names))
        return {
            "policy": self.policy,
            "accesses": int(lat.shape[0]),
            "hit_ratio": {name: float(hits[i]) / n for i, name in enumerate(self.tier_names)},
            "mean_latency_us": float(lat.mean() * 1e6) if lat.size else 0.0,
            "p99_latency_us": float(np.percentile(lat, 99) * 1e6) if lat.size else 0.0,
        }


class _Devices:
    """The simulated tiers: capacity and bytes used, each device's bandwidth queue (when it is
    next free), and per object its tier, when its bytes are complete there, and whether the
    backing tier's copy is stale. The replay loop binds these lists to locals for speed."""

    def __init__(self, tiers: tuple[TierModel, ...], n_keys: int):
        self.T = len(tiers)
        self.back = self.T - 1
        self.names = tuple(t.name for t in tiers)
        self.index = {nm: i for i, nm in enumerate(self.names)}
        self.cap = [float(t.capacity) for t in tiers]
        self.cap[self.back] = math.inf
        self.lat = [t.latency_s for t in tiers]
        self.rbw = [t.read_bw for t in tiers]
        self.wbw = [t.write_bw for t in tiers]
        self.busy = [0.0] * self.T
        self.used = [0] * self.T
        self.peak = [0] * self.T
        self.tier_of = [-1] * n_keys
        self.ready_at = [0.0] * n_keys
        self.dirty = bytearray(n_keys)

    def fill(self) -> tuple[float, ...]:
        """Each tier's fraction used (the backing tier: 0)."""
        inf = math.inf
        return tuple((u / c) if c not in (0.0, inf) else (0.0 if c == inf else 1.0)
                     for u, c in zip(self.used, self.cap))

    def add(self, k: int, tk: int, sz: int) -> None:
        """Object ``k`` of ``sz`` bytes now counts on tier ``tk``."""
        self.tier_of[k] = tk
        self.used[tk] += sz
        if self.used[tk] > self.peak[tk]:
            self.peak[tk] = self.used[tk]

    def queue(self, j: int, now: float, seconds: float) -> float:
        """Occupy device ``j`` for ``seconds`` from ``now`` or when it is next free; when it ends."""
        b = self.busy[j]
        self.busy[j] = (now if now > b else b) + seconds
        return self.busy[j]


def _place(dev: _Devices, placement: PlacementPolicy, obs: Observation, k: int, sz: int) -> int:
    """The tier the placement policy gives a never-seen object, checked and charged."""
    name = placement.place(obs, [(dev.names[j], dev.cap[j], dev.cap[j] - dev.used[j]) for j in range(dev.T)])
    if name is None:
        raise PolicyError(f"placement {placement.name or type(placement).__name__!r}: no tier for key {k} ({sz} bytes)")
    if name not in dev.index:
        raise PolicyError(f"placement {placement.name!r} named unknown tier {name!r}; tiers: {dev.names}")
    tk = dev.index[name]
    if dev.used[tk] + sz > dev.cap[tk]:
        raise PolicyError(f"placement {placement.name!r} put key {k} ({sz} bytes) on full tier {name!r}")
    dev.add(k, tk, sz)
    return tk


def _fill_on_first_read(dev: _Devices, k: int, tk: int, sz: int, nbytes: int, now: float) -> float:
    """A read of an object never seen placed on a faster tier: its bytes come from the backing
    tier and placing them is a fill (a migration), no free first hit. When the read completes."""
    back = dev.back
    fin = dev.queue(back, now, nbytes / dev.rbw[back]) + dev.lat[back]
    busy = dev.queue(tk, now, sz / dev.wbw[tk])
    r = fin + sz / dev.wbw[tk]
    dev.ready_at[k] = r if r > busy else busy
    return fin


def _checked_move(policy: MigrationPolicy, dev: _Devices, key, dst, n_keys: int) -> tuple[int, int]:
    """A decision as ``(key, tier index)`` ints, or a PolicyError naming what is wrong."""
    T = dev.T
    if not (type(dst) is int and 0 <= dst < T):
        if isinstance(dst, (int, np.integer)) and 0 <= int(dst) < T:
            dst = int(dst)
        else:
            raise PolicyError(f"policy {policy.name!r}: move of key {key!r} to tier {dst!r}; tiers are 0..{T - 1} {dev.names}")
    if type(key) is not int:
        if isinstance(key, np.integer):
            key = int(key)
        else:
            raise PolicyError(f"policy {policy.name!r}: move names unknown object {key!r}")
    if not 0 <= key < n_keys or dev.tier_of[key] < 0:
        raise PolicyError(f"policy {policy.name!r}: move names unknown object {key!r}")
    return key, dst


def _apply_moves(policy: MigrationPolicy, dev: _Devices, moves, osz: list[int], now: float, last_fin: float,
                 pend_keys: set[int]) -> tuple[int, int]:
    """Carry out one batch's decisions: (bytes moved, moves made). A clean object moved to the
    backing tier costs nothing; one the batch just served is in memory once read."""
    batch_bytes = n_moves = 0
    for key, dst in moves:
        key, dst = _checked_move(policy, dev, key, dst, len(osz))
        src = dev.tier_of[key]
        if src == dst:
            continue
        sz = osz[key]
        if dev.used[dst] + sz > dev.cap[dst]:
            raise PolicyError(
                f"policy {policy.name!r}: moving key {key!r} ({sz} bytes) to tier {dev.names[dst]!r} "
                f"would exceed its capacity ({dev.used[dst]} of {dev.cap[dst]:.0f} bytes used)")
        dev.used[src] -= sz
        dev.add(key, dst, sz)
        if dst == dev.back and not dev.dirty[key]:
            continue
        ready = last_fin
        if key not in pend_keys:
            read = dev.queue(src, now, sz / dev.rbw[src])
            ready = (read if read > dev.ready_at[key] else dev.ready_at[key]) + dev.lat[src]
        busy = dev.queue(dst, now, sz / dev.wbw[dst])
        r = ready + sz / dev.wbw[dst]
        dev.ready_at[key] = r if r > busy else busy
        if dst == dev.back:
            dev.dirty[key] = 0
        batch_bytes += sz
        n_moves += 1
    return batch_bytes, n_moves


def simulate(
    trace: Prepared,
    tiers: Sequence[TierModel],
    policy: MigrationPolicy,
    placement: PlacementPolicy | None = None,
    *,
    closed_loop: bool = False,
    progress: Callable[[int, int], None] | None = None,
    progress_every: int = 1 << 16,
) -> SimResult:
    """Replay ``trace`` (from :func:`prepare`) through ``policy`` on ``tiers`` (fastest first).

    Raises :class:`PolicyError` when a decision names an unknown object or a
    tier index out of range, or would exceed a tier's capacity.
    """
    tiers = tuple(tiers)
    if len(tiers) < 2:
        raise ValueError(f"need at least two tiers (a cache and a backing tier), got {len(tiers)}")
    if placement is None:
        placement = policy if isinstance(policy, PlacementPolicy) else Backing()
    dev = _Devices(tiers, trace.n_keys)
    policy.reset(tiers)
    if policy.needs_future:
        policy.prepare_future(trace.key)
    wall0 = _time.perf_counter()
    lats, served, totals, end = _replay(trace, dev, policy, placement, closed_loop, progress, progress_every)
    migrated, n_moves, n_decide = totals
    return SimResult(
        policy=policy.name or type(policy).__name__,
        tier_names=dev.names,
        latency_s=np.asarray(lats, dtype=np.float64),
        served=np.frombuffer(bytes(served), dtype=np.int8).copy(),
        bytes_migrated=int(migrated),
        migrations=n_moves,
        total_time_s=float(end),
        wall_s=_time.perf_counter() - wall0,
        decisions=n_decide,
        peak_used=tuple(dev.peak),
    )


def _replay(trace: Prepared, dev: _Devices, policy: MigrationPolicy, placement: PlacementPolicy,
            closed_loop: bool, progress, progress_every: int):
    """The event loop: serve each access on its object's tier, hand the policy each batch of
    observations and carry out its moves. Per-access state lives in locals (the hot path)."""
    n, back, names = trace.n, dev.back, dev.names
    tl, kl, sl = trace.time.tolist(), trace.key.tolist(), trace.size.tolist()
    opl, kindl, osz = trace.op.tolist(), trace.kind.tolist(), trace.obj_size.tolist()
    prevl, cntl = trace.prev.tolist(), trace.count.tolist()
    lat, rbw, wbw, busy = dev.lat, dev.rbw, dev.wbw, dev.busy
    tier_of, ready_at, dirty = dev.tier_of, dev.ready_at, dev.dirty
    lats, served = [0.0] * n, bytearray(n)
    future = bool(policy.needs_future)
    nextl = trace.next.tolist() if future else None
    batch_size, learns, inf = max(1, int(policy.batch)), bool(policy.learns), math.inf
    fill = dev.fill()
    clock = now = last_fin = 0.0
    migrated = n_moves = n_decide = 0
    pending: list[Observation] = []
    pend_keys: set[int] = set()
    plans = trace.plans
    next_plan, plan_at = 0, (plans[0][0] if plans else -1)  # the next declaration and the event it precedes
    for i in range(n):
        if i == plan_at:  # between decisions: the previous batch was cut before this event
            next_plan, plan_at = deliver_plans(policy, plans, next_plan, i)
        k, w, arr = kl[i], opl[i], tl[i]
        now = (arr if arr > clock else clock) if closed_loop else arr
        tk = tier_of[k]
        if tk < 0:
            sz = osz[k]
            pobs = Observation(k, sz, KINDS[kindl[i]], OPS[w], None, now, i, 1, inf, inf, -1, fill,
                               nextl[i] if future else inf)
            tk = _place(dev, placement, pobs, k, sz)
            fill = dev.fill()
            if not w and tk != back:
                last_fin = fin = _fill_on_first_read(dev, k, tk, sz, sl[i], now)
                migrated += sz
                n_moves += 1
                lats[i], served[i] = fin - now, back
                if closed_loop:
                    clock = fin
                resident, tk = tk, -1
        if tk >= 0:
            resident = tk
            b = busy[tk]
            occ = sl[i] / (wbw[tk] if w else rbw[tk])
            b = (now if now > b else b) + occ
            busy[tk] = b
            r = ready_at[k] + occ  # the object's bytes may still be on their way to this tier
            fin = (b if b > r else r) + lat[tk]
            last_fin = fin
            lats[i], served[i] = fin - now, tk
            if closed_loop:
                clock = fin
            if w:
                dirty[k] = 0 if tk == back else 1
        p = prevl[i]
        pending.append(Observation(
            k, osz[k], KINDS[kindl[i]], OPS[w], names[resident], now, i, cntl[i],
            (now - tl[p]) if p >= 0 else inf, (i - p) if p >= 0 else inf, resident, fill,
            nextl[i] if future else inf,
        ))
        pend_keys.add(k)
        if len(pending) < batch_size and i != n - 1 and plan_at != i + 1:
            continue
        moves = policy.decide(pending)
        n_decide += 1
        batch_bytes = 0
        if moves:
            batch_bytes, moved = _apply_moves(policy, dev, moves, osz, now, last_fin, pend_keys)
            n_moves += moved
            migrated += batch_bytes
            fill = dev.fill()
        if learns:
            m = len(pending)
            policy.observe([Outcome(o, lats[o.index], served[o.index], batch_bytes if j == m - 1 else 0)
                            for j, o in enumerate(pending)])
        pending = []
        pend_keys.clear()
        batch_size = max(1, int(policy.batch))  # a policy may adapt its batch as it learns the sizes
        if progress is not None and (i + 1) % progress_every == 0:
            progress(i + 1, n)
    if next_plan < len(plans):  # declared after the last event: delivered all the same
        deliver_plans(policy, plans, next_plan, n)
    if progress is not None:
        progress(n, n)
    end = max([now + 0.0] + busy + [max(ready_at, default=0.0)])
    if n and closed_loop:
        end = max(end, clock)
    return lats, served, (migrated, n_moves, n_decide), end


def deliver_plans(policy: MigrationPolicy, plans, j: int, at: int) -> tuple[int, int]:
    """Call ``policy.plan`` for every plan declared before event ``at`` from ``plans[j]`` on; the
    index of the next plan and the event it precedes (-1: none left)."""
    while j < len(plans) and plans[j][0] <= at:
        _at, owner, keys = plans[j]
        policy.plan(owner, keys)
        j += 1
    return j, (plans[j][0] if j < len(plans) else -1)
