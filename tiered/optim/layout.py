"""How :class:`~tiered.optim.OffloadedAdamW` cuts its state into chunks, and what one chunk holds.

A chunk is one store object ``[master | exp_avg | exp_avg_sq | step tag]`` (fp32), or, for
fp32 parameters in memory (*split* chunks, the parameter is its own master),
``[exp_avg | exp_avg_sq | step tag]`` plus a master object ``[master | step tag]`` that is
only written. The tag (two int32 in the last two fp32 slots) names the step the chunk holds,
checked on every read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tiered.allocators import HostBuffer, align_up

from ..store import StoreError

log = logging.getLogger("tiered.optim")

WAIT = 600.0  # seconds any wait on the store may take before it is an error
TAG = 2  # trailing fp32 slots of a chunk: the step it holds, as two int32
ALIGN_ELEMS = 4096  # a large parameter is split at multiples of this many elements
MAX_CHUNK_BYTES = 16 << 20  # default chunk size at most (12 bytes per element)


class OptimStateError(StoreError):
    """The optimizer state in the store is missing, of another layout, or mixes steps."""


@dataclass
class Segment:
    param: int  # index into OffloadedAdamW._params
    group: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class Chunk:
    index: int
    segments: list[Segment]
    unit: object = None  # the offload unit whose parameters these are (training offloaded weights)
    expected: int = 0  # parameters whose gradient completes the chunk in backward
    arrived: set = field(default_factory=set)
    resident: HostBuffer | None = None  # kept in the host tier across steps (never read back)
    resident_master: HostBuffer | None = None  # split chunks: where the resident master is written from
    split: bool = False  # fp32 parameters in memory: moments object + master object (written only)
    busy: bool = False  # its resident buffers are being updated or are about to be written from
    resident_writes: list = field(default_factory=list)  # puts reading from the resident buffers

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)

    @property
    def state_numel(self) -> int:
        """fp32 elements of the chunk's state object."""
        return (2 if self.split else 3) * self.numel + TAG

    @property
    def host_bytes(self) -> int:
        """Host memory the chunk takes while it is updated (a split chunk's master staged to write)."""
        return align_up(4 * (3 * self.numel + TAG)) + (4096 if self.split else 0)

    @property
    def resident_bytes(self) -> int:
        """Host memory the chunk's resident buffers hold (0 when it is streamed)."""
        return sum(b.reserved for b in (self.resident, self.resident_master) if b is not None)


def encode_step(buf: torch.Tensor, step: int) -> None:
    tag = buf[-TAG:].view(torch.int32)
    tag[0], tag[1] = step & 0x7FFFFFFF, step >> 31


def decode_step(buf: torch.Tensor) -> int:
    tag = buf[-TAG:].view(torch.int32)
    return int(tag[0]) | (int(tag[1]) << 31)


def unit_chunks(units, params: list[torch.Tensor], group_of: list[int]) -> tuple[list[Chunk], set[int]]:
    """One chunk per offload unit: the unit's parameters that this optimizer updates."""
    index_of = {id(p): i for i, p in enumerate(params)}
    assigned: set[int] = set()
    chunks: list[Chunk] = []
    for u in units:
        segs = []
        for p in u.params():
            i = index_of.get(id(p))
            if i is None or i in assigned or not p.requires_grad:
                continue
            assigned.add(i)
            segs.append(Segment(i, group_of[i], 0, p.numel()))
        if segs:
            chunks.append(Chunk(len(chunks), segs, unit=u, expected=len(segs)))
    return chunks, assigned


def plan_chunks(params: list[torch.Tensor], group_of: list[int], chunk_bytes: int,
                units=None, trainable: list[bool] | None = None) -> list[Chunk]:
    """Chunks of at most ``chunk_bytes`` (12 bytes per element) over the parameters, in order;
    a large parameter is split at multiples of ``ALIGN_ELEMS`` elements (kernels see the same
    layout). With ``units`` (an offloaded model's), one chunk per unit first. Frozen
    parameters (``requires_grad=False``: a LoRA base; ``trainable``, when given, says which
    are not, for tensors that stand for other parameters) get no chunk, so no state."""
    if trainable is None:
        trainable = [p.requires_grad for p in params]
    for i, p in enumerate(params):
        if p.is_sparse or p.is_complex():
            raise ValueError(f"OffloadedAdamW: parameter {i} is sparse or complex, which is not supported")
    chunks, assigned = unit_chunks(units, params, group_of) if units is not None else ([], set())
    limit = max(ALIGN_ELEMS, chunk_bytes // 12 // ALIGN_ELEMS * ALIGN_ELEMS)
    cur: list[Segment] = []
    room = limit
    for i, p in enumerate(params):
        if i in assigned or not trainable[i]:
            continue
        if units is not None and units.owns_param(p):
            raise ValueError(f"OffloadedAdamW: parameter {i} belongs to the offloaded model but to no unit")
        n, start = p.numel(), 0
        while start < n:
            take = min(n - start, room)
            if take < n - start:  # a split: keep slices aligned so kernels see the same layout
                take = take // ALIGN_ELEMS * ALIGN_ELEMS
            if take == 0:
                chunks.append(Chunk(len(chunks), cur))
                cur, room = [], limit
                continue
            cur.append(Segment(i, group_of[i], start, start + take))
            start += take
            room -= take
            if room == 0:
                chunks.append(Chunk(len(chunks), cur))
                cur, room = [], limit
    if cur:
        chunks.append(Chunk(len(chunks), cur))
    for c in chunks:
        c.split = c.unit is None and all(params[g.param].dtype == torch.float32 and params[g.param].device.type == "cpu"
                                          for g in c.segments)
    return chunks


def drop(f) -> None:
    """Give back an acquire that will not be used."""
    if f is None:
        return
    if not f.cancel():
        try:
            lease = f.result(timeout=WAIT)
        except Exception as e:  # noqa: BLE001 - the read failed: no lease to give back, nothing to use
            log.warning("abandoned state read failed: %s", e)
            return
        lease.release()
