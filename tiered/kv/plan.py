"""A decode step's gather plan, and the batched range reads of a layer's stored blocks.

Once per step (not per block and layer) the plan says, for every block, where each of its parts
is: resident on the device, a host copy in the store (acquired), or only on storage (read).
The parts to read for one layer are read with one :meth:`TieredStore.read_range_arrays` call
into one host buffer laid out as the layer's staging slot holds them (``[2, B, H, tokens, D]``:
each block's K and V rows land where the slot wants them, one range per ``(block, K|V, row,
head)``), so the gather copies each run of read blocks into its slot with one copy per K and V.

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

    def segments(self, part: int, first: int) -> list[tuple[int, int, int]]:
        """Runs ``(kind, j0, j1)`` of blocks ``first..`` of ``part`` with one kind each, in order."""
        w = self.where[part][first:]
        if not len(w):
            return []
        cuts = np.flatnonzero(w[1:] != w[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(w)]
        return [(int(w[a]), first + a, first + b) for a, b in zip(bounds[:-1], bounds[1:])]


def build_plan(key: tuple, blocks, parts: list, store) -> StepPlan:
    """The plan of ``blocks`` for this step: resident ones on the device; a stored part is read
    by range when it has block checksums and no host copy in the store, else acquired."""
    n = len(blocks)
    where = [np.full(n, DEVICE, dtype=np.int8) for _ in parts]
    keys = [[None] * n for _ in parts]
    for j, blk in enumerate(blocks):
        if blk.data is not None:
            continue
        for p, k in enumerate(blk.keys):
            meta = store.meta(k)
            keys[p][j] = k
            where[p][j] = READ if _ranged(meta) and not meta["in_host"] else HOST
    return StepPlan(key, where, keys)


@dataclass
class LayerRead:
    """One batch of a layer's read blocks: runs of block positions, one range read, one host
    buffer ``[2, B, H, tokens, D]`` (the runs' rows, in order)."""

    layer: int
    runs: list  # (j0, j1) block positions read, in order
    buf: object  # HostBuffer (at least nbytes)
    future: object  # IOFuture of the bytes read
    nbytes: int  # bytes of the runs' rows in buf


def layer_ranges(plan: StepPlan, part: int, at: int, runs: list, geometry: tuple, dims: tuple):
    """The read of layer ``at`` of ``part`` for the blocks in ``runs``, as ``read_range_arrays``
    takes it: ``(keys, which, offsets, lengths, buf_offsets, nbytes)``; range ``(i, q)`` is row
    ``q`` (K|V, batch row, head) of the i-th block, landing at ``[q, i * bs]`` of the buffer.

    ``geometry``: (batch, dtype); ``dims``: (kv_heads, block_size, head_dim)."""
    b, dtype = geometry
    h, bs, d = dims
    pos = [j for j0, j1 in runs for j in range(j0, j1)]
    keys = [plan.keys[part][j] for j in pos]
    n = len(keys)
    row = bs * d * dtype.itemsize  # one head's rows of a block, bytes
    q = np.arange(2 * b * h, dtype=np.int64)
    i = np.arange(n, dtype=np.int64)
    offsets = np.broadcast_to(at * len(q) * row + q[None, :] * row, (n, len(q))).reshape(-1)
    buf_offsets = (q[None, :] * (n * row) + i[:, None] * row).reshape(-1)
    which = np.repeat(i, len(q))
    lengths = np.full(len(offsets), row, dtype=np.int64)
    return keys, which, offsets, lengths, buf_offsets, n * len(q) * row


def read_views(read: LayerRead, geometry: tuple, dims: tuple, device=None) -> list:
    """Per run of ``read``: its K and V as ``[B, H, tokens, D]`` views of the read's buffer (or of
    ``device``, a uint8 device tensor holding the same bytes), in ``read.runs`` order."""
    b, dtype = geometry
    h, bs, d = dims
    flat = read.buf.tensor() if device is None else device
    n = sum(j1 - j0 for j0, j1 in read.runs)
    kv = flat[:2 * b * h * n * bs * d * dtype.itemsize].view(dtype).view(2, b, h, n * bs, d)
    out, i = [], 0
    for j0, j1 in read.runs:
        out.append((kv[0, :, :, i * bs:(i + j1 - j0) * bs], kv[1, :, :, i * bs:(i + j1 - j0) * bs]))
        i += j1 - j0
    return out
