"""The step's pipeline: while chunk *i* is updated on the CPU, chunks *i+1..i+k* are being read
by the store's engine and chunk *i-1* is being written. The update is torch's own functional
AdamW on views of the chunk's buffer, which is then written as is (no copy)."""

from __future__ import annotations

import functools
from collections import deque

import torch
from torch.optim.adamw import adamw as _functional_adamw

from tiered.allocators import HostBuffer
from tiered.io_engine import Priority

from .layout import TAG, WAIT, Chunk, OptimStateError, Segment, decode_step, drop, encode_step


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def same_bits(master: torch.Tensor, weights: torch.Tensor) -> bool:
    """``weights`` are ``master`` written into their dtype (what an update leaves), bit for bit."""
    rounded = master if weights.dtype == master.dtype else master.to(weights.dtype)
    bits = _BITS[weights.element_size()]
    return torch.equal(rounded.view(bits), weights.view(bits))


class _Pipeline:
    """Part of :class:`~tiered.optim.OffloadedAdamW` (see the module docstring)."""

    def _run(self, chunks: list[Chunk], s: int) -> None:
        """The pipeline: reads of the next ``lookahead`` chunks are in flight while one is updated."""
        reads: deque = deque()
        nxt = 0

        def issue() -> None:
            nonlocal nxt
            reads.append(self._start_read(chunks[nxt], s))
            self._prefetch_grads(chunks[nxt])
            nxt += 1

        resident = [c for c in chunks if self._take_resident(c)]
        chunks = [c for c in chunks if c.resident is None]
        if s % 2 == 0:
            # every other step backwards: the chunks written last in the previous step are still
            # cached in the host tier (the buffers their writes went out of) and come first now,
            # so they are not read again; forwards every step, they would be evicted by then
            chunks.reverse()
        self._declare_plan(chunks, s)
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
            for c, writes in deferred:
                self._resident_written(c, [w() for w in writes])
        except BaseException:
            for f in reads:
                drop(f)
            self._forget_grad_reads()
            raise

    def _declare_plan(self, chunks: list[Chunk], s: int) -> None:
        """Tell the store what this step reads and what the next one will (the same chunks, in
        reverse), so that when the host tier must evict, it keeps the copies read soonest."""
        now = [self._chunk_key(c, s - 1) for c in chunks] if s > 1 else []
        self._store.plan(now + [self._chunk_key(c, s) for c in reversed(chunks)], owner=self.owner)

    def _start_read(self, c: Chunk, s: int):
        if s == 1 or c.resident is not None:
            return None
        f = self._state_reads.pop(c.index, None)
        if f is not None:
            return f
        return self._store.acquire(self._chunk_key(c, s - 1), priority=Priority.DEMAND, wait=WAIT,
                                   owner=self.owner)

    def _update(self, c: Chunk, s: int, lease_f, deferred: list | None = None) -> None:
        """Update one chunk from its step ``s-1`` state; start writing it as step ``s``.

        The state is updated in place in the buffer it was read into (or the chunk's resident
        buffer), which is then written as is: no copy. ``lease_f`` is None for a resident chunk
        (claimed by the caller with :meth:`_take_resident`) and in step 1. A streamed chunk's
        write goes at read priority (the next reads need its room); a resident chunk's write at
        write-back priority, or, with ``deferred``, is appended there (with the chunk) as
        callables for the caller to issue later (after the streamed ones)."""
        if c.index in self._updated:
            raise OptimStateError(f"chunk {c.index} of {self.name!r} was updated twice in step {s}: "
                                  "call step() after every backward")
        resident = c.busy  # the caller claimed its resident buffers (_take_resident)
        held: dict = {"lease_f": lease_f}  # what this update owns until a put takes it
        edit = None
        try:
            buf = self._state_buffer(c, s, resident, held)
            n = c.numel
            if c.split:  # the parameters are the master: updated in place
                master, m, v = None, buf[:n], buf[n:2 * n]
            else:
                master, m, v = buf[:n], buf[n:2 * n], buf[2 * n:3 * n]
            if c.unit is not None:
                edit = self._units.open_unit_params(c.unit)
            if s == 1 and master is not None:
                self._init_master(c, master, edit)
            elif master is not None:
                self._refresh_masters(c, master, edit)
            if resident:  # changed in place from here: invalid until fully updated
                encode_step(buf, -1)
            self._clip_chunk(c)
            done = self._apply_adamw(c, master, m, v)
            self._copy_masters(c, master, done, edit)
            self._unpark(c)
            if c.split:
                held["master"] = self._stage_master(c, s)
            encode_step(buf, s)
            self._issue_writes(c, s, resident, held, deferred)
            if edit is not None:
                self._units.write_unit_params(edit)
                edit = None
            self._updated.add(c.index)
        finally:
            if edit is not None:
                edit.abandon()
            for b in (held.get("buffer"), held.get("master")):
                if b is not None:
                    b.release()
            if held.get("lease") is not None:
                held["lease"].release()
            elif held.get("lease_f") is not None:
                drop(held["lease_f"])
            if resident and c.busy and (deferred is None or not any(x is c for x, _w in deferred)):
                self._resident_written(c, [])  # failed before its writes were issued

    def _state_buffer(self, c: Chunk, s: int, resident: bool, held: dict) -> torch.Tensor:
        """The chunk's step ``s-1`` state in a buffer this update may change and write (its
        resident buffer, the buffer its read filled, or a fresh zeroed one in step 1)."""
        shape = (c.state_numel,)
        key = self._chunk_key(c, s - 1)
        if resident:
            buf = c.resident.tensor(torch.float32)
            if s > 1 and decode_step(buf) != s - 1:  # first use after open, resume, load
                self._load_resident(c, key, buf)
        elif held["lease_f"] is None:
            held["buffer"] = self._alloc(4 * shape[0], wait=WAIT)
            buf = held["buffer"].tensor(torch.float32)
        else:
            held["lease"], held["lease_f"] = held["lease_f"].result(timeout=WAIT), None
            buf = held["lease"].tensor
        if s == 1:
            buf.zero_()
            return buf
        if buf.dtype != torch.float32 or buf.shape != shape:
            raise OptimStateError(f"object {key!r} holds {buf.dtype}{tuple(buf.shape)}, expected "
                                  f"float32({shape[0]},): the store holds another layout")
        step = decode_step(buf)
        if step != s - 1:
            raise OptimStateError(f"object {key!r} holds state of step {step}, expected {s - 1}: "
                                  "the stored state mixes steps")
        if held.get("lease") is not None:  # own the buffer: it is changed in place and written as step s
            held["buffer"], held["lease"] = held["lease"].detach(), None
            buf = held["buffer"].tensor(torch.float32)
        return buf

    def _apply_adamw(self, c: Chunk, master, m: torch.Tensor, v: torch.Tensor) -> list[tuple[Segment, int]]:
        """torch's functional AdamW per param group over the chunk's segments that have a
        gradient; returns those segments with their offsets in the chunk."""
        per_group: dict[int, tuple[list, list, list, list, list]] = {}
        done: list[tuple[Segment, int]] = []
        off = 0
        for seg in c.segments:
            g = self._grad(seg.param)
            if g is not None:
                if g.is_sparse:
                    raise ValueError(f"OffloadedAdamW: parameter {seg.param} has a sparse gradient")
                gv = g.reshape(-1)[seg.start:seg.stop]
                if gv.device.type != "cpu":  # the update runs on the CPU: this segment's gradient comes over
                    gv = gv.to("cpu")
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
        for gi, (ps, gs, ms, vs, steps) in per_group.items():
            grp = self.param_groups[gi]
            beta1, beta2 = grp["betas"]
            _functional_adamw(ps, gs, ms, vs, [], steps, foreach=grp["foreach"], fused=grp["fused"],
                              amsgrad=False, beta1=beta1, beta2=beta2, lr=grp["lr"],
                              weight_decay=grp["weight_decay"], eps=grp["eps"], maximize=grp["maximize"])
        return done

    def _copy_masters(self, c: Chunk, master, done: list[tuple[Segment, int]], edit) -> None:
        """The updated masters into the parameters (or the unit's copies); gradients handed
        over in backward are released."""
        for seg, o in done:
            self._stepped_params.add(seg.param)
            p = self._params[seg.param]
            if master is None:
                continue  # updated in place
            new = master[o:o + seg.numel]
            if edit is not None:
                for view in edit.views[id(p)]:
                    view.copy_(new.view(view.shape))
            else:
                p.data.view(-1)[seg.start:seg.stop].copy_(new)
            if c.unit is not None:
                p.grad = None  # handed over in backward: released now

    def _stage_master(self, c: Chunk, s: int) -> HostBuffer | None:
        """A split chunk's master (all of its parameters) staged to be written: into its
        resident master buffer (returns None), else a fresh buffer (returned, owned by the caller)."""
        mb = None
        if c.resident_master is not None:
            wt = c.resident_master.tensor(torch.float32)
        else:
            mb = self._alloc(4 * (c.numel + TAG), wait=WAIT)
            wt = mb.tensor(torch.float32)
        off = 0
        for seg in c.segments:
            wt[off:off + seg.numel].copy_(self._params[seg.param].data.view(-1)[seg.start:seg.stop])
            off += seg.numel
        encode_step(wt, s)
        return mb

    def _issue_writes(self, c: Chunk, s: int, resident: bool, held: dict, deferred: list | None) -> None:
        """Write the chunk (and a split chunk's master) as step ``s``: from its resident buffers
        (kept), or giving the update's buffers to the puts."""
        shape = (c.state_numel,)
        if resident:
            src, give, prio = c.resident, False, Priority.WRITEBACK
        else:
            src, give, prio, held["buffer"] = held["buffer"], True, Priority.DEMAND, None  # the put owns it now
        writes = [functools.partial(self._put_chunk, self._chunk_key(c, s), src, shape, give, prio)]
        if c.split:
            msrc, mgive = (c.resident_master, False) if resident else (held["master"], True)
            writes.append(functools.partial(self._put_chunk, self._master_key(c, s), msrc, (c.numel + TAG,),
                                            mgive, prio, cache=False))
        if resident:
            if deferred is not None:
                deferred.append((c, writes))  # no buffer is given away
            else:
                self._resident_written(c, [w() for w in writes])
            return
        writes[0]()  # owns (and on failure releases) the state buffer from here
        if len(writes) > 1:
            held["master"] = None  # the master put owns it from here, also if it fails
            writes[1]()

    def _put_chunk(self, key: str, src: HostBuffer, shape: tuple, give: bool, priority: Priority,
                   cache: bool = True):
        # no fdatasync and no manifest commit per chunk: _commit does one of each for the step
        f = self._store.put_buffer(key, src, torch.float32, shape, kind="optim", give=give, sync=False,
                                   commit=False, priority=priority, cache=cache, owner=self.owner)
        self._writes.append(f)
        return f

    def _load_resident(self, c: Chunk, key: str, buf: torch.Tensor) -> None:
        """Fill a resident chunk's buffer from the store (the step it holds is checked by the caller)."""
        if key not in self._store:
            raise OptimStateError(f"object {key!r} is missing from the store at {self._store.root}")
        with self._store.acquire(key, wait=WAIT, owner=self.owner).result(timeout=WAIT) as lease:
            t = lease.tensor
            if t.dtype != torch.float32 or t.shape != buf.shape:
                raise OptimStateError(f"object {key!r} holds {t.dtype}{tuple(t.shape)}, expected "
                                      f"float32({buf.shape[0]},): the store holds another layout")
            buf.copy_(t)
        self._store.evict(key)  # the resident buffer is the copy used from now on

    def _init_master(self, c: Chunk, master: torch.Tensor, edit) -> None:
        off = 0
        for seg in c.segments:
            master[off:off + seg.numel].copy_(self._weights_of(seg, edit))
            off += seg.numel

    def _weights_of(self, seg: Segment, edit) -> torch.Tensor:
        """The segment's current weights (flat): the unit's copy, else the parameter's slice."""
        p = self._params[seg.param]
        if edit is not None:
            w = edit.views[id(p)][0].reshape(-1)
        else:
            w = p.detach().reshape(-1)[seg.start:seg.stop]
        return w if w.device.type == "cpu" else w.to("cpu")

    def _refresh_masters(self, c: Chunk, master: torch.Tensor, edit) -> None:
        """Weights changed since the last update (``model.load_state_dict``, any in-place
        write) are what this update starts from, as in memory: a segment whose weights are not
        its master (rounded to their dtype, compared bit for bit) gets its master from them."""
        off = 0
        for seg in c.segments:
            m, w = master[off:off + seg.numel], self._weights_of(seg, edit)
            if not same_bits(m, w):
                m.copy_(w)
            off += seg.numel
