"""Committing a step and recovering the last committed one.

Step *s* writes its chunks under keys of parity ``s % 2`` without per-object fdatasync or
manifest commit; :meth:`_commit` then makes them durable at once and puts the marker naming
*s* and the step before it (whose chunks the other parity holds). Recovery reads the marker,
checks every chunk of that step (the step tag each carries) and puts the stored masters into
the parameters. Under a process group (FSDP2) a step is complete once every rank's marker is,
and the ranks resume from the same step: see :mod:`.distributed_commit`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from tiered.io_engine import gather

from ..store import Lease
from .layout import TAG, WAIT, Chunk, OptimStateError, decode_step


@dataclass
class Marker:
    """What the marker object holds: int64 ``[step, chunks, elements, counts..., prev,
    prev_counts...]`` (``counts``: each parameter's step count; ``prev`` -1: no step before it
    to return to). Markers written before ``prev`` existed end after ``counts``."""

    step: int
    counts: list[int]
    prev: int = -1
    prev_counts: list[int] | None = None

    def counts_at(self, s: int) -> list[int]:
        return self.counts if s == self.step else self.prev_counts


class _Durability:
    """Part of :class:`~tiered.optim.OffloadedAdamW` (see the module docstring)."""

    def _commit(self, s: int, prev: tuple[int, list[int]] | None = None) -> None:
        """Every chunk of step ``s`` durable, then the marker naming ``s`` and ``prev`` (the step
        before it and its counts; default: the last committed step). This rank only: under a
        process group the ranks agree that each has committed ``s`` before any writes the step
        after it (``_agree``, in ``step()`` and ``load_state_dict``)."""
        self._wait_writes()
        steps = list(self._param_steps)  # counted only once the marker is durable: a retried step
        for i in self._stepped_params:  # after a failed marker put must not count twice
            steps[i] += 1
        before, before_counts = prev if prev is not None else (self._step, self._param_steps)
        self._put_marker(Marker(s, steps, before, list(before_counts)))
        self._param_steps = steps
        self._step = s
        self._updated.clear()
        self._stepped_params.clear()
        for c in self._chunks:
            c.arrived.clear()

    def _put_marker(self, m: Marker) -> None:
        prev_counts = m.prev_counts if m.prev >= 0 else [0] * len(m.counts)
        marker = torch.tensor([m.step, len(self._chunks), sum(c.numel for c in self._chunks), *m.counts,
                               m.prev, *prev_counts], dtype=torch.int64)
        self._store.put(self._marker_key, marker, kind="optim", owner=self.owner).result(timeout=WAIT)

    def _wait_writes(self) -> None:
        writes, self._writes = self._writes, []
        try:
            gather(writes).result(timeout=WAIT)  # waits for every write; raises the first error
        finally:
            if self._units is not None:
                self._units.wait_writes()

    def _read_marker(self) -> torch.Tensor:
        return self._store.get(self._marker_key, owner=self.owner).result(timeout=WAIT)

    def _local_marker(self) -> Marker | None:
        """This store's marker, checked against this optimizer's layout (None: no state)."""
        if self._marker_key not in self._store:
            return None
        t = self._read_marker()
        if not self.resume:
            raise OptimStateError(
                f"store at {self._store.root} already holds optimizer state {self.name!r} at step {int(t[0])} "
                f"(object {self._marker_key!r}); pass resume=True to continue it, or another name=")
        s, nchunks, numel = (int(x) for x in t[:3])
        n, total = len(self._params), sum(c.numel for c in self._chunks)
        if nchunks != len(self._chunks) or numel != total or t.numel() not in (3 + n, 4 + 2 * n):
            raise OptimStateError(
                f"object {self._marker_key!r} describes {nchunks} chunks of {numel} elements in {t.numel()} "
                f"entries; this optimizer has {len(self._chunks)} chunks of {total} elements for {n} parameters "
                "(another model, or other chunk_bytes)")
        counts = [int(x) for x in t[3:3 + n]]
        prev = int(t[3 + n]) if t.numel() > 3 + n else -1
        return Marker(s, counts, prev, [int(x) for x in t[4 + n:]] if prev >= 0 else None)

    def _find_state(self, error: BaseException | None = None) -> None:
        """Continue from the last complete step found in the store (under a process group: the
        last step every rank has, see :mod:`.distributed_commit`); without ``resume=True``,
        state found is an error. A rank's error (``error``: open() failed before) is raised on
        every rank, none waits for it."""
        mine = None
        if error is None:
            try:
                mine = self._local_marker()
            except Exception as e:  # noqa: BLE001 - raised by _agree_step once the other ranks know
                error = e
        hi, prev = (mine.step, mine.prev) if mine is not None else (0, -1)
        low = self._agree_step(hi, prev, error)
        able = mine is None or low in (mine.step, mine.prev)
        if able and low == 0 and self.resume and self._changed_in_place():
            error, able = self._changed_error(), False
        elif able and mine is not None:
            try:
                self._recover(low, mine.counts_at(low))
                if low != mine.step:  # rolled back: the marker names that step alone (the next
                    self._put_marker(Marker(low, mine.counts_at(low)))  # step writes over this one)
            except Exception as e:  # noqa: BLE001 - raised by _check_agreed once the other ranks know
                error, able = e, False
        self._check_agreed(low, able, hi, prev, error)

    # Step 0 has no stored weights: it is the parameters as given. Step 1 changes them in place
    # before it is committed, so until it is (on every rank) the parameters carry this attribute,
    # and resuming over them at step 0 in the same process is refused. Keeping the step-0
    # weights instead would take a second copy of every parameter (memory, or a write of all
    # masters and a read back from the store whose failure is being recovered from), while a
    # crash starts a new process whose parameters are the initial weights anyway.
    _CHANGED = "_tiered_changed_by_uncommitted_step"

    def _mark_changing(self) -> None:
        for p in self._param_objs:
            setattr(p, self._CHANGED, True)
        self._marked = True

    def _unmark_changing(self, loaded: bool = False) -> None:
        """Step 1 (or a later one) is committed on every rank: resume restores its masters;
        ``loaded``: stored masters were put into the parameters (whoever marked them)."""
        if loaded or self._marked:
            for p in self._param_objs:
                p.__dict__.pop(self._CHANGED, None)
            self._marked = False

    def _changed_in_place(self) -> bool:
        return any(getattr(p, self._CHANGED, False) for p in self._param_objs)

    def _changed_error(self) -> OptimStateError:
        every = " on every rank of the process group" if self._group is not None else ""
        return OptimStateError(
            f"OffloadedAdamW {self.name!r}: {self._rank_label}resuming at step 0 (no step committed{every}), whose "
            "weights are the parameters as given, but step 1 of an optimizer over these parameters failed in this "
            "process after it changed them in place; build the model again (new parameters with the initial "
            "weights) and reopen")

    def _recover(self, s: int, counts: list[int]) -> None:
        """Continue from step ``s``: check its chunks, put its masters in the params (step 0:
        no state, the parameters as given)."""
        self._param_steps = list(counts)
        self._step = s
        if s == 0:
            return
        with torch.no_grad():
            for c in self._chunks:
                self._load_chunk(c, s, into_params=True)
        self._wait_writes()
        self._unmark_changing(loaded=True)

    def _load_chunk(self, c: Chunk, s: int, into_params: bool = False, out: dict | None = None) -> None:
        """Read chunk ``c`` of step ``s``: its masters into the parameters (``into_params``)
        and/or every part into ``out`` (parameter index -> name -> full fp32 tensor)."""
        n = c.numel
        with self._acquire_checked(self._chunk_key(c, s), s, c.state_numel) as lease, \
                (self._acquire_checked(self._master_key(c, s), s, n + TAG) if c.split
                 else contextlib.nullcontext(lease)) as mlease:
            buf = lease.tensor
            if c.split:  # [exp_avg | exp_avg_sq]: the master is its own object
                buf = torch.cat([mlease.tensor[:n], buf])
            edit = self._units.open_unit_params(c.unit) if (into_params and c.unit is not None) else None
            try:
                off = 0
                for seg in c.segments:
                    master = buf[off:off + seg.numel]
                    if out is not None:
                        self._collect(out, seg, buf, n, off)
                    if into_params:
                        p = self._params[seg.param]
                        if edit is not None:
                            for view in edit.views[id(p)]:
                                view.copy_(master.view(view.shape))
                        else:
                            p.data.view(-1)[seg.start:seg.stop].copy_(master)
                    off += seg.numel
                if edit is not None:
                    self._units.write_unit_params(edit)
                    edit = None
            finally:
                if edit is not None:
                    edit.abandon()

    def _collect(self, out: dict, seg, buf: torch.Tensor, n: int, off: int) -> None:
        p = self._params[seg.param]
        for i, name in enumerate(("master", "exp_avg", "exp_avg_sq")):
            part = buf[i * n + off:i * n + off + seg.numel]
            full = out.setdefault(seg.param, {}).setdefault(name, torch.empty(p.numel(), dtype=torch.float32))
            full[seg.start:seg.stop].copy_(part)

    def _acquire_checked(self, key: str, s: int, numel: int) -> Lease:
        if key not in self._store:
            raise OptimStateError(f"object {key!r} of step {s} is missing from the store at {self._store.root}")
        lease = self._store.acquire(key, wait=WAIT, owner=self.owner).result(timeout=WAIT)
        buf = lease.tensor
        if buf.dtype != torch.float32 or buf.shape != (numel,) or decode_step(buf) != s:
            held = decode_step(buf) if buf.dtype == torch.float32 and buf.numel() >= TAG else None
            lease.release()
            raise OptimStateError(f"object {key!r} holds {buf.dtype}{tuple(buf.shape)} of step {held}, "
                                  f"expected float32({numel},) of step {s}")
        return lease
