"""Units run outside the model's forward: activation checkpointing recomputing them in backward.

Non-reentrant checkpointing recomputes a segment (one or more units) the first time backward
needs its saved tensors. transformers' ``GradientCheckpointingLayer`` calls the layer's
``forward`` directly, so the unit's own hooks do not run; the submodules holding its weights
(*parts*) see the call instead. The weights a recompute saves are the parameters as they are
bound (not packed as handles, the checkpoint's own hooks are innermost), so every unit bound
during one recompute stays bound until backward is done with that segment: until a recompute
triggered from another autograd node starts (the engine runs a later segment's nodes before an
earlier one's), or backward ends (:meth:`finish_backward`). A part called with no forward in
progress and no recompute (a submodule called by hand) binds its unit the same way, so it never
computes on placeholders.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layout import _Unit


def _autograd_node() -> object | None:
    """The autograd node executing now (None outside backward); a recompute runs inside one."""
    return torch._C._current_autograd_node()


class _Recompute:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`."""

    def _recomputing(self) -> bool:
        """A unit runs outside the model's forward with grad on: a recompute in backward."""
        return not self._running and torch.is_grad_enabled()

    def _hold_recomputed(self, u: _Unit) -> None:
        """Keep ``u`` bound for the recompute under way; a new recompute (another autograd
        node) first gives back the units the previous one held."""
        node = _autograd_node()
        if node is not self._recompute_node:
            self._release_recomputed()
            self._recompute_node = node
        if u not in self._recomputed:
            self._recomputed.append(u)
        with self._idle_lock:
            self._graph = True  # held for the backward under way

    def _enter_recompute(self) -> None:
        """Before a recompute loads a unit: a new recompute (another autograd node) first gives
        back the units the previous one held and the units whose backward is over, so the budget
        has their room (with a device cache the plan leaves one window beside the residents)."""
        if _autograd_node() is not self._recompute_node:
            self._release_recomputed()
            self._release_unused()

    def _release_recomputed(self) -> None:
        done, self._recomputed = self._recomputed, [u for u in self._recomputed if u.active]
        self._recompute_node = None
        for u in done:
            if not u.active:
                self._done_with(u)

    def _parts(self) -> dict[int, tuple[torch.nn.Module, list[_Unit]]]:
        """Each submodule holding parameters or buffers of its own, with the units it belongs
        to (several where a module is shared), nested units' parts excluded from the outer unit."""
        units_of = {id(u.module): u for u in self.units}
        parts: dict[int, tuple[torch.nn.Module, list[_Unit]]] = {}
        for u in self.units:
            todo = list(u.module.children())
            while todo:
                m = todo.pop()
                if id(m) in units_of:
                    continue  # a unit of its own
                if next(m.parameters(recurse=False), None) is not None or \
                        next(m.buffers(recurse=False), None) is not None:
                    entry = parts.setdefault(id(m), (m, []))
                    if u not in entry[1]:
                        entry[1].append(u)
                todo.extend(m.children())
        return parts

    def _part_hook(self, units: list[_Unit]) -> Callable:
        def hook(_m, _args):
            if self._running or any(u.active or u.bound for u in units):
                return  # a forward in progress binds its units; or its weights are bound already
            u = units[0]
            self._enter_recompute()
            u.active += 1
            try:
                self._load(u)
            finally:
                u.active -= 1
            self._hold_recomputed(u)
        return hook
