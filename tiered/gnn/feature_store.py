"""TieredFeatureStore: PyG node features out of core, gathered through the TieredStore.

Each attribute (``group_name``, ``attr_name``) is a table of rows split into
fixed row-range chunks; each chunk is one store object (durable, with a crc32
per 4 KiB block), or, imported in place, a range of an existing ``.npy`` file
registered as an external object, or, for a cold and compressed tier, a zarr
v3 array. A minibatch's rows are read as byte ranges of the chunk objects
(``TieredStore.read_ranges``: page-aligned reads, verified, see ``rows.py``),
and hot rows are kept in a host row cache whose memory is the feature store's
reservation of the host tier (owner ``gnn/<namespace>``, see ``memory.py``) and
whose policy is a ``policies.row_cache`` one (LRU, S3-FIFO, or the hybrid
static-score + frequency policy with a victim buffer).

Which attributes exist, with their chunk keys, is a small JSON catalog kept as
a store object, written after the chunks it names are durable. The class is
put together from parts, one job each: ``imports.py``, ``updates.py``,
``rows.py`` (gathers, prefetch), ``memory.py``, ``forking.py`` (worker processes).
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import os
import threading
import weakref
from typing import Any

import numpy as np
import torch
from torch_geometric.data import FeatureStore, TensorAttr

from tiered.allocators import align_up

from ..dtypes import dtype_from
from ..store import TieredStore
from .attrs import FeatureStoreError, _Attr, _group_from_json, _jsonable_group, _label
from .forking import _OPEN, _Workers
from .imports import BLOCK, _Imports
from .loops import sampling_degree, window
from .memory import _Memory
from .rows import _Gathers
from .snapshots import Session
from .updates import _Updates
from .worker import WorkerRows

CATALOG_FORMAT = "tiered-gnn-features"
CATALOG_VERSION = 1
TIERS = ("store", "external", "zarr")

__all__ = ["CATALOG_FORMAT", "CATALOG_VERSION", "FeatureStoreError", "TieredFeatureStore", "sampling_degree",
           "window"]


class TieredFeatureStore(_Memory, _Gathers, _Imports, _Updates, _Workers, FeatureStore):
    """A ``torch_geometric.data.FeatureStore`` whose rows live in a :class:`TieredStore`.

    Memory: the store charges everything to owner ``gnn/<namespace>`` (:attr:`owner`): the
    chunks' storage, and a reservation of the host tier for row caches and read scratch.
    ``cache_bytes``: host memory for row caches, shared among attributes in proportion to
    their size when each is first read (or set with :meth:`set_cache`); it is also the
    reserved share unless ``host_share`` (bytes, "2GiB" or "25%" of the host tier) is given;
    with neither, the config's ``[owners.gnn]`` share, else elastic (see ``memory.py``).
    ``policy``: ``lru`` | ``s3fifo`` | ``hybrid``; ``victim_fraction`` of each
    cache goes to the victim buffer (default 0.1 for hybrid, 0 otherwise).
    ``merge_gap``: page ranges closer than this are read as one request (reading a gap is
    cheaper than another request while gap < per-request cost x bandwidth: ~100 us x ~1.5 GB/s
    for the Python engine on a virtio disk);
    ``checksum_block``: chunks stored from now on carry a crc32 per this many bytes (a
    multiple of 4 KiB) and every row read is verified with them; larger blocks cost less CPU
    per byte read but make each isolated row's read that large (see ``imports.py``).
    ``scratch_bytes``: read buffer per gather round; ``chunk_bytes``: size of
    the row-range objects. Call ``open()`` (or use ``with``) after the store is open.

    In DataLoader worker processes (``num_workers > 0``, fork or spawn) the store is a
    read-only reader of the attributes as they were when the worker started (see
    ``worker.py``); the extents of a replaced version stay reserved while a process that
    got them may read them, until ``close()`` at the latest (see ``snapshots.py``).
    """

    def __init__(self, store: TieredStore, *, namespace: str = "features", cache_bytes: int | None = None,
                 host_share: int | str | None = None, policy: str = "hybrid", victim_fraction: float | None = None, chunk_bytes: int = 16 << 20,
                 merge_gap: int = 128 << 10, max_read: int = 4 << 20, scratch_bytes: int = 64 << 20,
                 timeout: float = 300.0, zarr_dir: str | os.PathLike | None = None,
                 checksum_block: int = BLOCK) -> None:
        super().__init__()
        from tiered.policies.row_cache import ROW_CACHE_POLICIES

        if policy not in ROW_CACHE_POLICIES:
            raise FeatureStoreError(f"unknown row-cache policy {policy!r}; known: {', '.join(sorted(ROW_CACHE_POLICIES))}")
        if not 0 <= (victim_fraction or 0) < 1:
            raise FeatureStoreError(f"victim_fraction must be in [0, 1), got {victim_fraction}")
        if checksum_block <= 0 or checksum_block % 4096 or checksum_block > min(scratch_bytes, 16 << 20):
            raise FeatureStoreError(f"checksum_block must be a positive multiple of 4096 of at most "
                                    f"scratch_bytes and 16 MiB, got {checksum_block}")
        if chunk_bytes < 4096 or scratch_bytes < max_read or max_read < 4096:
            raise FeatureStoreError(f"chunk_bytes ({chunk_bytes}) and max_read ({max_read}) must be >= 4096 and "
                                    f"scratch_bytes ({scratch_bytes}) >= max_read")
        self.store = store
        self.namespace = namespace
        self.policy = policy
        self.victim_fraction = (0.1 if policy == "hybrid" else 0.0) if victim_fraction is None else victim_fraction
        self._cache_bytes = cache_bytes
        self._host_share = host_share
        self._host = None  # the host tier reservation, while open
        self._cache_total: int | None = None  # bytes for all row caches (see _cache_budget)
        self.chunk_bytes = int(chunk_bytes)
        self.checksum_block = int(checksum_block)
        self.merge_gap = int(merge_gap)
        self.max_read = int(max_read)
        self.scratch_bytes = align_up(int(scratch_bytes))
        self.timeout = float(timeout)
        self._zarr_dir = zarr_dir
        self._attrs: dict[tuple, _Attr] = {}
        self._planned = False  # a plan of coming minibatches is declared (see plan)
        self._static: dict[Any, np.ndarray] = {}
        self._cache_plan: dict[tuple, int] = {}
        self._shrunk: dict[tuple, int] = {}  # cache sizes left by on_pressure (see memory.py)
        self._lock = threading.RLock()
        self._next_gen = 1
        self._opened = False
        self.reads = {"requests": 0, "bytes": 0, "rows": 0, "prefetch_skipped": 0}
        self._pid = os.getpid()
        self._worker: WorkerRows | None = None  # set in a worker process: rows are read from it
        self._fork_snapshot: WorkerRows | BaseException | None = None
        self._session: Session | None = None  # snapshots handed to workers, with their leases
        self._catalog_gen = 0  # bumped by every catalog write: a snapshot is valid for one

    # -- lifecycle -----------------------------------------------------------------
    @property
    def _catalog_key(self) -> str:
        return f"gnn/{self.namespace}/catalog"

    def open(self) -> "TieredFeatureStore":
        if self._worker is not None:
            self._check_open()  # the read-only worker copy's error
        if self._opened:
            return self
        self._reserve_host()
        try:
            self._load_catalog()
            self._session = Session.create(self.store.root, self.namespace)
        except BaseException:
            self._attrs = {}
            self._host.close()
            raise
        self._opened = True
        key = id(self)
        _OPEN[key] = weakref.ref(self, lambda r: _OPEN.pop(key) if _OPEN.get(key) is r else None)
        try:
            self._collect_orphans()
        except BaseException:
            self.close()
            raise
        return self

    def _load_catalog(self) -> None:
        if self._catalog_key in self.store:
            raw = self.store.get(self._catalog_key, owner=self.owner).result(timeout=self.timeout)
            try:
                doc = json.loads(raw.numpy().tobytes())
            except ValueError as e:
                raise FeatureStoreError(f"feature catalog {self._catalog_key!r} is not valid JSON ({e})") from e
            if doc.get("format") != CATALOG_FORMAT or doc.get("version") != CATALOG_VERSION:
                raise FeatureStoreError(f"{self._catalog_key!r} is not a {CATALOG_FORMAT} v{CATALOG_VERSION} catalog")
            self._next_gen = int(doc.get("next_gen", 1))
            for d in doc["attrs"]:
                dtype = dtype_from(d["dtype"], error=FeatureStoreError, where=self._catalog_key)
                a = _Attr(_group_from_json(d["group"]), d["attr"], dtype, tuple(d["shape"]),
                          int(d["chunk_rows"]), d["tier"], list(d["keys"]), int(d["gen"]), d.get("external"),
                          d.get("zarr"), int(d.get("block", 0)))
                if a.tier == "external":
                    self._register_external(a)
                self._attrs[(a.group, a.name)] = a
            legacy = [a for a in self._attrs.values() if a.tier == "store" and not a.block]
            for a in legacy:
                self._add_block_checksums(a)
            if legacy:
                self._write_catalog()

    def close(self) -> None:
        """Wait for prefetches, then give back cache memory (and the host reservation) and the
        extent leases of worker snapshots (their copies fail from then on). In a worker, close
        only the worker's own files."""
        if self._worker is not None:
            self._worker.close()
            return
        with self._lock:  # a concurrent snapshot (a fork) either finishes first or sees it closed
            if not self._opened or os.getpid() != self._pid:
                return
            self._withdraw_plan()
            self._opened = False
            _OPEN.pop(id(self), None)
            attrs, self._attrs = list(self._attrs.values()), {}
            session, self._session = self._session, None
            self._fork_snapshot = None
        errors = []
        try:
            for a in attrs:
                try:
                    self._shutdown_attr(a)
                except BaseException as e:  # noqa: BLE001 - raised below, after the other attributes
                    errors.append(e)
        finally:
            try:
                if session is not None:
                    session.close()
            finally:
                self._host.close()  # the caches' and scratch buffers went back above
                self._cache_total = None
        if errors:
            raise errors[0]

    def __enter__(self) -> "TieredFeatureStore":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._reader() is not None:
            raise FeatureStoreError(
                "this feature store is a read-only copy in a worker process (e.g. a DataLoader worker): it "
                "reads the attributes as they were when the worker got it; write in the main process")
        if not self._opened:
            raise FeatureStoreError("the feature store is not open: call open() or use it as a context manager")

    def _shutdown_attr(self, a: _Attr) -> None:
        with a.lock:
            pending = [f for _r, f in a.inflight]
        done, not_done = concurrent.futures.wait(pending, timeout=self.timeout)
        if not_done:
            raise FeatureStoreError(f"{a.label}: {len(not_done)} prefetches still running after {self.timeout} s")
        with a.lock:
            if a.cache is not None:
                a.cache.close()
                a.cache = None
            a.layout = None

    # -- catalog -------------------------------------------------------------------
    def _write_catalog(self) -> None:
        doc = {"format": CATALOG_FORMAT, "version": CATALOG_VERSION, "next_gen": self._next_gen,
               "attrs": [a.describe() for a in self._attrs.values()]}
        raw = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8).copy()
        self._catalog_gen += 1  # the table changed (a failed write is rolled back: the cached snapshot is redone)
        self.store.put(self._catalog_key, torch.from_numpy(raw), kind="gnn", owner=self.owner).result(
            timeout=self.timeout)
        self.store.evict(self._catalog_key)

    def _collect_orphans(self) -> None:
        """Delete chunk objects no catalog entry names (left by a crash between the chunks'
        puts and the catalog's, or between the catalog's and the old chunks' deletes)."""
        named = {k for a in self._attrs.values() for k in a.keys}
        prefix = f"gnn/{self.namespace}/"
        for key in self.store.keys():
            if key.startswith(prefix) and key != self._catalog_key and key not in named:
                self.store.delete(key)

    def _chunk_prefix(self, group, name: str, gen: int) -> str:
        h = hashlib.sha1(json.dumps([_jsonable_group(group), name]).encode()).hexdigest()[:16]
        return f"gnn/{self.namespace}/{h}/g{gen}"

    # -- attribute table -----------------------------------------------------------
    def _attr(self, group, name) -> _Attr:
        self._check_open()
        a = self._attrs.get((group, name))
        if a is None:
            known = ", ".join(_label(g, n) for g, n in self._attrs) or "none"
            raise KeyError(f"no feature attribute {_label(group, name)} in namespace {self.namespace!r}; known: {known}")
        return a

    def attributes(self) -> list[dict]:
        if (w := self._reader()) is not None:
            return [a.describe() for a in w.attrs.values()]
        return [a.describe() for a in self._attrs.values()]

    def _install(self, a: _Attr) -> None:
        """Make ``a`` current (its data durable already): catalog first, then drop the old one.
        If the catalog write fails, ``a``'s chunks are deleted and the old one stays."""
        with self._lock:
            old = self._attrs.get((a.group, a.name))
            self._attrs[(a.group, a.name)] = a
            try:
                self._write_catalog()
            except BaseException as e:
                if old is None:
                    del self._attrs[(a.group, a.name)]
                else:
                    self._attrs[(a.group, a.name)] = old
                try:
                    self._drop(a)
                except BaseException as cleanup:  # noqa: BLE001 - the write's error is the one to raise
                    e.add_note(f"the new chunks of {a.label} could not be deleted ({cleanup!r}); the next "
                               "open() collects them")
                raise
        if old is not None:
            self._drop(old)
        self._release_superseded()

    def _drop(self, a: _Attr) -> None:
        self._shutdown_attr(a)
        for key in a.keys:
            if key in self.store:
                self.store.delete(key)
        if a.zarr_path:
            import shutil

            shutil.rmtree(a.zarr_path, ignore_errors=False)

    # -- FeatureStore API ------------------------------------------------------------
    def __setitem__(self, key, value) -> None:
        """``store[attr] = tensor``; unset fields mean None (``store[group] = x`` puts
        (group, None, index=None)). This is what PyG's feature-store tests expect and what
        upstream's ``FeatureStore.__setitem__`` does on its main branch; torch_geometric 2.8.1's
        own ``__setitem__`` instead asserts that the key is fully specified."""
        attr = copy.copy(self._tensor_attr_cls.cast(key))
        for name in attr.__dataclass_fields__:
            if not attr.is_set(name):
                setattr(attr, name, None)
        self.put_tensor(value, attr)

    def _get_tensor(self, attr: TensorAttr) -> torch.Tensor:
        """``x[index]``; a missing attribute raises KeyError (as PyG's stores do)."""
        if (w := self._reader()) is not None:
            return w.gather(attr.group_name, attr.attr_name, attr.index)
        return self._gather_many([(self._attr(attr.group_name, attr.attr_name), attr.index)])[0]

    def _multi_get_tensor(self, attrs: list[TensorAttr]) -> list[torch.Tensor]:
        if (w := self._reader()) is not None:
            return [w.gather(a.group_name, a.attr_name, a.index) for a in attrs]
        return self._gather_many([(self._attr(a.group_name, a.attr_name), a.index) for a in attrs])

    def _remove_tensor(self, attr: TensorAttr) -> bool:
        self._check_open()
        with self._lock:
            a = self._attrs.pop((attr.group_name, attr.attr_name), None)
            if a is None:
                return False
            try:
                self._write_catalog()
            except BaseException:
                self._attrs[(a.group, a.name)] = a
                raise
        self._drop(a)
        self._release_superseded()
        return True

    def _get_tensor_size(self, attr: TensorAttr) -> tuple[int, ...] | None:
        w = self._reader()
        a = (w.attrs if w is not None else self._attrs).get((attr.group_name, attr.attr_name))
        return None if a is None else tuple(a.shape)

    def get_all_tensor_attrs(self) -> list[TensorAttr]:
        w = self._reader()
        return [TensorAttr(group_name=g, attr_name=n, index=None) for (g, n) in (w.attrs if w else self._attrs)]

    # -- reporting -----------------------------------------------------------------
    def stats(self) -> dict:
        """Per attribute: cache counters and size; plus read requests/bytes/rows issued."""
        attrs = {}
        for a in self._attrs.values():
            c = a.cache
            attrs[a.label] = {"tier": a.tier, "rows": a.num_rows, "row_bytes": a.row_bytes,
                              "cache_bytes": c.nbytes if c else 0,
                              "policy": c.policy.name if c else None,
                              **(c.counters.as_dict() if c else {})}
        return {"attrs": attrs, "reads": dict(self.reads)}

    def reset_stats(self) -> None:
        from .cache import CacheCounters

        for a in self._attrs.values():
            if a.cache is not None:
                a.cache.counters = CacheCounters()
        self.reads = {"requests": 0, "bytes": 0, "rows": 0, "prefetch_skipped": 0}

    def __repr__(self) -> str:
        if self._worker is not None:
            return f"TieredFeatureStore(namespace={self.namespace!r}, worker copy, attrs={len(self._worker.attrs)})"
        return f"TieredFeatureStore(namespace={self.namespace!r}, attrs={len(self._attrs)}, policy={self.policy!r})"


