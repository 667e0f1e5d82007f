"""The plain-module API on an offloaded model: what reads weights gets the real ones.

Between forwards an offloaded model's parameters are placeholders (NaN, no memory).
``state_dict()`` (and so ``save_pretrained`` and ``torch.save(model.state_dict())``) gets
each unit's real tensors from the store, one unit at a time: a post-hook on every unit
module replaces the placeholders of that unit's entries by host (CPU) copies read from its
objects, whatever the compute device. The returned dict holds every tensor at once, as
any state dict does, so saving this way needs host memory for the whole model.

Conversions (``model.to(dtype)``, ``.half()``, ``.to(other device)``), ``copy.deepcopy``,
pickling the module and ``load_state_dict`` would act on the placeholders (silently giving
NaN weights, a second runtime sharing the first one's hooks, or loaded values the store
never serves): they are refused with an error that says to call ``tiered.detach(model)``
first. Conversions that change nothing are allowed.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from allocators import OutOfBudget

from .offload import OffloadError

if TYPE_CHECKING:
    from .offload import OffloadedModule, _Slot, _Unit

_WAIT = 600.0


class _Copies:
    """Host copies made for one ``state_dict()`` call: a tensor shared by several names (tied
    weights) is read once and stays one tensor, as in the in-memory model's state dict."""

    def __init__(self) -> None:
        self._dest: weakref.ref | None = None
        self._by_tensor: dict[int, torch.Tensor] = {}

    def for_call(self, destination) -> dict[int, torch.Tensor]:
        if self._dest is None or self._dest() is not destination:
            self._dest = weakref.ref(destination)
            self._by_tensor = {}
        return self._by_tensor


def install(rt: "OffloadedModule") -> list:
    """Hooks and guards on ``rt.model``; returns what ``remove`` undoes."""
    copies = _Copies()
    handles = []
    for u in rt.units:
        names = _slot_names(u)
        handles.append(u.module.register_state_dict_post_hook(
            functools.partial(_fill_state, weakref.ref(rt), u, names, copies)))
    guarded = _guarded_modules(rt)
    for m in guarded:
        handles.append(m.register_load_state_dict_pre_hook(_refuse_load))
        m._apply = functools.partial(_checked_apply, m, _slot_types(m, rt))
        m.__deepcopy__ = functools.partial(_refuse_copy, "a deep copy", type(m).__name__)
        m.__reduce_ex__ = functools.partial(_refuse_copy, "pickling (torch.save of the module)", type(m).__name__)
    return handles + [_Guards(guarded)]


def remove(installed: list) -> None:
    for h in installed:
        h.remove()


class _Guards:
    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for m in self.modules:
            for attr in ("_apply", "__deepcopy__", "__reduce_ex__"):
                if attr in vars(m):
                    delattr(m, attr)


def _slot_names(u: "_Unit") -> list[tuple[str, "_Slot"]]:
    """Each slot's state-dict names relative to its unit's module (a shared submodule has several)."""
    where: dict[int, list[str]] = {}
    for n, m in u.module.named_modules(remove_duplicate=False):
        where.setdefault(id(m), []).append(n)
    out = []
    for s in u.slots:
        for n in where.get(id(s.module), []):
            out.append((f"{n}.{s.attr}" if n else s.attr, s))
    return out


def _fill_state(rt_ref, u: "_Unit", names, copies: _Copies, _module, state_dict, prefix, _meta) -> None:
    rt = rt_ref()
    if rt is None:
        return
    want = [(prefix + n, s) for n, s in names
            if prefix + n in state_dict and state_dict[prefix + n] is not s.tensor()]  # keep_vars: as is
    if not want:
        return
    made = copies.for_call(state_dict)
    todo = [(name, s) for name, s in want if id(s.tensor()) not in made]
    for key in dict.fromkeys(s.key for _n, s in todo):
        lease = _acquire(rt, key)
        try:
            for _name, s in todo:
                if s.key == key and id(s.tensor()) not in made:
                    made[id(s.tensor())] = s.source(lease.tensor).clone(memory_format=torch.contiguous_format)
        finally:
            lease.release()
    for name, s in want:
        state_dict[name] = made[id(s.tensor())]


def _acquire(rt: "OffloadedModule", key: str):
    """The host copy of ``key``; prefetches of the next forward give their room back if needed."""
    try:
        return rt.store.acquire(key, wait=0.0).result(timeout=_WAIT)
    except OutOfBudget:
        rt._drop_prefetches(keep=None)
        rt.room_from_others()
        return rt.store.acquire(key, wait=_WAIT).result(timeout=_WAIT)


def _guarded_modules(rt: "OffloadedModule") -> list[nn.Module]:
    """Every module whose subtree holds an offloaded tensor (the root included)."""
    owners = {id(s.module) for u in rt.units for s in u.slots}
    return [m for m in rt.model.modules() if any(id(x) in owners for x in m.modules())]


def _slot_types(m: nn.Module, rt: "OffloadedModule") -> list[tuple[torch.dtype, torch.device]]:
    inside = {id(x) for x in m.modules()}
    return list(dict.fromkeys((s.dtype, s.tensor().device) for u in rt.units for s in u.slots
                              if id(s.module) in inside))


def _checked_apply(m: nn.Module, types, fn, recurse: bool = True):
    """``Module._apply`` unless ``fn`` would change an offloaded tensor's dtype or device."""
    for dtype, device in types:
        probe = torch.empty((), dtype=dtype, device=device)
        out = fn(probe)
        if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.device != device:
            got = f"{out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise OffloadError(
                f"{type(m).__name__} is offloaded: converting its {dtype} weights on {device} to {got} would "
                "convert placeholders, not the weights; call tiered.detach(model) first (then offload again)")
    return type(m)._apply(m, fn, recurse)


def _refuse_load(module: nn.Module, *_args) -> None:
    raise OffloadError(f"{type(module).__name__} is offloaded: load_state_dict would write into placeholders "
                       "(or, with assign=True, replace parameters the store no longer serves); call "
                       "tiered.detach(model) first, load, then offload again")


def _refuse_copy(what: str, name: str, _arg=None):
    raise OffloadError(f"{name} is offloaded: {what} would copy placeholders, not the weights, and the runtime "
                       "attached to it; call tiered.detach(model) first, or save model.state_dict() (the real "
                       "weights) and load it into a new model")
