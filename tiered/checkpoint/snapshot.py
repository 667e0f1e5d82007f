"""Snapshots and the guard: copy tensors into host buffers before anybody mutates them.

A save cuts its tensors into pieces (at most SEGMENT bytes of one tensor each). The
background thread copies pieces into buffers of the store's host tier and hands each
one to the store as its own object (``put_buffer``, no fsync, no commit: the commit
level makes them durable together). Hooks on the optimizer step and on forwards
(``attach``) call ``guard``, which waits for the pieces of the tensors about to change
and copies the ones nobody has started on itself, so no tensor is saved half-updated.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Iterable

import torch

from tiered.allocators import OutOfBudget
from tiered.io_engine import IOFuture

from .format import CheckpointError

_PENDING, _CLAIMED, _COPIED = 0, 1, 2


class _WriteError(CheckpointError):
    """A piece could not be handed to the store (e.g. the tier is full)."""


class _Piece:
    """Up to SEGMENT bytes of one tensor: the unit of copying and writing, one store object."""

    __slots__ = ("handle", "index", "key", "name", "src", "shape", "offset", "length", "ptr", "state", "event",
                 "buf", "error", "submitted", "ready")

    def __init__(self, handle, index, name, src, shape, offset, length, ptr) -> None:
        self.handle, self.index, self.name, self.src, self.shape = handle, index, name, src, shape
        self.key = f"{handle.key_prefix}{index}"
        self.offset, self.length, self.ptr = offset, length, ptr  # offset: within its tensor
        self.state = _PENDING
        self.event = threading.Event()
        self.buf = None
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
        self.token = ""
        self.key_prefix = ""  # store keys of this save's pieces: <prefix><index>
        self.retain_tag: str | None = None
        self.writes: list[IOFuture] = []
        self.taken: list[_Piece] = []  # copied into host buffers by a guard, not yet written
        self.doc: dict | None = None
        self.cold_pin: tuple | None = None  # keeps the committed bytes until the cold copy has read them

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


def optim_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What ``opt.step()`` may write: its parameters and every tensor of its state."""
    out = [p for g in opt.param_groups for p in g["params"]]
    for state in opt.state.values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


def storage_ptr(t: torch.Tensor) -> int:
    """Where ``t``'s bytes live: a DTensor (FSDP2 parameters and optimizer state) by its local
    shard, whose storage is what a snapshot copies and an optimizer step mutates."""
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        t = local
    return t.untyped_storage().data_ptr()


class Snapshots:
    """The snapshot and guard half of :class:`~.lazy.LazyCheckpointer` (its state: ``_lock``,
    ``_pending``, ``_current``, ``_attached``, ``_hooks``, ``_streams``, ``host``, ``store``)."""

    # -- protection of tensors being snapshotted -------------------------------------
    def attach(self, obj: Any) -> None:
        """Protect ``obj``'s tensors while a snapshot still copies them: an optimizer (a pre-hook
        on ``step`` waits for its parameters and state), or a module (a forward pre-hook waits
        for its buffers, which the forward may update, e.g. batch-norm statistics)."""
        if isinstance(obj, torch.optim.Optimizer):
            def step_hook(opt, args, kwargs) -> None:
                self.guard(optim_tensors(opt))

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
        ptrs = {storage_ptr(t) for t in tensors if isinstance(t, torch.Tensor)}
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
                tensors.extend(optim_tensors(obj))
            else:
                tensors.extend(obj.buffers())
        return {storage_ptr(t) for t in tensors}

    def _claim(self, p: _Piece) -> bool:
        with self._lock:
            if p.state != _PENDING:
                return False
            p.state = _CLAIMED
            return True

    # -- copies ----------------------------------------------------------------------
    def _host_buffer(self, p: _Piece, drain):
        """Background thread: a host buffer for ``p``, taken before the piece is claimed (a guard
        never waits for host memory: it copies the piece privately meanwhile). When the budget is
        used up, ``drain()`` writes the pieces copied so far and the allocation waits for them,
        up to ``host_wait`` seconds in all."""
        buf = self.host.try_alloc(p.length)
        t0 = time.monotonic()
        while buf is None:  # write what is copied (guards too keep copying), then wait a bit
            drain()
            try:
                buf = self.host.alloc(p.length, timeout=0.05)
            except OutOfBudget as e:
                waited = time.monotonic() - t0
                if waited > self.host_wait:
                    raise OutOfBudget(f"no host buffer of {p.length} bytes for the checkpoint within "
                                      f"host_wait={self.host_wait} s (waited {waited:.1f} s; last: {e})") from None
        return buf

    def _copy(self, p: _Piece, buf) -> None:
        """Background thread: copy a claimed piece into ``buf`` (a host buffer it got first)."""
        try:
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
            self.host.free(buf)
        finally:
            p.src = None
            self._settle(p, _COPIED)

    def _copy_from_device(self, p: _Piece, dst: torch.Tensor) -> None:
        """Device -> host on a side stream (training kernels keep running), after the work that
        produced the bytes (``p.ready``, recorded on the saving stream) and into pinned memory
        when the host tier is pinned; returns when the bytes are in host memory."""
        dev = p.src.device
        stream = self._streams.get(dev)
        if stream is None:
            stream = self._streams[dev] = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream):
            stream.wait_event(p.ready)
            dst.copy_(p.src, non_blocking=self.host.pinned)
        stream.synchronize()

    def _take(self, p: _Piece) -> None:
        """Caller's thread: snapshot a claimed piece now. Into a free host buffer when the
        background thread works on this save (it writes such pieces when it needs their
        space, so holding them cannot block it); else, and for device tensors (a device-side
        copy is faster than a synchronous transfer), into private memory."""
        buf = None
        if not p.src.is_cuda and self._current is p.handle:
            buf = self.host.try_alloc(p.length)
        if buf is None:
            self._take_private(p)
            return
        try:
            dst = torch.from_numpy(buf.array)
            (dst.view(p.src.dtype).view(p.shape) if p.shape is not None else dst).copy_(p.src)
        except BaseException as e:  # noqa: BLE001 - fails the save through its handle, not the step
            self.host.free(buf)
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

    # -- the background thread's pass over one save -----------------------------------
    def _snapshot(self, h) -> None:
        """Copy every piece of ``h`` (or wait for a guard's copy) and hand it to the store."""
        ready: collections.deque[_Piece] = collections.deque()
        with self._lock:
            self._current = h

        def drain() -> None:
            """Write the copied pieces (also those a guard copied ahead of this thread)."""
            with self._lock:
                ready.extend(h.taken)
                h.taken.clear()
            while ready:
                p = ready.popleft()
                if not p.submitted:
                    self._put_piece(h, p)

        for p in h.pieces:
            self._snapshot_piece(p, drain)
            if isinstance(p.error, _WriteError):  # raised by drain() while this piece waited for room
                raise p.error
            if p.error is not None:
                raise CheckpointError(f"checkpoint step {h.step}: copying bytes {p.offset}.. of "
                                      f"tensor {p.name!r} failed: {p.error}") from p.error
            ready.append(p)
        h.stats["snapshot_s"] = time.perf_counter() - h.t_called
        h._snapshot.set()
        with self._lock:
            self._current = None
        drain()

    def _snapshot_piece(self, p: _Piece, drain) -> None:
        """Copy ``p`` into a host buffer, unless a guard did (into a host buffer of its own);
        a guard's private copy is moved into the buffer here."""
        if p.state == _COPIED:
            return
        try:
            buf = self._host_buffer(p, drain)
        except BaseException as e:  # noqa: BLE001 - fails the save through its handle
            if self._claim(p):
                p.src = None
                self._settle(p, _COPIED)
            else:
                p.event.wait()  # a guard copies it: it may still need p.src
            p.error = p.error or e
            return
        while True:
            if self._claim(p):
                self._copy(p, buf)
                return
            p.event.wait()  # a guard is copying it: into a host buffer, or privately (then pending again)
            if p.state == _COPIED:
                self.host.free(buf)
                return

    def _put_piece(self, h, p: _Piece) -> None:
        """Give the piece's buffer to the store as object ``p.key``: written now, made durable by
        the commit level, not cached; the checksum is computed by the I/O worker that wrote it."""
        buf, p.buf = p.buf, None
        p.submitted = True
        try:
            fut = self.store.put_buffer(p.key, buf, torch.uint8, (p.length,), kind="checkpoint", tier=self.tier,
                                        give=True, sync=False, commit=False, cache=False, owner=self.owner)
        except BaseException as e:
            self.host.returned(p.length)  # the store released the buffer it was given
            raise _WriteError(f"checkpoint step {h.step}: writing bytes {p.offset}.. of tensor {p.name!r} "
                              f"to the store failed: {e}") from e
        fut.add_done_callback(lambda _f, n=p.length: self.host.returned(n))
        h.writes.append(fut)
