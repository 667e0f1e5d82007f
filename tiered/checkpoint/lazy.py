"""LazyCheckpointer: checkpoints that do not stall training (after DataStates-LLM).

``save(state_dict, step)`` records what to save and returns at once. A background
thread then copies the tensors into host buffers (the *snapshot*) while the
forward and backward passes run: parameters and optimizer state do not change
until the optimizer steps. A pre-hook on ``optimizer.step`` (``attach``) makes the
step wait only for the tensors still being copied, and copies the ones nobody
has started on itself, so no tensor is ever saved half-updated. Tensors no
attached hook protects are copied inside ``save`` (``unguarded="copy"``).

The checkpointer is a client of a :class:`~tiered.TieredStore`, not a store of its own:
snapshot buffers come from its reservation of the store's host tier (owner
``checkpoint/<name>``; at most ``host_buffer`` bytes, or its share, at a time), each piece is
written as a store object of that owner, and a store retention keeps the committed bytes
on the storage tier, within its capacity (see :mod:`.commit`). Its directories are its own
(:mod:`.dirs`), and a load pins the bytes it reads against a concurrent retire. Then
optionally a cold tier: a zarr v3 group per step, zstd-compressed, written from the
storage copy. Tensors already held by the store (``StoreRef``) are checkpointed by
reference: the same retention keeps their extent until the checkpoint is retired.

Call order: ``LazyCheckpointer(...)`` -> ``open()`` (opens the store unless given one,
cleans up after a crash, starts the threads) -> ``attach(optimizer)`` -> ``save`` /
``load`` / ``latest`` -> ``close()`` (waits for pending saves).
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from tiered.allocators import align_up
from tiered.io_engine import IOFuture

from ..config import Config, load_config
from ..sizes import parse_size
from .commit import Levels, commit_order, part_record
from .dirs import DirectoryClaim
from .format import SEGMENT, CheckpointError, StoreRef, committed_steps, dtype_name, encode_tree
from .host import CheckpointHost
from .load import Loading
from .snapshot import CheckpointHandle, Snapshots, _Piece

__all__ = ["CheckpointHandle", "LazyCheckpointer", "StoreRef"]

class LazyCheckpointer(Snapshots, Levels, Loading):
    """See the module docstring.

    ``save`` raises the failures of earlier saves nobody waited for (``wait_all`` and ``close``
    raise them too).
    ``store``: an open TieredStore to write through (it stays open on ``close``); without
    it the checkpointer opens one for ``config`` (path, dict, Config or None for the
    default) and closes it on ``close``. The checkpoints' bytes live on storage tier
    ``tier`` (default the first), their manifests in ``<tier path>/checkpoints/<name>``
    unless ``directory`` is given. ``cold_tier`` / ``cold_directory``: also keep a
    zstd-compressed zarr copy there. ``keep_last`` / ``cold_keep_last``: how many
    committed steps each level keeps. Host memory is the store's host tier, charged to owner
    ``checkpoint/<name>``: ``host_share`` (bytes, "2GiB" or "25%"; default the config's
    ``[owners.checkpoint]`` share) reserves a guaranteed share, which is then the most the
    checkpointer holds at once; without a share it competes for free memory and holds at most
    ``host_buffer`` bytes at once (a snapshot larger than that streams through it, and the
    optimizer step may then wait for the disk); ``prefault`` faults the host tier's memory in
    at ``open`` (:meth:`TieredStore.prefault_host`; it changes no byte and takes no memory from
    other owners), so snapshots do not pay page faults. ``backend`` overrides
    ``[engine] backend`` of the store it opens (a name or a Backend, e.g. a FaultyBackend).
    """

    _save_raises_earlier_failures = True

    def __init__(self, config: Config | str | os.PathLike | dict | None = None, *, name: str = "default",
                 directory: str | os.PathLike | None = None, tier: str | None = None, keep_last: int = 3,
                 cold_tier: str | None = None, cold_directory: str | os.PathLike | None = None,
                 cold_keep_last: int | None = None, cold_level: int = 3, host_buffer: int | str = "1GiB",
                 host_share: int | str | None = None, store: Any = None, unguarded: str = "copy", host_wait: float = 120.0,
                 backend: Any = None, prefault: bool = True) -> None:
        self.config = _config_for(config, store, backend)
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if unguarded not in ("copy", "trust"):
            raise ValueError(f"unguarded must be 'copy' or 'trust', got {unguarded!r}")
        self.tier = self._storage_tier(tier, "tier").name
        if directory is None:
            directory = Path(self._storage_tier(tier, "tier").path) / "checkpoints" / name
        self.directory = Path(directory).resolve()
        self.cold_directory: Path | None = None
        if cold_directory is not None:
            self.cold_directory = Path(cold_directory).resolve()
        elif cold_tier is not None:
            self.cold_directory = Path(self._storage_tier(cold_tier, "cold_tier").path) / "checkpoints" / name
        self.name = name
        self.keep_last = keep_last
        self.cold_keep_last = keep_last if cold_keep_last is None else cold_keep_last
        self.cold_level = cold_level
        self.host_buffer = parse_size(host_buffer, where="host_buffer")
        if self.host_buffer < SEGMENT:
            raise CheckpointError(f"host_buffer = {host_buffer!r}: must hold at least one {SEGMENT}-byte segment")
        self.host_share = host_share
        self.owner = f"checkpoint/{name}"
        self.store = store
        self._own_store = store is None
        self._backend = backend
        self.unguarded = unguarded
        self.host_wait = host_wait
        self.prefault = prefault
        dir_id = f"{zlib.crc32(str(self.directory).encode()):08x}"
        self._tag_prefix = f"ckpt:{dir_id}:"  # store retention tags: <prefix><step>:<token>
        self._key_prefix = _key_prefix(name, dir_id)  # store keys of pieces: <prefix><step>-<token>/<index>
        self.host: CheckpointHost | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, list[_Piece]] = {}  # storage data_ptr -> pieces not yet copied
        self._handles: list[CheckpointHandle] = []
        self._cold_busy: Counter[int] = Counter()  # step -> cold copies still reading it (a step can be saved twice)
        self._pins: Counter[tuple] = Counter()  # bytes of a manifest -> readers (loads, cold copies) of them
        self._deferred: dict[tuple, tuple] = {}  # pinned bytes whose manifest is gone: freed on the last _unpin
        self._commit_seq = 0  # commit_seq of the last manifest committed (read back at open)
        self._attached: list[Any] = []
        self._hooks: list[Any] = []
        self._seq = 0
        self._current: CheckpointHandle | None = None  # the save the background thread copies
        self._streams: dict = {}  # CUDA device -> the side stream snapshots are copied on
        self._failures: list[tuple[CheckpointHandle, BaseException]] = []  # not yet raised to the caller
        self._retire_lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._claim_dirs: DirectoryClaim | None = None
        self._opened = False

    def _storage_tier(self, name: str | None, what: str):
        tiers = self.config.storage_tiers
        if not tiers:
            raise CheckpointError(f"{self.config.source}: no storage tier to keep checkpoints on")
        if name is None:
            return tiers[0]
        for t in tiers:
            if t.name == name:
                return t
        raise CheckpointError(f"{what}={name!r}: no storage tier of that name in {self.config.source}; "
                              f"known: {', '.join(t.name for t in tiers)}")

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> "LazyCheckpointer":
        if self._opened:
            return self
        self._claim_dirs = DirectoryClaim({"directory": self.directory} |
                                          ({"cold_directory": self.cold_directory} if self.cold_directory else {}))
        self._claim_dirs.acquire()
        try:
            if self._own_store:
                self.store = _open_store(self.config, self._backend)
            self.host = CheckpointHost(self.store, self.host_buffer, self.owner, self.host_share)
            if self.host.capacity < SEGMENT:
                raise CheckpointError(f"{self.owner} may hold {self.host.capacity} bytes of the host tier of the "
                                      f"store at {self.store.root}: less than one {SEGMENT}-byte segment")
            self._recover()
            if self.prefault:  # now, not during the first snapshot (page faults would slow its copies)
                if not self.store.prefault_host():  # faults the host tier in, touching nobody's bytes
                    self.host.prefault()  # a kernel without MADV_POPULATE_WRITE: this owner's free share
            self._start_threads()
        except BaseException:
            self._release_resources()
            raise
        self._opened = True
        return self

    def _start_threads(self) -> None:
        self._copy_q: queue.Queue = queue.Queue()
        self._commit_q: queue.Queue = queue.Queue()
        self._cold_q: queue.Queue = queue.Queue()
        loops = [("copy", self._copy_loop), ("commit", self._commit_loop)]
        if self.cold_directory is not None:
            loops.append(("cold", self._cold_loop))
        self._threads = [threading.Thread(target=fn, name=f"tiered-ckpt-{n}", daemon=True) for n, fn in loops]
        for t in self._threads:
            t.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish pending saves (durable and cold), stop threads, close the store if it opened it.
        Raises the first failure of a save nobody waited for. ``timeout``: seconds to wait for
        the pending saves (default: as long as they take); past it a CheckpointError, and the
        store and memory stay with the threads still running (call ``close`` again to wait more)."""
        if self._opened:
            self._opened = False
            self._copy_q.put(None)  # each loop passes the sentinel on to the next level
        elif not self._threads:
            return  # closed already (else: an earlier close timed out, and this one waits again)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise CheckpointError(f"close(): the checkpointer's thread {t.name} is still busy after {timeout} s "
                                      "(a save is stuck); its store and memory are kept while it runs")
        self._threads = []
        self._release_resources()
        self._raise_unobserved()

    def _release_resources(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        host, self.host = self.host, None
        try:
            if host is not None:
                host.close()  # its share of the host tier; buffers still out stay charged until released
        finally:
            try:
                if self._own_store and self.store is not None:
                    self.store.close()
                    self.store = None
            finally:
                claim, self._claim_dirs = self._claim_dirs, None
                if claim is not None:
                    claim.release()

    def __enter__(self) -> "LazyCheckpointer":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._opened:
            raise CheckpointError("the checkpointer is not open: call open() or use it as a context manager")

    # -- save ------------------------------------------------------------------------
    def save(self, state_dict: Any, step: int) -> CheckpointHandle:
        """Start checkpointing ``state_dict`` as ``step``; returns at once with a handle.

        Tensors must not be mutated until their snapshot is taken: attached optimizers and
        modules wait for it by themselves; other tensors are copied here (unless
        ``unguarded="trust"``). ``StoreRef`` entries are retained in the store here.
        """
        self._check_open()
        if self._save_raises_earlier_failures:
            self._raise_unobserved()
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**12:
            raise CheckpointError(f"save(step={step!r}): expected an int in [0, 10**12)")
        t0 = time.perf_counter()
        tensors: list = []
        tree = encode_tree(state_dict, tensors)
        with self._lock:
            self._seq += 1
            h = CheckpointHandle(step, self._seq)
        h.t_called = t0
        h.tree = tree
        h.token = secrets.token_hex(4)
        h.key_prefix = f"{self._key_prefix}{step}-{h.token}/"
        h.retain_tag = f"{self._tag_prefix}{step}:{h.token}"
        if self.cold_directory is not None:
            h.cold = IOFuture(f"checkpoint step {step} cold copy")
        guarded = self._guarded_ptrs() if self.unguarded == "copy" else None
        located = self._retain_refs(h, tensors)
        try:
            h.records, eager = self._plan(h, tensors, located, guarded)
        except BaseException:
            if located:
                self.store.release(h.retain_tag)  # nothing was queued: the retention goes too
            raise
        eager_ids = {id(p) for p in eager}
        with self._lock:
            for p in h.pieces:
                if id(p) not in eager_ids:
                    self._pending.setdefault(p.ptr, []).append(p)
            self._handles = [x for x in self._handles if not (x.durable.done() and (x.cold is None or x.cold.done()))]
            self._handles.append(h)
        for p in eager:
            if self._claim(p):
                self._take_private(p)  # the background thread may not be on this save yet
            h.stats["eager_bytes"] += p.length
        self._copy_q.put(h)
        h.stats["save_s"] = time.perf_counter() - t0
        return h

    def _retain_refs(self, h: CheckpointHandle, tensors: list) -> list[dict]:
        """Retain the current versions of the ``StoreRef`` entries for this save's tag."""
        refs = [(name, t) for name, t in tensors if isinstance(t, StoreRef)]
        if not refs:
            return []
        if any(t.store is not self.store for _n, t in refs):
            name = next(n for n, t in refs if t.store is not self.store)
            raise CheckpointError(f"save(step={h.step}): StoreRef {name!r} names a store this checkpointer "
                                  "was not given (LazyCheckpointer(..., store=store))")
        return self.store.retain(h.retain_tag, [t.key for _n, t in refs])

    def _plan(self, h: CheckpointHandle, tensors: list, located: list[dict], guarded: set[int] | None):
        """Cut the tensors into pieces (not copied yet); returns the manifest records (their
        ``pieces`` become ``parts`` at commit) and the pieces to copy at once (unguarded tensors)."""
        eager: list[_Piece] = []
        events: dict = {}
        records: list[dict] = []
        loc_iter = iter(located)
        for name, t in tensors:
            if isinstance(t, StoreRef):
                loc = next(loc_iter)
                records.append({"name": name, "dtype": loc["dtype"], "shape": loc["shape"], "nbytes": loc["nbytes"],
                                "parts": [part_record(loc)], "ref": {"key": t.key, "version": loc["version"]}})
                h.stats["referenced_bytes"] += loc["nbytes"]
                continue
            t = t.detach()
            nbytes = t.numel() * t.element_size()
            new = self._pieces(h, name, t, nbytes)
            if new and t.is_cuda:  # the snapshot copy waits for the work queued so far
                ready = events.get(t.device)
                if ready is None:
                    ready = events[t.device] = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(t.device))
                for p in new:
                    p.ready = ready
            records.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": nbytes,
                            "pieces": new})
            h.pieces.extend(new)
            if guarded is not None and new and new[0].ptr not in guarded:
                eager.extend(new)
            h.stats["bytes"] += nbytes
        return records, eager

    def _pieces(self, h: CheckpointHandle, name: str, t: torch.Tensor, nbytes: int) -> list[_Piece]:
        """A contiguous tensor in SEGMENT-byte pieces; any other one whole (made contiguous)."""
        if not nbytes:
            return []
        ptr = t.untyped_storage().data_ptr()
        first = len(h.pieces)
        if t.is_contiguous() and not t.is_conj() and not t.is_neg():
            flat = t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)
            return [_Piece(h, first + i, name, flat[lo:lo + min(SEGMENT, nbytes - lo)], None, lo,
                           min(SEGMENT, nbytes - lo), ptr)
                    for i, lo in enumerate(range(0, nbytes, SEGMENT))]
        if align_up(nbytes) > self.host.capacity:
            raise CheckpointError(f"save(step={h.step}): tensor {name!r} is not contiguous and larger "
                                  f"({nbytes} bytes) than host_buffer ({self.host.capacity})")
        return [_Piece(h, first, name, t, tuple(t.shape), 0, nbytes, ptr)]

    # -- background levels -----------------------------------------------------------
    def _copy_loop(self) -> None:
        while (h := self._copy_q.get()) is not None:
            try:
                self._snapshot(h)
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                self._fail_safely(h, e)
                continue
            finally:
                with self._lock:
                    self._current = None
            self._commit_q.put(h)
        self._commit_q.put(None)

    def _commit_loop(self) -> None:
        while (h := self._commit_q.get()) is not None:
            try:
                self._commit(h)
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                self._fail_safely(h, e)
                continue
            if self.cold_directory is not None:
                self._cold_q.put(h)
        self._cold_q.put(None)

    def _cold_loop(self) -> None:
        while (h := self._cold_q.get()) is not None:
            try:
                try:
                    info = self._cold_copy(h)
                finally:
                    self._unpin(h.cold_pin)
                    with self._lock:
                        self._cold_busy[h.step] -= 1
                        if self._cold_busy[h.step] <= 0:
                            del self._cold_busy[h.step]
                self._retire(self.directory, self.keep_last)  # what waited for this copy
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                h.cold.set_exception(e)
                self._record_failure(h, e)
            else:
                h.cold.set_result(info)

    # -- failures, waiting and inspection --------------------------------------------
    def _raise_unobserved(self) -> None:
        with self._lock:
            failures = [(h, e) for h, e in self._failures if not h._observed]
            self._failures = []
        if failures:
            h, exc = failures[0]
            raise CheckpointError(f"checkpoint step {h.step} failed in the background "
                                  f"({len(failures)} failure(s) nobody waited for): {exc}") from exc

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every save so far is durable (and copied to the cold tier, if any)."""
        with self._lock:
            handles, self._handles = list(self._handles), []
        deadline = None if timeout is None else time.monotonic() + timeout
        for h in handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                h.wait_cold(left)
            except TimeoutError:
                with self._lock:
                    self._handles[:0] = [x for x in handles if not x.durable.done() or
                                         (x.cold is not None and not x.cold.done())]
                raise
            except BaseException as e:
                with self._lock:
                    self._failures = [(f, x) for f, x in self._failures if f is not h]
                raise CheckpointError(f"checkpoint step {h.step} failed: {e}") from e
        self._raise_unobserved()

    def steps(self) -> dict[int, str]:
        """Committed steps -> the level holding them ("storage", else "cold")."""
        out = {s: "cold" for s in committed_steps(self.cold_directory)} if self.cold_directory else {}
        out.update({s: "storage" for s in committed_steps(self.directory)})
        return dict(sorted(out.items()))

    def latest(self) -> int | None:
        """The most recently committed step (not the highest: after a rollback they differ)."""
        order = commit_order(self.directory)
        if not order and self.cold_directory is not None:
            order = commit_order(self.cold_directory)
        return order[-1] if order else None


def _config_for(config: Any, store: Any, backend: Any) -> Config:
    """The store's config when given one (``config``, if given too, must name the same tiers)."""
    if store is None:
        return load_config(config)
    if backend is not None:
        raise CheckpointError("backend= applies to a store the checkpointer opens; with store= the store's "
                              "engine is used")
    if config is not None:
        mine = [(t.name, t.path) for t in load_config(config).storage_tiers]
        theirs = [(t.name, t.path) for t in store.config.storage_tiers]
        if mine != theirs:
            raise CheckpointError(f"config names storage tiers {mine}, but the store given has {theirs}")
    return store.config


def _key_prefix(name: str, dir_id: str) -> str:
    from ..store import StoreError, check_key

    prefix = f"ckpt/{name}/{dir_id}/"
    try:
        check_key(prefix + "0")
    except StoreError as e:
        raise CheckpointError(f"name={name!r}: not usable in a store key ({e})") from e
    return prefix


def _open_store(config: Config, backend: Any):
    """This process's store for ``config`` (shared with its other clients); closed once by ``close``."""
    from ..store import TieredStore

    return TieredStore.shared(config, **({"backend": backend} if backend is not None else {}))
