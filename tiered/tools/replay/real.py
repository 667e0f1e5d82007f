"""Real-mode replay: the trace's objects live in a :class:`~tiered.store.TieredStore`.

Each object of the trace is a store object (ephemeral, owner ``replay``) on the store's last
storage tier: the backing tier. The fast tier is the store's host tier, where the replay
reserves a share for owner ``replay``. An object on the fast tier is held there by the
replay: a lease on its cached copy (:meth:`~tiered.store.TieredStore.acquire`) while clean,
the detached buffer (:meth:`~tiered.store.Lease.detach`) once written. So:

* promotion = ``acquire`` at prefetch priority (a background read the next access may wait for);
* demotion = release and ``evict`` (clean), or ``put_buffer`` of the written bytes (write-back);
* an access served by the backing tier = ``acquire`` read from storage and evicted again
  (kept until the policy's decision when it ends a batch, so a promotion of the object just
  read costs no second read), a write = ``put_buffer`` of the bytes.

Accesses run one at a time; latency is wall-clock per access; promotions and write-backs are
store futures running in the background meanwhile, so their traffic delays later accesses as on
a real machine.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tiered.allocators import align_up
from tiered.io_engine import Priority
from tiered.policies import KINDS, OPS, Backing, MigrationPolicy, Observation, Outcome, PlacementPolicy, PolicyError, TierModel
from tiered.policies.sim import Prepared, SimResult, deliver_plans

from ...config import Config
from .. import REPLAY_OWNER
from ...sizes import format_size
from ..args import UsageError

WAIT = 600.0  # seconds one store operation may take before the replay calls it stuck


def run_real(trace: Prepared, tiers: Sequence[TierModel], policy: MigrationPolicy, cfg: Config | None = None,
             placement: PlacementPolicy | None = None, *, progress: Callable[[int, int], None] | None = None,
             max_footprint: int = 4 << 30, store=None) -> SimResult:
    """Replay with real I/O through a live store (see the module docstring): ``store``, or one
    opened on ``cfg`` for the replay and closed after it.

    Follows the call order of :class:`policies.base.MigrationPolicy` and the same checks as the
    simulator (a bad decision is a :class:`PolicyError`). Two tiers only (the first cache tier
    and the backing tier). Whatever the replay held is gone from the store when it returns.
    """
    from ...store import TieredStore

    tiers = (tiers[0], tiers[-1])
    if placement is None:
        placement = policy if isinstance(policy, PlacementPolicy) else Backing()
    total = sum(align_up(max(1, s)) for s in trace.obj_size.tolist())
    if total > max_footprint:
        raise UsageError(f"trace footprint {format_size(total)} exceeds the real-mode limit "
                         f"{format_size(max_footprint)}; "
                         "replay fewer events or smaller blocks")
    own = store is None
    if own:
        if cfg is None or not cfg.storage_tiers:
            raise UsageError(f"{getattr(cfg, 'source', 'the config')}: real replay needs a storage tier")
        store = TieredStore(cfg, hugepages=False).open()
    try:
        replay = _RealReplay(store, trace, tiers, policy, placement)
        try:
            replay.lay_out()
            return replay.run(progress)
        finally:
            replay.close()
    finally:
        if own:
            store.close()


def host_share(obj_sizes: list[int], fast_capacity: int) -> int:
    """The host bytes the replay reserves: the fast tier's capacity as the store's page-aligned
    copies take it (512-byte objects take a page each), plus room for the access buffer, the
    object just read from the backing tier and write-backs in flight."""
    big = max(obj_sizes, default=4096)
    blowup = max((align_up(max(1, s)) / max(1, s) for s in obj_sizes), default=1.0)
    return int(fast_capacity * blowup) + 4 * align_up(big) + (8 << 20)


class _RealReplay:
    """One replay's objects in the store and what the fast tier holds of them."""

    def __init__(self, store, trace: Prepared, tiers, policy: MigrationPolicy, placement: PlacementPolicy) -> None:
        self.store, self.trace, self.tiers = store, trace, tiers
        self.policy, self.placement = policy, placement
        self.names = (tiers[0].name, tiers[1].name)
        self.cap0 = int(tiers[0].capacity)
        self.sizes = trace.obj_size.tolist()  # as the policy and the simulator count them
        self.osz = [max(1, s) for s in self.sizes]  # as stored (an object holds at least one byte)
        self.backing = store.config.storage_tiers[-1].name
        self.prefix = f"replay/{os.getpid()}-{uuid.uuid4().hex[:8]}/"
        share = host_share(self.osz, self.cap0)
        host_cap = store.stats()["tiers"]["host"]["capacity"]
        if share > host_cap:
            raise UsageError(f"real replay: a fast tier of {format_size(self.cap0)} needs {format_size(share)} of the "
                             f"store's host tier, which holds {format_size(host_cap)}; lower --fast-fraction "
                             "or raise tiers.host.capacity")
        self.res = store.reserve("host", share, owner=REPLAY_OWNER)
        try:
            self.scratch = self.res.alloc(max(self.osz, default=4096))
        except BaseException:
            self.res.close()
            raise
        self.clean: dict[int, Any] = {}  # key -> future of a Lease, or the Lease: a clean fast-tier copy
        self.dirty: dict[int, Any] = {}  # key -> HostBuffer written on the fast tier, not yet written back
        self.writebacks: list = []  # futures of put_buffer write-backs
        self.just_read: int | None = None  # backing-tier object still cached after the access that read it

    def key(self, k: int) -> str:
        return f"{self.prefix}{k}"

    # -- setup and teardown -------------------------------------------------------------------
    def lay_out(self) -> None:
        """Put every object on the backing tier (ephemeral: nothing outlives the replay)."""
        limit = max(max(self.osz, default=0), self.res.reserved // 2)
        pending, held = [], 0
        for k, n in enumerate(self.osz):
            if held + n > limit:
                _wait_all(pending)
                pending, held = [], 0
            buf = self.res.alloc(n, WAIT)
            buf.array[:] = 0x5A
            pending.append(self.store.put_buffer(
                self.key(k), buf, torch.uint8, (n,), tier=self.backing, give=True, cache=False, sync=False,
                commit=False, ephemeral=True, owner=REPLAY_OWNER))
            held += n
        _wait_all(pending)
        self.store.commit()

    def close(self) -> None:
        errors = []
        for fut in self.writebacks:
            try:
                fut.result(timeout=WAIT)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the cleanup
                errors.append(e)
        for entry in self.clean.values():
            try:
                _lease(entry).release()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        for buf in self.dirty.values():
            buf.release()
        self.clean.clear()
        self.dirty.clear()
        self.scratch.release()
        self.store.delete_prefix(self.prefix)
        self.res.close()
        if errors:
            raise errors[0]

    # -- the loop -----------------------------------------------------------------------------
    def run(self, progress) -> SimResult:
        t, policy = self.trace, self.policy
        n, nkeys = t.n, t.n_keys
        self.kl, self.sl, self.opl = t.key.tolist(), t.size.tolist(), t.op.tolist()
        kindl, prevl, cntl, tl = t.kind.tolist(), t.prev.tolist(), t.count.tolist(), t.time.tolist()
        policy.reset(self.tiers)
        future = bool(policy.needs_future)
        if future:
            policy.prepare_future(t.key)
        nextl = t.next.tolist() if future else None
        self.tier_of = [-1] * nkeys
        self.used0 = self.peak0 = self.migrated = self.moves_n = 0
        lats, served = np.zeros(n), np.zeros(n, dtype=np.int8)
        decisions, pending = 0, []
        batch_size = max(1, int(policy.batch))
        inf, names = math.inf, self.names
        plans = t.plans
        next_plan, plan_at = 0, (plans[0][0] if plans else -1)  # declared plans, as the simulator delivers them
        t_start = time.perf_counter()
        for i in range(n):
            if i == plan_at:
                next_plan, plan_at = deliver_plans(policy, plans, next_plan, i)
            k = self.kl[i]
            t0 = time.perf_counter()
            filled = self.tier_of[k] < 0 and self._place(i, k, kindl[i], tl[i])
            from_tier = self._access(i, k)
            served[i] = 1 if filled else from_tier
            lats[i] = time.perf_counter() - t0
            src, p = self.tier_of[k], prevl[i]
            pending.append(Observation(k, self.osz_model(k), KINDS[kindl[i]], OPS[self.opl[i]], names[src], tl[i], i,
                                       cntl[i], (tl[i] - tl[p]) if p >= 0 else inf, (i - p) if p >= 0 else inf, src,
                                       self._occupancy(), nextl[i] if future else inf))
            if len(pending) < batch_size and i != n - 1 and plan_at != i + 1:
                self._forget_just_read()
                continue
            batch_bytes = self._apply(policy.decide(pending), i)
            decisions += 1
            self.migrated += batch_bytes
            if policy.learns:
                m = len(pending)
                policy.observe([Outcome(o, float(lats[o.index]), int(served[o.index]), batch_bytes if j == m - 1 else 0)
                                for j, o in enumerate(pending)])
            pending = []
            batch_size = max(1, int(policy.batch))  # a policy may adapt its batch (as sim re-reads it)
            self._reap()
            if progress is not None and (i + 1) % 4096 == 0:
                progress(i + 1, n)
        for k in list(self.clean):  # promotions still reading, and write-backs, count in the time
            self.clean[k] = _lease(self.clean[k])
        _wait_all(self.writebacks)
        self.writebacks = []
        wall = time.perf_counter() - t_start
        if progress is not None:
            progress(n, n)
        return SimResult(policy=policy.name or type(policy).__name__, tier_names=names, latency_s=lats,
                         served=served, bytes_migrated=int(self.migrated), migrations=self.moves_n,
                         total_time_s=wall, wall_s=wall, decisions=decisions, peak_used=(self.peak0, 0))

    def osz_model(self, k: int) -> int:
        """The object's size as the policy and the simulator count it."""
        return self.sizes[k]

    def _occupancy(self) -> tuple[float, float]:
        return (self.used0 / self.cap0 if self.cap0 else 1.0, 0.0)

    # -- first sight of an object: the placement policy picks its tier ------------------------
    def _place(self, i: int, k: int, kind: int, t: float) -> bool:
        """Put a new object on the tier the placement policy names; True when that took a fill read."""
        names, cap0 = self.names, self.cap0
        pobs = Observation(k, self.osz_model(k), KINDS[kind], OPS[self.opl[i]], None, t, i, 1, math.inf, math.inf,
                           -1, self._occupancy())
        name = self.placement.place(pobs, [(names[0], cap0, cap0 - self.used0), (names[1], math.inf, math.inf)])
        if name not in names:
            raise PolicyError(f"placement {self.placement.name!r} named tier {name!r}; tiers: {names}")
        self.tier_of[k] = names.index(name)
        if self.tier_of[k] == 0:
            if self.used0 + self.osz_model(k) > cap0:
                raise PolicyError(f"placement {self.placement.name!r} put key {k} on full tier {names[0]!r}")
            self._charge(k)
            if self.opl[i]:  # written before it was ever read: room on the fast tier, nothing to read
                self.dirty[k] = self.res.alloc(self.osz[k], WAIT)
                return False
            # its bytes come from the backing tier: a fill, counted as a migration
            self.clean[k] = self.store.acquire(self.key(k), owner=REPLAY_OWNER)
            self.migrated += self.osz_model(k)
            self.moves_n += 1
            return True
        return False

    def _charge(self, k: int) -> None:
        self.used0 += self.osz_model(k)
        self.peak0 = max(self.peak0, self.used0)

    # -- one access -----------------------------------------------------------------------------
    def _access(self, i: int, k: int) -> int:
        """Serve access ``i``; the tier that served it."""
        n, scratch = self.sl[i], self.scratch.array
        if self.tier_of[k] == 1:
            self._backing_access(i, k)
            return 1
        if k in self.dirty:
            buf = self.dirty[k].array
            if self.opl[i]:
                buf[:n] = scratch[:n]
            else:
                scratch[:n] = buf[:n]
        else:
            lease = self.clean[k] = _lease(self.clean[k])
            if self.opl[i]:  # the written bytes stay on the fast tier until the object is demoted
                buf = self.dirty[k] = lease.detach()
                del self.clean[k]
                buf.array[:n] = scratch[:n]
            else:
                scratch[:n] = lease.tensor.numpy()[:n]
        return 0

    def _backing_access(self, i: int, k: int) -> None:
        n, scratch = self.sl[i], self.scratch.array
        if self.opl[i]:
            buf = self.res.alloc(self.osz[k], WAIT)
            buf.array[:] = scratch[: self.osz[k]]
            self.store.put_buffer(self.key(k), buf, torch.uint8, (self.osz[k],), tier=self.backing, give=True,
                                  cache=True, sync=False, priority=Priority.DEMAND, ephemeral=True,
                                  owner=REPLAY_OWNER).result(timeout=WAIT)
        else:
            lease = self.store.acquire(self.key(k), owner=REPLAY_OWNER).result(timeout=WAIT)
            try:
                scratch[:n] = lease.tensor.numpy()[:n]
            finally:
                lease.release()
        self.just_read = k

    def _forget_just_read(self) -> None:
        """Evict the cached copy a backing-tier access left, unless the object was promoted since."""
        k, self.just_read = self.just_read, None
        if k is not None and self.tier_of[k] == 1:
            self.store.evict(self.key(k))

    # -- the policy's moves ---------------------------------------------------------------------
    def _apply(self, moves, i: int) -> int:
        """Carry out one decision's moves; the bytes they migrate."""
        batch_bytes = 0
        nkeys, names = self.trace.n_keys, self.names
        for key, dst in moves:
            key, dst = int(key), int(dst)
            if not 0 <= key < nkeys or self.tier_of[key] < 0:
                raise PolicyError(f"policy {self.policy.name!r}: move names unknown object {key!r}")
            if dst not in (0, 1):
                raise PolicyError(f"policy {self.policy.name!r}: move to tier {dst}; real mode has tiers 0..1 {names}")
            if self.tier_of[key] == dst:
                continue
            batch_bytes += self._promote(key) if dst == 0 else self._demote(key)
            self.tier_of[key] = dst
            self.moves_n += 1
        self._forget_just_read()
        return batch_bytes

    def _promote(self, key: int) -> int:
        if self.used0 + self.osz_model(key) > self.cap0:
            raise PolicyError(f"policy {self.policy.name!r}: moving key {key} to {self.names[0]!r} would exceed "
                              "its capacity")
        self._charge(key)
        # the object just read is still cached: its lease costs no read (a fill on miss)
        self.clean[key] = self.store.acquire(self.key(key), priority=Priority.PREFETCH, owner=REPLAY_OWNER)
        return self.osz_model(key)

    def _demote(self, key: int) -> int:
        self.used0 -= self.osz_model(key)
        buf = self.dirty.pop(key, None)
        if buf is None:
            _lease(self.clean.pop(key)).release()
            self.store.evict(self.key(key))
            return 0
        self.writebacks.append(self.store.put_buffer(
            self.key(key), buf, torch.uint8, (self.osz[key],), tier=self.backing, give=True, cache=False,
            sync=False, priority=Priority.WRITEBACK, ephemeral=True, owner=REPLAY_OWNER))
        return self.osz_model(key)

    def _reap(self) -> None:
        keep = []
        for fut in self.writebacks:
            if fut.done():
                fut.result(timeout=0)
            else:
                keep.append(fut)
        self.writebacks = keep


def _lease(entry):
    """The Lease of a fast-tier entry, waiting for its promotion read if it is still a future."""
    return entry.result(timeout=WAIT) if hasattr(entry, "result") else entry


def _wait_all(futures) -> None:
    for f in futures:
        f.result(timeout=WAIT)
