"""Training a model wrapped by ``tiered.offload`` (``model=``): each unit's gradients are handed
to the optimizer in backward as soon as they are complete (post-accumulate-grad hooks), and the
unit's state chunk, whose read began when the unit's backward did, is updated right away."""

from __future__ import annotations

from tiered.allocators import OutOfBudget
from tiered.io_engine import Priority

from .layout import Chunk, drop


class _Backward:
    """Part of :class:`~tiered.optim.OffloadedAdamW` (see the module docstring)."""

    def _install_grad_hooks(self) -> None:
        by_param: dict[int, Chunk] = {}
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
        self._hooks.append(self._units.on_backward_load(self._on_backward_load))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _grad_hook(self, c: Chunk, i: int):
        def hook(_p) -> None:
            if self.grads == "park":
                if self._open:
                    self._park(i)
                return
            self._check_second_gradient(c, i)
            c.arrived.add(i)
            if len(c.arrived) == c.expected and self._open:
                s = self._next_step()
                with self._breaks_on_error():
                    lease_f = None if self._take_resident(c) else self._start_read(c, s)
                    self._update(c, s, lease_f)
        return hook

    def _on_backward_load(self, unit) -> None:
        """A unit's backward begins: start reading its state chunk, so the update need not wait
        (``grads="park"``: the gradients parked by earlier backward passes, to accumulate into)."""
        if self._open and self.grads == "park":
            for c in self._chunks:
                if c.unit is unit:
                    self._prefetch_parked(c)
        if not self._open or self.grads != "stream":
            return
        s = self._next_step()  # the previous step's chunks are committed before they are read
        if s == 1:
            return
        for c in self._chunks:
            if (c.unit is unit and c.resident is None and c.index not in self._state_reads
                    and c.index not in self._updated):
                try:
                    self._state_reads[c.index] = self._store.acquire(
                        self._chunk_key(c, s - 1), priority=Priority.PREFETCH, wait=0.0, owner=self.owner)
                except OutOfBudget:  # no room to read ahead now: the update reads on demand
                    pass

    def _drop_state_reads(self) -> None:
        reads, self._state_reads = self._state_reads, {}
        for f in reads.values():
            drop(f)
