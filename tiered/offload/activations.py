"""The tensors autograd saves in an offloaded model's forward, kept in the store until backward
(``[offload] activations = "host"``).

Training keeps every activation the backward needs; on a small host budget they, not the
weights, are what runs out. With this on, each saved tensor of ``MIN_BYTES`` or more that is a
plain dense CPU or CUDA tensor and not memory the wrapper manages (unit weights, their views and
copies, parameters, leaves the caller holds) becomes an ephemeral store object of kind
``"activation"`` charged to the model's owner; autograd keeps a small handle. On a CPU the
bytes are copied into the host tier at once and written behind; under host pressure the store
evicts the written copies (the oldest first), so they spill to storage and are read back in
backward. On CUDA they are copied to pinned host memory on a side stream and put once the copy
is done. A tensor saved several times (a layer input read by q, k and v) is stored once.

Backward visits units in reverse: unpacking an object reads the ``READ_AHEAD`` objects packed
before it that are not in host memory. An unpacked object's host copy is given back at once.
The objects of one forward form a batch, deleted together (one manifest commit) once autograd
has dropped every handle of that forward. The last handle goes wherever autograd or a garbage
collection drops it, possibly inside a lock or a store operation, so dropping it only queues the
batch; queued batches are deleted at safe points: at the end of each backward that unpacked
something of the model, at its next forward, by ``offload_stats`` and by ``detach`` (which
deletes what is left). A failure while deleting is raised by the model's next forward.

Autograd checks that a saved tensor was not changed in place before backward uses it, but not
for tensors that saved-tensor hooks handle: the handle records the tensor's version at pack time
and unpack raises autograd's error when the tensor (while it lives) has a newer one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import weakref
from typing import Callable

import torch

from tiered.allocators import OutOfBudget
from tiered.io_engine import Priority

from .common import _WAIT, OffloadError, prefetching

#: smaller saved tensors stay where autograd put them (moving them costs more than it saves)
MIN_BYTES = 64 << 10
#: objects read ahead of the one backward unpacks
READ_AHEAD = 4
KIND = "activation"


class _Stored:
    """One store object holding the values of a saved tensor."""

    __slots__ = ("key", "index", "numel", "nbytes", "dtype", "shape", "stride", "device", "put", "copied", "buf",
                 "reading", "handles", "unpacked", "out")

    def __init__(self, key: str, index: int, t: torch.Tensor) -> None:
        self.key, self.index = key, index  # its place in the batch (the order of the forward)
        self.numel, self.nbytes = t.numel(), t.numel() * t.element_size()
        self.dtype, self.shape, self.stride, self.device = t.dtype, tuple(t.shape), tuple(t.stride()), t.device
        self.put = None  # the put's future
        self.copied = None  # CUDA: the event of the copy into ``buf``, before the put is issued
        self.buf = None
        self.reading = None  # a read-ahead's future of the lease
        self.handles = 0  # handles autograd holds (a tensor saved twice is stored once)
        self.unpacked = 0
        self.out = None  # weakref to the tensor last unpacked (shared while it lives)


class _Batch:
    """The objects of one forward; deleted when autograd drops the last handle to any of them."""

    __slots__ = ("prefix", "objects", "seen", "__weakref__")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.objects: list[_Stored] = []
        self.seen: dict[int, tuple[weakref.ref, int, _Stored]] = {}  # id(tensor) -> (ref, version, object)


class SavedActivation:
    """What autograd keeps instead of an offloaded tensor (its batch lives as long as it does);
    ``source``/``version``: the saved tensor (weakly) and its version when saved."""

    __slots__ = ("obj", "batch", "source", "version")

    def __init__(self, obj: _Stored, batch: _Batch, source: weakref.ref, version: int) -> None:
        self.obj, self.batch, self.source, self.version = obj, batch, source, version


def check_version(t: torch.Tensor, saved: int) -> None:
    """Raise autograd's error if ``t`` was changed in place since it was saved at version ``saved``
    (autograd leaves this check to the hooks of the tensors they handle)."""
    if t._version != saved:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version "
            f"{saved} instead. (It was saved for backward in the forward of an offloaded model.)")


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill one span of its storage exactly once (so one flat copy holds them and
    ``empty_strided`` rebuilds the same layout)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The span of ``t``'s storage holding its elements, in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def new_stats() -> dict:
    return {"packed": 0, "objects": 0, "bytes": 0, "live_bytes": 0, "peak_live_bytes": 0, "deduplicated": 0,
            "kept_large": 0, "unpacked": 0, "bytes_from_storage": 0, "read_ahead": 0, "batches_deleted": 0}


class ActivationOffload:
    """The saved-tensor hooks' store side for one offloaded model (see the module docstring).

    ``alloc(nbytes)``: a host buffer charged to the model (its host reservation);
    ``wrapper_memory(t)``: ``t`` is memory the wrapper manages (left alone).
    """

    def __init__(self, store, owner: str, prefix: str, alloc: Callable, wrapper_memory: Callable) -> None:
        self.store = store
        self.owner = owner
        self.prefix = f"{prefix}/@act/"  # '@' is in no module name: no unit's key starts so
        self._alloc = alloc
        self._wrapper_memory = wrapper_memory
        self._largest = store.arena.capacity // 4  # larger ones would crowd everything else out
        self._lock = threading.Lock()
        self._batch: _Batch | None = None  # of the forward in progress
        self._count = 0
        self._live: dict[str, weakref.finalize] = {}  # batch prefix -> its finalizer
        self._dropped: collections.deque = collections.deque()  # (prefix, objects) autograd dropped
        self._backward: int | None = None  # the graph task whose end drains ``_dropped``
        self._copying: list[_Stored] = []  # CUDA: copies to host not yet put
        self._returning: list[tuple[torch.cuda.Event, object]] = []  # CUDA: (copy event, lease) to release
        self._stream = None  # CUDA: the side stream of the copies to host (made on first use)
        self._errors: list[BaseException] = []
        self._closed = False
        self.stats = new_stats()

    # -- forward ---------------------------------------------------------------------------------
    def begin_forward(self) -> None:
        """A grad-enabled forward starts: delete the batches dropped since, raise what deleting
        an earlier batch ran into."""
        self._batch = None
        self.drain()
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise OffloadError(f"offloaded activations of an earlier forward could not be cleaned up: "
                               f"{errors[0]}") from errors[0]

    def end_forward(self) -> None:
        self._batch = None  # from here only autograd's handles keep the batch alive
        self._put_copied(block=False)

    def pack(self, t: torch.Tensor):
        """``t`` itself, or a handle to the store object now holding its values."""
        if self._closed:
            raise OffloadError("this model's offloaded activations were deleted by tiered.detach(model); "
                               "a detached model saves nothing in the store")
        if not self._wanted(t):
            return t
        if t.numel() * t.element_size() > self._largest:
            self.stats["kept_large"] += 1
            return t
        batch = self._batch_now()
        hit = batch.seen.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            ref, obj = hit[0], hit[2]
            self.stats["deduplicated"] += 1
        else:
            obj = self._store(batch, t)
            ref = weakref.ref(t)
            batch.seen[id(t)] = (ref, t._version, obj)
        obj.handles += 1
        self.stats["packed"] += 1
        return SavedActivation(obj, batch, ref, t._version)

    def _wanted(self, t: torch.Tensor) -> bool:
        return (type(t) is torch.Tensor and t.layout is torch.strided and t.device.type in ("cpu", "cuda")
                and not t.is_quantized and not t.is_nested and not t.is_conj() and not t.is_neg()
                and not (t.is_leaf and t.requires_grad)  # the caller holds it anyway
                and t.numel() * t.element_size() >= MIN_BYTES and _dense(t) and not self._wrapper_memory(t))

    def _batch_now(self) -> _Batch:
        if self._batch is None:
            batch = _Batch(f"{self.prefix}{self._count}/")
            self._count += 1
            # runs wherever the last handle goes (a GC inside a lock, an I/O worker): only queues
            fin = weakref.finalize(batch, self._dropped.append, (batch.prefix, batch.objects))
            fin.atexit = False  # the store deletes ephemeral objects when it closes
            with self._lock:
                self._live[batch.prefix] = fin
            self._batch = batch
        return self._batch

    def _store(self, batch: _Batch, t: torch.Tensor) -> _Stored:
        n = len(batch.objects)
        obj = _Stored(f"{batch.prefix}{n}", n, t)
        try:
            buf = self._alloc(obj.nbytes)
        except OutOfBudget as e:
            raise OffloadError(f"no host memory for a saved activation of {obj.nbytes} bytes "
                               f"({obj.dtype}{list(obj.shape)}): {e}") from e
        try:
            dst = buf.tensor(obj.dtype)
            if t.device.type == "cuda":
                self._copy_from_device(obj, dst, _flat(t))
                obj.buf = buf
            else:
                dst.copy_(_flat(t))
        except BaseException:
            buf.release()
            raise
        batch.objects.append(obj)  # from here _drop_batch gives its memory back
        if obj.copied is None:
            obj.put = self._put(obj, buf)
        with self._lock:
            self.stats["objects"] += 1
            self.stats["bytes"] += obj.nbytes
            self.stats["live_bytes"] += obj.nbytes
            self.stats["peak_live_bytes"] = max(self.stats["peak_live_bytes"], self.stats["live_bytes"])
        return obj

    def _put(self, obj: _Stored, buf) -> concurrent.futures.Future:
        # ephemeral and never read after a crash: no fdatasync, no manifest commit of its own
        return self.store.put_buffer(obj.key, buf, obj.dtype, (obj.numel,), kind=KIND, give=True, sync=False,
                                     commit=False, ephemeral=True, owner=self.owner)

    def _copy_from_device(self, obj: _Stored, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into the pinned ``dst`` on a side stream; put once the copy is done."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(src.device)
        self._stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self._stream)  # its memory is not reused before the copy is done
        obj.copied = torch.cuda.Event()
        obj.copied.record(self._stream)
        self._queue_copy(obj)

    def _queue_copy(self, obj: _Stored) -> None:
        with self._lock:  # the list is rebuilt by backward's and the deleting thread too
            self._copying.append(obj)

    def _put_copied(self, block: bool, only: _Stored | None = None) -> None:
        """Put the objects whose copy to host is done (``block``: wait for them; ``only``: that one).
        Under the lock: once it is free, an object not in the list has its ``put``."""
        with self._lock:
            keep = []
            for obj in self._copying:
                if (only is None or obj is only) and (block or obj.copied.query()):
                    obj.copied.synchronize()
                    buf, obj.buf, obj.copied = obj.buf, None, None
                    obj.put = self._put(obj, buf)
                else:
                    keep.append(obj)
            self._copying = keep

    # -- backward --------------------------------------------------------------------------------
    def unpack(self, h: SavedActivation) -> torch.Tensor:
        if self._closed:
            raise OffloadError("the activations this backward needs were deleted by tiered.detach(model); "
                               "run backward before detaching the model")
        source = h.source()
        if source is not None:  # else nothing but a view of it can have changed it (not checked)
            check_version(source, h.version)
        obj = h.obj
        out = obj.out() if obj.out is not None else None
        if out is None:
            lease = self._lease(obj)
            out = self._copy_out(obj, lease)
            obj.out = weakref.ref(out)
        obj.unpacked += 1
        self.stats["unpacked"] += 1
        if obj.unpacked == obj.handles and obj.reading is None:
            self.store.evict(obj.key)  # given back now; a retained graph reads it again from storage
        self._read_ahead(h.batch, obj.index)
        return out

    def _lease(self, obj: _Stored):
        if obj.put is None:
            self._put_copied(block=True, only=obj)
        obj.put.result(timeout=_WAIT)  # raises what the write ran into
        reading, obj.reading = obj.reading, None
        if reading is None:
            reading = self._acquire(obj, Priority.DEMAND, None)
        return reading.result(timeout=_WAIT)

    def _acquire(self, obj: _Stored, priority: Priority, wait: float | None):
        if not self.store.meta(obj.key)["in_host"]:
            self.stats["bytes_from_storage"] += obj.nbytes  # spilled: read back from storage
        return self.store.acquire(obj.key, priority=priority, wait=wait, owner=self.owner)

    def _copy_out(self, obj: _Stored, lease) -> torch.Tensor:
        """A tensor of the saved layout holding the object's values; the lease is given back."""
        out = torch.empty_strided(obj.shape, obj.stride, dtype=obj.dtype, device=obj.device)
        if out.device.type != "cuda":
            try:
                _flat(out).copy_(lease.tensor)
            finally:
                lease.release()
            return out
        stream = torch.cuda.current_stream(out.device)
        try:
            _flat(out).copy_(lease.tensor, non_blocking=True)
        except BaseException:
            lease.release()
            raise
        done = torch.cuda.Event()
        done.record(stream)
        with self._lock:
            self._returning.append((done, lease))
        self._release_returned(block=False)
        return out

    def _release_returned(self, block: bool) -> None:
        with self._lock:  # rebuilt by backward's and the deleting thread
            keep = []
            for done, lease in self._returning:
                if block or done.query():
                    done.synchronize()
                    lease.release()
                else:
                    keep.append((done, lease))
            self._returning = keep

    def _read_ahead(self, batch: _Batch, index: int) -> None:
        """Start reading the objects packed just before ``index`` (backward needs them next)."""
        started = 0
        for obj in reversed(batch.objects[max(0, index - 2 * READ_AHEAD):index]):
            if started >= READ_AHEAD:
                return
            if obj.unpacked >= obj.handles or obj.reading is not None or obj.put is None or not obj.put.done() \
                    or obj.put.exception() is not None or (obj.out is not None and obj.out() is not None):
                continue
            prefetching.active = True  # other models give nothing back for a read that can wait
            try:
                obj.reading = self._acquire(obj, Priority.PREFETCH, 0.0)
            except OutOfBudget:
                return  # the host tier is full: read on demand
            finally:
                prefetching.active = False
            started += 1
            self.stats["read_ahead"] += 1

    # -- the end of a batch ----------------------------------------------------------------------
    def drain_after_backward(self) -> None:
        """Called at each unpack: at the first one of a backward, have autograd delete the batches
        dropped by then at its end (before ``backward`` returns)."""
        task = torch._C._current_graph_task_id()
        if task != -1 and task != self._backward:
            self._backward = task
            torch.autograd.Variable._execution_engine.queue_callback(self.drain)

    def drain(self) -> None:
        """Delete the batches autograd dropped. Called only where this thread holds no lock of the
        store's or ours; what goes wrong is kept and raised by the next forward."""
        while True:
            try:
                prefix, objects = self._dropped.popleft()
            except IndexError:
                return
            self._delete_batch(prefix, objects)

    def _delete_batch(self, prefix: str, objects: list[_Stored]) -> None:
        with self._lock:
            self._live.pop(prefix, None)
            self.stats["live_bytes"] -= sum(o.nbytes for o in objects)
        if not self.store.is_open:
            return  # a closed store took its ephemeral objects along
        try:
            self._settle(objects)
            self.store.delete_prefix(prefix)
            with self._lock:
                self.stats["batches_deleted"] += 1
        except BaseException as e:  # noqa: BLE001 - kept for the next forward, which raises it
            with self._lock:
                self._errors.append(e)

    def _settle(self, objects: list[_Stored]) -> None:
        """Wait for the batch's copies and puts (a put still running would install its object
        after the delete) and give back the leases read ahead and never used."""
        if any(o.copied is not None for o in objects):
            self._put_copied(block=True)
        self._release_returned(block=True)
        reads = [o.reading for o in objects if o.reading is not None]
        for obj in objects:
            obj.reading = None
        puts = [o.put for o in objects if o.put is not None]
        _done, pending = concurrent.futures.wait(reads + puts, timeout=_WAIT)
        for f in reads:
            if f.done() and f.exception() is None:
                f.result().release()
        if pending:
            raise OffloadError(f"{len(pending)} reads or writes of activations still running after {_WAIT} s")
        failed = next((f.exception() for f in reads + puts if f.exception() is not None), None)
        if failed is not None:
            raise failed

    def close(self) -> None:
        """Delete every batch still alive (``detach``); from here nothing is packed, and handles
        dropped later find nothing to do. Raises, once all is deleted, what a delete ran into."""
        self._closed = True
        with self._lock:
            live = list(self._live.values())
        for fin in live:
            dropped = fin.detach()  # None: already queued
            if dropped is not None:
                self._dropped.append(dropped[2][0])
        self.drain()
        try:
            if self.store.is_open:  # and what a batch whose delete failed left
                self.store.delete_prefix(self.prefix)
        except BaseException as e:  # noqa: BLE001 - raised below, after what the batches ran into
            with self._lock:
                self._errors.append(e)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise OffloadError(f"offloaded activations could not be deleted: {errors[0]}") from errors[0]

    def report(self) -> dict:
        self.drain()
        with self._lock:
            return dict(self.stats)
