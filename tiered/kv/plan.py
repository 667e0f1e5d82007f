"""A decode step's gather plan, and the batched range reads of a layer's stored blocks.

Once per step (not per block and layer) the plan says, for every block, where each of its parts
is: resident on the device, a host copy in the store (acquired), or only on storage (read).
The parts to read for one layer are read with one :meth:`TieredStore.read_range_arrays` call
into one host buffer, the layer's K and V of each block one after the other (``[blocks, 2, B,
H, bs, D]``, one range per block: the layer's bytes of a part are contiguous), so the gather
copies each run of read blocks into its slot with one strided copy per K and V.

Such ranges must be whole checksum blocks: parts are put with a crc32 per
:func:`checksum_block` bytes, a divisor of one head's ``block_size x head_dim`` bytes. Where
those are not a multiple of 4 KiB (tiny models), parts are put without block checksums and,
like parts stored by earlier versions, acquired whole from the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..dtypes import dtype_from
from .blocks import KVCacheError

PAGE = 4096
#: the largest checksum block chosen (a range read verifies one crc32 per block)
MAX_CHECKSUM_BLOCK = 1 << 20

DEVICE, HOST, READ = 0, 1, 2  # where a block's part is this step


def checksum_block(shape, dtype: torch.dtype) -> int:
    """The ``block=`` a KV part ``[layers, 2, B, H, bs, D]`` is put with: the largest power of two
    times 4 KiB (at most 1 MiB) dividing one head's ``bs x D`` bytes, so that a layer's rows of a
    head are whole checksum blocks; 0 (none) when they are not a multiple of 4 KiB."""
    row = int(shape[-2]) * int(shape[-1]) * torch.empty((), dtype=dtype).element_size()
    if row % PAGE:
        return 0
    block = PAGE
    while block * 2 <= MAX_CHECKSUM_BLOCK and row % (block * 2) == 0:
        block *= 2
    return block


def _align_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def checksum_table_bytes(shape, dtype: torch.dtype) -> int:
    """Host bytes the store takes for the checksum table of a part ``shape`` put with
    :func:`checksum_block`: a crc32 per block of the part's bytes padded to 4 KiB, in whole pages
    (0 for a part put without block checksums)."""
    block = checksum_block(shape, dtype)
    if not block:
        return 0
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return _align_up(4 * -(-_align_up(max(nbytes, 1)) // block))


def _ranged(meta: dict) -> bool:
    """A stored part can be read by ranges of its rows: its checksum blocks divide one head's rows."""
    block = meta.get("block", 0)
    row = int(meta["shape"][-2]) * int(meta["shape"][-1]) * dtype_from(meta["dtype"]).itemsize
    return bool(block) and row % block == 0


@dataclass
class StepPlan:
    """Where each block's parts are for one decode step (see the module docstring).

    ``where[p][j]``: DEVICE, HOST or READ for part ``p`` of block position ``j``;
    ``keys[p][j]``: its store key (None when resident)."""

    key: tuple
    where: list[np.ndarray]
    keys: list[list]
    reads: dict = field(default_factory=dict)  # layer -> LayerRead issued this step
    batches: dict = field(default_factory=dict)  # (layer, first block) -> its runs in batches (the gather's)

    def segments(self, part: int, first: int) -> list[tuple[int, int, int]]:
        """Runs ``(kind, j0, j1)`` of blocks ``first..`` of ``part`` with one kind each, in order."""
        w = self.where[part][first:]
        if not len(w):
            return []
        cuts = np.flatnonzero(w[1:] != w[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(w)]
        return [(int(w[a]), first + a, first + b) for a, b in zip(bounds[:-1], bounds[1:])]


def check_part(key: str, meta: dict, shape: list, dtype: str) -> None:
    """Raise a KVCacheError naming ``key`` when the stored part is not the ``dtype`` (its name) x
    ``shape`` the cache reads it as (a range read would take the wrong bytes, or bytes outside it)."""
    if list(meta["shape"]) != shape or meta["dtype"] != dtype:
        raise KVCacheError(f"TieredCache: stored block part {key!r} is {meta['dtype']}{tuple(meta['shape'])}, "
                           f"the cache expects {dtype}{tuple(shape)} (batch rows, KV heads, block size or "
                           "dtype differ)")


def build_plan(key: tuple, blocks, parts: list, store, room: int = 0, expect: tuple | None = None) -> StepPlan:
    """The plan of ``blocks`` for this step: resident ones on the device; a stored part with a
    host copy in the store is acquired, one with block checksums read by range. Up to ``room``
    bytes of parts the store does not hold in host are acquired too (the first blocks' parts), so
    that they are cached there for the next steps: the host tier's room saves storage reads.

    ``expect``: (shapes, dtype name), each stored part ``p`` must be ``dtype`` x ``shapes[p]``
    (see :func:`check_part`)."""
    n = len(blocks)
    where = [np.full(n, DEVICE, dtype=np.int8) for _ in parts]
    keys = [[None] * n for _ in parts]
    reads = []  # (block position, part, bytes) read by range
    for j, blk in enumerate(blocks):
        if blk.data is not None:
            continue
        for p, k in enumerate(blk.keys):
            meta = store.meta(k)
            if expect is not None:
                check_part(k, meta, expect[0][p], expect[1])
            keys[p][j] = k
            if meta["in_host"] or not _ranged(meta):
                where[p][j] = HOST
                room -= meta["nbytes"] if meta["in_host"] else 0
            else:
                where[p][j] = READ
                reads.append((j, p, meta["nbytes"]))
    for j, p, nbytes in reads:
        if nbytes > room:
            break
        where[p][j] = HOST
        room -= nbytes
    return StepPlan(key, where, keys)


@dataclass
class LayerRead:
    """One batch of a layer's read blocks: runs of block positions, one range read, one host
    buffer ``[blocks, 2, B, H, bs, D]`` (the runs' blocks, in order)."""

    layer: int
    runs: list  # (j0, j1) block positions read, in order
    buf: object  # HostBuffer (at least nbytes)
    future: object  # IOFuture of the bytes read
    nbytes: int  # bytes of the runs' rows in buf
    gen: int = 0  # the cache's generation of reads it was issued in (see GatherMixin._idle)


def layer_ranges(plan: StepPlan, part: int, at: int, runs: list, geometry: tuple, dims: tuple):
    """The read of layer ``at`` of ``part`` for the blocks in ``runs``, as ``read_range_arrays``
    takes it: ``(keys, which, offsets, lengths, buf_offsets, nbytes)``; range i is the layer's
    K and V of the i-th block (``[2, B, H, bs, D]``, whole checksum blocks), at ``i`` of the buffer.

    ``geometry``: (batch, dtype); ``dims``: (kv_heads, block_size, head_dim)."""
    b, dtype = geometry
    h, bs, d = dims
    keys = [plan.keys[part][j] for j0, j1 in runs for j in range(j0, j1)]
    n = len(keys)
    layer = 2 * b * h * bs * d * dtype.itemsize
    i = np.arange(n, dtype=np.int64)
    return keys, i, np.full(n, at * layer, dtype=np.int64), np.full(n, layer, dtype=np.int64), i * layer, n * layer


def read_views(read: LayerRead, geometry: tuple, dims: tuple, device=None) -> list:
    """Per run of ``read``: its blocks' K and V (``[n, B, H, bs, D]`` each) as views of the read's
    buffer (or of ``device``, a uint8 device tensor holding the same bytes), in ``read.runs`` order."""
    b, dtype = geometry
    h, bs, d = dims
    flat = read.buf.tensor() if device is None else device
    n = sum(j1 - j0 for j0, j1 in read.runs)
    blocks = flat[:read.nbytes].view(dtype).view(n, 2, b, h, bs, d)
    out, i = [], 0
    for j0, j1 in read.runs:
        out.append((blocks[i:i + j1 - j0, 0], blocks[i:i + j1 - j0, 1]))
        i += j1 - j0
    return out
