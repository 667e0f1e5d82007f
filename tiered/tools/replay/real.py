"""Real-mode replay: the trace through a live :class:`~tiered.store.TieredStore` and its governor.

The replay opens a store of its own with two storage tiers, each a directory: the fast tier
(``fast``, the modeled fast tier's capacity, rounded down to whole 4 KiB extents) on the config's
fastest storage tier, and the backing tier (``backing``, room for the whole footprint) on its
slowest. ``[policy] migration`` names the replayed policy, so the store's governor, not the
replay, decides every move and carries it out (``TieredStore.migrate``); the replay only
accesses objects, as any workload does:

* an object is created on first sight (an ephemeral put, owner ``replay``, whose latency is the
  access's) on the tier the placement policy names (the policy itself when it is a
  PlacementPolicy, as in sim mode: a second instance of it, the governor holds its own). A
  first read placed on the fast tier is a fill: it counts as served by the backing tier and
  as a migration, as in sim mode;
* a read reads the whole object from its storage tier and checks its bytes against the last
  write; its host copy is evicted once the governor has decided on the read (a move of the
  object reads no storage again, as the simulator's fill on miss), so the next read reaches
  storage again;
* a write puts the whole object again, on the tier it is on. A new version needs room beside
  the old one (the store never overwrites in place); on a full fast tier the old version is
  moved down first (the replay's own ``migrate``, not a policy decision: ``rewrite_moves``).

Closed loop, synchronous with the governor: one access at a time, and after each batch of
accesses (the policy's ``batch``) ``store.sync_governor()`` waits until the governor has decided
on them and carried its moves out. So the policy sees the accesses in the simulator's order and
every access is served where the simulator would serve it. Latency per access is wall-clock;
the governor's moves run between accesses (unpaced), so they delay none.

The figures are the store's: the tier an access is served from is the object's tier in the
store's metadata before the access; bytes migrated and migrations are ``stats()["governor"]``'s
(plus fills). The store keeps one copy per object, so a demotion always moves its bytes, where
the simulator's backing tier keeps a copy of every object and a clean demotion is free:
``extra["clean_demotions"]`` (and ``clean_demoted_bytes``) count the difference. Objects count
as the 4 KiB extents they take. Whatever the replay stored is gone when it returns.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tiered.allocators import align_up
from tiered.policies import KINDS, OPS, Backing, MigrationPolicy, Observation, PlacementPolicy, PolicyError, \
    TierModel, create_policy
from tiered.policies.sim import Prepared, SimResult

from ...config import NOT_LIVE, Config
from ...sizes import format_size
from .. import REPLAY_OWNER
from ..args import UsageError

WAIT = 600.0  # seconds one store operation may take before the replay calls it stuck
FAST, BACKING = "fast", "backing"  # the replay store's storage tiers, fastest first
UNPACED = 1 << 50  # bytes/s for the governor's moves: the replay waits for them between accesses


class ReplayDataError(RuntimeError):
    """A read returned bytes other than the object's last write."""


def check_live(name: str, policy: MigrationPolicy | None = None) -> None:
    """A one-line UsageError for a policy a live store cannot run (it needs the future, or learns
    from latencies the governor does not report)."""
    why = NOT_LIVE.get(name)
    if why is None and policy is not None:
        if policy.needs_future:
            why = "it needs the future of the accesses, which a live store does not know"
        elif policy.learns:
            why = "it learns from access latencies, which the live governor does not report"
    if why is not None:
        raise UsageError(f"policy {name!r} runs in --mode sim only: {why}")


def run_real(trace: Prepared, tiers: Sequence[TierModel], policy: str, cfg: Config | None, *,
             progress: Callable[[int, int], None] | None = None, max_footprint: int = 4 << 30,
             workdir: str | os.PathLike | None = None) -> SimResult:
    """Replay ``trace`` with real I/O through a store whose governor runs ``policy`` (a policy
    name: the store builds the policy by name). Two tiers: the first of ``tiers`` and the last.

    The store's directories are ``workdir``/fast and ``workdir``/backing when given (kept,
    emptied), else new directories under the config's storage tiers, removed afterwards.
    """
    if not isinstance(policy, str):
        raise TypeError(f"run_real: expected a policy name (the store's governor builds the policy by name), "
                        f"got {type(policy).__name__}")
    check_live(policy)
    placer = create_policy(policy)
    try:
        check_live(policy, placer)
        placement = placer if isinstance(placer, PlacementPolicy) else Backing()
        sizes = [max(1, s) for s in trace.obj_size.tolist()]
        total = sum(align_up(s) for s in sizes)
        if total > max_footprint:
            raise UsageError(f"trace footprint {format_size(total)} exceeds the real-mode limit "
                             f"{format_size(max_footprint)}; replay fewer events or smaller blocks")
        fast_cap = _fast_capacity(tiers[0])
        placer.reset((TierModel(tiers[0].name, fast_cap), TierModel(tiers[-1].name, math.inf)))  # as the governor's
        dirs, made = _directories(cfg, tiers, workdir)
        try:
            store_cfg = _store_config(cfg, tiers, dirs, policy, placer.batch, fast_cap, sizes)
            return _replay_in_store(store_cfg, trace, tiers, placer, placement, sizes, progress)
        finally:
            _remove(made)
    finally:
        placer.close()


def _replay_in_store(store_cfg: dict, trace: Prepared, tiers, placer, placement, sizes, progress) -> SimResult:
    from ...store import TieredStore

    store = TieredStore(store_cfg, hugepages=False, cache_on_put=False).open()
    try:
        names = (tiers[0].name, tiers[-1].name)
        replay = _RealReplay(store, trace, names, placement, sizes)
        return replay.run(placer.name or type(placer).__name__, max(1, int(placer.batch)), progress)
    finally:
        store.close()  # deletes the replay's (ephemeral) objects


def _fast_capacity(tier: TierModel) -> int:
    cap = int(tier.capacity) // 4096 * 4096 if math.isfinite(tier.capacity) else 0
    if cap < 4096:
        raise UsageError(f"real replay: the fast tier {tier.name!r} of {tier.capacity:.0f} bytes holds no 4 KiB "
                         "extent; raise --fast-fraction")
    return cap


def _storage_spec(cfg: Config, name: str, fastest: bool):
    """The config's storage tier named ``name``, else its fastest (or slowest) storage tier."""
    storage = cfg.storage_tiers
    return next((t for t in storage if t.name == name), storage[0] if fastest else storage[-1])


def _directories(cfg: Config | None, tiers, workdir) -> tuple[tuple[Path, Path], list[Path]]:
    """(fast, backing) directories, and the ones made here that the replay removes after."""
    if workdir is not None:
        dirs = (Path(workdir) / FAST, Path(workdir) / BACKING)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        return dirs, []
    if cfg is None or not cfg.storage_tiers:
        raise UsageError(f"{getattr(cfg, 'source', 'the config')}: real replay needs a storage tier")
    tag = f".replay-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bases = (_storage_spec(cfg, tiers[0].name, True).path / tag, _storage_spec(cfg, tiers[-1].name, False).path / tag)
    made = list(dict.fromkeys(bases))
    dirs = (bases[0] / FAST, bases[1] / BACKING)
    try:
        for d in dirs:
            d.mkdir(parents=True)
    except BaseException:
        _remove(made)
        raise
    return dirs, made


def _remove(made: list[Path]) -> None:
    for d in made:
        if d.exists():
            shutil.rmtree(d)


def _store_config(cfg: Config | None, tiers, dirs, policy: str, batch: int, fast_cap: int, sizes) -> dict:
    """The replay store: a host tier for its copies, the fast and the backing storage tiers (the
    config's bandwidth throttles), the config's engine, the governor running ``policy``."""
    big = align_up(max(sizes, default=1))
    total = sum(align_up(s) for s in sizes)
    backing = align_up(total + max(total // 4, 16 * big) + (1 << 20))  # room for rewrites' new versions
    fast_tier = {"path": str(dirs[0]), "capacity": fast_cap}
    back_tier = {"path": str(dirs[1]), "capacity": backing}
    out: dict = {"tiers": {"host": {"capacity": 4 * big + (32 << 20)}, FAST: fast_tier, BACKING: back_tier},
                 "policy": {"migration": policy, "migration_bandwidth": UNPACED,
                            "migration_batch": min(max(1, int(batch)), 1 << 16)}}
    if cfg is not None:
        for spec_tier, name in ((fast_tier, tiers[0].name), (back_tier, tiers[-1].name)):
            if cfg.storage_tiers:
                spec = _storage_spec(cfg, name, spec_tier is fast_tier)
                spec_tier.update({k: v for k, v in (("read_bandwidth", spec.read_bandwidth),
                                                    ("write_bandwidth", spec.write_bandwidth)) if v})
        e = cfg.engine
        out["engine"] = {"backend": e.backend, "workers": e.workers, "queue_depth": e.queue_depth,
                         "chunk": e.chunk, "direct": e.direct}
    return out


class _RealReplay:
    """One replay's accesses to the store, and the figures the rows are built from."""

    def __init__(self, store, trace: Prepared, names: tuple[str, str], placement: PlacementPolicy,
                 sizes: list[int]) -> None:
        self.store, self.trace, self.names, self.placement = store, trace, names, placement
        self.sizes = sizes  # bytes each object holds in the store
        self.version = [-1] * trace.n_keys  # access index of each object's last write: its bytes
        self.dirty = bytearray(trace.n_keys)  # written on the fast tier since it arrived there
        self.fast_cap = store.stats()["tiers"][FAST]["capacity"]
        self.moves: list[tuple[str, str]] = []  # (key, destination) of the governor's moves
        self.read_since_sync: list[str] = []  # their host copies go after the governor's decision
        self._own_move = False  # the replay's own migrate (a rewrite on a full tier) is no decision
        self.figures = dict.fromkeys(("fills", "fill_bytes", "promotions", "demotions", "clean_demotions",
                                      "clean_demoted_bytes", "rewrite_moves", "displaced_writes",
                                      "placed_below", "verified_reads", "host_copies_read"), 0)
        from ...store.errors import StoreError, TierFullError

        self._tier_full, self._store_error = TierFullError, StoreError
        store.add_listener(self._on_event)

    @staticmethod
    def key(k: int) -> str:
        return f"replay/{k}"

    def _on_event(self, ev) -> None:
        if ev.op == "migrate" and not self._own_move:
            self.moves.append((ev.key, ev.tier))

    # -- the loop -----------------------------------------------------------------------------
    def run(self, name: str, batch: int, progress) -> SimResult:
        t = self.trace
        n = t.n
        kl, opl, kindl, tl = t.key.tolist(), t.op.tolist(), t.kind.tolist(), t.time.tolist()
        lats, served = np.zeros(n), np.zeros(n, dtype=np.int8)
        decisions = 0
        plans, next_plan = t.plans, 0  # declared plans reach the governor as the store's plans
        t_start = time.perf_counter()
        for i in range(n):
            while next_plan < len(plans) and plans[next_plan][0] <= i:
                _at, owner, keys = plans[next_plan]
                self.store.plan([self.key(k) for k in keys], owner=f"replay/{owner}")
                self.placement.plan(f"replay/{owner}", keys)  # the copy that places new objects
                next_plan += 1
            served[i], lats[i] = self._access(i, kl[i], opl[i], kindl[i], tl[i])
            if (i + 1) % batch and i != n - 1:
                continue
            self._sync()
            decisions += 1
            if progress is not None and (i + 1) % 4096 == 0:
                progress(i + 1, n)
        wall = time.perf_counter() - t_start
        if progress is not None:
            progress(n, n)
        return self._result(name, lats, served, decisions, wall)

    def _sync(self) -> None:
        """Wait for the governor's decisions on the accesses so far; account for its moves."""
        if not self.store.sync_governor(WAIT):
            g = self.store.stats()["governor"]
            if g["stopped"]:
                raise PolicyError(f"the store's governor stopped: {g['stopped']}")
            raise TimeoutError(f"the store's governor did not decide within {WAIT:.0f} s ({g['queued']} queued)")
        for key in self.read_since_sync:  # kept until now: a move of it reads no storage again
            self.store.evict(key)
        self.read_since_sync = []
        moves, self.moves = self.moves, []
        f = self.figures
        for key, dst in moves:
            k = int(key.rsplit("/", 1)[1])
            if dst == FAST:
                f["promotions"] += 1
                continue
            f["demotions"] += 1
            if self.dirty[k]:
                self.dirty[k] = 0
            else:  # the simulator's backing tier holds a copy: this move is free there
                f["clean_demotions"] += 1
                f["clean_demoted_bytes"] += self.sizes[k]

    def _result(self, name: str, lats, served, decisions: int, wall: float) -> SimResult:
        stats = self.store.stats()
        g, f = stats["governor"], self.figures
        if g["failed"]:
            raise self._store_error(f"the store's governor failed {g['failed']} move(s): {g['last_error']}")
        owned = self.store.owners().get(REPLAY_OWNER, {})
        extra = {**f, "governor": g, "refused": sum(v for k, v in g.items() if k.startswith("refused_"))}
        return SimResult(policy=name, tier_names=self.names, latency_s=lats, served=served,
                         bytes_migrated=int(sum(g["bytes_migrated"].values()) + f["fill_bytes"]),
                         migrations=int(g["migrations"] + f["fills"]), total_time_s=wall, wall_s=wall,
                         decisions=decisions,
                         peak_used=tuple(owned.get(t, {}).get("peak", 0) for t in (FAST, BACKING)), extra=extra)

    # -- one access -----------------------------------------------------------------------------
    def _access(self, i: int, k: int, op: int, kind: int, t: float) -> tuple[int, float]:
        """Serve access ``i``: (the tier that served it, seconds it took)."""
        if self.version[k] < 0:
            return self._create(i, k, op, kind, t)
        key = self.key(k)
        meta = self.store.meta(key)  # where the store says it is, before the access
        if meta["in_host"] and not self.store.evict(key):  # the copy a read of this batch left
            self.figures["host_copies_read"] += 1  # pinned by a move of the governor's
        t0 = time.perf_counter()
        if op:
            landed = self._write(i, k, kind, meta["tier"])
            took = time.perf_counter() - t0
            self.dirty[k] = landed == FAST
        else:
            got = self.store.get(key, owner=REPLAY_OWNER).result(timeout=WAIT)
            took = time.perf_counter() - t0
            self.read_since_sync.append(key)
            self._verify(i, k, got.numpy())
        return (0 if meta["tier"] == FAST else 1), took

    def _create(self, i: int, k: int, op: int, kind: int, t: float) -> tuple[int, float]:
        """First sight: put the object on the tier the placement policy names."""
        tier = self._place(i, k, op, kind, t)
        t0 = time.perf_counter()
        if tier == FAST and not self._put_if_room(i, k, kind):  # room in bytes, but in no one piece
            tier = BACKING
            self.figures["placed_below"] += 1
        if tier == BACKING:
            self._put(i, k, kind, BACKING)
        took = time.perf_counter() - t0
        if tier == FAST and not op:  # its bytes came from the backing tier: a fill, as in sim mode
            self.figures["fills"] += 1
            self.figures["fill_bytes"] += self.sizes[k]
            return 1, took
        self.dirty[k] = op == 1 and tier == FAST
        return (0 if tier == FAST else 1), took

    def _place(self, i: int, k: int, op: int, kind: int, t: float) -> str:
        used = self.store.stats()["tiers"][FAST]["used"]
        size = align_up(self.sizes[k])
        pobs = Observation(k, size, KINDS[kind], OPS[op], None, t, i, 1, math.inf, math.inf, -1,
                           (used / self.fast_cap, 0.0))
        name = self.placement.place(pobs, [(self.names[0], self.fast_cap, self.fast_cap - used),
                                           (self.names[1], math.inf, math.inf)])
        if name not in self.names:
            raise PolicyError(f"placement {self.placement.name!r} named tier {name!r}; tiers: {self.names}")
        if name == self.names[0] and used + size > self.fast_cap:
            raise PolicyError(f"placement {self.placement.name!r} put key {k} ({size} bytes) on full tier {name!r}")
        return FAST if name == self.names[0] else BACKING

    def _write(self, i: int, k: int, kind: int, tier: str) -> str:
        """A new version on the object's tier; on a full fast tier the old version moves down
        first (the new one needs room beside it until it is committed). The tier it landed on."""
        if tier != FAST:
            self._put(i, k, kind, tier)
            return tier
        if self._put_if_room(i, k, kind):
            return FAST
        self._own_move = True
        try:
            self.store.migrate(self.key(k), BACKING).result(timeout=WAIT)
        finally:
            self._own_move = False
        self.store.evict(self.key(k))
        self.figures["rewrite_moves"] += 1
        if self._put_if_room(i, k, kind):
            return FAST
        self.figures["displaced_writes"] += 1  # room in bytes, but in no one piece: it stays below
        self._put(i, k, kind, BACKING)
        return BACKING

    def _put(self, i: int, k: int, kind: int, tier: str) -> None:
        self.store.put(self.key(k), torch.from_numpy(_content(k, i, self.sizes[k])), kind=KINDS[kind], tier=tier,
                       ephemeral=True, owner=REPLAY_OWNER, placed=False).result(timeout=WAIT)  # the policy's to move
        self.version[k] = i

    def _put_if_room(self, i: int, k: int, kind: int) -> bool:
        """Put on the fast tier; False (nothing written) when it has no free extent for it."""
        try:
            self._put(i, k, kind, FAST)
        except self._tier_full:  # refused before anything was written
            return False
        return True

    def _verify(self, i: int, k: int, got: np.ndarray) -> None:
        if not np.array_equal(got, _content(k, self.version[k], self.sizes[k])):
            head = got[:16].view(np.int64).tolist() if got.size >= 16 else got.tolist()
            raise ReplayDataError(f"access {i}: object {self.key(k)} read back other bytes than its last write "
                                  f"(access {self.version[k]}); it starts {head}")
        self.figures["verified_reads"] += 1


def _content(k: int, version: int, n: int) -> np.ndarray:
    """The bytes of object ``k`` written at access ``version``: key and version, then a fill."""
    out = np.full(n, (k * 131 + version * 7) % 251 + 1, dtype=np.uint8)
    if n >= 16:
        out[:16] = np.array([k, version], dtype=np.int64).view(np.uint8)
    return out

