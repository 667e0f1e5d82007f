"""Committing a step and recovering the last committed one.

Step *s* writes its chunks under keys of parity ``s % 2`` without per-object fdatasync or
manifest commit; :meth:`_commit` then makes them durable at once and puts the marker naming
*s*. Recovery reads the marker, checks every chunk of that step (the step tag each carries)
and puts the stored masters into the parameters.
"""

from __future__ import annotations

import contextlib

import torch

from io_engine import gather

from ..store import Lease
from .layout import TAG, WAIT, Chunk, OptimStateError, decode_step


class _Durability:
    """Part of :class:`~tiered.optim.OffloadedAdamW` (see the module docstring)."""

    def _commit(self, s: int) -> None:
        """Every chunk of step ``s`` durable, then the marker naming ``s``."""
        self._wait_writes()
        steps = list(self._param_steps)  # counted only once the marker is durable: a retried step
        for i in self._stepped_params:  # after a failed marker put must not count twice
            steps[i] += 1
        marker = torch.tensor([s, len(self._chunks), sum(c.numel for c in self._chunks)] + steps,
                              dtype=torch.int64)
        self._store.put(self._marker_key, marker, kind="optim", owner=self.owner).result(timeout=WAIT)
        self._param_steps = steps
        self._step = s
        self._updated.clear()
        self._stepped_params.clear()
        for c in self._chunks:
            c.arrived.clear()

    def _wait_writes(self) -> None:
        writes, self._writes = self._writes, []
        try:
            gather(writes).result(timeout=WAIT)  # waits for every write; raises the first error
        finally:
            if self._units is not None:
                self._units.wait_writes()

    def _read_marker(self) -> torch.Tensor:
        return self._store.get(self._marker_key, owner=self.owner).result(timeout=WAIT)

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
