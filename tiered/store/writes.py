"""Puts: a new version goes to a new extent; it becomes current when written and durable
when the manifest naming it is committed."""

from __future__ import annotations

import numpy as np
import torch

from tiered.allocators import HostBuffer, OutOfBudget
from tiered.io_engine import IOFuture, Priority, chain, gather
from tiered.policies import Observation

from ..checksums import crc32, segment_checksums
from ..dtypes import dtype_name
from . import stream as store_stream
from .errors import HostBudgetError, StoreError, TierFullError
from .objects import (DEFAULT_OWNER, Extent, HostCopy, ObjectMeta, _PendingPut, check_key, extent_length,
                      placed_flag)


class _Writes:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    # -- put -----------------------------------------------------------------------
    def put(self, key: str, tensor: torch.Tensor, *, kind: str = "blob", tier: str | None = None,
            ephemeral: bool = False, owner: str = DEFAULT_OWNER, block: int = 0,
            placed: bool | None = None) -> IOFuture:
        """Store ``tensor`` under ``key`` (a new version if it exists).

        The bytes are copied into the host arena before this returns, so the
        caller may reuse ``tensor`` at once; the future resolves to the
        object's description once the data and manifest are durable. Puts of
        one key take effect in the order they were called.

        ``ephemeral=True``: the object is this process's scratch: :meth:`close` deletes it, and
        so does the next :meth:`open` after a crash (the manifest records it as ephemeral; its
        bytes are not fdatasync'ed, since no later process reads them). A later put of the key
        decides again whether it is ephemeral. ``owner``: the workload charged for the object's
        extent (its storage share) and its cached host copy (see :meth:`reserve`). ``block``: also
        record a crc32 per ``block`` bytes (a multiple of 4096), so that :meth:`read_ranges` can
        verify reads of parts of the object (rows of a feature table, say). ``tier``: the storage
        tier to write it to (default: where ``[policy] placement`` puts it); an object put on a
        named tier is *placed* there: the governor never moves it (``placed=False``: start it on
        ``tier`` but let the governor move it; a later put decides again).
        """
        self._check_open()
        with self._lock:
            self._puts_in_flight[key] = self._puts_in_flight.get(key, 0) + 1
        try:
            f = self._put(key, tensor, kind, tier, relocate=None, ephemeral=ephemeral, owner=owner, block=block,
                          placed=placed)
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
                   ephemeral: bool = False, owner: str | None = None, block: int = 0,
                   placed: bool | None = None) -> IOFuture:
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
        next read waits for this buffer's room may ask for DEMAND). ``ephemeral``: as for :meth:`put`;
        ``owner``: charged for the extent (default: the owner the buffer was allocated for);
        ``tier``, ``placed``: as for :meth:`put`.
        """
        try:  # first: a fork child must not wait on a lock its parent's threads held
            self._check_open()
        except BaseException:
            if give and isinstance(buf, HostBuffer) and not buf.released:
                buf.release()
            raise
        with self._lock:
            self._puts_in_flight[key] = self._puts_in_flight.get(key, 0) + 1
        try:
            check_key(key)
            shape = tuple(int(d) for d in shape)
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if not isinstance(buf, HostBuffer) or buf.released or buf._arena is not self.arena:
                raise StoreError(f"put_buffer({key!r}): expected a live buffer of this store's host arena")
            if buf.nbytes != nbytes:
                raise StoreError(f"put_buffer({key!r}): buffer holds {buf.nbytes} bytes, "
                                 f"{dtype_name(dtype)}{shape} needs {nbytes}")
        except BaseException:
            self._put_landed(key)
            if give and isinstance(buf, HostBuffer) and not buf.released:
                buf.release()
            raise
        try:
            f = self._write_buffer(key, buf, nbytes, dtype, shape, kind, tier, None, give, sync, commit,
                                   priority, cache, ephemeral, buf.owner if owner is None else owner, block,
                                   placed=placed)
        except BaseException:
            self._put_landed(key)
            raise
        f.add_done_callback(lambda _f: self._put_landed(key))
        return f

    def commit(self) -> None:
        """Make every put done so far durable: fdatasync the data files written by puts with
        ``sync=False``, then commit the manifest (a no-op when nothing changed)."""
        self._check_open()
        with self._lock:
            gen = self._gen
        self._commit_through(gen)

    def _put(self, key: str, tensor: torch.Tensor, kind: str, tier: str | None, relocate: int | None,
             ephemeral: bool = False, owner: str = DEFAULT_OWNER, block: int = 0,
             placed: bool | None = None) -> IOFuture:
        self._check_open()
        check_key(key)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"put({key!r}): expected a torch.Tensor, got {type(tensor).__name__}")
        src = tensor.detach().resolve_conj().resolve_neg()
        nbytes = src.numel() * src.element_size()
        if store_stream.too_big_for_host(self, nbytes):  # never whole in host memory
            return store_stream.put_streamed(self, key, src.contiguous(), kind, tier, relocate, ephemeral, owner,
                                             block, placed)
        if src.device.type != "cpu":
            src = src.cpu()
        src = src.contiguous()
        try:
            buf = self._alloc_host(nbytes, owner=owner)
        except OutOfBudget as e:
            raise HostBudgetError(f"put({key!r}) of {nbytes} bytes: {e}") from e
        try:
            if nbytes:
                buf.padded[:nbytes] = src.reshape(-1).view(torch.uint8).numpy()
        except BaseException:
            buf.release()
            raise
        return self._write_buffer(key, buf, nbytes, src.dtype, tuple(src.shape), kind, tier, relocate,
                                  True, True, True, Priority.WRITEBACK, True, ephemeral, owner, block,
                                  placed=placed)

    def _write_buffer(self, key: str, buf: HostBuffer, nbytes: int, dtype: torch.dtype, shape: tuple,
                      kind: str, tier: str | None, relocate: int | None, give: bool, sync: bool,
                      commit: bool, priority: Priority, cache: bool, ephemeral: bool = False,
                      owner: str = DEFAULT_OWNER, block: int = 0, wait: float | None = None,
                      placed: bool | None = None) -> IOFuture:
        """Write ``buf`` (its first ``nbytes`` are the object) as a new version of ``key``; with
        ``block``, a crc32 per ``block`` bytes is written after the data (same extent)."""
        durable = sync and not ephemeral  # nobody reads an ephemeral object after a crash
        table = None
        try:
            flat = buf.padded
            flat[nbytes:] = 0
            length = extent_length(nbytes, block)
            if block:
                table, table_crc = self._block_table(flat, block, owner, wait)
            with self._lock:
                tier_name, offset = self._reserve_extent(key, length, kind, tier, owner)
                version = relocate if relocate is not None else self._next_version(key)
            p = _PendingPut(key, version, relocate, tier_name, offset, length, nbytes, dtype, tuple(shape), kind,
                            sync, commit, ephemeral, buf, give, cache, owner=owner, block=block,
                            table_crc=table_crc if block else 0, placed=placed_flag(tier, relocate, placed))
            path = self._tiers[tier_name].data_file
            wf = self.engine.write(path, offset, flat, sync=durable and not block, priority=priority)
            if block:
                tf = self.engine.write(path, offset + len(flat), table.padded, sync=durable, priority=priority)
                wf = chain(gather([wf, tf]), lambda _r: length, f"put {key}")
        except BaseException:
            if give:
                buf.release()
            if table is not None:
                table.release()
            raise

        def undo(f) -> None:
            if table is not None:
                table.release()
            if f.exception() is not None:
                with self._lock:
                    self._tiers[tier_name].give(offset, length)
                if give:
                    buf.release()

        wf.add_done_callback(undo)
        return chain(wf, lambda _n: self._install(p), f"put {key}", note=f"while putting object {key!r}")

    def _block_table(self, flat, block: int, owner: str, wait: float | None = None) -> tuple[HostBuffer, int]:
        """The crc32 of each ``block`` bytes of ``flat`` (the padded data) in a host buffer, and
        the crc32 of that table (what the manifest records)."""
        if block <= 0 or block % 4096:
            raise StoreError(f"block checksums every {block} bytes: expected a positive multiple of 4096")
        crcs = np.fromiter((crc32(flat[i:i + block]) for i in range(0, len(flat), block)), dtype=np.uint32,
                           count=-(-len(flat) // block))
        table = self._alloc_host(crcs.nbytes, wait, owner)
        table.array[:] = crcs.view(np.uint8)
        table.padded[crcs.nbytes:] = 0
        return table, crc32(table.array)

    def _install(self, p: "_PendingPut") -> dict:
        """Make a written version current (unless a later put or delete of the key already took
        effect) and commit it; runs on the engine worker that finished the write, not the
        caller's thread: zlib drops the GIL, so the caller computes on while the checksum runs."""
        crc = p.crc if p.crc is not None else segment_checksums(p.buf.padded[:p.nbytes], 0)
        key, tier_name, ext = p.key, p.tier, Extent(p.tier, p.offset, p.length)
        with self._lock:
            old = self._objects.get(key)
            refused = self._overtaken(p, old)
            if refused is not None:
                return refused
            gen, meta = self._make_current(p, old, ext, crc)
        if p.give:
            self._notify_host()  # the cached copy is evictable from now on
        if p.commit:
            self._commit_through(gen, lambda: self._undo_install(meta, old, ext))
        with self._lock:
            self.counters.puts += 1
            self.counters.bytes_written[tier_name] = self.counters.bytes_written.get(tier_name, 0) + p.length
        if p.relocate is None:  # a migration is no workload's write (migrate emits its own event)
            self._emit(key, p.nbytes, "write", p.kind, tier_name)
        return meta.describe()

    def _overtaken(self, p: "_PendingPut", old: ObjectMeta | None) -> dict | None:
        """Under the lock: the result of a write a later put, delete or placing of its key already
        overtook (its blocks given back, never named by a manifest), else None."""
        stale = (p.version <= self._tombstones.get(p.key, 0)
                 or (old is not None and (old.version != p.version if p.relocate is not None
                                          else old.version > p.version)))
        # a governor's move (placed None) of an object its caller placed meanwhile
        overruled = p.relocate is not None and p.placed is None and old is not None and old.placed
        if not (stale or overruled):
            return None
        self._tiers[p.tier].give(p.offset, p.length)
        if p.give:
            p.buf.release()
        return {"key": p.key, "version": p.version, "superseded": True, **({"placed": True} if overruled else {})}

    def _make_current(self, p: "_PendingPut", old: ObjectMeta | None, ext: Extent, crc) -> tuple[int, ObjectMeta]:
        """Under the lock: the written version becomes the key's object (the old one unlinked; a
        migration keeps its loaded host copy, a put may leave its buffer as the host copy); the
        manifest generation that will commit it and its metadata."""
        if not p.sync and not p.ephemeral:
            self._unsynced.add(p.tier)
        self._gen += 1
        moved_copy = None
        if p.relocate is not None and old is not None and old.host is not None and old.host.ready:
            moved_copy, old.host = old.host, None  # a migration: the same bytes, so the cached copy stays
        if old is not None:  # a migration frees its old tier's blocks: they are not rewritten soon
            self._unlink(old, superseded=p.relocate is None)
        placed = p.placed if p.placed is not None else (old is not None and old.placed)
        meta = ObjectMeta(p.key, p.kind, p.dtype, p.shape, p.nbytes, p.version, crc, ext, ephemeral=p.ephemeral,
                          owner=p.owner, block=p.block, table_crc=p.table_crc, placed=placed)
        self._objects[p.key] = meta
        self._tiers[p.tier].objects += 1
        if moved_copy is not None:  # its entry in the host policy stays as it was
            meta.host = moved_copy
            if p.give:
                p.buf.release()
        elif p.give and p.cache and self.cache_on_put:
            meta.host = HostCopy(p.buf, p.version, ready=True)
            self.host_policy.admit(Observation(p.key, p.length, p.kind, "write", "host"))
        elif p.give:
            p.buf.release()
        return self._gen, meta

    def _undo_install(self, meta: ObjectMeta, old: ObjectMeta | None, ext: Extent) -> None:
        """The manifest write failed: the previous version stays current (unless the key has
        moved on since) and the new extent is freed once no reader holds it."""
        key = meta.key
        if self._objects.get(key) is not meta:
            return
        self._drop_host(meta)
        self._tiers[ext.tier].objects -= 1
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

    def _reserve_extent(self, key: str, size: int, kind: str, tier: str | None,
                        owner: str = DEFAULT_OWNER) -> tuple[str, int]:
        if tier is not None:
            if tier not in self._tiers:
                raise StoreError(f"put({key!r}): unknown storage tier {tier!r}; known: {', '.join(self._tier_order)}")
            name = tier
        else:
            choices = [(n, self._tiers[n].space.capacity, self._tiers[n].room_for(owner)) for n in self._tier_order]
            obs = Observation(key, size, kind, "write")
            governor = self._governor if self.config.policy.placement == "auto" else None
            name = governor.place(obs, choices) if governor is not None else None
            if name is None:
                name = self.placement.place(obs, choices)
            if name is None:
                free = ", ".join(f"{n}: {f} bytes in one piece" for n, _c, f in choices)
                raise TierFullError(f"put({key!r}): no storage tier has room for {size} bytes ({free})")
        t = self._tiers[name]
        offset = t.take(size, owner)
        if offset is None:
            kept = t.held_back(owner)
            raise TierFullError(f"put({key!r}): tier {name!r} has no free extent of {size} bytes for owner {owner!r} "
                             f"({t.space.free_bytes} of {t.space.capacity} bytes free, largest piece "
                             f"{t.space.largest()}" + (f", {kept} kept for other owners' shares" if kept else "") + ")")
        return name, offset
