"""TieredFeatureStore: PyG node features out of core, gathered through the TieredStore.

Each attribute (``group_name``, ``attr_name``) is a table of rows split into
fixed row-range chunks; each chunk is one store object (durable, checksummed
when written, on a storage tier), or, imported in place, a range of an
existing ``.npy`` file registered as an external extent, or, for a cold and
compressed tier, a zarr v3 array. A minibatch's rows are read straight from
the chunks' extents (``TieredStore.locate``) with page-aligned O_DIRECT reads
issued concurrently through the store's engine (see ``gather.py``), and hot
rows are kept in a host row cache whose memory comes from the store's host
arena and whose policy is a ``policies.row_cache`` one (LRU, S3-FIFO, or the
hybrid static-score + frequency policy with a victim buffer).

Which attributes exist, with their chunk keys, is a small JSON catalog kept as
a store object, written after the chunks it names are durable.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch_geometric.data import FeatureStore, TensorAttr

from allocators import OutOfBudget, align_up
from io_engine import IOFuture, Op, Priority, Request, gather

from ..store import ExtentLease, StoreError, TieredStore, _dtype_from, _dtype_name
from .cache import RowCache
from .gather import Layout, plan_reads, rows_from, split_rounds, unique_rows
from .snapshots import Session
from .worker import SnapshotAttr, WorkerRows

CATALOG_FORMAT = "tiered-gnn-features"
CATALOG_VERSION = 1
TIERS = ("store", "external", "zarr")


class FeatureStoreError(StoreError):
    """Misuse of the feature store; the message names the attribute."""


# open feature stores of this process, by id: snapshotted for the child just before a fork
_OPEN: dict[int, weakref.ref] = {}


def _snapshot_before_fork() -> None:
    """Give each open feature store a worker snapshot for a forked child (a DataLoader worker)
    to read from: the child must never use the parent's engine, whose threads it lacks. The
    snapshot of the current catalog is made once and reused by later forks; the child holds
    it (``snapshots.py``) until it exits or its copy is closed."""
    for ref in list(_OPEN.values()):
        fs = ref()
        if fs is not None and fs._opened and fs._pid == os.getpid():
            try:
                fs._fork_snapshot = fs._snapshot()
            except BaseException as e:  # noqa: BLE001 - raised in the child when it reads
                fs._fork_snapshot = e


os.register_at_fork(before=_snapshot_before_fork)


def _label(group, attr) -> str:
    return f"{attr!r}" if group is None else f"{group!r}/{attr!r}"


def _jsonable_group(group):
    return list(group) if isinstance(group, tuple) else group


def _group_from_json(g):
    return tuple(g) if isinstance(g, list) else g


@dataclass
class _Attr:
    group: Any
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunk_rows: int
    tier: str
    keys: list[str]
    gen: int
    external: dict | None = None  # {"path", "offset", "identity"}
    zarr_path: str | None = None
    # runtime state
    leases: list[ExtentLease] = field(default_factory=list)
    layout: Layout | None = None
    paths: list[str] = field(default_factory=list)
    cache: RowCache | None = None
    zarr: Any = None
    lock: threading.RLock = field(default_factory=threading.RLock)  # engine callbacks may run inline
    inflight: list[tuple[np.ndarray, IOFuture]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    @property
    def label(self) -> str:
        return _label(self.group, self.name)

    def describe(self) -> dict:
        return {"group": _jsonable_group(self.group), "attr": self.name, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape), "chunk_rows": self.chunk_rows, "tier": self.tier,
                "keys": self.keys, "gen": self.gen, "external": self.external, "zarr": self.zarr_path}


class TieredFeatureStore(FeatureStore):
    """A ``torch_geometric.data.FeatureStore`` whose rows live in a :class:`TieredStore`.

    ``cache_bytes``: host memory for row caches, taken from the store's host
    arena (default: a quarter of it), shared among attributes in proportion to
    their size when each is first read (or set with :meth:`set_cache`).
    ``policy``: ``lru`` | ``s3fifo`` | ``hybrid``; ``victim_fraction`` of each
    cache goes to the victim buffer (default 0.1 for hybrid, 0 otherwise).
    ``merge_gap``: page ranges closer than this are read as one request (reading a gap is
    cheaper than another request while gap < per-request cost x bandwidth: ~100 us x ~1.5 GB/s
    for the Python engine on a virtio disk);
    ``scratch_bytes``: read buffer per gather round; ``chunk_bytes``: size of
    the row-range objects. Call ``open()`` (or use ``with``) after the store is open.

    In DataLoader worker processes (``num_workers > 0``, fork or spawn) the store is a
    read-only reader of the attributes as they were when the worker started (see
    ``worker.py``); the extents of a replaced version stay reserved while a process that
    got them may read them, until ``close()`` at the latest (see ``snapshots.py``).
    """

    def __init__(self, store: TieredStore, *, namespace: str = "features", cache_bytes: int | None = None,
                 policy: str = "hybrid", victim_fraction: float | None = None, chunk_bytes: int = 16 << 20,
                 merge_gap: int = 128 << 10, max_read: int = 4 << 20, scratch_bytes: int = 64 << 20,
                 timeout: float = 300.0, zarr_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        from policies.row_cache import ROW_CACHE_POLICIES

        if policy not in ROW_CACHE_POLICIES:
            raise FeatureStoreError(f"unknown row-cache policy {policy!r}; known: {', '.join(sorted(ROW_CACHE_POLICIES))}")
        if not 0 <= (victim_fraction or 0) < 1:
            raise FeatureStoreError(f"victim_fraction must be in [0, 1), got {victim_fraction}")
        if chunk_bytes < 4096 or scratch_bytes < max_read or max_read < 4096:
            raise FeatureStoreError(f"chunk_bytes ({chunk_bytes}) and max_read ({max_read}) must be >= 4096 and "
                                    f"scratch_bytes ({scratch_bytes}) >= max_read")
        self.store = store
        self.namespace = namespace
        self.policy = policy
        self.victim_fraction = (0.1 if policy == "hybrid" else 0.0) if victim_fraction is None else victim_fraction
        self._cache_bytes = cache_bytes
        self.chunk_bytes = int(chunk_bytes)
        self.merge_gap = int(merge_gap)
        self.max_read = int(max_read)
        self.scratch_bytes = align_up(int(scratch_bytes))
        self.timeout = float(timeout)
        self._zarr_dir = zarr_dir
        self._attrs: dict[tuple, _Attr] = {}
        self._static: dict[Any, np.ndarray] = {}
        self._cache_plan: dict[tuple, int] = {}
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
        self.store._check_open()
        if self._cache_bytes is None:
            self._cache_bytes = self.store.arena.capacity // 4
        if self._catalog_key in self.store:
            raw = self.store.get(self._catalog_key).result(timeout=self.timeout)
            try:
                doc = json.loads(raw.numpy().tobytes())
            except ValueError as e:
                raise FeatureStoreError(f"feature catalog {self._catalog_key!r} is not valid JSON ({e})") from e
            if doc.get("format") != CATALOG_FORMAT or doc.get("version") != CATALOG_VERSION:
                raise FeatureStoreError(f"{self._catalog_key!r} is not a {CATALOG_FORMAT} v{CATALOG_VERSION} catalog")
            self._next_gen = int(doc.get("next_gen", 1))
            for d in doc["attrs"]:
                a = _Attr(_group_from_json(d["group"]), d["attr"], _dtype_from(d["dtype"]), tuple(d["shape"]),
                          int(d["chunk_rows"]), d["tier"], list(d["keys"]), int(d["gen"]), d.get("external"),
                          d.get("zarr"))
                if a.tier == "external":
                    self._register_external(a)
                self._attrs[(a.group, a.name)] = a
        self._session = Session.create(self.store.root, self.namespace)
        self._opened = True
        key = id(self)
        _OPEN[key] = weakref.ref(self, lambda r: _OPEN.pop(key) if _OPEN.get(key) is r else None)
        try:
            self._collect_orphans()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Wait for prefetches, then give back cache memory and extent leases (those handed
        to worker processes too: their copies fail from then on). In a worker, close only
        the worker's own files."""
        if self._worker is not None:
            self._worker.close()
            return
        with self._lock:  # a concurrent snapshot (a fork) either finishes first or sees it closed
            if not self._opened or os.getpid() != self._pid:
                return
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
            if session is not None:
                session.close()
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
            for lease in a.leases:
                lease.release()
            a.leases, a.layout = [], None

    # -- catalog -------------------------------------------------------------------
    def _write_catalog(self) -> None:
        doc = {"format": CATALOG_FORMAT, "version": CATALOG_VERSION, "next_gen": self._next_gen,
               "attrs": [a.describe() for a in self._attrs.values()]}
        raw = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8).copy()
        self._catalog_gen += 1  # the table changed (a failed write is rolled back: the cached snapshot is redone)
        self.store.put(self._catalog_key, torch.from_numpy(raw), kind="gnn").result(timeout=self.timeout)
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

    # -- import --------------------------------------------------------------------
    def import_array(self, source, group_name=None, attr_name: str = "x", *, tier: str = "store",
                     in_place: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
        """Store a row-major array as attribute (``group_name``, ``attr_name``), one chunk at a time.

        ``source``: a torch tensor, a numpy array or ``np.memmap``, a path to a
        ``.npy`` file (memory-mapped, never read whole), or a zarr array (or the
        path of one). ``tier="store"`` copies rows into store objects on the
        store's storage tier; ``tier="zarr"`` writes a zstd-compressed zarr v3
        array (cold tier); ``in_place=True`` serves a ``.npy``/``np.memmap``
        file where it is (it must then not change). Returns the attribute's
        description.
        """
        self._check_open()
        if tier not in ("store", "zarr"):
            raise FeatureStoreError(f"import_array({_label(group_name, attr_name)}): tier must be 'store' or "
                                    f"'zarr', got {tier!r}")
        arr = _open_source(source)
        if len(arr.shape) < 1:
            raise FeatureStoreError(f"import_array({_label(group_name, attr_name)}): a 0-d array has no rows")
        dtype = _torch_dtype(arr.dtype, _label(group_name, attr_name))
        shape = tuple(int(d) for d in arr.shape)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        chunk_rows = max(1, self.chunk_bytes // max(row_bytes, 1))
        with self._lock:
            gen = self._next_gen
            self._next_gen += 1
        prefix = self._chunk_prefix(group_name, attr_name, gen)
        n = shape[0]
        starts = list(range(0, n, chunk_rows))
        a = _Attr(group_name, attr_name, dtype, shape, chunk_rows, "store", [], gen)
        if in_place:
            if tier != "store":
                raise FeatureStoreError(f"import_array({a.label}): in_place works with tier='store' only")
            fname, offset = _memmap_file(arr, a.label)
            a.tier = "external"
            a.external = {"path": fname, "offset": offset}
            a.keys = [f"{prefix}/c{i:06d}" for i in range(len(starts))]
            self._register_external(a, first=True)
        elif tier == "zarr":
            import zarr

            root = Path(self._zarr_dir) if self._zarr_dir else self.store.root / "gnn-zarr"
            path = root / self.namespace / f"{prefix.rsplit('/', 2)[-2]}-g{gen}.zarr"
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            zarr_rows = max(1, (1 << 20) // max(row_bytes, 1))
            z = zarr.create_array(str(path), shape=shape, dtype=arr.dtype, chunks=(zarr_rows, *shape[1:]),
                                  compressors=zarr.codecs.ZstdCodec(level=3), overwrite=False)
            step = max(zarr_rows, chunk_rows // zarr_rows * zarr_rows)
            for lo in range(0, n, step):
                z[lo : lo + step] = np.asarray(arr[lo : lo + step])
                if progress:
                    progress(min(lo + step, n), n)
            a.tier, a.zarr_path = "zarr", str(path)
        else:
            try:
                for i, lo in enumerate(starts):
                    part = np.array(arr[lo : lo + chunk_rows], order="C")  # one chunk in RAM, writable
                    key = f"{prefix}/c{i:06d}"
                    self.store.put(key, torch.from_numpy(part), kind="gnn").result(timeout=self.timeout)
                    a.keys.append(key)
                    self.store.evict(key)  # rows are read from storage; the row cache holds hot ones
                    if progress:
                        progress(min(lo + chunk_rows, n), n)
            except BaseException:
                for key in a.keys:
                    self.store.delete(key)
                raise
        self._install(a)
        return a.describe()

    def _register_external(self, a: _Attr, first: bool = False) -> None:
        ext = a.external
        path, offset = ext["path"], int(ext["offset"])
        st = os.stat(path)
        ident = [st.st_size, st.st_mtime_ns, st.st_ino]
        if first:
            ext["identity"] = ident
        elif ident != list(ext.get("identity") or []):
            raise FeatureStoreError(f"{a.label}: {path} changed since it was imported in place "
                                    "(size, mtime or inode differ); import it again")
        rb = a.row_bytes
        for i, key in enumerate(a.keys):
            lo = i * a.chunk_rows
            rows = min(a.chunk_rows, a.num_rows - lo)
            self.store.register_external(key, path, offset + lo * rb, rows * rb, a.dtype,
                                         (rows, *a.row_shape), kind="gnn")

    # -- readiness -----------------------------------------------------------------
    def _ready(self, a: _Attr) -> None:
        """Locate the chunks (leases) and create the row cache, once per attribute."""
        with a.lock:
            if a.tier == "zarr":
                if a.zarr is None:
                    import zarr

                    a.zarr = zarr.open_array(a.zarr_path, mode="r")
            elif a.layout is None:
                self._locate(a)
            if a.cache is None:
                self._make_cache(a)

    def _locate(self, a: _Attr) -> None:
        leases = []
        try:
            for key in a.keys:
                leases.append(self.store.locate(key))
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        paths = sorted({l.path for l in leases})
        fidx = {p: i for i, p in enumerate(paths)}
        sizes = {p: os.stat(p).st_size for p in paths}
        off = np.array([l.offset for l in leases], dtype=np.int64)
        limit = np.array([min(align_up(l.offset + l.nbytes), sizes[l.path]) for l in leases], dtype=np.int64)
        a.leases, a.paths = leases, paths
        a.layout = Layout(a.num_rows, a.row_bytes, a.chunk_rows, off,
                          np.array([fidx[l.path] for l in leases], dtype=np.int64), limit)

    def set_static_score(self, group_name, score) -> None:
        """Per-node importance for the hybrid policy (e.g. :func:`sampling_degree`), for every
        attribute of ``group_name``; caches of that group are rebuilt empty."""
        self._check_open()
        s = np.asarray(score.numpy() if isinstance(score, torch.Tensor) else score, dtype=np.float64).reshape(-1)
        for (g, _n), a in self._attrs.items():
            if g == group_name and len(s) != a.num_rows:
                raise FeatureStoreError(f"static score for group {group_name!r} has {len(s)} entries, "
                                        f"attribute {a.label} has {a.num_rows} rows")
        self._static[group_name] = s
        for (g, _n), a in self._attrs.items():
            if g == group_name:
                self._reset_cache(a)

    def set_cache(self, group_name, attr_name: str, nbytes: int) -> None:
        """Give attribute (``group_name``, ``attr_name``) a row cache of ``nbytes`` (slots + victims)."""
        a = self._attr(group_name, attr_name)
        self._cache_plan[(group_name, attr_name)] = int(nbytes)
        self._reset_cache(a)

    def _reset_cache(self, a: _Attr) -> None:
        with a.lock:
            if a.cache is not None:
                a.cache.close()
                a.cache = None

    def _make_cache(self, a: _Attr) -> None:
        from policies.row_cache import create_row_cache_policy

        nbytes = self._cache_plan.get((a.group, a.name))
        if nbytes is None:
            total = sum(x.nbytes for x in self._attrs.values()) or 1
            held = sum(x.cache.nbytes for x in self._attrs.values() if x.cache is not None)
            nbytes = min(int(self._cache_bytes * a.nbytes / total), max(0, self._cache_bytes - held))
        rows = min(a.num_rows, nbytes // max(a.row_bytes, 1))
        victims = int(rows * self.victim_fraction)
        kw = {}
        if self.policy == "hybrid" and a.group in self._static:
            kw["static_score"] = self._static[a.group]
        policy = create_row_cache_policy(self.policy, a.num_rows, rows - victims, **kw)
        a.cache = RowCache(policy, a.row_bytes, victims).open(self.store.arena, a.label)

    # -- gathers -------------------------------------------------------------------
    def _read_rows(self, a: _Attr, rows: np.ndarray, priority: Priority,
                   sink: Callable[[slice, np.ndarray], None]) -> IOFuture:
        """Read sorted unique ``rows`` from storage; ``sink(sel, data)`` receives them in
        consecutive slices of ``rows`` as rounds complete (on an engine thread)."""
        out = IOFuture(f"read {len(rows)} rows of {a.label}")
        if not len(rows):
            out.set_result(0)
            return out
        if a.tier == "zarr":  # zarr does its own I/O (decompression included), in this thread
            data = np.ascontiguousarray(a.zarr.oindex[(rows,)]).reshape(len(rows), -1).view(np.uint8)
            sink(slice(0, len(rows)), data)
            out.set_result(len(rows))
            return out
        plan = plan_reads(rows, a.layout, merge_gap=self.merge_gap, max_read=self.max_read)
        rounds = split_rounds(plan, self.scratch_bytes)
        need = max(int(plan.buf_offset[j - 1] - plan.buf_offset[i] + align_up(int(plan.length[j - 1])))
                   for i, j in rounds)
        # a prefetch never waits for memory: it may run under the attribute lock that the
        # completion callbacks of earlier reads (which free scratch) need
        wait = 0.0 if priority is Priority.PREFETCH else self.store.host_wait
        buf = self.store.arena.alloc(need, timeout=wait)
        scratch = buf.padded
        row_run = plan.row_run
        with self._lock:
            self.reads["requests"] += len(plan)
            self.reads["bytes"] += int(plan.length.sum())
            self.reads["rows"] += len(rows)
        engine = self.store.engine
        files, offs, lens, boffs = (plan.file.tolist(), plan.offset.tolist(), plan.length.tolist(),
                                    plan.buf_offset.tolist())

        def submit(k: int) -> None:
            i, j = rounds[k]
            base = boffs[i]
            # one engine call and one future per round (thousands of small reads: per-request
            # futures and callbacks were the gather's main Python cost)
            reqs = [Request(Op.READ, a.paths[files[r]], offs[r], lens[r],
                            scratch[boffs[r] - base : boffs[r] - base + lens[r]], priority) for r in range(i, j)]
            engine.submit_many(reqs).add_done_callback(lambda g: finished(k, g))

        def finished(k: int, g) -> None:
            try:
                g.result()
                i, j = rounds[k]
                lo, hi = np.searchsorted(row_run, [i, j], side="left")
                base = boffs[i]
                sink(slice(int(lo), int(hi)), rows_from(scratch, plan.row_pos[lo:hi] - base, a.row_bytes))
                if k + 1 < len(rounds):
                    submit(k + 1)
                    return
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                buf.release()
                note = f"while reading rows of feature attribute {a.label}"
                if note not in getattr(e, "__notes__", ()):
                    e.add_note(note)
                out.set_exception(e)
                return
            buf.release()
            out.set_result(len(rows))

        try:
            submit(0)
        except BaseException:
            buf.release()
            raise
        return out

    def _wait_inflight(self, a: _Attr, rows: np.ndarray) -> None:
        """Wait for running prefetches that read any of ``rows`` (so they are not read twice)."""
        with a.lock:
            waits = [f for r, f in a.inflight if not f.done() and np.isin(rows, r, assume_unique=True).any()]
        if waits:
            _done, not_done = concurrent.futures.wait(waits, timeout=self.timeout)
            if not_done:
                raise TimeoutError(f"{a.label}: prefetch still running after {self.timeout} s")

    def _start_gather(self, a: _Attr, uniq: np.ndarray) -> tuple[np.ndarray, tuple, IOFuture]:
        """Serve ``uniq`` from the cache and start reading the rest; returns (rows as bytes,
        (mask of rows that were not in cache slots, the cache they may enter), future of the reads)."""
        self._ready(a)
        out = np.empty((len(uniq), a.row_bytes), dtype=np.uint8)
        if not len(uniq):
            f = IOFuture("empty gather")
            f.set_result(0)
            return out, (np.zeros(0, dtype=bool), None), f
        self._wait_inflight(a, uniq)
        with a.lock:
            cache = a.cache
            found = cache.lookup(uniq, out)
            offer = cache.policy.peek(uniq) < 0  # misses and victim-buffer hits
        miss = np.flatnonzero(~found)

        def sink(sel: slice, data: np.ndarray) -> None:
            out[miss[sel]] = data

        return out, (offer, cache), self._read_rows(a, uniq[miss], Priority.DEMAND, sink)

    def _finish_gather(self, a: _Attr, uniq: np.ndarray, out: np.ndarray, offer: tuple, fut: IOFuture) -> None:
        fut.result(timeout=self.timeout)
        mask, cache = offer
        if mask.any():
            with a.lock:
                if a.cache is cache:  # rows read before an update, reset or close must not enter a new cache
                    cache.admit(uniq[mask], out[mask])

    def gather_rows(self, group_name, attr_name: str, index) -> torch.Tensor:
        """``x[index]`` of attribute (``group_name``, ``attr_name``) as a new CPU tensor."""
        if (w := self._reader()) is not None:
            return w.gather(group_name, attr_name, index)
        return self._gather_many([(self._attr(group_name, attr_name), index)])[0]

    def _gather_many(self, items: list[tuple[_Attr, Any]]) -> list[torch.Tensor]:
        """Gather several (attribute, index) pairs, with every attribute's reads in flight at once
        and each distinct index de-duplicated once."""
        norm: dict[int, tuple] = {}
        started = []
        try:
            for a, index in items:
                key = id(index)
                if key not in norm or norm[key][0] != a.num_rows:
                    ids, out_shape = _normalize_index(index, a.num_rows, a.label)
                    norm[key] = (a.num_rows, ids, out_shape, *unique_rows(ids))
                _n, ids, out_shape, uniq, inv = norm[key]
                started.append((a, uniq, inv, out_shape, *self._start_gather(a, uniq)))
        except BaseException:
            for _a, _u, _i, _s, _o, _m, f in started:  # never free buffers under running reads
                concurrent.futures.wait([f], timeout=self.timeout)
            raise
        results = []
        errors = []
        for a, uniq, inv, out_shape, out, offer, fut in started:
            try:
                self._finish_gather(a, uniq, out, offer, fut)
            except BaseException as e:  # noqa: BLE001 - raised below once every read is done
                errors.append(e)
                continue
            if not len(uniq):
                results.append(torch.empty((*out_shape, *a.row_shape), dtype=a.dtype))
                continue
            rows = torch.from_numpy(out).view(a.dtype) if a.dtype != torch.uint8 else torch.from_numpy(out)
            rows = rows.reshape(len(uniq), *a.row_shape)
            res = rows.index_select(0, torch.from_numpy(inv.reshape(-1))) if len(inv) != len(uniq) or not _is_identity(inv) else rows
            results.append(res.reshape(*out_shape, *a.row_shape))
        if errors:
            raise errors[0]
        return results

    # -- prefetch ------------------------------------------------------------------
    def prefetch(self, index, group_name=None, attr_names: Sequence[str] | None = None) -> IOFuture:
        """Start reading the rows ``index`` (the next minibatch's node ids) that are not cached,
        at prefetch priority, into the row caches; returns a future of the rows read.

        Call it while the current minibatch computes: a later gather of those
        rows waits for the read instead of issuing its own. Attributes on the
        zarr tier are skipped (zarr reads are synchronous).
        """
        self._check_open()
        names = attr_names if attr_names is not None else [n for (g, n) in self._attrs if g == group_name]
        futs = []
        for name in names:
            a = self._attr(group_name, name)
            if a.tier == "zarr":
                continue
            futs.append(self._prefetch_attr(a, index))
        total = IOFuture("prefetch")
        g = gather(futs, "prefetch")

        def done(f) -> None:
            if f.exception() is not None:
                total.set_exception(f.exception())
            else:
                total.set_result(sum(f.result()))

        g.add_done_callback(done)
        return total

    def _prefetch_attr(self, a: _Attr, index) -> IOFuture:
        self._ready(a)
        ids, _shape = _normalize_index(index, a.num_rows, a.label)
        uniq = np.unique(ids)
        with a.lock:
            want = uniq[~a.cache.contains(uniq)]
            for r, f in a.inflight:
                if len(want) and not f.done():
                    want = want[~np.isin(want, r, assume_unique=True)]
            cache = a.cache

            def sink(sel: slice, data: np.ndarray) -> None:
                with a.lock:
                    if a.cache is cache:
                        cache.counters.prefetched += cache.admit(want[sel], data, force=True)

            try:
                fut = self._read_rows(a, want, Priority.PREFETCH, sink)
            except OutOfBudget:  # no scratch free now: skip; the rows are read on demand
                with self._lock:
                    self.reads["prefetch_skipped"] += 1
                skipped = IOFuture(f"prefetch of {a.label} skipped (no scratch memory)")
                skipped.set_result(0)
                return skipped
            entry = (want, fut)
            a.inflight.append(entry)

        def forget(_f) -> None:
            with a.lock:
                a.inflight = [e for e in a.inflight if e is not entry]

        fut.add_done_callback(forget)
        return fut

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

    def update_tensor(self, tensor, *args, **kwargs) -> bool:
        """Replace the attribute (``index=None``) or its rows ``index``, all or nothing: a failed
        update leaves the previous data (PyG's default removes first, then puts). An index
        is handled as in :meth:`_put_tensor`."""
        attr = self._tensor_attr_cls.cast(*args, **kwargs)
        if not attr.is_fully_specified():
            raise ValueError(f"update_tensor: the TensorAttr {attr} is not fully specified "
                             "(group_name, attr_name and index are all needed; index=None means every row)")
        return self._put_tensor(tensor, attr)

    def _put_tensor(self, tensor, attr: TensorAttr) -> bool:
        """Put a whole attribute, or update rows of an existing one.

        ``index`` None, or an index naming each row 0..n-1 of the ``n``-row tensor once with
        ``n`` at least the attribute's rows, replaces the attribute (as PyG's reference store
        does: a re-put feature may grow). Any other index updates those rows, which must
        exist, with values of the attribute's dtype (they are not cast); rows are never
        dropped by an index that covers only some of them."""
        self._check_open()
        t = tensor if isinstance(tensor, torch.Tensor) else torch.as_tensor(np.asarray(tensor))
        t = t.detach().cpu()
        label = _label(attr.group_name, attr.attr_name)
        if attr.index is None:
            self.import_array(t.contiguous(), attr.group_name, attr.attr_name)
            return True
        a = self._attrs.get((attr.group_name, attr.attr_name))
        whole = _names_every_row(t, attr.index, label)
        if a is None or (whole and len(t) >= a.num_rows):
            self.import_array(_rows_in_index_order(t, attr.index, label), attr.group_name, attr.attr_name)
            return True
        a = self._attr(attr.group_name, attr.attr_name)
        if a.tier != "store":
            raise FeatureStoreError(f"put_tensor({a.label}, index=...): rows can be updated on the store tier only "
                                    f"(this attribute is on the {a.tier} tier); put the whole tensor instead")
        try:
            ids, _out_shape = _normalize_index(attr.index, a.num_rows, a.label)
        except IndexError as e:
            raise FeatureStoreError(f"put_tensor({a.label}, index=...): {e}; to replace the attribute, put a tensor "
                                    "with index=None or an index naming each of its rows 0..n-1 once") from e
        if t.numel() != len(ids) * int(np.prod(a.row_shape, dtype=np.int64)):
            raise FeatureStoreError(f"put_tensor({a.label}): {len(ids)} rows of shape {a.row_shape} expected, "
                                    f"got a tensor of shape {tuple(t.shape)}")
        if t.dtype != a.dtype:
            raise FeatureStoreError(f"put_tensor({a.label}, index=...): the attribute holds {_dtype_name(a.dtype)}, "
                                    f"got {_dtype_name(t.dtype)} rows; convert them (values are not cast)")
        self._update_rows(a, ids, t.reshape(len(ids), *a.row_shape))
        return True

    def _update_rows(self, a: _Attr, ids: np.ndarray, values: torch.Tensor) -> None:
        """Apply ``x[ids] = values`` all or nothing (the last value of a repeated id wins).

        The touched chunks are written as new objects of a new generation, then one
        catalog write switches the attribute to them, then the old chunks are deleted:
        a crash before the catalog write leaves every old row (the new chunks are
        orphans, collected on the next open), a crash after it every new one."""
        _u, last = np.unique(ids[::-1], return_index=True)
        pick = len(ids) - 1 - last
        ids, values = ids[pick], values[torch.from_numpy(pick)]
        chunk = ids // a.chunk_rows
        with self._lock:
            if not self._opened:
                raise FeatureStoreError(f"update of {a.label}: the feature store was closed")
            if self._attrs.get((a.group, a.name)) is not a:
                raise FeatureStoreError(f"update of {a.label}: the attribute was replaced or removed by another "
                                        "thread before this update could apply; nothing was written")
            self._shutdown_attr(a)  # leases name the old extents; the cache holds old rows
            gen = self._next_gen
            self._next_gen += 1
            prefix = self._chunk_prefix(a.group, a.name, gen)
            replaced: dict[int, tuple[str, str]] = {}
            old_keys = list(a.keys)
            try:
                for c in np.unique(chunk):
                    c = int(c)
                    sel = np.flatnonzero(chunk == c)
                    part = self.store.get(old_keys[c]).result(timeout=self.timeout)
                    part[torch.from_numpy(ids[sel] - c * a.chunk_rows)] = values[torch.from_numpy(sel)]
                    key = f"{prefix}/c{c:06d}"
                    replaced[c] = (old_keys[c], key)
                    self.store.put(key, part, kind="gnn").result(timeout=self.timeout)
                    self.store.evict(key)
                for c, (_old, key) in replaced.items():
                    a.keys[c] = key
                self._write_catalog()  # the commit point
            except BaseException:
                a.keys[:] = old_keys
                for _old, key in replaced.values():
                    if key in self.store:
                        self.store.delete(key)
                raise
        for old, _key in replaced.values():
            self.store.delete(old)
        self._release_superseded()

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

    # -- worker processes ------------------------------------------------------------
    def __getstate__(self) -> dict:
        """What a worker process gets (DataLoader with spawn): a read-only snapshot of where
        the rows are, not the store, its engine, locks or caches (see ``worker.py``). A process
        being spawned also inherits the parent's lock on the snapshot, so it is held from now on."""
        w = self._reader()
        state = {"tensor_attr_cls": self._tensor_attr_cls, "namespace": self.namespace, "policy": self.policy}
        if w is None:
            w = self._snapshot()
            state["hold"] = self._lock_for_spawned_child(w)
        state["rows"] = w  # after "hold": the copy takes its own lock while the inherited one is open
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_tensor_attr_cls=state["tensor_attr_cls"], namespace=state["namespace"],
                             policy=state["policy"], _worker=state["rows"], _pid=os.getpid(), _opened=False,
                             _attrs={}, _fork_snapshot=None, _session=None, _static={}, _cache_plan={},
                             reads={"requests": 0, "bytes": 0, "rows": 0, "prefetch_skipped": 0})
        if state.get("hold") is not None:
            os.close(state["hold"].detach())  # the copy holds its own lock now

    def _lock_for_spawned_child(self, rows: WorkerRows):
        """The parent's shared-lock descriptor on snapshot ``rows``, duplicated into the process
        being spawned (multiprocessing spawn/forkserver), or None for a plain pickle (the copy
        then takes the lock when it is unpickled, if the snapshot is still held then)."""
        from multiprocessing.context import get_spawning_popen

        popen = get_spawning_popen()
        with self._lock:
            exports = self._session.exports if self._session is not None else []
            export = next((e for e in exports if e.rows is rows), None)
            if popen is None or export is None or export.hold_fd is None:
                return None
            return popen.DupFd(popen.duplicate_for_child(export.hold_fd))

    def _reader(self) -> WorkerRows | None:
        """The worker snapshot to read from, or None in the process that opened the store."""
        pid = os.getpid()
        w = self._worker
        if w is not None:
            if w.pid != pid:  # a worker copy forked again
                w = self._worker = w.fresh()
            return w
        if pid == self._pid:
            return None
        snap = self._fork_snapshot  # a forked child of the process that opened the store
        if isinstance(snap, BaseException):
            raise FeatureStoreError(f"feature store {self.namespace!r}: the snapshot for this forked process "
                                    f"failed in the parent ({snap})") from snap
        if snap is None:
            raise FeatureStoreError(f"feature store {self.namespace!r} was not open when this process was forked")
        self._worker = snap.fresh()
        return self._worker

    def _snapshot(self) -> WorkerRows:
        """Every attribute with its chunks' extents, each held while a process may read the
        snapshot (see ``snapshots.py``); made once per catalog generation."""
        self._check_open()
        with self._lock:
            if not self._opened:  # closed since the check
                raise FeatureStoreError("the feature store is not open: call open() or use it as a context manager")
            current = self._session.current
            if current is not None and current.gen == self._catalog_gen:
                return current.rows
            attrs, leases = [], []
            try:
                for a in list(self._attrs.values()):
                    chunks = []
                    for key in ([] if a.tier == "zarr" else a.keys):
                        leases.append(lease := self.store.locate(key))
                        chunks.append((lease.path, lease.offset, lease.nbytes))
                    attrs.append(SnapshotAttr(a.group, a.name, a.dtype, tuple(a.shape), a.chunk_rows, a.tier,
                                              chunks, a.zarr_path))
                export = self._session.add(self._catalog_gen, WorkerRows(self.namespace, attrs, self.max_read),
                                           leases)
            except BaseException:
                for lease in leases:
                    lease.release()
                raise
            self._session.reap(self._catalog_gen)
            return export.rows

    def _release_superseded(self) -> None:
        """Give back the extents of snapshots older than the catalog that no process holds."""
        with self._lock:
            if self._session is not None:
                self._session.reap(self._catalog_gen)

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


# ----------------------------------------------------------------------------- helpers


def sampling_degree(edge_index, num_nodes: int) -> np.ndarray:
    """How often each node can be drawn as a neighbor: its count as an edge source.

    PyG's neighbor samplers walk incoming edges (``edge_index[1]`` is the node
    sampled from), so a node's features are fetched in proportion to this
    degree; it is the static score the hybrid policy wants.
    """
    src = edge_index[0].numpy() if isinstance(edge_index, torch.Tensor) else np.asarray(edge_index)[0]
    return np.bincount(src.astype(np.int64), minlength=num_nodes).astype(np.float64)


def window(batches: Iterable, fs: TieredFeatureStore, *, depth: int = 1, group_name=None,
           attr_names: Sequence[str] | None = None) -> Iterator:
    """Yield ``batches`` (node-id tensors/arrays) with prefetches of the next ``depth`` already
    issued: the window prefetch of GIDS, for loops that know upcoming ids."""
    it = iter(batches)
    queue: list = []
    for _ in range(depth + 1):
        try:
            queue.append((b := next(it), fs.prefetch(b, group_name, attr_names) if queue else None))
        except StopIteration:
            break
    while queue:
        b, f = queue.pop(0)
        try:
            nb = next(it)
            queue.append((nb, fs.prefetch(nb, group_name, attr_names)))
        except StopIteration:
            pass
        if f is not None:
            f.result(timeout=fs.timeout)  # surfaces prefetch errors in the consumer's thread
        yield b


def _is_identity(inv: np.ndarray) -> bool:
    return bool(len(inv) == 0 or (inv[0] == 0 and np.all(np.diff(inv) == 1)))


def _normalize_index(index, n: int, label: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Row ids (int64, non-negative, checked) and the leading output shape for ``x[index]``."""
    if index is None:
        return np.arange(n, dtype=np.int64), (n,)
    if isinstance(index, slice):
        ids = np.arange(*index.indices(n), dtype=np.int64)
        return ids, (len(ids),)
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"feature attribute {label}: index {i} is out of range for {n} rows")
        return np.array([i % n if n else i], dtype=np.int64), ()
    if isinstance(index, torch.Tensor):
        arr = index.detach().cpu().numpy()
    else:
        arr = np.asarray(index)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise IndexError(f"feature attribute {label}: boolean mask of shape {arr.shape}, expected ({n},)")
        ids = np.flatnonzero(arr).astype(np.int64)
        return ids, (len(ids),)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64), arr.shape
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexError(f"feature attribute {label}: index must be integers, a boolean mask, a slice or None, "
                         f"got dtype {arr.dtype}")
    ids = arr.reshape(-1).astype(np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -n or hi >= n:
        bad = lo if lo < -n else hi
        raise IndexError(f"feature attribute {label}: index {bad} is out of range for {n} rows "
                         f"(valid: {-n}..{n - 1})")
    if lo < 0:
        ids = np.where(ids < 0, ids + n, ids)
    return ids, arr.shape


def _names_every_row(t: torch.Tensor, index, label: str) -> bool:
    """Whether ``index`` names each row 0..len(t)-1 of ``t`` exactly once."""
    n = len(t) if t.dim() else 0
    try:
        ids, _shape = _normalize_index(index, n, label)
    except IndexError:
        return False
    return len(ids) == n and np.array_equal(np.sort(ids), np.arange(n))


def _rows_in_index_order(t: torch.Tensor, index, label: str) -> torch.Tensor:
    """The rows of a new attribute put with ``index``: row ``index[i]`` is ``t[i]``. The index
    must name every row 0..len(t)-1 exactly once (the attribute has no other rows)."""
    n = len(t) if t.dim() else 0
    why = f"put_tensor({label}, index=...): a new attribute needs an index naming every row 0..{n - 1} exactly once"
    try:
        ids, _shape = _normalize_index(index, n, label)
    except IndexError as e:
        raise FeatureStoreError(f"{why} ({e})") from e
    if len(ids) != n or not np.array_equal(np.sort(ids), np.arange(n)):
        raise FeatureStoreError(f"{why}; got {len(ids)} ids, {len(np.unique(ids))} distinct")
    if _is_identity(ids):
        return t.contiguous()
    out = torch.empty_like(t)
    out[torch.from_numpy(ids)] = t
    return out


def _torch_dtype(dt, label: str) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dt)).dtype
    except TypeError as e:
        raise FeatureStoreError(f"{label}: numpy dtype {dt} has no torch equivalent") from e


def _open_source(source):
    """An array-like with ``shape``/``dtype``/slicing, without reading the data."""
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().contiguous().numpy()
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.suffix == ".npy":
            return np.load(p, mmap_mode="r")
        import zarr

        return zarr.open_array(str(p), mode="r")
    if hasattr(source, "shape") and hasattr(source, "dtype") and hasattr(source, "__getitem__"):
        return source
    raise FeatureStoreError(f"cannot import from {type(source).__name__}: expected a tensor, a numpy array or "
                            "memmap, a .npy path, or a zarr array")


def _memmap_file(arr, label: str) -> tuple[str, int]:
    if not isinstance(arr, np.memmap) or arr.filename is None:
        raise FeatureStoreError(f"import_array({label}, in_place=True): needs a .npy path or an np.memmap of a file, "
                                f"got {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise FeatureStoreError(f"import_array({label}, in_place=True): {arr.filename} is not C-contiguous")
    base_off = int(arr.offset)
    # a slice of a memmap keeps the file's offset; find where this view starts in the file
    root = arr
    while isinstance(getattr(root, "base", None), np.memmap):
        root = root.base
    delta = arr.__array_interface__["data"][0] - np.asarray(root).__array_interface__["data"][0] if root is not arr else 0
    return str(os.path.abspath(arr.filename)), base_off + int(delta)
