"""The tiered object store: named tensors with a durable home and cached copies.

Call order: ``TieredStore(config)`` -> ``open()`` (maps the host arena,
starts the engine, reads the manifest, locks the directory) -> ``put`` /
``get`` / ``acquire`` / ``prefetch`` / ``evict`` / ``migrate`` / ``delete``
from any threads -> ``close()``.

Layout: each storage tier is one directory holding one data file
(``objects.dat``) carved into 4 KiB-aligned extents; the first storage
tier also holds ``manifest.json`` (key -> dtype, shape, tier, offset,
crc32, version). The host tier is the arena: cached copies of objects,
evicted by the placement policy when space is needed.

Invariants (from the design):
- a put is acknowledged only after its bytes are durable (O_DIRECT write +
  fdatasync) and the manifest naming them is committed;
- a new version is written to a new extent; the old extent is freed only
  after the manifest no longer names it and no reader holds it, so a crash
  at any point leaves the last committed state readable;
- every read is verified against the crc32 recorded at write time;
- budgets are hard: the host arena and each storage tier's capacity (an object larger than
  the host tier is put and read through it in pieces: ``stream``);
- a process's ephemeral objects are deleted by its ``close()``, or after a crash by the next
  ``open()``.

The class is assembled from parts, one job each: ``host`` (the host tier's cached copies),
``writes`` (puts), ``reads`` (loads, leases, external objects), ``manifest`` (loading and
group commit), ``retention`` (versions kept for checkpoints); helpers: ``registry`` (one open
store per directory per process, ``shared()``), ``check`` (a missing manifest,
``check()``/repair), ``stream`` (objects larger than the host tier).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from tiered.allocators import HostArena
from tiered.io_engine import Backend, IOEngine, IOFuture, Priority
from tiered.policies import FirstFit, create_eviction_policy, create_policy
from tiered.traces import AccessEvent

from ..atomic import remove_stale_temps
from ..config import Config, load_config
from . import check as store_check, registry as store_registry
from .errors import StoreError
from .governor import Governor
from .plans import Plans
from .objects import DEFAULT_OWNER, LOCK_FILE, Extent, ObjectMeta, StoreCounters
from .extents import _StorageTier
from .device import _DeviceTier
from .host import _HostTier
from .owners import _Owners
from .ranges import _Ranges
from .manifest import _Manifest
from .reads import _Reads
from .retention import _Retention
from .writes import _Writes

log = logging.getLogger("tiered.store")


class TieredStore(_HostTier, _DeviceTier, _Owners, _Writes, _Reads, _Ranges, _Manifest, _Retention):
    """See the module docstring."""

    def __init__(
        self,
        config: Config | str | os.PathLike | dict | None = None,
        *,
        host_wait: float = 30.0,
        cache_on_put: bool = True,
        hugepages: bool = True,
        backend: str | Backend | None = None,
    ) -> None:
        """``backend`` overrides ``[engine] backend`` (a name, or a Backend instance such as
        ``io_engine.testing.FaultyBackend`` for fault-injection tests)."""
        self.config = load_config(config)
        if not self.config.storage_tiers:
            raise StoreError(f"{self.config.source}: the store needs at least one storage tier")
        self.host_wait = host_wait
        self.cache_on_put = cache_on_put
        self._hugepages = hugepages
        self._backend = backend if backend is not None else self.config.engine.backend
        self._lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self._listeners: list[Callable[[AccessEvent], None]] = []
        self._tier_order = [t.name for t in self.config.storage_tiers]
        self.placement = FirstFit()
        self.arena: HostArena | None = None
        self._device_tier = next(iter(self.config.device_tiers), None)
        self._device_region = None  # the GPU tier's DeviceArena, reserved on first use
        self.engine: IOEngine | None = None
        self._governor: Governor | None = None  # started by open() when [policy] migration names a policy
        self._opened = False
        self._shared_users = 0  # >0: a TieredStore.shared() store, closed by its last user
        self._shared_kwargs: dict = {}
        self._closing = False  # the last user of a shared store is closing it
        self._closed_event = threading.Event()
        self._lock_fds: list[int] = []
        self._pid: int | None = None  # the process that opened it (a fork child must not use it)
        self._reset_state()

    def _reset_state(self) -> None:
        self._objects: dict[str, ObjectMeta] = {}
        self._tiers = {t.name: _StorageTier(t) for t in self.config.storage_tiers}
        self._gen = 0
        self._committed_gen = 0
        self._retired: list[Extent] = []
        self._issued: dict[str, int] = {}  # key -> newest version handed to a put or delete
        self._puts_in_flight: dict[str, int] = {}  # key -> puts called whose future is not done
        self._tombstones: dict[str, int] = {}  # key -> version of its latest delete
        self._retained: dict[str, list[tuple[dict, Extent]]] = {}  # tag -> extents kept for it (checkpoints)
        self._unsynced: set[str] = set()  # tiers written by sync=False puts since their last fdatasync
        self._start_empty = False
        self._check_layout = True
        self.recovered: dict = {}  # what open() cleaned up after a crash (see check())
        self.counters = StoreCounters()
        self.host_policy = create_eviction_policy(self.config.policy.eviction)
        self._plans = Plans()
        self._init_owners()

    # -- lifecycle -----------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self._tiers[self._tier_order[0]].path

    @classmethod
    def shared(cls, config: Config | str | os.PathLike | dict | None = None, *, check_layout: bool = True,
               **kwargs) -> "TieredStore":
        """This process's open store for ``config``'s directories, or a newly opened one.

        For clients of one process that each need the store (a directory can be open only once):
        every caller calls ``close()`` once; the store closes when the last one does. A different
        config (tiers, engine, policy or ``kwargs``) for a store open here is a StoreError naming the
        differing settings; so is a store of the directory opened here with plain ``open()``.
        ``check_layout``: as in :meth:`open`, for a store opened here.
        """
        return store_registry.shared_store(cls, config, kwargs, check_layout=check_layout)

    def open(self, *, start_empty: bool = False, check_layout: bool = True) -> "TieredStore":
        """``start_empty``: where the manifest is missing but a data file holds bytes (the store's
        objects cannot be found), start an empty store instead of refusing to open; the data
        file's blocks are given back by :meth:`check` with ``repair=True``. ``check_layout=False``:
        open a per-rank shard that another rank or world size wrote (a checkpoint reader of another
        world size using it as scratch), leaving the layout recorded in it unchanged."""
        if self._opened:
            return self
        self._check_machine()
        self._reset_state()
        self._start_empty = start_empty
        self._check_layout = check_layout
        self._closing = False
        self._closed_event.clear()
        self._lock_fds = store_registry.lock_directories(self, LOCK_FILE)
        self._pid = os.getpid()
        try:
            store_check.check_tier_markers(self)
            created = []
            for tier in self._tiers.values():
                remove_stale_temps(tier.path)
                if not os.path.exists(tier.data_file):
                    Path(tier.data_file).touch(mode=0o600)
                    created.append(tier.data_file)
            try:
                self._load_manifest()
                store_check.check_data_files(self, created)
            except BaseException:
                for path in created:
                    os.unlink(path)
                raise
            store_check.write_tier_markers(self)
            host = self.config.host_tier
            capacity = host.capacity if host else 256 << 20
            self.arena = HostArena(capacity, hugepages=self._hugepages, name=f"tier {host.name if host else 'host'}").open()
            e = self.config.engine
            self.engine = IOEngine(self._backend, workers=e.workers, queue_depth=e.queue_depth,
                                   chunk=e.chunk, direct=e.direct).open()
            for tier in self._tiers.values():
                if tier.spec.read_bandwidth or tier.spec.write_bandwidth:
                    self.engine.set_bandwidth_limit(tier.path, tier.spec.read_bandwidth, tier.spec.write_bandwidth)
            self._start_governor()
        except BaseException:
            self._release_resources()
            raise
        self._opened = True
        return self

    def _start_governor(self) -> None:
        """The governor runs wherever it has a choice to make: ``[policy] migration`` is not
        "none" and there are two or more storage tiers to move objects between."""
        p = self.config.policy
        if p.migration == "none" or len(self._tier_order) < 2:
            return
        policy = (create_policy("schedule", fallback=p.fallback) if p.migration in ("auto", "schedule")
                  else create_policy(p.migration))
        self._governor = Governor(self, policy, bandwidth=p.migration_bandwidth, batch=p.migration_batch)
        self._governor.start()

    def _check_machine(self) -> None:
        """A budget larger than the machine fails here, naming the key and the machine's figure
        (not later, as a bare ENOMEM from the arena or ENOSPC from a write)."""
        from ..config import machine_limits

        limits = machine_limits(self.config)
        if limits:
            raise StoreError("; ".join(msg for _key, msg in limits))

    def close(self) -> None:
        """Wait for in-flight work, delete the ephemeral objects, then release memory, threads and
        the lock. A shared store (see :meth:`shared`) closes when its last user closes it."""
        if not self._opened:
            return
        if self._pid != os.getpid():  # a fork child's copy: the parent's files are not its to change
            self._opened = False
            return
        if self._shared_users:
            store_registry.close_shared(self)
        else:
            self._close_now()

    def _close_now(self) -> None:
        self._stop_governor()
        self._opened = False
        try:
            if self.engine is not None:
                self.engine.close()  # in-flight puts land (and commit) first
            self._delete_ephemeral()
        finally:
            self._release_resources()

    def _delete_ephemeral(self) -> None:
        with self._lock:
            doomed = [m for m in self._objects.values() if m.ephemeral]
            gen = self._remove(doomed)
        if doomed:
            self._commit_through(gen)

    def _remove(self, doomed: list[ObjectMeta]) -> int:
        """Drop objects (under ``self._lock``) as :meth:`delete` does; the generation to commit."""
        for meta in doomed:
            self._tombstones[meta.key] = self._next_version(meta.key)
            del self._objects[meta.key]
            self._gen += 1
            self._unlink(meta)
        return self._gen

    def _sync_data_file(self, tier: str) -> None:
        if self.engine is not None and self.engine.is_open:
            self.engine.fsync(self._tiers[tier].data_file)
        else:  # closing: the engine has stopped
            fd = os.open(self._tiers[tier].data_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def _stop_governor(self) -> None:
        governor, self._governor = self._governor, None
        if governor is not None:
            governor.stop()

    def _release_resources(self) -> None:
        self._stop_governor()
        self._close_reservations()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        with self._lock:
            for meta in self._objects.values():
                meta.host = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self._device_region is not None:
            self._device_region.close()
            self._device_region = None
        if self._lock_fds:
            store_registry.unlock_directory(self, self._lock_fds)
            self._lock_fds = []
        self._closed_event.set()

    def __enter__(self) -> "TieredStore":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """Whether the store is open in this process (a fork child's inherited copy is not)."""
        return self._opened and self._pid == os.getpid()

    def _check_open(self) -> None:
        if not self._opened:
            raise StoreError("the store is not open: call open() or use it as a context manager")
        if self._pid != os.getpid():
            raise StoreError(f"the store at {self.root} was opened by process {self._pid}; a forked child "
                             "must open a store of its own (its I/O threads did not survive the fork)")

    # -- events --------------------------------------------------------------------
    def add_listener(self, fn: Callable[[AccessEvent], None]) -> None:
        """Call ``fn(event)`` on every access (recorders, learning policies).

        A listener that raises is logged and does not fail the access: a broken
        recorder must not break I/O.
        """
        self._listeners.append(fn)

    def _emit(self, key: str, nbytes: int, op: str, kind: str, tier: str | None) -> None:
        if op == "read":
            self._plans.advance(key)
        if self._listeners or self._governor is not None:
            self._deliver(AccessEvent(time.monotonic(), key, nbytes, op, kind, tier))

    def _deliver(self, ev: AccessEvent) -> None:
        governor = self._governor
        if governor is not None:
            governor.offer(ev)
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:  # noqa: BLE001 - logged, see add_listener
                log.exception("store listener %r failed on %s", fn, ev)

    def _governor_idle(self) -> dict:
        """What ``stats()`` says of a store whose governor does not run, and why."""
        why = ("[policy] migration = \"none\"" if self.config.policy.migration == "none"
               else "one storage tier: there is no other tier to move objects to" if len(self._tier_order) < 2
               else "the store is not open")
        return {"policy": None, "running": False, "why": why}

    def sync_governor(self, timeout: float = 30.0) -> bool:
        """Wait until the governor has decided on every access made before this call and carried
        its moves out (True), for replay and tests; True at once when no governor runs."""
        governor = self._governor
        return True if governor is None else governor.sync(timeout)

    def plan(self, keys: Sequence[str], *, owner: str = DEFAULT_OWNER) -> None:
        """Declare the keys ``owner`` will read next, in order (replacing its previous plan; an
        empty list withdraws it). While a plan is active the host tier evicts unplanned copies
        first and planned ones farthest-read-first (see :mod:`tiered.store.plans`)."""
        self._check_open()
        keys = list(keys)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"plan(owner={owner!r}): keys are strings, got {k!r}")
        self._plans.set(owner, keys)
        if self._listeners or self._governor is not None:
            self._deliver(AccessEvent(time.monotonic(), owner, 0, "plan", "blob", None, tuple(keys)))

    def migrate(self, key: str, tier: str, *, wait: float | None = None) -> IOFuture:
        """Move ``key``'s home to storage tier ``tier`` (or, for "host", prefetch it).

        The version read is rewritten as the same version, from its host copy: read first when
        not cached (charged to the object's owner, waiting up to ``wait`` seconds, default
        ``host_wait``, for host memory), and still cached after the move. If a newer put or a
        delete of the key lands meanwhile, that one wins and the move is dropped (the result
        says ``superseded``). Listeners see one ``migrate`` event, not the move's own I/O.
        """
        return self._migrate(key, tier, wait, evict=True, placed=True)

    def _migrate(self, key: str, tier: str, wait: float | None, evict: bool, commit: bool = True,
                 placed: bool | None = None) -> IOFuture:
        """:meth:`migrate`; ``evict=False`` (the governor's moves): the copy is read only into host
        memory that is free now, never displacing the workloads' cached copies. ``commit=False``:
        the move is durable only after a later :meth:`commit` (the governor commits once per
        round of moves; until then a crash leaves the object where it was, intact)."""
        self._check_open()
        if tier == "host":
            return self.prefetch(key)
        if tier not in self._tiers:
            raise StoreError(f"migrate({key!r}): unknown tier {tier!r}; known: host, {', '.join(self._tier_order)}")
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r} in the store at {self.root}")
            if meta.extent.external:
                raise StoreError(f"migrate({key!r}): the object is read in place from {meta.extent.path}; "
                                 "put it into the store to give it a home on a tier")
        lease_f = self._acquire(key, Priority.WRITEBACK, wait, meta.owner, emit=False, evict=evict)
        self._emit(key, meta.nbytes, "migrate", meta.kind, tier)
        out = IOFuture(f"migrate {key} -> {tier}")
        lease_f.add_done_callback(lambda f: self._rewrite_for_migration(f, key, tier, wait, commit, out, placed))
        return out

    def _rewrite_for_migration(self, lease_f, key: str, tier: str, wait: float | None, commit: bool,
                               out: IOFuture, placed: bool | None) -> None:
        try:
            lease = lease_f.result()
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            out.set_exception(e)
            return
        mark = None  # (generation, meta) of a placed mark to commit
        result = None  # set when nothing is to be written
        try:
            with self._lock:
                meta = self._objects.get(key)
                # the version leased, still a stored object (a key re-registered as an external
                # file since the check holds a window of that file, not the object's bytes)
                current = (meta is not None and meta.version == lease.version and not meta.extent.external
                           and lease._copy.start == 0)
                if current and placed is None and meta.placed:  # placed since the governor decided
                    lease.release()
                    out.set_result({"key": key, "superseded": True, "placed": True})
                    return
                if not current or meta.extent.tier == tier:
                    if current and placed and not meta.placed:  # already there: the caller's choice pins it
                        meta.placed = True
                        self._gen += 1
                        mark = (self._gen, meta)
                    result = meta.describe() if current else {"key": key, "superseded": True}
            if result is not None:
                lease.release()
                if mark is not None:  # durable before the caller hears of it
                    self._commit_through(mark[0], lambda m=mark[1]: setattr(m, "placed", False))
                out.set_result(result)
                return
            inner = self._write_buffer(key, lease._copy.buffer, meta.nbytes, meta.dtype, meta.shape, meta.kind,
                                       tier, lease.version, False, True, commit, Priority.WRITEBACK, False,
                                       meta.ephemeral, meta.owner, meta.block, wait, placed)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            if result is None:
                lease.release()
            out.set_exception(e)
            return

        def done(g) -> None:
            lease.release()  # the bytes were written out of the pinned copy
            if g.exception() is not None:
                out.set_exception(g.exception())
            else:
                out.set_result(g.result())

        inner.add_done_callback(done)

    def delete(self, key: str) -> None:
        """Remove ``key``; its extent is reused once the manifest no longer names it.

        A put of the key called before this delete cannot bring it back.
        """
        self._check_open()
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r}")
            self._tombstones[key] = self._next_version(key)
            del self._objects[key]
            self._gen += 1
            gen = self._gen
            self._unlink(meta)
        self._commit_through(gen)
        self._emit(key, meta.nbytes, "delete", meta.kind, None)

    def delete_prefix(self, prefix: str) -> list[str]:
        """Remove every key starting with ``prefix`` (one manifest commit); the keys removed."""
        self._check_open()
        with self._lock:
            doomed = [m for k, m in self._objects.items() if k.startswith(prefix)]
            gen = self._remove(doomed)
        self._commit_through(gen)
        for meta in doomed:
            self._emit(meta.key, meta.nbytes, "delete", meta.kind, None)
        return [m.key for m in doomed]

    def check(self, repair: bool = False) -> dict:
        """Read every object and verify its crc32s, and find the blocks of the data files that no
        manifest entry names (left by a crash mid-put). ``repair`` deletes the corrupt objects and
        gives those blocks back (hole punch). Returns what was found and done: see
        :func:`tiered.store.check.check_store`."""
        self._check_open()
        return store_check.check_store(self, repair)

    # -- inspection ----------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._objects

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._objects)

    def meta(self, key: str) -> dict:
        with self._lock:
            m = self._objects.get(key)
            if m is None:
                raise KeyError(f"no object {key!r}")
            return m.describe()

    def stats(self) -> dict:
        with self._lock:
            tiers = {
                n: {"kind": "storage", "path": str(t.path), "capacity": t.space.capacity,
                    "used": t.used, "objects": t.objects,
                    "bytes_read": self.counters.bytes_read.get(n, 0),
                    "bytes_written": self.counters.bytes_written.get(n, 0)}
                for n, t in self._tiers.items()
            }
            a = self.arena.stats() if self.arena else None
            host = None if a is None else {
                "kind": "host", "capacity": a.capacity, "used": a.in_use, "peak": a.peak,
                "fragmentation": a.fragmentation, "hugepages": a.hugepages, "pinned": a.pinned,
                "objects": sum(1 for m in self._objects.values() if m.host is not None and m.host.ready),
            }
            c = self.counters
            governor = self._governor
            d = self._device_region.stats() if self._device_region is not None else None
            device = {} if self._device_tier is None else {self._device_tier.name: {
                "kind": "device", "device": self._device_tier.device, "capacity": self._device_tier.capacity,
                "used": d.in_use if d else 0, "peak": d.peak if d else 0, "reserved_region": d is not None}}
            return {
                "tiers": {**device, "host": host, **tiers},
                "owners": self.owners() if self._opened else {},
                "external_bytes_read": c.bytes_read.get("external", 0),
                "hits": c.hits, "misses": c.misses, "puts": c.puts, "evictions": c.evictions,
                "commits": c.commits, "objects": len(self._objects),
                "engine": self.engine.stats() if self.engine else None,
                "governor": governor.stats() if governor is not None else self._governor_idle(),
                "plans": self._plans.stats(),
            }
