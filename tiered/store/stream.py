"""Objects larger than the host tier: written and read through it in pieces.

A put normally copies the whole object into one host buffer; an object that can
never fit the host tier is instead copied piece by piece into a staging buffer and
written to consecutive parts of its new extent (crc32 per segment, as for any
object). Reads of such objects (``get``, ``check``) stream the same way and verify
each segment's crc32 when its last byte has been read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from tiered.allocators import align_up
from tiered.io_engine import Priority

from ..checksums import SEGMENT, crc32
from .errors import ChecksumError, HostBudgetError, StoreError
from .objects import DEFAULT_OWNER, ObjectMeta, _PendingPut, extent_length, placed_flag

if TYPE_CHECKING:
    from .core import TieredStore

#: the most a staging piece holds: big enough to keep every engine worker busy
MAX_PIECE = 32 << 20


def piece_size(store: "TieredStore") -> int:
    """Staging piece: half the host tier (room for cached copies to stay), 4 KiB-aligned."""
    return max(4096, min(MAX_PIECE, store.arena.capacity // 2) // 4096 * 4096)


def too_big_for_host(store: "TieredStore", nbytes: int) -> bool:
    return align_up(max(nbytes, 1)) > store.arena.capacity


class SegmentCrc:
    """crc32 of each SEGMENT of an object, fed its bytes in order in pieces of any size."""

    def __init__(self) -> None:

        self._segment, self.crc32 = SEGMENT, crc32
        self.sums: list[int] = []
        self._cur = 0
        self._pos = 0

    def update(self, data: np.ndarray) -> None:
        i = 0
        while i < len(data):
            take = min(self._segment - self._pos % self._segment, len(data) - i)
            self._cur = self.crc32(data[i:i + take], self._cur)
            self._pos += take
            i += take
            if self._pos % self._segment == 0:
                self.sums.append(self._cur)
                self._cur = 0

    def finish(self) -> list[int]:
        if self._pos % self._segment or not self.sums:
            self.sums.append(self._cur)
        return self.sums


def put_streamed(store: "TieredStore", key: str, src: torch.Tensor, kind: str, tier: str | None,
                 relocate: int | None, ephemeral: bool, owner: str = DEFAULT_OWNER, block: int = 0,
                 placed: bool | None = None):
    """Write contiguous tensor ``src`` (CPU or GPU: copied piece by piece, never whole into host
    memory) as a new version of ``key``; the bytes are all written before this returns, the
    returned future resolves once committed."""
    from tiered.io_engine import chain, completed

    data = src.reshape(-1).view(torch.uint8)
    nbytes = data.numel()
    size = extent_length(nbytes, block)
    with store._lock:
        tier_name, offset = store._reserve_extent(key, size, kind, tier, owner)
        version = relocate if relocate is not None else store._next_version(key)
    try:
        crc, table_crc = _write_pieces(store, data, store._tiers[tier_name].data_file, offset, not ephemeral, owner,
                                       block)
    except BaseException as e:
        with store._lock:
            store._tiers[tier_name].give(offset, size)
        if isinstance(e, StoreError) or not isinstance(e, Exception):
            raise
        from tiered.allocators import OutOfBudget

        error = HostBudgetError if isinstance(e, OutOfBudget) else StoreError
        raise error(f"put({key!r}): streaming {nbytes} bytes through the host tier to tier "
                    f"{tier_name!r} failed: {e}") from e
    p = _PendingPut(key, version, relocate, tier_name, offset, size, nbytes, src.dtype, tuple(src.shape), kind,
                    True, True, ephemeral, crc=crc, owner=owner, block=block, table_crc=table_crc,
                    placed=placed_flag(tier, relocate, placed))
    return chain(completed(size), lambda _n: store._install(p), f"put {key}", note=f"while putting object {key!r}")


def _write_pieces(store: "TieredStore", data: torch.Tensor, path: str, offset: int, durable: bool,
                  owner: str, block: int = 0) -> tuple[list[int], int]:
    """Write the data piece by piece (then, with ``block``, its table of block crc32s); returns the
    segment crc32s and the table's crc32."""
    nbytes, step = data.numel(), piece_size(store)
    if block:
        step = max(block, step // block * block)
    size = align_up(nbytes)
    crc = SegmentCrc()
    blocks: list[int] = []
    buf = store._alloc_host(step, owner=owner)
    try:
        for o in range(0, size, step):
            n, m = min(step, nbytes - o), min(step, size - o)
            arr = buf.padded
            torch.from_numpy(arr[:n]).copy_(data[o:o + n])
            arr[n:m] = 0
            crc.update(arr[:n])
            if block:
                blocks.extend(crc32(arr[i:min(i + block, m)]) for i in range(0, m, block))
            last = o + step >= size and not block
            store.engine.write(path, offset + o, arr[:m], m, sync=durable and last).result()
    finally:
        buf.release()
    if not block:
        return crc.finish(), 0
    table = np.asarray(blocks, dtype=np.uint32).view(np.uint8)
    tbuf = store._alloc_host(len(table), owner=owner)
    try:
        tbuf.array[:] = table
        tbuf.padded[len(table):] = 0
        store.engine.write(path, offset + size, tbuf.padded, len(tbuf.padded), sync=durable).result()
    finally:
        tbuf.release()
    return crc.finish(), crc32(table)


def read_streamed(store: "TieredStore", meta: "ObjectMeta", consume: Callable[[int, np.ndarray], None],
                  priority: Priority = Priority.DEMAND, owner: str = DEFAULT_OWNER) -> None:
    """Read ``meta``'s version through staging pieces, calling ``consume(object_offset, bytes)`` for
    each; raises ChecksumError (after the last piece) when a segment's crc32 does not match. The
    caller holds the extent against freeing (``extent.readers``)."""

    ext, nbytes = meta.extent, meta.nbytes
    path, step = store._tiers[ext.tier].data_file, min(piece_size(store), align_up(max(nbytes, 1)))
    crc = SegmentCrc()
    buf = store._alloc_host(step, owner=owner)
    try:
        for o in range(0, max(nbytes, 1), step):
            n = min(step, nbytes - o)
            m = align_up(max(n, 1))
            store.engine.read(path, ext.offset + o, buf.padded[:m], m, priority=priority).result()
            crc.update(buf.padded[:n])
            consume(o, buf.padded[:n])
    finally:
        buf.release()
    for i, (got, want) in enumerate(zip(crc.finish(), meta.crc32)):
        if got != want:
            raise ChecksumError(
                f"object {meta.key!r} (version {meta.version}) read from {path}: segment {i} (bytes "
                f"{i * SEGMENT}..{min(nbytes, (i + 1) * SEGMENT)} of {nbytes}, file offset "
                f"{ext.offset + i * SEGMENT}) has crc32 {got:#010x}, recorded {want:#010x}")


def get_future(store: "TieredStore", meta: "ObjectMeta", out: torch.Tensor | None, tier: str,
               priority: Priority):
    """``get`` of an object larger than the host tier, read before this returns; a done future of
    the tensor or of a StoreError naming the object. The caller holds ``meta.extent`` as a reader
    (released here)."""
    from tiered.allocators import OutOfBudget
    from tiered.io_engine import IOFuture, completed

    try:
        if out is not None and (tuple(out.shape) != meta.shape or out.dtype != meta.dtype):
            raise StoreError(f"get({meta.key!r}): out has {out.dtype}{tuple(out.shape)}, object is "
                             f"{meta.dtype}{meta.shape}")
        result = get_streamed(store, meta, out, "cuda" if tier == "gpu" else "cpu", priority)
    except Exception as e:  # noqa: BLE001 - handed to the caller through the future
        what = f"get({meta.key!r}) of {meta.nbytes} bytes through the host tier: {e}"
        if not isinstance(e, StoreError):
            e = HostBudgetError(what) if isinstance(e, OutOfBudget) else StoreError(what)
        f = IOFuture(f"get {meta.key}")
        f.set_exception(e)
        return f
    finally:
        store._release_extent(meta.extent)
    store._emit(meta.key, meta.nbytes, "read", meta.kind, meta.extent.tier)
    return completed(result, f"get {meta.key}")


def get_streamed(store: "TieredStore", meta: "ObjectMeta", out: torch.Tensor | None, device: str,
                 priority: Priority) -> torch.Tensor:
    """The object ``meta`` (too big for the host tier) copied into ``out`` or a new tensor on
    ``device``: memory the caller owns, as every ``get`` returns, filled piece by piece."""
    dst = out if out is not None and out.is_contiguous() else torch.empty(meta.shape, dtype=meta.dtype, device=device)
    flat = dst.reshape(-1).view(torch.uint8) if meta.nbytes else dst

    def consume(o: int, piece: np.ndarray) -> None:
        flat[o:o + len(piece)].copy_(torch.from_numpy(piece))

    read_streamed(store, meta, consume, priority)
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


