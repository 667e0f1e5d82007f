"""Reads: host copies loaded once and shared by concurrent readers, verified segment by
segment on the engine workers; objects read in place from external files."""

from __future__ import annotations

import os
from typing import Callable
import torch

from tiered.allocators import HostBuffer, OutOfBudget, align_up
from tiered.io_engine import IOFuture, Priority, chain, completed, gather
from tiered.policies import Observation

from ..checksums import SEGMENT, crc32, segments
from . import stream as store_stream
from .errors import ChecksumError, HostBudgetError, StoreError
from .objects import DEFAULT_OWNER, Extent, HostCopy, ObjectMeta, check_key
from .extents import file_identity
from .leases import ExtentLease, Lease, _LoadFuture


class _Reads:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    # -- reads ---------------------------------------------------------------------
    def acquire(self, key: str, *, priority: Priority = Priority.DEMAND, wait: float | None = None,
                owner: str = DEFAULT_OWNER) -> IOFuture:
        """A future of a :class:`Lease`: the object's host copy, pinned, zero-copy.

        Raises KeyError at once for a key the store does not hold, and HostBudgetError
        (an OutOfBudget) naming the object when host memory for the copy cannot be found
        within ``wait`` seconds (default ``host_wait``; 0 for a prefetch that must not block),
        at once when the object is larger than the host tier.
        """
        self._check_open()
        return self._acquire(key, priority, wait, owner, emit=True)

    def _acquire(self, key: str, priority: Priority, wait: float | None, owner: str, emit: bool,
                 evict: bool = True) -> IOFuture:
        """:meth:`acquire`; ``emit=False`` for the store's own reads (a migration), which are no
        workload's accesses; ``evict=False`` takes host memory only where it is free."""
        copy, load, meta = self._pin_host_copy(key, priority, wait, owner, emit, evict)
        if load is None:
            if emit:
                self._emit(key, meta.nbytes, "read", meta.kind, "host")
            return completed(Lease(self, meta, copy), f"acquire {key}")
        out = chain(load, lambda _: Lease(self, meta, copy), f"acquire {key}")
        out.add_done_callback(lambda f: (f.cancelled() or f.exception() is not None) and self._unpin(copy))
        return out

    def get(self, key: str, *, tier: str = "host", out: torch.Tensor | None = None,
            priority: Priority = Priority.DEMAND, owner: str = DEFAULT_OWNER) -> IOFuture:
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
            return store_stream.get_future(self, meta, out, tier, priority)
        lease_f = self.acquire(key, priority=priority, owner=owner)

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

    def prefetch(self, key: str, *, owner: str = DEFAULT_OWNER) -> IOFuture:
        """Bring ``key`` into the host tier at prefetch priority.

        Cancelling the returned future cancels the read only while it has not
        started and no other caller waits for the same load.
        """
        self._check_open()
        copy, load, _meta = self._pin_host_copy(key, Priority.PREFETCH, None, owner, emit="prefetch")
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

    def _pin_host_copy(self, key: str, priority: Priority, wait: float | None = None,
                       owner: str = DEFAULT_OWNER, emit: bool | str = True,
                       evict: bool = True) -> tuple[HostCopy, IOFuture | None, ObjectMeta]:
        """Pin the host copy of ``key``, starting a load if needed.

        Returns (copy, load future or None when the copy is ready, the object's
        metadata for the version pinned), all taken under one lock. ``emit``: the read is an
        access (listeners see it once the copy is loaded, also when this call joins a load
        another caller started); ``"prefetch"``: a load ahead of use, emitted as such (not an
        access: plans do not move past it); False: the store's own read (a migration).
        """
        with self._lock:
            meta = self._objects.get(key)
            if meta is None:
                raise KeyError(f"no object {key!r} in the store at {self.root}")
            if meta.host is not None:
                return (*self._join_host_copy(key, meta, emit), meta)
            self.counters.misses += bool(emit)
            load = _LoadFuture(f"load {key}")
            copy = HostCopy(None, meta.version, pins=1, loaded=load, loading=True)
            meta.host = copy
            ext = meta.extent
            ext.readers += 1
        load.add_done_callback(lambda f: self._load_finished(f, meta, copy, ext))
        try:
            buf, reads = self._read_into_host(key, meta, ext, copy, priority, wait, owner, evict)
        except BaseException as e:
            if load.set_running_or_notify_cancel():
                load.set_exception(e)
            raise
        load.follow(chain(gather(reads), lambda _results: self._publish_load(key, meta, ext, copy, buf, emit),
                          f"load {key}", note=f"while reading object {key!r}"), reads)
        return copy, load, meta

    def _join_host_copy(self, key: str, meta: ObjectMeta, emit: bool | str) -> tuple[HostCopy, IOFuture | None]:
        """Under the lock: pin the host copy ``meta`` already has (loaded, or a load another
        caller started, which this read then waits on and counts as an access too)."""
        copy = meta.host
        copy.pins += 1
        if copy.ready:
            if emit:  # the store's own reads (a migration) are no hit and no recency
                self.counters.hits += 1
                self.host_policy.touch(Observation(key, meta.nbytes, meta.kind, "read", "host"))
            return copy, None
        if emit is True:
            copy.loaded.add_done_callback(
                lambda f: f.cancelled() or f.exception() is not None
                or self._emit(key, meta.nbytes, "read", meta.kind, meta.extent.tier))
        return copy, copy.loaded

    def _read_into_host(self, key: str, meta: ObjectMeta, ext: Extent, copy: HostCopy, priority: Priority,
                        wait: float | None, owner: str, evict: bool) -> tuple[HostBuffer, list[IOFuture]]:
        """A host buffer for ``copy`` and the segment reads from ``ext`` filling it, each checked
        as it lands."""
        if ext.external:
            src_file, lead = ext.path, ext.offset % 4096
            window = align_up(lead + meta.nbytes)
        else:
            src_file, lead, window = self._tiers[ext.tier].data_file, 0, None
        try:
            buf = self._alloc_host(meta.nbytes if window is None else window, wait, owner, evict)
        except OutOfBudget as e:
            raise HostBudgetError(f"object {key!r} ({meta.nbytes} bytes): {e}") from e
        copy.buffer, copy.start = buf, lead
        length = len(buf.padded) if window is None else lead + meta.nbytes  # externals end anywhere
        if ext.external and file_identity(src_file) != ext.identity:
            raise StoreError(f"object {key!r}: {src_file} changed since it was registered "
                             "(size, mtime or inode differ); register it again")
        # external files carry no checksums: their identity is checked instead of hashing
        # every byte on every read (crc32 runs at ~3 GB/s per core, slower than the disk)
        unverified = ext.external
        sums: list[int] = [0] * segments(lead, meta.nbytes)
        reads = []
        for i, start in enumerate(range(0, max(length, 1), SEGMENT)):
            n = min(SEGMENT, length - start)
            rf = self.engine.read(src_file, ext.offset - lead + start, buf.padded[start:start + n], n,
                                  priority=priority)
            reads.append(chain(rf, _segment_check(buf, lead, meta, i, sums, unverified, src_file, key)))
        return buf, reads

    def _load_finished(self, f, meta: ObjectMeta, copy: HostCopy, ext: Extent) -> None:
        """A load ended (either way): the extent has one reader less; a failed load's copy is
        dropped so the next read starts over."""
        with self._lock:
            ext.readers -= 1
            copy.loading = False
            if f.cancelled() or f.exception() is not None:
                if meta.host is copy:
                    meta.host = None
                copy.detached = True
            self._maybe_free(copy)
            self._free_retired()

    def _publish_load(self, key: str, meta: ObjectMeta, ext: Extent, copy: HostCopy, buf: HostBuffer,
                      emit: bool | str) -> None:
        """Every segment read and checked: the copy is ready (admitted to the host ranking unless
        the object changed meanwhile), its bytes counted, the access emitted."""
        with self._lock:
            copy.ready = True
            if meta.host is copy:
                self.host_policy.admit(Observation(key, buf.reserved, meta.kind, "read", "host"))
            else:
                copy.detached = True
            self.counters.bytes_read[ext.tier] = self.counters.bytes_read.get(ext.tier, 0) + buf.reserved
        self._notify_host()  # unpinned (a prefetch) it is evictable now
        if emit:
            self._emit(key, meta.nbytes, "read" if emit is True else emit, meta.kind, ext.tier)

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
                                                   identity=file_identity(path)))
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
            if ext.external and file_identity(path) != ext.identity:
                raise StoreError(f"object {key!r}: {path} changed since it was registered "
                                 "(size, mtime or inode differ); register it again")
            ext.readers += 1
            return ExtentLease(self, key, meta.version, path, ext.offset, meta.nbytes, ext)

    def _release_extent(self, ext: Extent) -> None:
        with self._lock:
            ext.readers -= 1
            self._free_retired()


def _segment_check(buf: HostBuffer, lead: int, meta: ObjectMeta, i: int, sums: list[int], unverified: bool,
                   src_file: str, key: str) -> Callable:
    """Verify segment ``i`` once it is read (external objects have no recorded checksums)."""

    def check(_n: int) -> None:
        lo = max(lead, i * SEGMENT)
        hi = min(lead + meta.nbytes, (i + 1) * SEGMENT)
        if unverified:  # nothing recorded to compare with (external object)
            return
        got = crc32(buf.array[lo:hi]) if hi > lo else crc32(b"")
        sums[i] = got
        if got != meta.crc32[i]:
            raise ChecksumError(
                f"object {key!r} (version {meta.version}) read from {src_file}: segment {i} "
                f"(bytes {lo - lead}..{hi - lead} of {meta.nbytes}, file offset {meta.extent.offset + lo - lead}) "
                f"has crc32 {got:#010x}, recorded {meta.crc32[i]:#010x}"
            )

    return check
