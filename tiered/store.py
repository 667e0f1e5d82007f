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
  the host tier is put and read through it in pieces: ``store_stream``);
- a process's ephemeral objects are deleted by its ``close()``, or after a crash by the next
  ``open()``.

Helpers: ``store_registry`` (one open store per directory per process, ``shared()``),
``store_check`` (a missing manifest, ``check()``/repair), ``store_stream`` (large objects).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from allocators import FreeList, HostArena, HostBuffer, OutOfBudget, align_up
from io_engine import Backend, IOEngine, IOFuture, Priority, chain, completed, gather
from policies import FirstFit, Observation, create_eviction_policy
from traces import AccessEvent

from . import store_check, store_registry, store_stream
from .atomic import remove_stale_temps, write_json_atomic
from .config import Config, TierSpec, load_config

log = logging.getLogger("tiered.store")

try:  # ISA-L's crc32: the same values as zlib's (the format does not change), ~3x faster, drops the GIL
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # optional accelerator
    _crc32 = zlib.crc32

MANIFEST = "manifest.json"
DATA_FILE = "objects.dat"
LOCK_FILE = ".lock"
FORMAT = "tiered-store"
FORMAT_VERSION = 2  # 2: per-segment crc32 lists
#: objects are checksummed, and read, in segments of this many bytes: each segment is
#: its own engine request, verified by the worker that read it, so checking a large
#: object runs on all workers at once instead of after the whole read on one thread
SEGMENT = 8 << 20
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:@+=-][A-Za-z0-9_.:@+=/-]*$")


class StoreError(RuntimeError):
    """Misuse of the store or a store-level failure; the message names the object."""


class HostBudgetError(StoreError, OutOfBudget):
    """The host tier cannot hold what an operation on an object needs; names the object."""


class ChecksumError(StoreError):
    """Bytes read back do not match the checksum recorded when they were written."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise StoreError(f"manifest names unknown dtype {name!r}")
    return dt


def check_key(key: str) -> str:
    """Keys are names in the manifest, never paths; still refuse anything path-like."""
    if not isinstance(key, str) or not key or len(key) > 1024 or not _KEY_RE.fullmatch(key):
        raise StoreError(
            f"invalid object key {key!r}: expected 1-1024 characters of letters, digits and "
            "_ . : @ + = - /, not starting with '/'"
        )
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: empty, '.' or '..' path components are not allowed")
    return key


@dataclass
class Extent:
    """Where one version of an object lives: on a storage tier, or in an external file.

    External extents (e.g. a tensor inside a model's ``.safetensors`` file) are
    read in place, never written or freed, and not recorded in the manifest.
    """

    tier: str
    offset: int
    length: int  # reserved bytes (a multiple of 4 KiB); for external extents the exact size
    readers: int = 0
    retired_gen: int | None = None  # manifest generation that stopped naming it
    path: str | None = None  # set for external extents
    identity: tuple | None = None  # external: (size, mtime_ns, inode) of the file when registered
    punch: bool = True  # give the blocks back to the filesystem when freed (not for a superseded version)

    @property
    def external(self) -> bool:
        return self.path is not None


@dataclass
class HostCopy:
    """A cached copy of one version of an object in the host arena."""

    buffer: HostBuffer | None
    version: int
    pins: int = 0
    ready: bool = False
    detached: bool = False  # no longer the object's current copy; free when unpinned
    loaded: IOFuture | None = None
    start: int = 0  # where the object's bytes begin in the buffer (external, unaligned extents)
    loading: bool = False  # a read is filling the buffer: it must not be freed yet
    prefetchers: int = 0  # prefetch() callers still waiting for this load


@dataclass
class ObjectMeta:
    key: str
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    version: int
    crc32: list[int] | None  # one per SEGMENT of the buffer; None for external objects
    extent: Extent
    host: HostCopy | None = None
    ephemeral: bool = False  # deleted when the store closes, or by the next open after a crash

    def describe(self) -> dict:
        return {
            "key": self.key, "kind": self.kind, "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape), "nbytes": self.nbytes, "version": self.version,
            "tier": self.extent.tier, "offset": self.extent.offset,
            "in_host": bool(self.host and self.host.ready), "ephemeral": self.ephemeral,
        }


@dataclass
class _PendingPut:
    """A version written (or being written) to its extent, not yet current: see ``_install``."""

    key: str
    version: int
    relocate: int | None  # set for a migration: the version it rewrites
    tier: str
    offset: int
    length: int  # the extent's bytes
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    kind: str
    sync: bool
    commit: bool
    ephemeral: bool
    buf: HostBuffer | None = None  # the written bytes (None for a streamed put)
    give: bool = False  # the buffer is the store's: cache or release it
    cache: bool = True
    crc: list[int] | None = None  # computed while streaming; else from ``buf``


class _StorageTier:
    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.path = Path(spec.path)
        self.data_file = str(self.path / DATA_FILE)
        self.space = FreeList(spec.capacity // 4096 * 4096)  # a hard budget: round down
        self.objects = 0

    @property
    def used(self) -> int:
        return self.space.capacity - self.space.free_bytes

    def release(self, offset: int, length: int, punch: bool = True) -> None:
        """Return an extent to the free space and (``punch``) its blocks to the filesystem."""
        self.space.give(offset, length)
        if punch:
            punch_hole(self.data_file, offset, length)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(path: str, offset: int, length: int) -> bool:
    """Deallocate a freed extent's blocks (the file keeps its size), so deleted objects give
    their disk space back; False where the filesystem or platform cannot (space is still
    reused by later extents)."""
    fallocate = _fallocate()
    if fallocate is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _fallocate():
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


class Lease:
    """A pinned, zero-copy view of an object's host copy. Release it (or use ``with``)."""

    def __init__(self, store: "TieredStore", meta: ObjectMeta, copy: HostCopy) -> None:
        self._store = store
        self._copy = copy
        self._version = meta.version
        self.key = meta.key
        raw = torch.from_numpy(copy.buffer.array[copy.start : copy.start + meta.nbytes])
        self.tensor = (raw.view(meta.dtype) if meta.dtype != torch.uint8 else raw).view(meta.shape)
        self._released = False

    @property
    def version(self) -> int:
        """The object version this lease pins (a later put makes a new one)."""
        return self._version

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.tensor = None
            self._store._unpin(self._copy)

    def detach(self) -> HostBuffer:
        """The leased bytes in a buffer the caller owns (and releases, or gives to
        :meth:`TieredStore.put_buffer`); the lease is released. For a reader that changes the
        bytes in place and puts them back: the pinned buffer itself is taken out of the cache,
        without a copy (the object's next read reads it from storage again), unless another
        lease pins it too, or it is an external object's window; then it is a copy."""
        if self._released:
            raise StoreError(f"lease of {self.key!r} was released")
        buf = self._store._detach_copy(self.key, self._copy, self.tensor.numel() * self.tensor.element_size())
        if buf is None:
            src = self.tensor.reshape(-1).view(torch.uint8).numpy()
            buf = self._store._alloc_host(len(src))
            buf.array[:] = src
            self.release()
            return buf
        self._released = True
        self.tensor = None
        return buf

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ExtentLease:
    """Where one object version's bytes are (``path``, ``offset``, ``nbytes``), kept from
    being freed or reused until ``release()`` (see :meth:`TieredStore.locate`)."""

    def __init__(self, store: "TieredStore", key: str, version: int, path: str, offset: int, nbytes: int,
                 extent: Extent) -> None:
        self.key, self.version, self.path, self.offset, self.nbytes = key, version, path, offset, nbytes
        self._store, self._extent = store, extent

    def release(self) -> None:
        if self._extent is not None:
            ext, self._extent = self._extent, None
            self._store._release_extent(ext)

    def __enter__(self) -> "ExtentLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class StoreCounters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: dict = field(default_factory=dict)  # tier -> bytes read from it
    bytes_written: dict = field(default_factory=dict)
    evictions: int = 0
    commits: int = 0


class TieredStore:
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
        self.engine: IOEngine | None = None
        self._lock_fd: int | None = None
        self._opened = False
        self._shared_users = 0  # >0: a TieredStore.shared() store, closed by its last user
        self._shared_kwargs: dict = {}
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
        self.recovered: dict = {}  # what open() cleaned up after a crash (see check())
        self.counters = StoreCounters()
        self.host_policy = create_eviction_policy(self.config.policy.placement)

    # -- lifecycle -----------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self._tiers[self._tier_order[0]].path

    @classmethod
    def shared(cls, config: Config | str | os.PathLike | dict | None = None, **kwargs) -> "TieredStore":
        """This process's open store for ``config``'s directories, or a newly opened one.

        For clients of one process that each need the store (a directory can be open only once):
        every caller calls ``close()`` once; the store closes when the last one does. A different
        config (tiers, engine, policy or ``kwargs``) for a store open here is a StoreError naming the
        differing settings; so is a store of the directory opened here with plain ``open()``.
        """
        return store_registry.shared_store(cls, config, kwargs)

    def open(self, *, start_empty: bool = False) -> "TieredStore":
        """``start_empty``: where the manifest is missing but a data file holds bytes (the store's
        objects cannot be found), start an empty store instead of refusing to open; the data
        file's blocks are given back by :meth:`check` with ``repair=True``."""
        if self._opened:
            return self
        self._reset_state()
        self._start_empty = start_empty
        self._lock_fd = store_registry.lock_directory(self, self.root / LOCK_FILE)
        try:
            for tier in self._tiers.values():
                remove_stale_temps(tier.path)
                Path(tier.data_file).touch(mode=0o600, exist_ok=True)
            self._load_manifest()
            host = self.config.host_tier
            capacity = host.capacity if host else 256 << 20
            self.arena = HostArena(capacity, hugepages=self._hugepages, name=f"tier {host.name if host else 'host'}").open()
            e = self.config.engine
            self.engine = IOEngine(self._backend, workers=e.workers, queue_depth=e.queue_depth,
                                   chunk=e.chunk, direct=e.direct).open()
            for tier in self._tiers.values():
                if tier.spec.read_bandwidth or tier.spec.write_bandwidth:
                    self.engine.set_bandwidth_limit(tier.path, tier.spec.read_bandwidth, tier.spec.write_bandwidth)
        except BaseException:
            self._release_resources()
            raise
        self._opened = True
        return self

    def close(self) -> None:
        """Wait for in-flight work, delete the ephemeral objects, then release memory, threads and
        the lock. A shared store (see :meth:`shared`) closes when its last user closes it."""
        if not self._opened:
            return
        if self._shared_users:
            store_registry.close_shared(self)
        else:
            self._close_now()

    def _close_now(self) -> None:
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

    def _release_resources(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        with self._lock:
            for meta in self._objects.values():
                meta.host = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self._lock_fd is not None:
            store_registry.unlock_directory(self, self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "TieredStore":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._opened:
            raise StoreError("the store is not open: call open() or use it as a context manager")

    # -- manifest ------------------------------------------------------------------
    def _load_manifest(self) -> None:
        path = self.root / MANIFEST
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            store_check.manifest_missing(self, path, self._start_empty)
            return
        except ValueError as e:
            raise StoreError(f"{path}: manifest is not valid JSON ({e})") from e
        dropped = []
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
        for key, o in doc.get("objects", {}).items():
            try:
                tier_name, offset, nbytes = o["tier"], int(o["offset"]), int(o["nbytes"])
                meta = ObjectMeta(key, str(o["kind"]), _dtype_from(o["dtype"]), tuple(int(d) for d in o["shape"]),
                                  nbytes, int(o["version"]), [int(c) for c in o["crc32"]],
                                  Extent(tier_name, offset, align_up(max(nbytes, 1))))
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"{path}: object {key!r} has a malformed entry ({e!r}): {o!r}") from e
            if o.get("ephemeral"):  # scratch of a process that crashed: delete it
                dropped.append((key, meta.extent))
                continue
            tier = self._tiers.get(tier_name)
            if tier is None:
                raise StoreError(
                    f"{path}: object {key!r} lives on tier {tier_name!r}, which the config "
                    f"({self.config.source}) does not define; known: {', '.join(self._tier_order)}"
                )
            try:
                tier.space.mark_used(meta.extent.offset, meta.extent.length)
            except RuntimeError as e:
                raise StoreError(f"{path}: object {key!r}: extent {offset}+{meta.extent.length} on tier "
                                 f"{tier_name!r} does not fit the tier's capacity or overlaps another") from e
            tier.objects += 1
            self._objects[key] = meta
        self._gen = self._committed_gen = int(doc.get("generation", 0))
        self._load_retained(doc.get("retained", {}), path)
        if dropped:
            self._forget_ephemeral(dropped)

    def _forget_ephemeral(self, dropped: list[tuple[str, Extent]]) -> None:
        """Commit a manifest without a crashed process's ephemeral objects, then give their
        blocks back (except any a retention tag keeps)."""
        write_json_atomic(self.root / MANIFEST, self._snapshot())
        kept = {(rec["tier"], int(rec["offset"])) for recs in self._retained.values() for rec, _e in recs}
        for _key, ext in dropped:
            if (ext.tier, ext.offset) not in kept and ext.tier in self._tiers:
                punch_hole(self._tiers[ext.tier].data_file, ext.offset, ext.length)
        self.recovered["ephemeral_removed"] = [key for key, _e in dropped]
        log.info("removed %d ephemeral objects left by a process that did not close %s", len(dropped), self.root)

    def _load_retained(self, retained: dict, path: Path) -> None:
        """Rebuild the extents kept for retention tags (see :meth:`retain`) from the manifest."""
        extents = {(m.extent.tier, m.extent.offset): m.extent for m in self._objects.values()}
        for tag, recs in retained.items():
            for r in recs:
                try:
                    tier_name, offset, nbytes = r["tier"], int(r["offset"]), int(r["nbytes"])
                except (KeyError, TypeError, ValueError) as e:
                    raise StoreError(f"{path}: retained extent of tag {tag!r} is malformed ({e!r}): {r!r}") from e
                tier = self._tiers.get(tier_name)
                if tier is None:
                    raise StoreError(f"{path}: tag {tag!r} retains an extent on tier {tier_name!r}, which the "
                                     f"config ({self.config.source}) does not define")
                ext = extents.get((tier_name, offset))
                if ext is None:  # a superseded or deleted version: still reserved until released
                    ext = Extent(tier_name, offset, align_up(max(nbytes, 1)), retired_gen=0)
                    try:
                        tier.space.mark_used(offset, ext.length)
                    except RuntimeError as e:
                        raise StoreError(f"{path}: tag {tag!r}: retained extent {offset}+{ext.length} on tier "
                                         f"{tier_name!r} overlaps another or exceeds the capacity") from e
                    extents[(tier_name, offset)] = ext
                    self._retired.append(ext)
                ext.readers += 1
                self._retained.setdefault(tag, []).append((r, ext))

    def _snapshot(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generation": self._gen,
            "tiers": {n: {"path": str(t.path), "capacity": t.spec.capacity} for n, t in self._tiers.items()},
            "objects": {
                k: {"kind": m.kind, "dtype": _dtype_name(m.dtype), "shape": list(m.shape),
                    "nbytes": m.nbytes, "version": m.version, "crc32": m.crc32,
                    "tier": m.extent.tier, "offset": m.extent.offset, **({"ephemeral": True} if m.ephemeral else {})}
                for k, m in self._objects.items() if not m.extent.external
            },
            **({"retained": {tag: [rec for rec, _e in recs] for tag, recs in self._retained.items()}}
               if self._retained else {}),
        }

    def _commit_through(self, gen: int, on_fail: Callable[[], None] | None = None) -> None:
        """Group commit: one manifest write covers every change up to the newest.

        ``on_fail`` runs (under the commit lock, so no other commit can make the
        change durable meanwhile) when the write fails, to take the change back.
        """
        with self._commit_lock:
            if self._committed_gen >= gen:
                return
            with self._lock:
                snap, snap_gen = self._snapshot(), self._gen
                unsynced, self._unsynced = self._unsynced, set()
            try:
                # every object in the snapshot was written before it was taken: one fdatasync
                # per tier now makes the sync=False puts among them durable before it names them
                for name in sorted(unsynced):
                    self._sync_data_file(name)
                write_json_atomic(self.root / MANIFEST, snap)
            except BaseException:
                with self._lock:
                    self._unsynced |= unsynced
                    if on_fail is not None:
                        on_fail()
                raise
            with self._lock:
                self._committed_gen = snap_gen
                self.counters.commits += 1
                self._free_retired()

    def _next_version(self, key: str) -> int:
        cur = self._objects.get(key)
        v = max(self._issued.get(key, 0), cur.version if cur else 0) + 1
        self._issued[key] = v
        return v

    def _unlink(self, meta: ObjectMeta, superseded: bool = False) -> None:
        """Forget ``meta``'s host copy and extent; call after bumping ``_gen`` for the change,
        so the extent is freed only once a manifest without it is committed. The blocks of a
        version ``superseded`` by a put stay allocated in the data file when it is freed: a key
        that is rewritten (optimizer state, KV blocks) reuses such space at once, and punching
        a hole there costs a syscall per object and a block allocation on the next write."""
        self._drop_host(meta)
        meta.extent.punch = not superseded
        if not meta.extent.external:
            meta.extent.retired_gen = self._gen
            self._retired.append(meta.extent)
            self._tiers[meta.extent.tier].objects -= 1

    def _free_retired(self) -> None:
        keep = []
        for ext in self._retired:
            if ext.readers == 0 and ext.retired_gen <= self._committed_gen:
                self._tiers[ext.tier].release(ext.offset, ext.length, ext.punch)
            else:
                keep.append(ext)
        self._retired = keep

    # -- retention (checkpoints of stored objects) ----------------------------------
    def retain(self, tag: str, keys: list[str]) -> list[dict]:
        """Keep the current version of each of ``keys`` where it is until ``release(tag)``.

        The extents are neither overwritten nor freed, even when a key is put again or
        deleted, and the retention is in the committed manifest before this returns (one
        commit for all keys), so it survives a restart: a checkpoint can name the bytes
        instead of copying them. Returns, per key, where its bytes are: data file
        (``path``), offset, nbytes, dtype, shape, version, and the crc32 of each
        ``segment`` bytes.
        """
        self._check_open()
        check_key(tag)
        entries: list[tuple[dict, Extent]] = []
        with self._lock:
            for key in keys:
                meta = self._objects.get(key)
                if meta is None:
                    raise KeyError(f"retain: no object {key!r} in the store at {self.root}")
                if meta.extent.external:
                    raise StoreError(f"retain({key!r}): object is served in place from {meta.extent.path}, "
                                     "which the store does not own; copy it instead")
                if self._puts_in_flight.get(key):
                    raise StoreError(f"retain({key!r}): a put of it is still in flight, so the current "
                                     f"version {meta.version} may not be what the caller last wrote; "
                                     "wait for that put's future first")
            for key in keys:
                meta = self._objects[key]
                ext = meta.extent
                rec = {"key": key, "version": meta.version, "tier": ext.tier, "offset": ext.offset,
                       "nbytes": meta.nbytes, "dtype": _dtype_name(meta.dtype), "shape": list(meta.shape),
                       "crc32": list(meta.crc32), "segment": SEGMENT}
                ext.readers += 1
                entries.append((rec, ext))
            self._retained.setdefault(tag, []).extend(entries)
            self._gen += 1
            gen = self._gen

        def undo() -> None:
            recs = self._retained.get(tag, [])
            mine = {id(e) for e in entries}
            recs[:] = [e for e in recs if id(e) not in mine]  # identity: equal extents may differ
            for _rec, ext in entries:
                ext.readers -= 1
            if not recs:
                self._retained.pop(tag, None)
            self._free_retired()

        self._commit_through(gen, undo)
        return [{**rec, "path": self._tiers[rec["tier"]].data_file} for rec, _e in entries]

    def release(self, tag: str) -> bool:
        """Drop every retention of ``tag``; False when it holds none. Extents no version names any
        more are freed once a manifest without the retention is committed."""
        self._check_open()
        with self._lock:
            entries = self._retained.pop(tag, None)
            if entries is None:
                return False
            self._gen += 1
            gen = self._gen
            for _rec, ext in entries:
                ext.readers -= 1
                if ext.retired_gen is not None:
                    ext.retired_gen = max(ext.retired_gen, gen)
                    ext.punch = True  # kept for a checkpoint, not reused by its key: give it back
        self._commit_through(gen)
        return True

    def retained(self, prefix: str = "") -> dict[str, list[dict]]:
        """Retention tags starting with ``prefix`` and what each keeps (as :meth:`retain` returned)."""
        with self._lock:
            return {tag: [{**rec, "path": self._tiers[rec["tier"]].data_file} for rec, _e in recs]
                    for tag, recs in self._retained.items() if tag.startswith(prefix)}

    # -- events --------------------------------------------------------------------
    def add_listener(self, fn: Callable[[AccessEvent], None]) -> None:
        """Call ``fn(event)`` on every access (recorders, learning policies).

        A listener that raises is logged and does not fail the access: a broken
        recorder must not break I/O.
        """
        self._listeners.append(fn)

    def _emit(self, key: str, nbytes: int, op: str, kind: str, tier: str | None) -> None:
        if self._listeners:
            ev = AccessEvent(time.monotonic(), key, nbytes, op, kind, tier)
            for fn in list(self._listeners):
                try:
                    fn(ev)
                except Exception:  # noqa: BLE001 - logged, see add_listener
                    log.exception("store listener %r failed on %s", fn, ev)

    # -- host memory ---------------------------------------------------------------
    def _evictable(self, key: str) -> bool:
        m = self._objects.get(key)
        return m is not None and m.host is not None and m.host.ready and m.host.pins == 0

    def _alloc_host(self, nbytes: int, wait: float | None = None) -> HostBuffer:
        """A host buffer, evicting unpinned cached copies (policy's choice) to make room,
        then waiting up to ``wait`` (default ``host_wait``) seconds for pins to go."""
        size = align_up(max(nbytes, 1))
        if size > self.arena.capacity:
            raise OutOfBudget(f"host tier: {nbytes} bytes requested but its budget is {self.arena.capacity} bytes")
        wait = self.host_wait if wait is None else wait
        deadline = time.monotonic() + wait
        while True:
            evicted = []
            seen = self.arena.changes  # read before trying: a change after it ends the wait below
            with self._lock:
                buf = self.arena.try_alloc(nbytes)
                while buf is None:
                    victims = self.host_policy.victims(size, self._evictable)
                    if not victims:
                        break
                    for key in victims:
                        meta = self._objects[key]
                        self._drop_host(meta)
                        self.counters.evictions += 1
                        evicted.append(meta)
                    buf = self.arena.try_alloc(nbytes)
            for meta in evicted:
                self._emit(meta.key, meta.nbytes, "evict", meta.kind, "host")
            if buf is not None:
                return buf
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                st = self.arena.stats()
                raise OutOfBudget(
                    f"host tier: no room for {nbytes} bytes within {wait} s "
                    f"({st.in_use} of {st.capacity} bytes held by pinned or loading objects)"
                )
            # wait for a buffer to be freed or a cached copy to become evictable (unpinned, or a
            # put's copy installed), then retry with eviction
            self.arena.wait_change(seen, min(0.05, remaining))

    def _drop_host(self, meta: ObjectMeta) -> None:
        copy = meta.host
        meta.host = None
        self.host_policy.remove(meta.key)
        if copy is not None:
            copy.detached = True
            self._maybe_free(copy)

    def _maybe_free(self, copy: HostCopy) -> None:
        """Free a detached copy's buffer once nobody pins it and no read is filling it."""
        if copy.detached and copy.pins == 0 and not copy.loading and copy.buffer is not None:
            copy.buffer.release()
            copy.buffer = None

    def _detach_copy(self, key: str, copy: HostCopy, nbytes: int) -> HostBuffer | None:
        """Take a copy's buffer out of the cache; None when others pin it (or it is a window)."""
        with self._lock:
            if copy.pins != 1 or copy.loading or copy.buffer is None or copy.start or copy.buffer.nbytes != nbytes:
                return None
            meta = self._objects.get(key)
            if meta is not None and meta.host is copy:
                meta.host = None
                self.host_policy.remove(key)
            buf, copy.buffer = copy.buffer, None
            copy.pins = 0
            copy.detached = True
            return buf

    def _notify_host(self) -> None:
        """Wake allocations waiting for room: a cached copy may have become evictable."""
        arena = self.arena
        if arena is not None:  # None once closed (a lease released late)
            arena.notify()

    def _unpin(self, copy: HostCopy) -> None:
        with self._lock:
            copy.pins -= 1
            self._maybe_free(copy)
        self._notify_host()  # it may be evictable now

    # -- put -----------------------------------------------------------------------
    def put(self, key: str, tensor: torch.Tensor, *, kind: str = "blob", tier: str | None = None,
            ephemeral: bool = False) -> IOFuture:
        """Store ``tensor`` under ``key`` (a new version if it exists).

        The bytes are copied into the host arena before this returns, so the
        caller may reuse ``tensor`` at once; the future resolves to the
        object's description once the data and manifest are durable. Puts of
        one key take effect in the order they were called.

        ``ephemeral=True``: the object is this process's scratch: :meth:`close` deletes it, and
        so does the next :meth:`open` after a crash (the manifest records it as ephemeral; its
        bytes are not fdatasync'ed, since no later process reads them). A later put of the key
        decides again whether it is ephemeral.
        """
        with self._lock:
            self._puts_in_flight[key] = self._puts_in_flight.get(key, 0) + 1
        try:
            f = self._put(key, tensor, kind, tier, relocate=None, ephemeral=ephemeral)
        except BaseException:
            self._put_landed(key)
            raise
        f.add_done_callback(lambda _f: self._put_landed(key))
        return f

    def _put_landed(self, key: str) -> None:
        with self._lock:
            n = self._puts_in_flight[key] - 1
            if n:
                self._puts_in_flight[key] = n
            else:
                del self._puts_in_flight[key]

    def put_buffer(self, key: str, buf: HostBuffer, dtype: torch.dtype, shape, *, kind: str = "blob",
                   tier: str | None = None, give: bool = False, sync: bool = True, commit: bool = True,
                   priority: Priority = Priority.WRITEBACK, cache: bool = True,
                   ephemeral: bool = False) -> IOFuture:
        """Store the bytes already in ``buf`` (a buffer of this store's arena, e.g. from
        :meth:`alloc_host` or :meth:`Lease.detach`) as ``key``, without copying them.

        ``buf.nbytes`` must be the size of ``dtype`` x ``shape``. The caller must not change
        the bytes until the future is done. ``give=True`` hands the buffer to the store: it
        becomes the object's cached host copy (with ``cache`` and the store's ``cache_on_put``;
        else it is released once written), also when the put fails; else the caller keeps
        it and the store never caches or frees it.

        ``sync=False`` skips this write's fdatasync and ``commit=False`` the manifest commit:
        the future then resolves once the bytes are written and the object is current in
        memory, but it is durable (survives a crash) only after a later :meth:`commit`, or any
        committing put, returns; until then a crash leaves the previous version. Used to
        make many puts durable with one fdatasync and one manifest write (each uncommitted put of a
        key keeps the extent of the version it replaced reserved until that commit, so commit before
        rewriting one key many times). ``priority``: the
        engine priority of the write (write-back by default, after reads; a pipeline whose
        next read waits for this buffer's room may ask for DEMAND). ``ephemeral``: as for :meth:`put`.
        """
        with self._lock:
            self._puts_in_flight[key] = self._puts_in_flight.get(key, 0) + 1
        try:
            self._check_open()
            check_key(key)
            shape = tuple(int(d) for d in shape)
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if not isinstance(buf, HostBuffer) or buf.released or buf._arena is not self.arena:
                raise StoreError(f"put_buffer({key!r}): expected a live buffer of this store's host arena")
            if buf.nbytes != nbytes:
                raise StoreError(f"put_buffer({key!r}): buffer holds {buf.nbytes} bytes, "
                                 f"{_dtype_name(dtype)}{shape} needs {nbytes}")
        except BaseException:
            self._put_landed(key)
            if give and isinstance(buf, HostBuffer) and not buf.released:
                buf.release()
            raise
        try:
            f = self._write_buffer(key, buf, nbytes, dtype, shape, kind, tier, None, give, sync, commit,
                                   priority, cache, ephemeral)
        except BaseException:
            self._put_landed(key)
            raise
        f.add_done_callback(lambda _f: self._put_landed(key))
        return f

    def alloc_host(self, nbytes: int, wait: float | None = None) -> HostBuffer:
        """A buffer of the host tier for :meth:`put_buffer` (evicting cached copies for room,
        waiting up to ``wait`` seconds); the caller releases it unless it gives it to a put."""
        self._check_open()
        return self._alloc_host(nbytes, wait)

    def commit(self) -> None:
        """Make every put done so far durable: fdatasync the data files written by puts with
        ``sync=False``, then commit the manifest (a no-op when nothing changed)."""
        self._check_open()
        with self._lock:
            gen = self._gen
        self._commit_through(gen)

    def _put(self, key: str, tensor: torch.Tensor, kind: str, tier: str | None, relocate: int | None,
             ephemeral: bool = False) -> IOFuture:
        self._check_open()
        check_key(key)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put({key!r}): expected a torch.Tensor, got {type(tensor).__name__}")
        src = tensor.detach().resolve_conj().resolve_neg()
        nbytes = src.numel() * src.element_size()
        if store_stream.too_big_for_host(self, nbytes):  # never whole in host memory
            return store_stream.put_streamed(self, key, src.contiguous(), kind, tier, relocate, ephemeral)
        if src.device.type != "cpu":
            src = src.cpu()
        src = src.contiguous()
        try:
            buf = self._alloc_host(nbytes)
        except OutOfBudget as e:
            raise HostBudgetError(f"put({key!r}) of {nbytes} bytes: {e}") from e
        try:
            if nbytes:
                buf.padded[:nbytes] = src.reshape(-1).view(torch.uint8).numpy()
        except BaseException:
            buf.release()
            raise
        return self._write_buffer(key, buf, nbytes, src.dtype, tuple(src.shape), kind, tier, relocate,
                                  True, True, True, Priority.WRITEBACK, True, ephemeral)

    def _write_buffer(self, key: str, buf: HostBuffer, nbytes: int, dtype: torch.dtype, shape: tuple,
                      kind: str, tier: str | None, relocate: int | None, give: bool, sync: bool,
                      commit: bool, priority: Priority, cache: bool, ephemeral: bool = False) -> IOFuture:
        """Write ``buf`` (its first ``nbytes`` are the object) as a new version of ``key``."""
        durable = sync and not ephemeral  # nobody reads an ephemeral object after a crash
        try:
            flat = buf.padded
            flat[nbytes:] = 0
            with self._lock:
                tier_name, offset = self._reserve_extent(key, len(flat), kind, tier)
                version = relocate if relocate is not None else self._next_version(key)
            p = _PendingPut(key, version, relocate, tier_name, offset, len(flat), nbytes, dtype, tuple(shape), kind,
                            sync, commit, ephemeral, buf, give, cache)
            wf = self.engine.write(self._tiers[tier_name].data_file, offset, flat, sync=durable, priority=priority)
        except BaseException:
            if give:
                buf.release()
            raise

        def undo(f) -> None:
            if f.exception() is not None:
                with self._lock:
                    self._tiers[tier_name].space.give(offset, len(flat))
                if give:
                    buf.release()

        wf.add_done_callback(undo)
        return chain(wf, lambda _n: self._install(p), f"put {key}", note=f"while putting object {key!r}")

    def _install(self, p: "_PendingPut") -> dict:
        """Make a written version current (unless a later put or delete of the key already took
        effect) and commit it; runs on the engine worker that finished the write, not the
        caller's thread: zlib drops the GIL, so the caller computes on while the checksum runs."""
        crc = p.crc if p.crc is not None else segment_checksums(p.buf.padded[:p.nbytes], 0)
        key, tier_name, ext = p.key, p.tier, Extent(p.tier, p.offset, p.length)
        with self._lock:
            old = self._objects.get(key)
            stale = (p.version <= self._tombstones.get(key, 0)
                     or (old is not None and (old.version != p.version if p.relocate is not None
                                              else old.version > p.version)))
            if stale:  # a later put or delete of this key already took effect
                self._tiers[tier_name].space.give(p.offset, p.length)  # never named by a manifest
                if p.give:
                    p.buf.release()
                return {"key": key, "version": p.version, "superseded": True}
            if not p.sync and not p.ephemeral:
                self._unsynced.add(tier_name)
            self._gen += 1
            gen = self._gen
            if old is not None:  # a migration frees its old tier's blocks: they are not rewritten soon
                self._unlink(old, superseded=p.relocate is None)
            meta = ObjectMeta(key, p.kind, p.dtype, p.shape, p.nbytes, p.version, crc, ext, ephemeral=p.ephemeral)
            self._objects[key] = meta
            self._tiers[tier_name].objects += 1
            if p.give and p.cache and self.cache_on_put:
                meta.host = HostCopy(p.buf, p.version, ready=True)
                self.host_policy.admit(Observation(key, p.length, p.kind, "write", "host"))
            elif p.give:
                p.buf.release()
        if p.give:
            self._notify_host()  # the cached copy is evictable from now on

        def rollback() -> None:  # the manifest write failed: the previous version stays current
            if self._objects.get(key) is not meta:
                return
            self._drop_host(meta)
            self._tiers[tier_name].objects -= 1
            if old is not None:
                self._retired.remove(old.extent)
                old.extent.retired_gen = None
                self._tiers[old.extent.tier].objects += 1
                self._objects[key] = old
            else:
                del self._objects[key]
            ext.retired_gen = 0  # never committed: free as soon as no reader holds it
            self._retired.append(ext)
            self._free_retired()

        if p.commit:
            self._commit_through(gen, rollback)
        with self._lock:
            self.counters.puts += 1
            self.counters.bytes_written[tier_name] = self.counters.bytes_written.get(tier_name, 0) + p.length
        self._emit(key, p.nbytes, "write", p.kind, tier_name)
        return meta.describe()

    def _reserve_extent(self, key: str, size: int, kind: str, tier: str | None) -> tuple[str, int]:
        if tier is not None:
            if tier not in self._tiers:
                raise StoreError(f"put({key!r}): unknown storage tier {tier!r}; known: {', '.join(self._tier_order)}")
            name = tier
        else:
            choices = [(n, self._tiers[n].space.capacity, self._tiers[n].space.largest()) for n in self._tier_order]
            name = self.placement.place(Observation(key, size, kind, "write"), choices)
            if name is None:
                free = ", ".join(f"{n}: {f} bytes in one piece" for n, _c, f in choices)
                raise StoreError(f"put({key!r}): no storage tier has room for {size} bytes ({free})")
        t = self._tiers[name]
        offset = t.space.take(size)
        if offset is None:
            raise StoreError(f"put({key!r}): tier {name!r} has no free extent of {size} bytes "
                             f"({t.space.free_bytes} of {t.space.capacity} bytes free, largest piece "
                             f"{t.space.largest()})")
        return name, offset

    # -- reads ---------------------------------------------------------------------
    def acquire(self, key: str, *, priority: Priority = Priority.DEMAND, wait: float | None = None) -> IOFuture:
        """A future of a :class:`Lease`: the object's host copy, pinned, zero-copy.

        Raises KeyError at once for a key the store does not hold, and HostBudgetError
        (an OutOfBudget) naming the object when host memory for the copy cannot be found
        within ``wait`` seconds (default ``host_wait``; 0 for a prefetch that must not block),
        at once when the object is larger than the host tier.
        """
        self._check_open()
        copy, load, meta = self._pin_host_copy(key, priority, wait)
        if load is None:
            self._emit(key, meta.nbytes, "read", meta.kind, "host")
            return completed(Lease(self, meta, copy), f"acquire {key}")
        out = chain(load, lambda _: Lease(self, meta, copy), f"acquire {key}")
        out.add_done_callback(lambda f: (f.cancelled() or f.exception() is not None) and self._unpin(copy))
        return out

    def get(self, key: str, *, tier: str = "host", out: torch.Tensor | None = None,
            priority: Priority = Priority.DEMAND) -> IOFuture:
        """A future of a tensor the caller owns (a copy), on ``tier`` ("host" or "gpu").

        An object larger than the host tier is read through it in pieces, into ``out`` or a new
        tensor, before this returns (:meth:`acquire` of it fails: no lease can hold it)."""
        if tier not in ("host", "gpu"):
            raise StoreError(f"get({key!r}): tier must be 'host' or 'gpu', got {tier!r}")
        if tier == "gpu" and not torch.cuda.is_available():
            raise StoreError(f"get({key!r}, tier='gpu'): no CUDA device on this machine")
        self._check_open()
        with self._lock:
            meta = self._objects.get(key)
            big = meta is not None and not meta.extent.external and store_stream.too_big_for_host(self, meta.nbytes)
            if big:
                meta.extent.readers += 1
        if big:
            return self._get_streamed(meta, out, tier, priority)
        lease_f = self.acquire(key, priority=priority)

        def copy_out(lease: Lease) -> torch.Tensor:
            try:
                if out is not None:
                    if out.shape != lease.tensor.shape or out.dtype != lease.tensor.dtype:
                        raise StoreError(f"get({key!r}): out has {out.dtype}{tuple(out.shape)}, object is "
                                         f"{lease.tensor.dtype}{tuple(lease.tensor.shape)}")
                    out.copy_(lease.tensor)
                    return out
                if tier == "gpu":
                    return lease.tensor.to("cuda", non_blocking=False)
                return lease.tensor.clone()
            finally:
                lease.release()

        return chain(lease_f, copy_out, f"get {key}")

    def _get_streamed(self, meta: ObjectMeta, out: torch.Tensor | None, tier: str, priority: Priority) -> IOFuture:
        """``get`` of an object larger than the host tier: read through it in pieces, before
        returning (the caller holds ``meta.extent`` as a reader; released here)."""
        try:
            if out is not None and (tuple(out.shape) != meta.shape or out.dtype != meta.dtype):
                raise StoreError(f"get({meta.key!r}): out has {out.dtype}{tuple(out.shape)}, object is "
                                 f"{meta.dtype}{meta.shape}")
            device = "cuda" if tier == "gpu" else "cpu"
            result = store_stream.get_streamed(self, meta, out, device, priority)
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future
            f = IOFuture(f"get {meta.key}")
            if isinstance(e, OutOfBudget) and not isinstance(e, StoreError):
                e = HostBudgetError(f"get({meta.key!r}) of {meta.nbytes} bytes through the host tier: {e}")
            elif not isinstance(e, StoreError):
                e = StoreError(f"get({meta.key!r}) of {meta.nbytes} bytes through the host tier: {e}")
            f.set_exception(e)
            return f
        finally:
            self._release_extent(meta.extent)
        self._emit(meta.key, meta.nbytes, "read", meta.kind, meta.extent.tier)
        return completed(result, f"get {meta.key}")

    def prefetch(self, key: str) -> IOFuture:
        """Bring ``key`` into the host tier at prefetch priority.

        Cancelling the returned future cancels the read only while it has not
        started and no other caller waits for the same load.
        """
        self._check_open()
        copy, load, _meta = self._pin_host_copy(key, Priority.PREFETCH)
        with self._lock:
            copy.prefetchers += load is not None
            copy.pins -= 1  # a prefetch keeps nothing pinned; the copy stays cached
            self._maybe_free(copy)
        self._notify_host()
        if load is None:
            return completed(None, f"prefetch {key}")
        out = chain(load, lambda _: None, f"prefetch {key}")

        def cancel() -> bool:
            """Stop waiting; the read itself is cancelled only if it has not started and
            no other caller (a get, an acquire, another prefetch) waits for it."""
            with self._lock:
                if not IOFuture.cancel(out):
                    return False
                copy.prefetchers -= 1
                if copy.pins == 0 and copy.prefetchers == 0:
                    load.cancel_read()
                return True

        out.cancel = cancel  # type: ignore[method-assign]
        return out

    def _pin_host_copy(self, key: str, priority: Priority,
                       wait: float | None = None) -> tuple[HostCopy, IOFuture | None, ObjectMeta]:
        """Pin the host copy of ``key``, starting a load if needed.

        Returns (copy, load future or None when the copy is ready, the object's
        metadata for the version pinned), all taken under one lock.
        """
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r} in the store at {self.root}")
            copy = meta.host
            if copy is not None:
                copy.pins += 1
                if copy.ready:
                    self.counters.hits += 1
                    self.host_policy.touch(Observation(key, meta.nbytes, meta.kind, "read", "host"))
                    return copy, None, meta
                return copy, copy.loaded, meta
            self.counters.misses += 1
            load = _LoadFuture(f"load {key}")
            copy = HostCopy(None, meta.version, pins=1, loaded=load, loading=True)
            meta.host = copy
            ext = meta.extent
            ext.readers += 1
        if ext.external:
            src_file, lead = ext.path, ext.offset % 4096
            window = align_up(lead + meta.nbytes)
        else:
            src_file, lead, window = self._tiers[ext.tier].data_file, 0, None

        def finish(f) -> None:
            with self._lock:
                ext.readers -= 1
                copy.loading = False
                if f.cancelled() or f.exception() is not None:
                    if meta.host is copy:
                        meta.host = None
                    copy.detached = True
                self._maybe_free(copy)
                self._free_retired()

        load.add_done_callback(finish)
        try:
            try:
                buf = self._alloc_host(meta.nbytes if window is None else window, wait)
            except OutOfBudget as e:
                raise HostBudgetError(f"object {key!r} ({meta.nbytes} bytes): {e}") from e
            copy.buffer, copy.start = buf, lead
            length = len(buf.padded) if window is None else lead + meta.nbytes  # externals end anywhere
            if ext.external and _file_identity(src_file) != ext.identity:
                raise StoreError(f"object {key!r}: {src_file} changed since it was registered "
                                 "(size, mtime or inode differ); register it again")
            # external files carry no checksums: their identity is checked instead of hashing
            # every byte on every read (crc32 runs at ~3 GB/s per core, slower than the disk)
            unverified = ext.external
            sums: list[int] = [0] * _segments(lead, meta.nbytes)
            reads = []
            for i, start in enumerate(range(0, max(length, 1), SEGMENT)):
                n = min(SEGMENT, length - start)
                rf = self.engine.read(src_file, ext.offset - lead + start, buf.padded[start:start + n], n,
                                      priority=priority)
                reads.append(chain(rf, _segment_check(buf, lead, meta, i, sums, unverified, src_file, key)))
        except BaseException as e:
            if load.set_running_or_notify_cancel():
                load.set_exception(e)
            raise

        def publish(_results) -> None:
            with self._lock:

                copy.ready = True
                if meta.host is copy:
                    self.host_policy.admit(Observation(key, buf.reserved, meta.kind, "read", "host"))
                else:
                    copy.detached = True
                self.counters.bytes_read[ext.tier] = self.counters.bytes_read.get(ext.tier, 0) + buf.reserved
            self._notify_host()  # unpinned (a prefetch) it is evictable now
            self._emit(key, meta.nbytes, "read", meta.kind, ext.tier)

        load.follow(chain(gather(reads), publish, f"load {key}", note=f"while reading object {key!r}"), reads)
        return copy, load, meta

    def register_external(self, key: str, path, offset: int, nbytes: int, dtype: torch.dtype,
                          shape: tuple[int, ...], *, kind: str = "weight") -> None:
        """Make ``nbytes`` at ``offset`` of an existing file the home of ``key``, read in place.

        Used to serve tensors straight out of checkpoint files (safetensors) with
        O_DIRECT, without copying them into a tier first. Not persisted: callers
        register again after reopening. The file must not change while registered:
        each read checks its size, mtime and inode against the registration (such
        files carry no checksums, and hashing every read would cost more CPU than
        the disk takes to read them).
        """
        self._check_open()
        check_key(key)
        path = os.path.abspath(os.fspath(path))
        size = os.stat(path).st_size
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise StoreError(f"register_external({key!r}): bytes {offset}..{offset + nbytes} are outside "
                             f"{path} ({size} bytes)")
        expected = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if expected != nbytes:
            raise StoreError(f"register_external({key!r}): {dtype}{tuple(shape)} needs {expected} bytes, got {nbytes}")
        with self._lock:
            version = self._next_version(key)
            old = self._objects.get(key)
            self._gen += 1
            gen = self._gen
            if old is not None:
                self._unlink(old)
            self._objects[key] = ObjectMeta(key, kind, dtype, tuple(shape), nbytes, version, None,
                                            Extent("external", offset, nbytes, path=path,
                                                   identity=_file_identity(path)))
        if old is not None and not old.extent.external:
            self._commit_through(gen)  # the manifest must stop naming the replaced object

    def locate(self, key: str) -> "ExtentLease":
        """Where the current version of ``key`` lives on storage, held against freeing.

        For clients that read parts of an object themselves through ``self.engine``
        (GNN feature rows): the extent is not freed, even if the key is put again or
        deleted, until the returned lease is released. Such partial reads are not
        checked against the object's segment checksums (they cover 8 MiB segments).
        """
        self._check_open()
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r} in the store at {self.root}")
            ext = meta.extent
            path = ext.path if ext.external else self._tiers[ext.tier].data_file
            if ext.external and _file_identity(path) != ext.identity:
                raise StoreError(f"object {key!r}: {path} changed since it was registered "
                                 "(size, mtime or inode differ); register it again")
            ext.readers += 1
            return ExtentLease(self, key, meta.version, path, ext.offset, meta.nbytes, ext)

    def _release_extent(self, ext: Extent) -> None:
        with self._lock:
            ext.readers -= 1
            self._free_retired()

    # -- eviction, migration, deletion ---------------------------------------------
    def trim(self) -> int:
        """Drop every cached host copy that nobody pins and no read is filling; returns how many.

        Eviction on demand frees only as much as the policy picks, and a copy that is pinned again
        (a cache hit) stays where it was: after trim() the host tier's free space is all but what
        is pinned or loading, merged, for a group of buffers that must fit together."""
        self._check_open()
        dropped = []
        with self._lock:
            for key, meta in self._objects.items():
                if self._evictable(key):
                    self._drop_host(meta)
                    self.counters.evictions += 1
                    dropped.append(meta)
        for meta in dropped:
            self._emit(meta.key, meta.nbytes, "evict", meta.kind, "host")
        return len(dropped)

    def evict(self, key: str, tier: str = "host") -> bool:
        """Drop the cached copy of ``key`` from ``tier``; False when it is pinned or not there."""
        self._check_open()
        if tier != "host":
            raise StoreError(f"evict({key!r}, {tier!r}): only cached copies can be evicted; "
                             "use migrate() to move an object's home between storage tiers")
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r}")
            if meta.host is None or not meta.host.ready or meta.host.pins:
                return False
            self._drop_host(meta)
            self.counters.evictions += 1
        self._emit(key, meta.nbytes, "evict", meta.kind, "host")
        return True

    def migrate(self, key: str, tier: str) -> IOFuture:
        """Move ``key``'s home to storage tier ``tier`` (or, for "host", prefetch it).

        The version read is rewritten as the same version; if a newer put or a
        delete of the key lands meanwhile, that one wins and the move is dropped.
        """
        self._check_open()
        if tier == "host":
            return self.prefetch(key)
        if tier not in self._tiers:
            raise StoreError(f"migrate({key!r}): unknown tier {tier!r}; known: host, {', '.join(self._tier_order)}")
        lease_f = self.acquire(key, priority=Priority.WRITEBACK)
        out = IOFuture(f"migrate {key} -> {tier}")

        def rewrite(f) -> None:
            try:
                lease = f.result()
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                out.set_exception(e)
                return
            try:
                with self._lock:
                    meta = self._objects.get(key)
                    current = meta is not None and meta.version == lease._version
                    if current and meta.extent.tier == tier:
                        out.set_result(meta.describe())
                        return
                    if not current:
                        out.set_result({"key": key, "superseded": True})
                        return
                    kind, ephemeral = meta.kind, meta.ephemeral
                inner = self._put(key, lease.tensor, kind, tier, relocate=lease._version, ephemeral=ephemeral)
            except BaseException as e:  # noqa: BLE001
                out.set_exception(e)
                return
            finally:
                lease.release()
            inner.add_done_callback(
                lambda g: out.set_exception(g.exception()) if g.exception() else out.set_result(g.result()))

        lease_f.add_done_callback(rewrite)
        return out

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
        :func:`tiered.store_check.check_store`."""
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
            return {
                "tiers": {"host": host, **tiers},
                "external_bytes_read": c.bytes_read.get("external", 0),
                "hits": c.hits, "misses": c.misses, "puts": c.puts, "evictions": c.evictions,
                "commits": c.commits, "objects": len(self._objects),
                "engine": self.engine.stats() if self.engine else None,
            }


def _file_identity(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _segments(lead: int, nbytes: int) -> int:
    return max(1, -(-(lead + nbytes) // SEGMENT))


def segment_checksums(data, lead: int) -> list[int]:
    """crc32 of the object's bytes in each SEGMENT of its buffer (``data`` starts at ``lead``)."""
    return [_crc32(data[max(0, i * SEGMENT - lead) : (i + 1) * SEGMENT - lead])
            for i in range(_segments(lead, len(data)))]


def _segment_check(buf: HostBuffer, lead: int, meta: ObjectMeta, i: int, sums: list[int], unverified: bool,
                   src_file: str, key: str) -> Callable:
    """Verify segment ``i`` once it is read (external objects have no recorded checksums)."""

    def check(_n: int) -> None:
        lo = max(lead, i * SEGMENT)
        hi = min(lead + meta.nbytes, (i + 1) * SEGMENT)
        if unverified:  # nothing recorded to compare with (external object)
            return
        got = _crc32(buf.array[lo:hi]) if hi > lo else _crc32(b"")
        sums[i] = got
        if got != meta.crc32[i]:
            raise ChecksumError(
                f"object {key!r} (version {meta.version}) read from {src_file}: segment {i} "
                f"(bytes {lo - lead}..{hi - lead} of {meta.nbytes}, file offset {meta.extent.offset + lo - lead}) "
                f"has crc32 {got:#010x}, recorded {meta.crc32[i]:#010x}"
            )

    return check


class _LoadFuture(IOFuture):
    """The future of a host-copy load, created before its read is submitted so that
    concurrent readers of the same key can wait on it."""

    def __init__(self, description: str = "") -> None:
        super().__init__(description)
        self._reads: list[IOFuture] = []

    def follow(self, result: IOFuture, reads: list[IOFuture]) -> None:
        self._reads = reads

        def relay(f) -> None:
            if f.cancelled():
                super(_LoadFuture, self).cancel()
                self.set_running_or_notify_cancel()
            elif self.set_running_or_notify_cancel():
                if f.exception() is not None:
                    self.set_exception(f.exception())
                else:
                    self.set_result(f.result())

        result.add_done_callback(relay)

    def cancel(self) -> bool:
        """Joined waiters share this future: only ``prefetch`` may cancel, via ``cancel_read``."""
        return False

    def cancel_read(self) -> bool:
        """Cancel the segment reads that have not started; True when none had."""
        return all([r.cancel() for r in self._reads]) if self._reads else False
