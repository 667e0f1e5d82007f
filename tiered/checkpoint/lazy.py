"""LazyCheckpointer: checkpoints that do not stall training (after DataStates-LLM).

``save(state_dict, step)`` records what to save and returns at once. A background
thread then copies the tensors into host buffers (the *snapshot*) while the
forward and backward passes run: parameters and optimizer state do not change
until the optimizer steps. A pre-hook on ``optimizer.step`` (``attach``) makes the
step wait only for the tensors still being copied, and copies the ones nobody
has started on itself, so no tensor is ever saved half-updated. Tensors no
attached hook protects are copied inside ``save`` (``unguarded="copy"``).

Levels, each flushed in the background: host buffers (a :class:`HostArena`) ->
the storage tier (O_DIRECT writes through the :class:`IOEngine`, fsync, then the
manifest: see :mod:`.format`) -> optionally a cold tier (a zarr v3 store per step,
zstd-compressed, written from the storage copy). Tensors held by a
:class:`~tiered.TieredStore` (``StoreRef``) are checkpointed by reference: the
store keeps their extent (``TieredStore.retain``) until the checkpoint is retired.

Call order: ``LazyCheckpointer(...)`` -> ``open()`` (locks the directory, cleans
up after a crash, starts the engine and threads) -> ``attach(optimizer)`` ->
``save`` / ``load`` / ``latest`` -> ``close()`` (waits for pending saves).
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
from collections import Counter
import queue
import secrets
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from allocators import HostArena, OutOfBudget, align_up
from io_engine import IOEngine, IOFuture, Priority, chain, gather

from ..atomic import fsync_dir, remove_stale_temps, write_json_atomic
from ..config import Config, load_config
from ..sizes import parse_size
from ._io import read_verified
from .format import (
    COLD_RE, DATA_RE, FORMAT, FORMAT_VERSION, SEGMENT, CheckpointChecksumError, CheckpointError, cold_name,
    committed_steps, data_name, decode_tree, dtype_from, dtype_name, encode_tree, manifest_name, read_manifest,
    referenced_files, segment_crcs,
)

log = logging.getLogger("tiered.checkpoint")

_PENDING, _CLAIMED, _COPIED = 0, 1, 2


@dataclass(frozen=True)
class StoreRef:
    """A state-dict entry whose current version lives in ``store`` under ``key``:
    checkpointed by reference to its extent, never read back."""

    store: Any  # TieredStore
    key: str


class _Piece:
    """Up to SEGMENT bytes of one tensor: the unit of copying, checksumming and writing."""

    __slots__ = ("handle", "index", "src", "shape", "offset", "length", "ptr", "state", "event",
                 "buf", "crcs", "error", "submitted", "ready")

    def __init__(self, handle, index, src, shape, offset, length, ptr) -> None:
        self.handle, self.index, self.src, self.shape = handle, index, src, shape
        self.offset, self.length, self.ptr = offset, length, ptr
        self.state = _PENDING
        self.event = threading.Event()
        self.buf = None
        self.crcs: list[int] = []
        self.error: BaseException | None = None
        self.submitted = False
        self.ready = None  # CUDA: event after which ``src`` holds the bytes to save


class CheckpointHandle:
    """One ``save``: wait for it to be durable (``wait``), or just for its snapshot."""

    def __init__(self, step: int, seq: int) -> None:
        self.step = step
        self.seq = seq
        self.t_called = time.perf_counter()
        self.stats: dict[str, float] = {"save_s": 0.0, "guard_wait_s": 0.0, "snapshot_s": float("nan"),
                                        "durable_s": float("nan"), "cold_s": float("nan"), "bytes": 0,
                                        "referenced_bytes": 0, "eager_bytes": 0}
        self._snapshot = threading.Event()
        self.durable = IOFuture(f"checkpoint step {step} durable")
        self.cold: IOFuture | None = None
        self._observed = False
        # filled by save()
        self.pieces: list[_Piece] = []
        self.records: list[dict] = []
        self.tree: Any = None
        self.data_file = ""
        self.token = ""
        self.retain_tag: str | None = None
        self.writes: list[IOFuture] = []
        self.taken: list[_Piece] = []  # copied into host buffers by a guard, not yet written
        self.doc: dict | None = None

    @property
    def stall_s(self) -> float:
        """Time the caller was blocked: inside ``save`` plus waits in the step hook."""
        return self.stats["save_s"] + self.stats["guard_wait_s"]

    def snapshot_done(self) -> bool:
        return self._snapshot.is_set()

    def wait_snapshot(self, timeout: float | None = None) -> None:
        if not self._snapshot.wait(timeout):
            raise TimeoutError(f"checkpoint step {self.step}: snapshot not complete within {timeout} s")

    def done(self) -> bool:
        return self.durable.done()

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the checkpoint is durable and committed; raises what made it fail."""
        self._observed = True
        return self.durable.result(timeout)

    def wait_cold(self, timeout: float | None = None) -> dict | None:
        self.wait(timeout)
        return None if self.cold is None else self.cold.result(timeout)

    def __repr__(self) -> str:
        state = "durable" if self.done() else ("snapshotted" if self.snapshot_done() else "copying")
        return f"<CheckpointHandle step={self.step} {state}>"


class LazyCheckpointer:
    """See the module docstring.

    ``config``: the tiered config (path, dict, Config or None for the default); the
    checkpoints live in ``<tier path>/checkpoints/<name>`` (``tier``: a storage tier
    name, default the first) unless ``directory`` is given. ``cold_tier`` /
    ``cold_directory``: also keep a zstd-compressed zarr copy there.
    ``keep_last`` / ``cold_keep_last``: how many committed steps each level keeps.
    ``host_buffer``: bytes of host memory for snapshots (a snapshot larger than this
    streams through it, and the optimizer step may then wait for the disk).
    ``store``: the TieredStore whose objects ``StoreRef`` entries name.
    ``backend`` overrides ``[engine] backend`` (a name or a Backend, e.g. a FaultyBackend).
    """

    def __init__(self, config: Config | str | os.PathLike | dict | None = None, *, name: str = "default",
                 directory: str | os.PathLike | None = None, tier: str | None = None, keep_last: int = 3,
                 cold_tier: str | None = None, cold_directory: str | os.PathLike | None = None,
                 cold_keep_last: int | None = None, cold_level: int = 3, host_buffer: int | str = "1GiB",
                 store: Any = None, unguarded: str = "copy", host_wait: float = 120.0,
                 backend: Any = None, prefault: bool = True) -> None:
        self.config = load_config(config)
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if unguarded not in ("copy", "trust"):
            raise ValueError(f"unguarded must be 'copy' or 'trust', got {unguarded!r}")
        if directory is None:
            spec = self._storage_tier(tier, "tier")
            directory = Path(spec.path) / "checkpoints" / name
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
        self.store = store
        self.unguarded = unguarded
        self.host_wait = host_wait
        self.prefault = prefault
        self._backend = backend if backend is not None else self.config.engine.backend
        self._tag_prefix = f"ckpt:{zlib.crc32(str(self.directory).encode()):08x}:"
        self._lock = threading.Lock()
        self._pending: dict[int, list[_Piece]] = {}  # storage data_ptr -> pieces not yet copied
        self._handles: list[CheckpointHandle] = []
        self._cold_busy: Counter[int] = Counter()  # step -> cold copies still reading it (a step can be saved twice)
        self._attached: list[Any] = []
        self._hooks: list[Any] = []
        self._seq = 0
        self._current: CheckpointHandle | None = None  # the save the background thread copies
        self._streams: dict = {}  # CUDA device -> the side stream snapshots are copied on
        self._failures: list[tuple[CheckpointHandle, BaseException]] = []  # not yet raised to the caller
        self._retire_lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self.arena: HostArena | None = None
        self.engine: IOEngine | None = None
        self._lock_fd: int | None = None
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
        for d in filter(None, (self.directory, self.cold_directory)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"checkpoint directory {self.directory} is open in another process "
                                  f"(lock {self.directory / '.lock'})") from None
        self._lock_fd = fd
        try:
            self._recover()
            # touched now, not during the first snapshot (page faults would slow its copies)
            self.arena = HostArena(self.host_buffer, name="checkpoint host buffer", prefault=self.prefault).open()
            e = self.config.engine
            self.engine = IOEngine(self._backend, workers=e.workers, queue_depth=e.queue_depth, chunk=e.chunk,
                                   direct=e.direct).open()
            self._copy_q: queue.Queue = queue.Queue()
            self._commit_q: queue.Queue = queue.Queue()
            self._cold_q: queue.Queue = queue.Queue()
            loops = [("copy", self._copy_loop), ("commit", self._commit_loop)]
            if self.cold_directory is not None:
                loops.append(("cold", self._cold_loop))
            self._threads = [threading.Thread(target=fn, name=f"tiered-ckpt-{n}", daemon=True) for n, fn in loops]
            for t in self._threads:
                t.start()
        except BaseException:
            self._release_resources()
            raise
        self._opened = True
        return self

    def close(self) -> None:
        """Finish pending saves (durable and cold), stop threads, release memory and the lock.
        Raises the first failure of a save nobody waited for."""
        if not self._opened:
            return
        self._opened = False
        self._copy_q.put(None)  # each loop passes the sentinel on to the next level
        for t in self._threads:
            t.join()
        self._threads = []
        self._release_resources()
        self._raise_unobserved()

    def _release_resources(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "LazyCheckpointer":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._opened:
            raise CheckpointError("the checkpointer is not open: call open() or use it as a context manager")

    def _recover(self) -> None:
        """Delete what an interrupted save left: temp manifests, data files and zarr copies no
        committed manifest names, store retentions no committed checkpoint uses."""
        tags = set()
        for d, pattern in ((self.directory, DATA_RE), (self.cold_directory, COLD_RE)):
            if d is None:
                continue
            removed = remove_stale_temps(d)
            manifests = committed_steps(d)
            keep = referenced_files(manifests)
            for p in manifests.values():
                tag = read_manifest(p).get("retain_tag")
                if tag:
                    tags.add(tag)
            for name in os.listdir(d):
                if pattern.match(name) and name not in keep:
                    path = d / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    removed += 1
            if removed:
                fsync_dir(d)
                log.info("checkpoint %s: removed %d leftovers of interrupted saves", d, removed)
        if self.store is not None:
            for tag in self.store.retained(self._tag_prefix):
                if tag not in tags:
                    self.store.release(tag)

    # -- protection of tensors being snapshotted -------------------------------------
    def attach(self, obj: Any) -> None:
        """Protect ``obj``'s tensors while a snapshot still copies them: an optimizer (a pre-hook
        on ``step`` waits for its parameters and state), or a module (a forward pre-hook waits
        for its buffers, which the forward may update, e.g. batch-norm statistics)."""
        if isinstance(obj, torch.optim.Optimizer):
            def step_hook(opt, args, kwargs) -> None:
                self.guard(_optim_tensors(opt))

            self._hooks.append(obj.register_step_pre_hook(step_hook))
        elif isinstance(obj, torch.nn.Module):
            def forward_hook(mod, args) -> None:
                self.guard(list(mod.buffers(recurse=False)))

            # on every module that owns buffers, not only the root: a submodule can be called on
            # its own (model.backbone(x)) and must not update its statistics mid-snapshot
            for m in obj.modules():
                if next(m.buffers(recurse=False), None) is not None:
                    self._hooks.append(m.register_forward_pre_hook(forward_hook))
        else:
            raise TypeError(f"attach() takes a torch.optim.Optimizer or a torch.nn.Module, not {type(obj).__name__}")
        self._attached.append(obj)

    def guard(self, tensors: Iterable[torch.Tensor]) -> float:
        """Return once no pending snapshot still needs the current bytes of ``tensors`` (call it
        before mutating tensors no attached hook covers). Pieces nobody copies yet are copied
        here; the seconds spent waiting are returned and charged to the saves' stall."""
        if not self._pending:
            return 0.0
        t0 = time.perf_counter()
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
        with self._lock:
            todo = [p for ptr in ptrs for p in self._pending.get(ptr, ())]
        if not todo:
            return 0.0
        todo.sort(key=lambda p: (p.handle.seq, p.index))
        for p in todo:
            if self._claim(p):
                self._take(p)
            else:
                p.event.wait()
        dt = time.perf_counter() - t0
        for h in {p.handle for p in todo}:
            h.stats["guard_wait_s"] += dt
        return dt

    def _guarded_ptrs(self) -> set[int]:
        tensors: list[torch.Tensor] = []
        for obj in self._attached:
            if isinstance(obj, torch.optim.Optimizer):
                tensors.extend(_optim_tensors(obj))
            else:
                tensors.extend(obj.buffers())
        return {t.untyped_storage().data_ptr() for t in tensors}

    def _claim(self, p: _Piece) -> bool:
        with self._lock:
            if p.state != _PENDING:
                return False
            p.state = _CLAIMED
            return True

    def _copy(self, p: _Piece, drain) -> None:
        """Background thread: copy a claimed piece into a host buffer; when the buffer space is
        full, ``drain()`` flushes the pieces copied so far and the allocation waits for them."""
        buf = None
        try:
            buf = self.arena.try_alloc(p.length)
            deadline = time.monotonic() + self.host_wait
            while buf is None:  # flush what is copied (guards too keep copying), then wait a bit
                drain()
                try:
                    buf = self.arena.alloc(p.length, timeout=0.05)
                except OutOfBudget:
                    if time.monotonic() > deadline:
                        raise
            dst = torch.from_numpy(buf.array)
            if p.shape is not None:  # a non-contiguous tensor: copied whole, made contiguous
                dst = dst.view(p.src.dtype).view(p.shape)
            if p.src.is_cuda:
                self._copy_from_device(p, dst)
            else:
                dst.copy_(p.src)
            p.buf = buf
        except BaseException as e:  # noqa: BLE001 - fails the save through its handle
            p.error = e
            if buf is not None:
                buf.release()
        finally:
            p.src = None
            self._settle(p, _COPIED)

    def _copy_from_device(self, p: _Piece, dst: torch.Tensor) -> None:
        """Device -> host on a side stream (training kernels keep running), after the work that
        produced the bytes (``p.ready``, recorded on the saving stream) and into pinned memory
        when the arena is pinned; returns when the bytes are in host memory."""
        dev = p.src.device
        stream = self._streams.get(dev)
        if stream is None:
            stream = self._streams[dev] = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            stream.wait_event(p.ready)
            dst.copy_(p.src, non_blocking=self.arena.pinned)
        stream.synchronize()

    def _take(self, p: _Piece) -> None:
        """Caller's thread: snapshot a claimed piece now. Into a free host buffer when the
        background thread works on this save (it writes such pieces when it needs their
        space, so holding them cannot block it); else, and for device tensors (a device-side
        copy is faster than a synchronous transfer), into private memory."""
        buf = None
        if not p.src.is_cuda and self._current is p.handle:
            buf = self.arena.try_alloc(p.length)
        if buf is None:
            self._take_private(p)
            return
        try:
            dst = torch.from_numpy(buf.array)
            (dst.view(p.src.dtype).view(p.shape) if p.shape is not None else dst).copy_(p.src)
        except BaseException as e:  # noqa: BLE001 - fails the save through its handle, not the step
            buf.release()
            p.error = e
            p.src = None
            self._settle(p, _COPIED)
            return
        p.buf = buf
        p.src = None
        with self._lock:
            p.handle.taken.append(p)
        self._settle(p, _COPIED)

    def _take_private(self, p: _Piece) -> None:
        """Caller's thread (a guard, or ``save`` for unguarded tensors): snapshot a claimed piece
        into private memory at once, without waiting for host buffers (that would make the
        caller wait for the disk); the background thread moves it into a host buffer later."""
        try:
            p.src = p.src.clone()  # on CUDA: a device-side copy, queued before the mutation
            if p.src.is_cuda:
                p.ready = torch.cuda.Event()
                p.ready.record()
        except BaseException as e:  # noqa: BLE001 - fails the save through its handle, not the step
            p.error = e
            p.src = None
            self._settle(p, _COPIED)
            return
        self._settle(p, _PENDING)

    def _settle(self, p: _Piece, state: int) -> None:
        """The piece's bytes are safe from mutation now: nobody needs to guard it any more."""
        with self._lock:
            p.state = state
            lst = self._pending.get(p.ptr)
            if lst is not None:
                try:
                    lst.remove(p)
                except ValueError:
                    pass
                if not lst:
                    del self._pending[p.ptr]
        p.event.set()

    # -- save ------------------------------------------------------------------------
    def save(self, state_dict: Any, step: int) -> CheckpointHandle:
        """Start checkpointing ``state_dict`` as ``step``; returns at once with a handle.

        Tensors must not be mutated until their snapshot is taken: attached optimizers and
        modules wait for it by themselves; other tensors are copied here (unless
        ``unguarded="trust"``). ``StoreRef`` entries are retained in the store here.
        """
        self._check_open()
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
        if self.cold_directory is not None:
            h.cold = IOFuture(f"checkpoint step {step} cold copy")
        h.data_file = data_name(step, h.token)
        guarded = self._guarded_ptrs() if self.unguarded == "copy" else None
        refs = [(i, name, t) for i, (name, t) in enumerate(tensors) if isinstance(t, StoreRef)]
        if refs:
            if self.store is None or any(t.store is not self.store for _i, _n, t in refs):
                raise CheckpointError(f"save(step={step}): StoreRef {refs[0][1]!r} names a store this "
                                      "checkpointer was not given (LazyCheckpointer(..., store=store))")
            h.retain_tag = f"{self._tag_prefix}{step}:{h.token}"
            located = self.store.retain(h.retain_tag, [t.key for _i, _n, t in refs])
        try:
            records, eager = self._plan(h, tensors, located if refs else [], guarded)
        except BaseException:
            if h.retain_tag:
                self.store.release(h.retain_tag)  # nothing was queued: the retention goes too
            raise
        h.records = records
        eager_ids = {id(p) for p in eager}
        lazy_pieces = [p for p in h.pieces if id(p) not in eager_ids]
        with self._lock:
            for p in lazy_pieces:
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

    def _plan(self, h: CheckpointHandle, tensors: list, located: list[dict], guarded: set[int] | None):
        """Lay the tensors out in the data file and cut them into pieces (not copied yet);
        returns the manifest records and the pieces to copy at once (unguarded tensors)."""
        eager: list[_Piece] = []
        events: dict = {}
        offset = 0
        records: list[dict] = []
        loc_iter = iter(located)
        for name, t in tensors:
            if isinstance(t, StoreRef):
                loc = next(loc_iter)
                records.append({"name": name, "dtype": loc["dtype"], "shape": loc["shape"], "nbytes": loc["nbytes"],
                                "file": loc["path"], "offset": loc["offset"], "crc32": loc["crc32"],
                                "segment": loc["segment"], "ref": {"key": t.key, "version": loc["version"]}})
                h.stats["referenced_bytes"] += loc["nbytes"]
                continue
            t = t.detach()
            nbytes = t.numel() * t.element_size()
            rec = {"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": nbytes,
                   "file": h.data_file, "offset": offset, "pieces": []}
            records.append(rec)
            ptr = t.untyped_storage().data_ptr() if nbytes else 0
            lazy = nbytes > 0 and (guarded is None or ptr in guarded)
            new: list[_Piece] = []
            if t.is_contiguous() and not t.is_conj() and not t.is_neg():
                flat = t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)
                for lo in range(0, nbytes, SEGMENT):
                    n = min(SEGMENT, nbytes - lo)
                    new.append(_Piece(h, len(h.pieces) + len(new), flat[lo:lo + n], None, offset + lo, n, ptr))
            elif nbytes:
                if align_up(nbytes) > self.host_buffer:
                    raise CheckpointError(f"save(step={h.step}): tensor {name!r} is not contiguous and larger "
                                          f"({nbytes} bytes) than host_buffer ({self.host_buffer})")
                new.append(_Piece(h, len(h.pieces), t, tuple(t.shape), offset, nbytes, ptr))
            if new and t.is_cuda:  # the snapshot copy waits for the work queued so far
                ready = events.get(t.device)
                if ready is None:
                    ready = events[t.device] = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(t.device))
                for p in new:
                    p.ready = ready
            rec["pieces"] = new
            h.pieces.extend(new)
            (eager if not lazy else []).extend(new)
            h.stats["bytes"] += nbytes
            offset += align_up(max(nbytes, 1))
        return records, eager

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

    def _snapshot(self, h: CheckpointHandle) -> None:
        path = str(self.directory / h.data_file)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        ready: collections.deque[_Piece] = collections.deque()
        with self._lock:
            self._current = h

        def drain() -> None:
            """Write the copied pieces (also those a guard copied ahead of this thread); each
            one's checksum is computed by the I/O worker that wrote it (the buffer does not
            change until released), off this thread."""
            with self._lock:
                ready.extend(h.taken)
                h.taken.clear()
            while ready:
                p = ready.popleft()
                if p.submitted:
                    continue
                p.buf.padded[p.length:] = 0
                wf = self.engine.write(path, p.offset, p.buf.padded, priority=Priority.WRITEBACK)
                p.submitted = True

                def checksum(_n, p=p) -> None:
                    p.crcs = segment_crcs(p.buf.array)

                fut = chain(wf, checksum, f"checkpoint step {h.step} piece at {p.offset}")
                fut.add_done_callback(lambda _f, b=p.buf: b.release())
                h.writes.append(fut)

        for p in h.pieces:
            if self._claim(p):
                self._copy(p, drain)
            else:
                p.event.wait()  # a guard is taking a private copy
                if self._claim(p):
                    self._copy(p, drain)
            if p.error is not None:
                raise CheckpointError(f"checkpoint step {h.step}: copying bytes {p.offset}.. of "
                                      f"{h.data_file} failed: {p.error}") from p.error
            ready.append(p)
        h.stats["snapshot_s"] = time.perf_counter() - h.t_called
        h._snapshot.set()
        with self._lock:
            self._current = None
        drain()

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

    def _commit(self, h: CheckpointHandle) -> None:
        gather(h.writes).result()
        path = self.directory / h.data_file
        self.engine.fsync(path)
        tensors = []
        for rec in h.records:
            pieces = rec.pop("pieces", None)
            if pieces is not None:
                rec["crc32"] = [c for p in pieces for c in p.crcs] or segment_crcs(b"")
            tensors.append(rec)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": h.step, "segment": SEGMENT,
               "created": time.time(), "data_file": h.data_file, "tensors": tensors, "tree": h.tree,
               "retain_tag": h.retain_tag}
        mpath = self.directory / manifest_name(h.step)
        old = read_manifest(mpath) if mpath.exists() else None
        write_json_atomic(mpath, doc)  # the commit point
        h.doc = doc
        h.pieces = []
        h.stats["durable_s"] = time.perf_counter() - h.t_called
        if h.cold is not None:
            with self._lock:
                self._cold_busy[h.step] += 1
        try:  # committed: a failure from here on is not this save's, and must not undo it
            if old is not None:  # the same step saved again: its previous files are unreferenced now
                self._drop_files(self.directory, old)
            self._retire(self.directory, self.keep_last)
        except BaseException as e:  # noqa: BLE001 - raised by the next save(), wait_all() or close()
            log.error("checkpoint retention in %s failed: %s", self.directory, e)
            failed = CheckpointHandle(h.step, h.seq)
            failed.durable.set_exception(e)
            with self._lock:
                self._failures.append((failed, CheckpointError(f"retention after step {h.step}: {e}")))
        h.durable.set_result({"step": h.step, "manifest": str(mpath), "bytes": h.stats["bytes"]})

    def _cold_loop(self) -> None:
        while (h := self._cold_q.get()) is not None:
            try:
                try:
                    info = self._cold_copy(h)
                finally:
                    with self._lock:
                        self._cold_busy[h.step] -= 1
                        if self._cold_busy[h.step] <= 0:
                            del self._cold_busy[h.step]
                self._retire(self.directory, self.keep_last)  # what waited for this copy
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                log.error("checkpoint step %d: cold copy failed: %s", h.step, e)
                h.cold.set_exception(e)
                with self._lock:
                    self._failures.append((h, e))
            else:
                h.cold.set_result(info)

    def _cold_copy(self, h: CheckpointHandle) -> dict:
        import zarr
        from zarr.codecs import ZstdCodec

        doc = h.doc
        zname = cold_name(h.step, h.token)
        zpath = self.cold_directory / zname
        group = zarr.open_group(store=zarr.storage.LocalStore(str(zpath)), mode="w", zarr_format=3)
        tensors = []
        for i, t in enumerate(doc["tensors"]):
            n = t["nbytes"]
            arr = group.create_array(name=f"t{i}", shape=(n,), chunks=(max(1, min(SEGMENT, n)),), dtype="uint8",
                                     compressors=[ZstdCodec(level=self.cold_level)], fill_value=0)
            src = self._resolve(self.directory, t["file"])

            def put(lo: int, data) -> None:
                arr[lo:lo + len(data)] = data

            self._read_tensor(src, t, doc["segment"], put, f"step {h.step} tensor {t['name']!r}")
            tensors.append({k: v for k, v in t.items() if k not in ("file", "offset", "ref", "segment")}
                           | {"array": f"t{i}", "segment": t.get("segment", doc["segment"])})
        _fsync_tree(zpath)
        cold_doc = dict(doc, data_file=None, zarr=zname, tensors=tensors, retain_tag=None)
        mpath = self.cold_directory / manifest_name(h.step)
        old = read_manifest(mpath) if mpath.exists() else None
        write_json_atomic(mpath, cold_doc)
        if old is not None:
            self._drop_files(self.cold_directory, old)
        self._retire(self.cold_directory, self.cold_keep_last)
        h.stats["cold_s"] = time.perf_counter() - h.t_called
        return {"step": h.step, "manifest": str(mpath)}

    # -- retention -------------------------------------------------------------------
    def _retire(self, directory: Path, keep: int) -> None:
        """Keep the ``keep`` most recently *committed* steps: a run that rolls back to an earlier
        step and saves again keeps that save (ranking by step number would delete it)."""
        with self._retire_lock:
            steps = _commit_order(directory)
            for step in steps[:-keep]:
                if directory == self.directory:
                    with self._lock:
                        if step in self._cold_busy:
                            continue  # the cold level still reads it; retired on a later pass
                self.delete(step, _directory=directory)

    def delete(self, step: int, *, _directory: Path | None = None) -> None:
        """Retire ``step`` from a level (default: the storage level): the manifest goes first
        (then the directory is fsynced), then its data, then its store retention."""
        directory = self.directory if _directory is None else _directory
        with self._retire_lock:
            mpath = directory / manifest_name(step)
            if not mpath.exists():
                raise CheckpointError(f"delete({step}): no committed checkpoint of that step in {directory}")
            doc = read_manifest(mpath)
            mpath.unlink()
            fsync_dir(directory)
            self._drop_files(directory, doc)

    def _drop_files(self, directory: Path, doc: dict) -> None:
        for key in ("data_file", "zarr"):
            name = doc.get(key)
            if not name:
                continue
            path = directory / name
            if self.engine is not None:
                self.engine.forget(path)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        tag = doc.get("retain_tag")
        if tag and self.store is not None:
            self.store.release(tag)

    # -- failures --------------------------------------------------------------------
    def _fail_safely(self, h: CheckpointHandle, e: BaseException) -> None:
        """``_fail``, keeping the level's thread alive (and the sentinel chain intact) if the
        clean-up itself fails: that error is reported too, with the save's."""
        try:
            self._fail(h, e)
        except BaseException as e2:  # noqa: BLE001 - recorded below, raised by the next call
            log.error("checkpoint step %d: clean-up after the failure failed too: %s", h.step, e2)
            e2.add_note(f"while cleaning up after checkpoint step {h.step} failed: {e!r}")
            if h.durable.set_running_or_notify_cancel():
                h.durable.set_exception(e)
            h._snapshot.set()
            with self._lock:
                self._failures.append((h, e2))

    def _fail(self, h: CheckpointHandle, e: BaseException) -> None:
        """A save failed: unblock hooks, free its buffers, remove its files and retention."""
        log.error("checkpoint step %d failed: %s", h.step, e)
        with self._lock:
            for p in h.pieces:
                if p.state == _PENDING:
                    p.state = _COPIED
                    lst = self._pending.get(p.ptr)
                    if lst is not None and p in lst:
                        lst.remove(p)
                        if not lst:
                            del self._pending[p.ptr]
                    p.src = None
                    p.event.set()
        for p in h.pieces:
            p.event.wait()
            if p.buf is not None and not p.submitted:
                p.buf.release()
                p.buf = None
        try:
            gather(h.writes).exception()
        finally:
            path = self.directory / h.data_file
            if self.engine is not None:
                self.engine.forget(path)
            if path.exists():
                path.unlink()
            if h.retain_tag and self.store is not None:
                self.store.release(h.retain_tag)
            if h.durable.set_running_or_notify_cancel():
                h.durable.set_exception(e)
            if h.cold is not None and h.cold.set_running_or_notify_cancel():
                h.cold.set_exception(e)
            h._snapshot.set()
            with self._lock:
                self._failures.append((h, e))

    def _raise_unobserved(self) -> None:
        with self._lock:
            failures = [(h, e) for h, e in self._failures if not h._observed]
            self._failures = []
        if failures:
            h, exc = failures[0]
            raise CheckpointError(f"checkpoint step {h.step} failed in the background "
                                  f"({len(failures)} failure(s) nobody waited for): {exc}") from exc

    # -- waiting and inspection ------------------------------------------------------
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
        order = _commit_order(self.directory)
        if not order and self.cold_directory is not None:
            order = _commit_order(self.cold_directory)
        return order[-1] if order else None

    # -- load ------------------------------------------------------------------------
    def load(self, step: int | None = None, *, into: Any = None) -> Any:
        """The state dict saved as ``step`` (default: the latest), every byte checked against its
        crc32. With ``into`` (a state dict of the same keys), tensors are filled in place as they
        verify: after an error ``into`` may hold some tensors of this step and some old ones, so load
        without ``into`` (then copy) where a failed load must leave the live state untouched."""
        self._check_open()
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no committed checkpoint in {self.directory}"
                                      + (f" or {self.cold_directory}" if self.cold_directory else ""))
            step = self.latest()
        if step not in steps:
            raise CheckpointError(f"no committed checkpoint of step {step} in {self.directory}; "
                                  f"committed: {sorted(steps) or 'none'}")
        directory = self.directory if steps[step] == "storage" else self.cold_directory
        mpath = directory / manifest_name(step)
        doc = read_manifest(mpath)
        targets: dict[str, torch.Tensor] = {}
        if into is not None:
            pairs: list = []
            encode_tree(into, pairs)
            targets = {name: t for name, t in pairs if isinstance(t, torch.Tensor)}
            extra = sorted(set(targets) - {t["name"] for t in doc["tensors"]})
            if extra:
                raise CheckpointError(f"load(step={step}): into has tensors {extra[:5]} that {mpath} does not hold")
        group = None
        if doc.get("zarr"):
            import zarr

            group = zarr.open_group(store=zarr.storage.LocalStore(str(directory / doc["zarr"]), read_only=True),
                                    mode="r")
        out = []
        for t in doc["tensors"]:
            dtype = dtype_from(t["dtype"], f"{mpath}: tensor {t['name']!r}")
            shape = tuple(t["shape"])
            target = targets.get(t["name"])
            if target is not None and (target.dtype != dtype or tuple(target.shape) != shape):
                raise CheckpointError(f"load(step={step}): {t['name']!r} is {t['dtype']}{shape} in {mpath}, "
                                      f"but into has {dtype_name(target.dtype)}{tuple(target.shape)}")
            if into is not None and target is None:
                raise CheckpointError(f"load(step={step}): {t['name']!r} is in {mpath} but not in into")
            direct = target is not None and target.device.type == "cpu" and target.is_contiguous()
            dest = target.detach() if direct else torch.empty(shape, dtype=dtype)
            flat = dest.reshape(-1).view(torch.uint8) if dest.dtype != torch.uint8 else dest.reshape(-1)
            where = f"step {step} tensor {t['name']!r}"

            def put(lo: int, data, flat=flat) -> None:
                flat[lo:lo + len(data)].numpy()[:] = data

            if group is not None:
                self._read_cold(group[t["array"]], t, put, where, directory / doc["zarr"])
            else:
                self._read_tensor(self._resolve(directory, t["file"]), t, doc["segment"], put, where)
            if target is not None:
                if not direct:
                    with torch.no_grad():
                        target.copy_(dest)
                dest = target
            out.append(dest)
        return decode_tree(doc["tree"], out, str(mpath))

    @staticmethod
    def _resolve(directory: Path, name: str) -> str:
        return name if os.path.isabs(name) else str(directory / name)

    def _read_tensor(self, path: str, t: dict, segment: int, put, where: str) -> None:
        read_verified(self.engine, self.arena, path, t["offset"], t["nbytes"], t["crc32"],
                      t.get("segment", segment), put, where, self.host_wait)

    @staticmethod
    def _read_cold(arr, t: dict, put, where: str, zpath: Path) -> None:
        n, crcs, segment = t["nbytes"], t["crc32"], t["segment"]
        if arr.shape != (n,):
            raise CheckpointError(f"{where}: zarr array {zpath}/{t['array']} has shape {arr.shape}, expected ({n},)")
        for k, lo in enumerate(range(0, n, segment)):
            data = arr[lo:min(n, lo + segment)]
            got = zlib.crc32(data)
            if got != crcs[k]:
                raise CheckpointChecksumError(f"{where}: segment {k} of {zpath}/{t['array']} has crc32 {got:#010x}, "
                                              f"recorded {crcs[k]:#010x}")
            put(lo, data)


def _optim_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What ``opt.step()`` may write: its parameters and every tensor of its state."""
    out = [p for g in opt.param_groups for p in g["params"]]
    for state in opt.state.values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (zarr writes without syncing)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)
    fsync_dir(root.parent)


def _commit_order(directory: Path) -> list[int]:
    """Committed steps in ``directory``, oldest commit first (manifest ``created``, then step)."""
    ranked = []
    for step, path in committed_steps(directory).items():
        try:
            created = float(read_manifest(path).get("created", 0.0))
        except FileNotFoundError:
            continue  # retired meanwhile by another pass
        ranked.append((created, step))
    return [step for _created, step in sorted(ranked)]
