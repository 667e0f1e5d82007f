"""Reading part of a stored DCP tensor item: only the checksum blocks that hold its bytes.

A load at another world size asks for a hypercube of a saved chunk (``ReadItem.storage_offsets``
and ``lengths``); reading the item whole and narrowing it made every rank read the whole
checkpoint. The writer puts each piece of an item as a store object with a crc32 per ``block``
bytes (the store's ``put(..., block=)``: the table follows the object's padded data in its
extent, its own crc32 recorded as ``table_crc``). Here the hypercube becomes runs of contiguous
bytes (row-major), the runs the blocks that hold them, and those blocks are read through the
store's engine, each checked against the table (read and checked first). The reader cannot go
through ``TieredStore.read_ranges``: the pieces are retained extents of keys already deleted,
often in another rank's store. Items written without block tables are read whole instead.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from tiered.allocators import align_up
from tiered.io_engine import IOFuture, chain, gather

from ..checksums import block_crcs
from .format import SEGMENT, CheckpointChecksumError, CheckpointError

#: bytes per crc32 the writer asks the store for: a partial read overshoots by < 2 blocks per run group
BLOCK = 64 << 10


@dataclass(frozen=True)
class Part:
    """One stored piece of an item: ``nbytes`` at ``offset`` of ``path``, item bytes ``start`` on."""

    path: str
    offset: int
    nbytes: int
    start: int
    block: int
    table_crc: int


def block_record(put: dict, located: dict) -> dict:
    """What the metadata keeps of a piece's block table: its block size and crc32 (from the
    put; the version retained must be the one put)."""
    if not put.get("block"):
        return {}
    if put.get("version") != located["version"]:
        raise CheckpointError(f"store object {located['key']!r}: version {located['version']} retained, "
                              f"{put.get('version')} put")
    return {"block": put["block"], "table_crc": put["table_crc"]}


def item_parts(records: list[dict], path_of) -> list[Part]:
    """An item's pieces from its metadata records (``path_of(record)``: the data file)."""
    parts, start = [], 0
    for r in records:
        parts.append(Part(path_of(r), r["offset"], r["nbytes"], start, r.get("block", 0), r.get("table_crc", 0)))
        start += r["nbytes"]
    return parts


def parts_with_blocks(parts: list[Part]) -> bool:
    """Whether every piece has a block table, of one block size, starting on a block boundary."""
    return bool(parts) and all(p.block and p.block == parts[0].block and p.start % p.block == 0 for p in parts)


def wants_part(shape, offsets, lengths) -> bool:
    """Whether a request asks for less than the whole (non-empty) stored tensor."""
    return math.prod(lengths) > 0 and (any(offsets) or list(lengths) != list(shape))


def request_runs(shape, itemsize: int, offsets, lengths) -> tuple[np.ndarray, int]:
    """The item byte offsets of the contiguous runs of the hypercube ``offsets`` + ``lengths`` of
    a row-major tensor of ``shape``, in order, and their common length in bytes."""
    n = len(shape)
    if n == 0:
        return np.zeros(1, dtype=np.int64), itemsize
    strides = [math.prod(shape[j + 1:]) for j in range(n)]
    k = n - 1
    while k > 0 and offsets[k] == 0 and lengths[k] == shape[k]:  # whole inner dimensions join the run
        k -= 1
    grid = np.zeros((), dtype=np.int64)
    for j in range(k):
        grid = grid[..., None] + (offsets[j] + np.arange(lengths[j], dtype=np.int64)) * strides[j]
    starts = grid.reshape(-1) + offsets[k] * strides[k]
    return starts * itemsize, lengths[k] * strides[k] * itemsize


def needed_blocks(starts: np.ndarray, run: int, block: int, length: int) -> np.ndarray:
    """Indices of the ``block``-byte blocks of an item of ``length`` bytes that the runs touch."""
    count = -(-length // block)
    edges = np.zeros(count + 1, dtype=np.int64)
    np.add.at(edges, starts // block, 1)
    np.add.at(edges, (starts + run - 1) // block + 1, -1)
    return np.flatnonzero(np.cumsum(edges[:-1]) > 0)


def read_hypercube(engine, arena, parts: list[Part], dtype: torch.dtype, shape, offsets, lengths,
                   where: str, wait: float) -> torch.Tensor:
    """The hypercube of the stored tensor as a (strided) tensor over the blocks read."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    length = math.prod(shape) * itemsize
    starts, run = request_runs(shape, itemsize, offsets, lengths)
    block = parts[0].block
    blocks = needed_blocks(starts, run, block, length)
    lo, hi = int(blocks[0]) * block, min((int(blocks[-1]) + 1) * block, length)
    span = torch.empty(hi - lo, dtype=torch.uint8)
    groups = _block_groups(parts, blocks)
    tables = _read_tables(engine, arena, sorted({p for p, _b0, _n in groups}, key=lambda p: p.start), where, wait)
    _read_blocks(engine, arena, groups, tables, span.numpy(), lo, where, wait)
    strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    first = sum(o * s for o, s in zip(offsets, strides)) * itemsize
    return span.view(dtype).as_strided(tuple(lengths), strides, (first - lo) // itemsize)


def _block_groups(parts: list[Part], blocks: np.ndarray) -> list[tuple[Part, int, int]]:
    """Consecutive needed blocks within one piece: (piece, its first block there, count)."""
    block = parts[0].block
    part_of = np.searchsorted(np.array([p.start for p in parts], dtype=np.int64), blocks * block, side="right") - 1
    cuts = np.flatnonzero((np.diff(blocks) != 1) | (np.diff(part_of) != 0)) + 1
    out = []
    for seg in np.split(np.arange(len(blocks)), cuts):
        p = parts[int(part_of[seg[0]])]
        out.append((p, int(blocks[seg[0]]) - p.start // block, len(seg)))
    return out


def _read_tables(engine, arena, parts: list[Part], where: str, wait: float) -> dict[Part, np.ndarray]:
    """Each piece's block crc32 table, checked against its recorded crc32 (read in parallel)."""
    tables: dict[Part, np.ndarray] = {}
    reads = []
    for p in parts:
        data = align_up(max(p.nbytes, 1))
        n = 4 * -(-data // p.block)

        def check(buf, p=p, n=n, at=p.offset + data) -> None:
            got = zlib.crc32(buf.array[:n])
            if got != p.table_crc:
                raise CheckpointChecksumError(
                    f"{where}: the block checksum table of item bytes {p.start}..{p.start + p.nbytes}, "
                    f"read from {p.path} at offset {at}, has crc32 {got:#010x}, recorded {p.table_crc:#010x}")
            tables[p] = buf.array[:n].view(np.uint32).copy()

        reads.append((p.path, p.offset + data, n, check))
    _read_all(engine, arena, reads, where, wait)
    return tables


def _read_blocks(engine, arena, groups, tables: dict, span: np.ndarray, lo: int, where: str, wait: float) -> None:
    """Read each group of blocks, check every block against its piece's table, copy the data
    bytes into ``span`` (item bytes ``lo`` on); blocks until all are done."""
    reads = []
    for p, b0, count in groups:
        first = b0 * p.block
        valid = min((b0 + count) * p.block, p.nbytes) - first  # data bytes; the read ends padded

        def check(buf, p=p, b0=b0, first=first, valid=valid) -> None:
            _check_blocks(buf.padded[:align_up(valid)], tables[p], p, b0, where)
            at = p.start + first - lo
            span[at:at + valid] = buf.array[:valid]

        reads.append((p.path, p.offset + first, valid, check))
    _read_all(engine, arena, reads, where, wait)


def _read_all(engine, arena, reads: list, where: str, wait: float) -> None:
    """Each ``(path, offset, nbytes, on_data)``: read ``nbytes`` (padded to whole pages) at
    ``offset`` into a buffer of its own, hand it to ``on_data`` on the engine's thread, free it;
    reads run in parallel, and every submitted read ends (freeing its buffer) before the first
    failure is raised."""
    futs: list[IOFuture] = []
    try:
        for path, offset, nbytes, on_data in reads:
            buf = arena.alloc(nbytes, timeout=wait)
            try:
                rf = engine.read(path, offset, buf.padded, align_up(nbytes))
            except BaseException:
                buf.release()
                raise

            def done(_n, buf=buf, on_data=on_data) -> None:
                try:
                    on_data(buf)
                finally:
                    buf.release()

            rf.add_done_callback(lambda f, buf=buf: f.exception() is not None and buf.release())
            futs.append(chain(rf, done, where))
    finally:
        gather(futs).exception()
    gather(futs).result()


def _check_blocks(data: np.ndarray, table: np.ndarray, p: Part, b0: int, where: str) -> None:
    """Raise for the first block of ``data`` (blocks ``b0`` on of piece ``p``) whose crc32 differs."""
    got = np.array(block_crcs(data, p.block), dtype=np.uint32)
    want = table[b0:b0 + len(got)]
    bad = np.flatnonzero(got != want)
    if len(bad):
        i = int(bad[0])
        at = (b0 + i) * p.block
        end = p.start + min(at + p.block, p.nbytes)
        raise CheckpointChecksumError(
            f"{where}: block {b0 + i} of {p.block} bytes (item bytes {p.start + at}..{end}) read from {p.path} "
            f"at offset {p.offset + at} has crc32 {int(got[i]):#010x}, recorded {int(want[i]):#010x}")


def table_bytes(nbytes: int, block: int) -> int:
    """Host bytes the store takes for the block table of an object of ``nbytes`` while putting it."""
    return align_up(4 * -(-align_up(max(nbytes, 1)) // block)) if block else 0


def piece_bytes(block: int) -> int:
    """Bytes per stored piece: a whole number of blocks that, with its block table, fits one
    segment (the smallest staging budget a writer accepts)."""
    piece = SEGMENT
    while block and piece + table_bytes(piece, block) > SEGMENT:
        piece -= block
    return piece


def check_block(block: int) -> int:
    """A writer's block size: 0 (none), or a multiple of 4096 that divides the piece size."""
    if block < 0 or block % 4096 or (block and SEGMENT % block):
        raise CheckpointError(f"block = {block}: expected 0 or a multiple of 4096 bytes that divides {SEGMENT}")
    return block
