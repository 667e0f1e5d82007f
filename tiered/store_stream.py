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

from allocators import align_up
from io_engine import Priority

if TYPE_CHECKING:
    from .store import ObjectMeta, TieredStore

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
        from .store import SEGMENT, _crc32

        self._segment, self._crc32 = SEGMENT, _crc32
        self.sums: list[int] = []
        self._cur = 0
        self._pos = 0

    def update(self, data: np.ndarray) -> None:
        i = 0
        while i < len(data):
            take = min(self._segment - self._pos % self._segment, len(data) - i)
            self._cur = self._crc32(data[i:i + take], self._cur)
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
                 relocate: int | None, ephemeral: bool):
    """Write contiguous tensor ``src`` (CPU or GPU: copied piece by piece, never whole into host
    memory) as a new version of ``key``; the bytes are all written before this returns, the
    returned future resolves once committed."""
    from io_engine import chain, completed

    from .store import StoreError, _PendingPut

    data = src.reshape(-1).view(torch.uint8)
    nbytes = data.numel()
    size = align_up(nbytes)
    with store._lock:
        tier_name, offset = store._reserve_extent(key, size, kind, tier)
        version = relocate if relocate is not None else store._next_version(key)
    try:
        crc = _write_pieces(store, data, store._tiers[tier_name].data_file, offset, durable=not ephemeral)
    except BaseException as e:
        with store._lock:
            store._tiers[tier_name].space.give(offset, size)
        if isinstance(e, StoreError) or not isinstance(e, Exception):
            raise
        raise StoreError(f"put({key!r}): streaming {nbytes} bytes through the host tier to tier "
                         f"{tier_name!r} failed: {e}") from e
    p = _PendingPut(key, version, relocate, tier_name, offset, size, nbytes, src.dtype, tuple(src.shape), kind,
                    True, True, ephemeral, crc=crc)
    return chain(completed(size), lambda _n: store._install(p), f"put {key}", note=f"while putting object {key!r}")


def _write_pieces(store: "TieredStore", data: torch.Tensor, path: str, offset: int, durable: bool) -> list[int]:
    nbytes, step = data.numel(), piece_size(store)
    size = align_up(nbytes)
    crc = SegmentCrc()
    buf = store._alloc_host(step)
    try:
        for o in range(0, size, step):
            n, m = min(step, nbytes - o), min(step, size - o)
            arr = buf.padded
            torch.from_numpy(arr[:n]).copy_(data[o:o + n])
            arr[n:m] = 0
            crc.update(arr[:n])
            last = o + step >= size
            store.engine.write(path, offset + o, arr[:m], m, sync=durable and last).result()
    finally:
        buf.release()
    return crc.finish()


def read_streamed(store: "TieredStore", meta: "ObjectMeta", consume: Callable[[int, np.ndarray], None],
                  priority: Priority = Priority.DEMAND) -> None:
    """Read ``meta``'s version through staging pieces, calling ``consume(object_offset, bytes)`` for
    each; raises ChecksumError (after the last piece) when a segment's crc32 does not match. The
    caller holds the extent against freeing (``extent.readers``)."""
    from .store import SEGMENT, ChecksumError

    ext, nbytes = meta.extent, meta.nbytes
    path, step = store._tiers[ext.tier].data_file, min(piece_size(store), align_up(max(nbytes, 1)))
    crc = SegmentCrc()
    buf = store._alloc_host(step)
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


