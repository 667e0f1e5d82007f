"""``OffloadedAdamW``: AdamW whose fp32 master weights and moments live in the tiered store.

The state is cut into chunks (whole parameters, or 4096-element-aligned slices
of large ones; one chunk per unit for a model wrapped by ``tiered.offload``).
A chunk is one store object ``[master | exp_avg | exp_avg_sq | step tag]``
(fp32), so one read and one write, when its parameters are not all fp32 (the
master is their fp32 copy) or live in offloaded units. For fp32 parameters in
memory the parameter *is* the master: the chunk is ``[exp_avg | exp_avg_sq |
step tag]``, updated with the parameter in place, and the master is only
written (its own object ``[master | step tag]``, what resume and crash
recovery restore the parameters from), never read back during training, so
a step reads 8 bytes per parameter instead of 12. ``step()`` streams them as the
ZeRO-Infinity pipeline does: while chunk *i* is updated on the CPU, chunks
*i+1..i+k* are being read by the engine and chunk *i-1* is being written.
The update itself is torch's own functional AdamW on views of the chunk, so
results are bitwise those of ``torch.optim.AdamW`` with the same
``foreach``/``fused`` setting.

Host budget: what the host tier holds beyond the pipeline's working set
(``lookahead`` chunks being read, one updated, two being written) keeps whole
chunks *resident*: they stay in host memory across steps and are never read
back from storage, so a step reads fewer bytes than the state holds. Every
chunk, resident or not, is still written every step (the moments from the
buffer they were updated in, without a copy; a master staged from the
parameters), so storage always holds complete steps. Streamed chunks go in
reverse order every other step: those written last in one step are still
cached in the pipeline's part of the host tier and come first in the next,
without a read.

Crash consistency: step *s* writes its chunks under keys of parity ``s % 2``
(written without a per-object fdatasync or manifest commit) and, only once all
of them are written, one fdatasync per data file, one manifest commit and a
marker object naming step *s*. The state of step *s-1* (the other parity) is
never touched by step *s*, and step *s+1* writes nothing before the marker of
*s* is durable, so a kill at any point leaves the marker naming a step whose
chunks are all present; each chunk also carries the step it belongs to,
checked on every read, so a state that mixes steps is refused with
:class:`OptimStateError` instead of being used.

By default ``step()`` returns once every chunk is updated and its write is
issued: the rest of the writes and the commit overlap what the caller does
next (forward and backward of the next step), and the step is made durable
when the next step begins, before it writes anything (or in ``flush()``,
``state_dict()``, ``load_state_dict()``, ``close()``). So a crash loses at most
the last step that ``step()`` returned from, never mixes steps. ``sync=True``
makes ``step()`` return only once its step is durable.

Training a model wrapped by ``tiered.offload`` (``model=``): in backward each
unit's gradients are handed to the optimizer as soon as they are complete
(post-accumulate-grad hooks); the unit's state chunk is updated right away
(its read was started when the unit's backward began), the new weights are
written into the unit's store objects, and the gradients are released. So
neither the weights, nor the gradients, nor the optimizer state need to be in
memory at once. ``step()`` then updates what backward did not (parameters
outside units, unused ones) and commits the step.
"""

from __future__ import annotations

from collections import deque
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _functional_adamw

from allocators import HostBuffer, OutOfBudget, align_up
from io_engine import Priority, gather

from ..config import load_config
from ..store import Lease, StoreError, TieredStore

log = logging.getLogger("tiered.optim")

_WAIT = 600.0  # seconds any wait on the store may take before it is an error
_TAG = 2  # trailing fp32 slots of a chunk: the step it holds, as two int32
_ALIGN_ELEMS = 4096  # a large parameter is split at multiples of this many elements


class OptimStateError(StoreError):
    """The optimizer state in the store is missing, of another layout, or mixes steps."""


@dataclass
class _Segment:
    param: int  # index into OffloadedAdamW._params
    group: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass
class _Chunk:
    index: int
    segments: list[_Segment]
    unit: object = None  # the offload unit whose parameters these are (training offloaded weights)
    expected: int = 0  # parameters whose gradient completes the chunk in backward
    arrived: set = field(default_factory=set)
    resident: HostBuffer | None = None  # kept in the host tier across steps (never read back)
    resident_master: HostBuffer | None = None  # split chunks: where the resident master is written from
    split: bool = False  # fp32 parameters in memory: moments object + master object (written only)

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)


def _encode_step(buf: torch.Tensor, step: int) -> None:
    tag = buf[-_TAG:].view(torch.int32)
    tag[0], tag[1] = step & 0x7FFFFFFF, step >> 31


def _decode_step(buf: torch.Tensor) -> int:
    tag = buf[-_TAG:].view(torch.int32)
    return int(tag[0]) | (int(tag[1]) << 31)


class OffloadedAdamW(Optimizer):
    """AdamW with its state in a :class:`~tiered.TieredStore`; see the module docstring.

    ``store``: an open store (the caller closes it); else ``config`` (TOML path, dict,
    Config or None) names one that :meth:`open` opens and :meth:`close` closes; with
    ``model`` (a model wrapped by ``tiered.offload``) the model's store is the default.
    ``name``: key prefix of this optimizer's objects. ``chunk_bytes``: target size of one
    chunk object (12 bytes per element; default: what the host tier holds ``lookahead + 3``
    of, at most 16 MiB: the rest of the host tier keeps chunks resident). ``lookahead``: chunks read ahead of the update.
    ``resume``: continue from the last complete step found in the store (else finding
    state there is an error, so two runs cannot silently share it).
    ``resident_bytes``: host memory for chunks kept resident across steps (default: what the
    host tier holds beyond the pipeline when this optimizer opened the store itself and no
    model shares it, else 0). ``sync``: ``step()`` returns only once its step is durable
    (default: the step is committed when the next one begins, see the module docstring; always
    so with ``model``).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False,
                 foreach: bool | None = False, fused: bool | None = None, config=None,
                 store: TieredStore | None = None, model: nn.Module | None = None, name: str = "adamw",
                 chunk_bytes: int | None = None, lookahead: int = 2, resume: bool = False,
                 resident_bytes: int | None = None, sync: bool = False) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"OffloadedAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"OffloadedAdamW: betas must be in [0, 1), got {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"OffloadedAdamW: eps must be >= 0, got {eps}")
        if chunk_bytes is not None and chunk_bytes < 12 * _ALIGN_ELEMS:
            raise ValueError(f"OffloadedAdamW: chunk_bytes must be >= {12 * _ALIGN_ELEMS}, got {chunk_bytes}")
        if lookahead < 0:
            raise ValueError(f"OffloadedAdamW: lookahead must be >= 0, got {lookahead}")
        if resident_bytes is not None and resident_bytes < 0:
            raise ValueError(f"OffloadedAdamW: resident_bytes must be >= 0, got {resident_bytes}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, amsgrad=False)
        super().__init__(params, defaults)
        self._rt = getattr(model, "_tiered", None) if model is not None else None
        if model is not None and self._rt is None:
            raise ValueError(f"OffloadedAdamW(model=...): {type(model).__name__} is not wrapped by tiered.offload")
        self._config = config
        self._store = store if store is not None else (self._rt.store if self._rt is not None else None)
        self._owns_store = self._store is None
        self.name = name
        self.chunk_bytes = chunk_bytes
        self.lookahead = lookahead
        self.resume = resume
        self.resident_bytes = resident_bytes
        # with model=, backward updates units and writes weights before step(): each step is
        # committed before step() returns, so that nothing of it is left for the next backward
        self.sync = sync or self._rt is not None
        self._pending: int | None = None  # a step that step() returned from, not committed yet
        self._broken: BaseException | None = None  # a step failed to become durable
        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._group_of: list[int] = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._chunks: list[_Chunk] = []
        self._param_steps: list[int] = [0] * len(self._params)
        self._step = 0  # last committed step
        self._updated: set[int] = set()  # chunk indexes already updated in the step in progress
        self._stepped_params: set[int] = set()
        self._writes: list = []
        self._state_reads: dict[int, object] = {}  # chunk index -> acquire future started in backward
        self._hooks: list = []
        self._open = False

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> "OffloadedAdamW":
        """Open the store (if this optimizer owns it), plan the chunks, find earlier state."""
        if self._open:
            return self
        if self._owns_store:
            self._store = TieredStore(load_config(self._config)).open()
        try:
            self._plan_chunks()
            self._check_budget()
            self._place_resident()
            if self._marker_key in self._store:
                if not self.resume:
                    step = int(self._read_marker()[0])
                    raise OptimStateError(
                        f"store at {self._store.root} already holds optimizer state {self.name!r} at step {step} "
                        f"(object {self._marker_key!r}); pass resume=True to continue it, or another name=")
                self._recover()
            if self._rt is not None:
                self._install_grad_hooks()
        except BaseException:
            self._remove_hooks()
            self._release_resident()
            if self._owns_store:
                self._store.close()
            raise
        self._open = True
        return self

    def close(self) -> None:
        """Commit the last step (see :meth:`flush`); close the store if this optimizer opened it."""
        if not self._open:
            return
        self._remove_hooks()
        self._drop_state_reads()
        try:
            self._settle()
            self._open = False
        finally:
            self._open = False
            try:
                self._wait_writes()  # resident buffers are write sources until their writes are done
            finally:
                self._release_resident()
                if self._owns_store:
                    self._store.close()

    def flush(self) -> None:
        """Make the last step durable now (it is otherwise committed when the next step begins)."""
        self._check_open()
        self._settle()

    def __enter__(self) -> "OffloadedAdamW":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._open:
            raise OptimStateError("OffloadedAdamW is not open: call open() or use it as a context manager")
        if self._broken is not None:
            raise OptimStateError(f"OffloadedAdamW {self.name!r}: step {self._step + 1} failed to become durable "
                                  f"({self._broken!r}); reopen with resume=True to continue from step "
                                  f"{self._step}") from self._broken

    def _settle(self) -> None:
        """Commit the step that step() returned from, if any: before the next one writes."""
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        try:
            self._commit(s)
        except BaseException as e:
            self._broken = e
            raise

    def _next_step(self) -> int:
        self._settle()
        return self._step + 1

    @property
    def store(self) -> TieredStore:
        return self._store

    @property
    def _marker_key(self) -> str:
        return f"{self.name}/step"

    def _chunk_key(self, c: _Chunk, step: int) -> str:
        return f"{self.name}/c{c.index:06d}/{step % 2}"

    def _master_key(self, c: _Chunk, step: int) -> str:
        """A split chunk's master object (the parameters as of that step)."""
        return f"{self.name}/w{c.index:06d}/{step % 2}"

    @staticmethod
    def _state_numel(c: _Chunk) -> int:
        return (2 if c.split else 3) * c.numel + _TAG

    @staticmethod
    def _host_bytes(c: _Chunk) -> int:
        """Host memory one chunk takes while it is updated (a split chunk's master staged to write)."""
        return align_up(4 * (3 * c.numel + _TAG)) + (4096 if c.split else 0)

    # -- planning --------------------------------------------------------------------
    def _plan_chunks(self) -> None:
        index_of = {id(p): i for i, p in enumerate(self._params)}
        for i, p in enumerate(self._params):
            if p.is_sparse or p.is_complex():
                raise ValueError(f"OffloadedAdamW: parameter {i} is sparse or complex, which is not supported")
        assigned: set[int] = set()
        chunks: list[_Chunk] = []
        if self._rt is not None:
            self._rt.check_trainable()
            for u in self._rt.units:
                segs = []
                for s in u.slots:
                    if s.is_buffer:
                        continue
                    i = index_of.get(id(s.tensor()))
                    if i is None or i in assigned:
                        continue
                    assigned.add(i)
                    segs.append(_Segment(i, self._group_of[i], 0, s.shape.numel()))
                if segs:
                    chunks.append(_Chunk(len(chunks), segs, unit=u, expected=len(segs)))
        chunk_bytes = self.chunk_bytes
        if chunk_bytes is None:
            chunk_bytes = min(16 << 20, self._store.arena.capacity // (self.lookahead + 3) - 4096 - 4 * _TAG)
        limit = max(_ALIGN_ELEMS, chunk_bytes // 12 // _ALIGN_ELEMS * _ALIGN_ELEMS)
        cur: list[_Segment] = []
        room = limit
        for i, p in enumerate(self._params):
            if i in assigned:
                continue
            if self._rt is not None and self._rt.owns_param(p):
                raise ValueError(f"OffloadedAdamW: parameter {i} belongs to the offloaded model but to no unit")
            n, start = p.numel(), 0
            while start < n:
                take = min(n - start, room)
                if take < n - start:  # a split: keep slices aligned so kernels see the same layout
                    take = take // _ALIGN_ELEMS * _ALIGN_ELEMS
                if take == 0:
                    chunks.append(_Chunk(len(chunks), cur))
                    cur, room = [], limit
                    continue
                cur.append(_Segment(i, self._group_of[i], start, start + take))
                start += take
                room -= take
                if room == 0:
                    chunks.append(_Chunk(len(chunks), cur))
                    cur, room = [], limit
        if cur:
            chunks.append(_Chunk(len(chunks), cur))
        for c in chunks:
            c.split = c.unit is None and all(self._params[g.param].dtype == torch.float32 for g in c.segments)
        self._chunks = chunks

    def _pipeline_bytes(self) -> int:
        """Host memory the streaming pipeline needs: lookahead reads, one update, two writes."""
        if not self._chunks:
            return 0
        return (self.lookahead + 3) * max(self._host_bytes(c) for c in self._chunks)

    def _place_resident(self) -> None:
        """Keep the last chunks resident in what the host tier holds beyond the pipeline."""
        cap = self._store.arena.capacity
        room = self.resident_bytes
        if room is None:
            room = cap - self._pipeline_bytes() - (64 << 10) if self._owns_store and self._rt is None else 0
        room = min(room, cap - self._pipeline_bytes())
        for c in reversed(self._chunks):
            size = self._host_bytes(c)
            if size > room:
                break
            c.resident = self._store.alloc_host(4 * self._state_numel(c), wait=0.0)
            _encode_step(c.resident.tensor(torch.float32), -1)  # holds no step yet: loaded on first use
            if c.split:
                c.resident_master = self._store.alloc_host(4 * (c.numel + _TAG), wait=0.0)
            room -= size

    def _release_resident(self) -> None:
        for c in self._chunks:
            for attr in ("resident", "resident_master"):
                buf = getattr(c, attr)
                if buf is not None:
                    setattr(c, attr, None)
                    buf.release()

    def _check_budget(self) -> None:
        if not self._chunks:
            return
        biggest = max(self._host_bytes(c) for c in self._chunks)
        need = (self.lookahead + 3) * biggest
        cap = self._store.arena.capacity
        if need > cap:
            raise OptimStateError(
                f"OffloadedAdamW: host tier of {cap} bytes cannot hold {self.lookahead + 3} state chunks of "
                f"{biggest} bytes (lookahead {self.lookahead} + the one updated + 2 being written); lower "
                "chunk_bytes or lookahead, or raise [tiers.host] capacity")

    # -- stepping --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Update every chunk backward did not; the step is committed when the next one begins
        (``sync=True``: before this returns)."""
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        s = self._next_step()
        todo = [c for c in self._chunks if c.index not in self._updated]
        with self._breaks_on_error():
            self._run(todo, s)
            if self.sync:
                self._commit(s)
            else:
                self._pending = s
        return loss

    @contextlib.contextmanager
    def _breaks_on_error(self):
        """A step that fails part-way cannot be retried: parameters (their own masters) may be
        updated already, resident chunks' writes may be lost, and a later marker would name a
        step some chunk never reached. The optimizer refuses further steps; resume=True
        continues from the last committed step."""
        try:
            yield
        except BaseException as e:
            if self._broken is None:
                self._broken = e
            raise

    def _run(self, chunks: list[_Chunk], s: int) -> None:
        """The pipeline: reads of the next ``lookahead`` chunks are in flight while one is updated."""
        reads: deque = deque()
        nxt = 0

        def issue() -> None:
            nonlocal nxt
            reads.append(self._start_read(chunks[nxt], s))
            nxt += 1

        resident = [c for c in chunks if c.resident is not None]
        chunks = [c for c in chunks if c.resident is None]
        if s % 2 == 0:
            # every other step backwards: the chunks written last in the previous step are still
            # cached in the host tier (the buffers their writes went out of) and come first now,
            # so they are not read again; forwards every step, they would be evicted by then
            chunks.reverse()
        deferred: list = []  # resident chunks' writes, issued once the streamed ones are
        try:
            while nxt < len(chunks) and len(reads) <= self.lookahead:
                issue()
            for c in resident:  # no read: updated while the first reads are in flight
                self._update(c, s, None, deferred)
            for c in chunks:
                lease_f = reads.popleft()
                self._update(c, s, lease_f)
                if nxt < len(chunks):
                    issue()
            for write in deferred:
                write()
        except BaseException:
            for f in reads:
                _drop(f)
            raise

    def _start_read(self, c: _Chunk, s: int):
        if s == 1 or c.resident is not None:
            return None
        f = self._state_reads.pop(c.index, None)
        if f is not None:
            return f
        return self._store.acquire(self._chunk_key(c, s - 1), priority=Priority.DEMAND, wait=_WAIT)

    def _grad(self, i: int) -> torch.Tensor | None:
        return self._params[i].grad

    def _update(self, c: _Chunk, s: int, lease_f, deferred: list | None = None) -> None:
        """Update one chunk from its step ``s-1`` state; start writing it as step ``s``.

        The state is updated in place in the buffer it was read into (or the chunk's resident
        buffer), which is then written as is: no copy. ``lease_f`` is None for a resident chunk
        and in step 1. A streamed chunk's write goes at read priority (the next reads need its
        room); a resident chunk's write at write-back priority, or, with ``deferred``, is appended
        there as a callable for the caller to issue later (after the streamed ones)."""
        if c.index in self._updated:
            raise OptimStateError(f"chunk {c.index} of {self.name!r} was updated twice in step {s}: "
                                  "call step() after every backward")
        n = c.numel
        shape = (self._state_numel(c),)
        key = self._chunk_key(c, s - 1)
        lease: Lease | None = None
        hb: HostBuffer | None = None  # a buffer this update owns until its put takes it
        mb: HostBuffer | None = None  # a split chunk's master, staged to be written
        unit_views = None
        fresh = s == 1
        try:
            if c.resident is not None:
                buf = c.resident.tensor(torch.float32)
                if not fresh and _decode_step(buf) != s - 1:  # first use after open, resume, load
                    self._load_resident(c, key, buf)
            elif lease_f is None:
                hb = self._store.alloc_host(4 * shape[0], wait=_WAIT)
                buf = hb.tensor(torch.float32)
            else:
                lease = lease_f.result(timeout=_WAIT)
                lease_f = None  # the lease is ours now: released or detached below
                buf = lease.tensor
            if fresh:
                buf.zero_()
            else:
                if buf.dtype != torch.float32 or buf.shape != shape:
                    raise OptimStateError(f"object {key!r} holds {buf.dtype}{tuple(buf.shape)}, expected "
                                          f"float32({shape[0]},): the store holds another layout")
                held = _decode_step(buf)
                if held != s - 1:
                    raise OptimStateError(f"object {key!r} holds state of step {held}, expected {s - 1}: "
                                          "the stored state mixes steps")
            if lease is not None:  # own the buffer: it is changed in place and written as step s
                hb, lease = lease.detach(), None
                buf = hb.tensor(torch.float32)
            if c.split:  # the parameters are the master: updated in place
                master, m, v = None, buf[:n], buf[n:2 * n]
            else:
                master, m, v = buf[:n], buf[n:2 * n], buf[2 * n:3 * n]
            if c.unit is not None:
                unit_views = self._rt.open_unit_params(c.unit)
            if fresh and master is not None:
                self._init_master(c, master, unit_views)
            per_group: dict[int, tuple[list, list, list, list, list]] = {}
            done: list[tuple[_Segment, int]] = []
            off = 0
            for seg in c.segments:
                g = self._grad(seg.param)
                if g is not None:
                    if g.is_sparse:
                        raise ValueError(f"OffloadedAdamW: parameter {seg.param} has a sparse gradient")
                    gv = g.reshape(-1)[seg.start:seg.stop]
                    if gv.dtype != torch.float32:
                        gv = gv.float()
                    lists = per_group.setdefault(seg.group, ([], [], [], [], []))
                    lists[0].append(self._params[seg.param].data.view(-1)[seg.start:seg.stop] if master is None
                                    else master[off:off + seg.numel])
                    lists[1].append(gv)
                    lists[2].append(m[off:off + seg.numel])
                    lists[3].append(v[off:off + seg.numel])
                    lists[4].append(torch.tensor(float(self._param_steps[seg.param]), dtype=torch.float32))
                    done.append((seg, off))
                off += seg.numel
            if c.resident is not None:  # changed in place from here: invalid until fully updated
                _encode_step(buf, -1)
            for gi, (ps, gs, ms, vs, steps) in per_group.items():
                grp = self.param_groups[gi]
                beta1, beta2 = grp["betas"]
                _functional_adamw(ps, gs, ms, vs, [], steps, foreach=grp["foreach"], fused=grp["fused"],
                                  amsgrad=False, beta1=beta1, beta2=beta2, lr=grp["lr"],
                                  weight_decay=grp["weight_decay"], eps=grp["eps"], maximize=grp["maximize"])
            for seg, o in done:
                self._stepped_params.add(seg.param)
                p = self._params[seg.param]
                if master is None:
                    continue  # updated in place
                new = master[o:o + seg.numel]
                if unit_views is not None:
                    for view in unit_views.views[id(p)]:
                        view.copy_(new.view(view.shape))
                else:
                    p.data.view(-1)[seg.start:seg.stop].copy_(new)
                if c.unit is not None:
                    p.grad = None  # handed over in backward: released now
            if c.split:  # stage the master (all of the chunk's parameters) to be written
                if c.resident_master is not None:
                    wt = c.resident_master.tensor(torch.float32)
                else:
                    mb = self._store.alloc_host(4 * (n + _TAG), wait=_WAIT)
                    wt = mb.tensor(torch.float32)
                off = 0
                for seg in c.segments:
                    wt[off:off + seg.numel].copy_(self._params[seg.param].data.view(-1)[seg.start:seg.stop])
                    off += seg.numel
                _encode_step(wt, s)
            _encode_step(buf, s)
            if c.resident is not None:
                src, give, prio = c.resident, False, Priority.WRITEBACK
            else:
                src, give, prio, hb = hb, True, Priority.DEMAND, None  # the put owns it now, also if it fails
            writes = [functools.partial(self._put_chunk, self._chunk_key(c, s), src, shape, give, prio)]
            if c.split:
                msrc, mgive = (c.resident_master, False) if c.resident_master is not None else (mb, True)
                writes.append(functools.partial(self._put_chunk, self._master_key(c, s), msrc, (n + _TAG,),
                                                mgive, prio, cache=False))
            if deferred is not None and c.resident is not None:
                deferred.extend(writes)  # resident: no buffer is given away
            else:
                writes[0]()  # owns (and on failure releases) the state buffer from here
                if len(writes) > 1:
                    mb = None  # the master put owns it from here, also if it fails
                    writes[1]()
            if unit_views is not None:
                self._rt.write_unit_params(unit_views)
                unit_views = None
            self._updated.add(c.index)
        finally:
            if unit_views is not None:
                unit_views.abandon()
            if hb is not None:
                hb.release()
            if mb is not None:
                mb.release()
            if lease is not None:
                lease.release()
            elif lease_f is not None:
                _drop(lease_f)

    def _put_chunk(self, key: str, src: HostBuffer, shape: tuple, give: bool, priority: Priority,
                   cache: bool = True) -> None:
        # no fdatasync and no manifest commit per chunk: _commit does one of each for the step
        self._writes.append(self._store.put_buffer(key, src, torch.float32, shape, kind="optim", give=give,
                                                   sync=False, commit=False, priority=priority, cache=cache))

    def _load_resident(self, c: _Chunk, key: str, buf: torch.Tensor) -> None:
        """Fill a resident chunk's buffer from the store (the step it holds is checked by the caller)."""
        if key not in self._store:
            raise OptimStateError(f"object {key!r} is missing from the store at {self._store.root}")
        with self._store.acquire(key, wait=_WAIT).result(timeout=_WAIT) as lease:
            t = lease.tensor
            if t.dtype != torch.float32 or t.shape != buf.shape:
                raise OptimStateError(f"object {key!r} holds {t.dtype}{tuple(t.shape)}, expected "
                                      f"float32({buf.shape[0]},): the store holds another layout")
            buf.copy_(t)
        self._store.evict(key)  # the resident buffer is the copy used from now on

    def _init_master(self, c: _Chunk, master: torch.Tensor, unit_views) -> None:
        off = 0
        for seg in c.segments:
            p = self._params[seg.param]
            if unit_views is not None:
                src = unit_views.views[id(p)][0].reshape(-1)
            else:
                src = p.detach().reshape(-1)[seg.start:seg.stop]
            master[off:off + seg.numel].copy_(src)
            off += seg.numel

    def _commit(self, s: int) -> None:
        """Every chunk of step ``s`` durable, then the marker naming ``s``."""
        self._wait_writes()
        steps = list(self._param_steps)  # counted only once the marker is durable: a retried step
        for i in self._stepped_params:  # after a failed marker put must not count twice
            steps[i] += 1
        marker = torch.tensor([s, len(self._chunks), sum(c.numel for c in self._chunks)] + steps,
                              dtype=torch.int64)
        self._store.put(self._marker_key, marker, kind="optim").result(timeout=_WAIT)
        self._param_steps = steps
        self._step = s
        self._updated.clear()
        self._stepped_params.clear()
        for c in self._chunks:
            c.arrived.clear()

    def _wait_writes(self) -> None:
        writes, self._writes = self._writes, []
        try:
            gather(writes).result(timeout=_WAIT)  # waits for every write; raises the first error
        finally:
            if self._rt is not None:
                self._rt.wait_writes()

    # -- offloaded weights: gradients handed over in backward --------------------------
    def _install_grad_hooks(self) -> None:
        by_param: dict[int, _Chunk] = {}
        for c in self._chunks:
            if c.unit is not None:
                for seg in c.segments:
                    by_param[seg.param] = c
        for i, p in enumerate(self._params):
            c = by_param.get(i)
            if c is None:
                continue
            if not p.requires_grad:
                c.expected -= 1
                continue
            self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(c, i)))
        self._rt.backward_listeners.append(self._on_backward_load)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._rt is not None and self._on_backward_load in self._rt.backward_listeners:
            self._rt.backward_listeners.remove(self._on_backward_load)

    def _grad_hook(self, c: _Chunk, i: int):
        def hook(_p) -> None:
            c.arrived.add(i)
            if len(c.arrived) == c.expected and self._open:
                s = self._next_step()
                with self._breaks_on_error():
                    self._update(c, s, self._start_read(c, s))
        return hook

    def _on_backward_load(self, unit) -> None:
        """A unit's backward begins: start reading its state chunk, so the update need not wait."""
        if not self._open:
            return
        s = self._next_step()  # the previous step's chunks are committed before they are read
        if s == 1:
            return
        for c in self._chunks:
            if (c.unit is unit and c.resident is None and c.index not in self._state_reads
                    and c.index not in self._updated):
                try:
                    self._state_reads[c.index] = self._store.acquire(
                        self._chunk_key(c, s - 1), priority=Priority.PREFETCH, wait=0.0)
                except OutOfBudget:  # no room to read ahead now: the update reads on demand
                    pass

    def _drop_state_reads(self) -> None:
        reads, self._state_reads = self._state_reads, {}
        for f in reads.values():
            _drop(f)

    # -- recovery, state_dict -----------------------------------------------------------
    def _read_marker(self) -> torch.Tensor:
        return self._store.get(self._marker_key).result(timeout=_WAIT)

    def _recover(self) -> None:
        """Continue from the last complete step: check its chunks, put its masters in the params."""
        marker = self._read_marker()
        s, nchunks, numel = (int(x) for x in marker[:3])
        total = sum(c.numel for c in self._chunks)
        if nchunks != len(self._chunks) or numel != total or marker.numel() != 3 + len(self._params):
            raise OptimStateError(
                f"object {self._marker_key!r} describes {nchunks} chunks of {numel} elements for "
                f"{marker.numel() - 3} parameters; this optimizer has {len(self._chunks)} chunks of {total} "
                f"elements for {len(self._params)} parameters (another model, or other chunk_bytes)")
        self._param_steps = [int(x) for x in marker[3:]]
        self._step = s
        with torch.no_grad():
            for c in self._chunks:
                self._load_chunk(c, s, into_params=True)
        self._wait_writes()

    def _load_chunk(self, c: _Chunk, s: int, into_params: bool = False,
                    out: dict | None = None) -> None:
        n = c.numel
        with self._acquire_checked(self._chunk_key(c, s), s, self._state_numel(c)) as lease, \
                (self._acquire_checked(self._master_key(c, s), s, n + _TAG) if c.split
                 else contextlib.nullcontext(lease)) as mlease:
            buf = lease.tensor
            if c.split:  # [exp_avg | exp_avg_sq]: the master is its own object
                buf = torch.cat([mlease.tensor[:n], buf])
            views = self._rt.open_unit_params(c.unit) if (into_params and c.unit is not None) else None
            try:
                off = 0
                for seg in c.segments:
                    p = self._params[seg.param]
                    master = buf[off:off + seg.numel]
                    if out is not None:
                        for name, part in (("master", master), ("exp_avg", buf[n + off:n + off + seg.numel]),
                                           ("exp_avg_sq", buf[2 * n + off:2 * n + off + seg.numel])):
                            full = out.setdefault(seg.param, {}).setdefault(
                                name, torch.empty(p.numel(), dtype=torch.float32))
                            full[seg.start:seg.stop].copy_(part)
                    if into_params:
                        if views is not None:
                            for view in views.views[id(p)]:
                                view.copy_(master.view(view.shape))
                        else:
                            p.data.view(-1)[seg.start:seg.stop].copy_(master)
                    off += seg.numel
                if views is not None:
                    self._rt.write_unit_params(views)
                    views = None
            finally:
                if views is not None:
                    views.abandon()

    def _acquire_checked(self, key: str, s: int, numel: int) -> Lease:
        if key not in self._store:
            raise OptimStateError(f"object {key!r} of step {s} is missing from the store at {self._store.root}")
        lease = self._store.acquire(key, wait=_WAIT).result(timeout=_WAIT)
        buf = lease.tensor
        if buf.dtype != torch.float32 or buf.shape != (numel,) or _decode_step(buf) != s:
            held = _decode_step(buf) if buf.dtype == torch.float32 and buf.numel() >= _TAG else None
            lease.release()
            raise OptimStateError(f"object {key!r} holds {buf.dtype}{tuple(buf.shape)} of step {held}, "
                                  f"expected float32({numel},) of step {s}")
        return lease

    def state_dict(self) -> dict:
        """torch's AdamW layout (``state`` by parameter index, ``param_groups``), read from the
        store (it materializes the whole state in memory); ``master`` is added for parameters
        that are not fp32."""
        self._check_open()
        self._settle()
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        state: dict = {}
        if self._step > 0:
            full: dict = {}
            for c in self._chunks:
                self._load_chunk(c, self._step, out=full)
            for i, parts in full.items():
                if self._param_steps[i] == 0:
                    continue
                p = self._params[i]
                st = {"step": torch.tensor(float(self._param_steps[i]), dtype=torch.float32),
                      "exp_avg": parts["exp_avg"].view(p.shape), "exp_avg_sq": parts["exp_avg_sq"].view(p.shape)}
                if p.dtype != torch.float32:
                    st["master"] = parts["master"].view(p.shape)
                state[i] = st
        return {"state": state, "param_groups": groups, "tiered_step": self._step}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of ``torch.optim.AdamW``: it is written to the store
        as a complete step (masters from ``master`` entries, else from the parameters)."""
        self._check_open()
        self._settle()
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: expected {len(self.param_groups)} param_groups, got "
                             f"{len(groups) if isinstance(groups, list) else type(groups).__name__}")
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise ValueError(f"load_state_dict: param_groups[{gi}] has {len(theirs.get('params', ()))} "
                                 f"parameters, this optimizer {len(mine['params'])}")
        ids = [i for g in groups for i in g["params"]]
        state = state_dict.get("state", {})
        for k in state:
            if k not in ids:
                raise ValueError(f"load_state_dict: state for parameter {k!r}, which no param_group lists")
        for mine, theirs in zip(self.param_groups, groups):
            for k, v in theirs.items():
                if k != "params":
                    mine[k] = v
        steps = [0] * len(self._params)
        per_param: list[dict | None] = [None] * len(self._params)
        for i, sid in enumerate(ids):
            st = state.get(sid)
            if st is None:
                continue
            p = self._params[i]
            for name in ("exp_avg", "exp_avg_sq"):
                t = st.get(name)
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    raise ValueError(f"load_state_dict: state[{sid}][{name!r}] must be a tensor of shape "
                                     f"{tuple(p.shape)}, got {getattr(t, 'shape', type(t).__name__)}")
            steps[i] = int(float(st["step"]))
            per_param[i] = st
        self._drop_state_reads()
        self._wait_writes()
        s = max(int(state_dict.get("tiered_step", 0)), max(steps, default=0), self._step + 1)
        if s % 2 == self._step % 2:  # never overwrite the keys the committed marker names
            s += 1
        for c in self._chunks:
            n = c.numel
            buf = torch.zeros(3 * n + _TAG, dtype=torch.float32)
            views = self._rt.open_unit_params(c.unit) if c.unit is not None else None
            try:
                self._init_master(c, buf[:n], views)
                off = 0
                for seg in c.segments:
                    st = per_param[seg.param]
                    if st is not None:
                        sl = slice(seg.start, seg.stop)
                        if "master" in st:
                            buf[off:off + seg.numel].copy_(st["master"].reshape(-1)[sl])
                        buf[n + off:n + off + seg.numel].copy_(st["exp_avg"].reshape(-1)[sl])
                        buf[2 * n + off:2 * n + off + seg.numel].copy_(st["exp_avg_sq"].reshape(-1)[sl])
                    off += seg.numel
            finally:
                if views is not None:
                    views.abandon()
            _encode_step(buf, s)
            if c.split:  # [master | tag] and [exp_avg | exp_avg_sq | tag]
                mt = torch.cat([buf[:n], buf[3 * n:]])
                self._writes.append(self._store.put(self._master_key(c, s), mt, kind="optim"))
                buf = buf[n:]
            self._writes.append(self._store.put(self._chunk_key(c, s), buf, kind="optim"))
        self._param_steps = steps
        self._step = s - 1
        self._updated.clear()
        self._stepped_params.clear()
        with self._breaks_on_error():
            self._commit(s)
        # the loaded masters are the parameters now (they differ from them for low precision)
        for c in self._chunks:
            self._load_chunk(c, s, into_params=True)
            if c.resident is not None:  # holds the state before the load: read again on first use
                _encode_step(c.resident.tensor(torch.float32), -1)
        self._wait_writes()

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_open", False):
            raise OptimStateError("OffloadedAdamW: add_param_group after open() is not supported "
                                  "(the chunk layout in the store is fixed)")
        super().add_param_group(param_group)


def _drop(f) -> None:
    """Give back an acquire that will not be used."""
    if f is None:
        return
    if not f.cancel():
        try:
            lease = f.result(timeout=_WAIT)
        except Exception as e:  # noqa: BLE001 - the read failed: no lease to give back, nothing to use
            log.warning("abandoned state read failed: %s", e)
            return
        lease.release()

