"""The plain-module API on an offloaded model: what reads weights gets the real ones.

Between forwards an offloaded model's parameters are placeholders (NaN, no memory).
``state_dict()`` (and so ``save_pretrained`` and ``torch.save(model.state_dict())``) of the
model or of any submodule holding offloaded tensors gets the real tensors from the store,
one object at a time: the outermost such module's ``state_dict`` call replaces the
placeholders of every entry by host (CPU) copies read from the objects, whatever the
compute device (a tensor several names share is read once and stays one tensor). The
returned dict holds every tensor at once, as any state dict does, so saving this way needs
host memory for the whole model; nothing is kept once the call returns.
``state_dict(keep_vars=True)`` would return the placeholder parameters themselves: it is
refused (call ``tiered.detach(model)`` first to get the real parameters).

``load_state_dict`` writes the values of offloaded tensors into their store objects (new
versions, durable when it returns; on the CPU); ``assign=True`` is refused, and so is a state
dict holding a parameter of an expert bank (stored one object per expert): refused before
anything is written.
Conversions (``model.to(dtype)``, ``.half()``, ``.to(other device)``), ``copy.deepcopy`` and
pickling the module would act on the placeholders (silently giving NaN weights, or a second
runtime sharing the first one's hooks): they are refused with an error that says to call
``tiered.detach(model)`` first. Conversions that change nothing are allowed.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from tiered.allocators import OutOfBudget

from .offload.common import OffloadError

if TYPE_CHECKING:
    from .offload.layout import _Slot
    from .offload.runtime import OffloadedModule

_WAIT = 600.0


def install(rt: "OffloadedModule") -> list:
    """Hooks and guards on ``rt.model``; returns what ``remove`` undoes."""
    handles = []
    calls = threading.local()  # depth of the state_dict() calls of guarded modules, per thread
    guarded = _guarded_modules(rt)
    for m in guarded:
        handles.append(m.register_state_dict_post_hook(
            functools.partial(_fill_state, weakref.ref(rt), calls)))
        loaded: list[str] = []  # names the pre-hook wrote to the store: not missing
        handles.append(m.register_load_state_dict_pre_hook(
            functools.partial(_load_into_store, weakref.ref(rt), loaded)))
        handles.append(m.register_load_state_dict_post_hook(functools.partial(_not_missing, loaded)))
        m.state_dict = functools.partial(_counted_state_dict, m, calls)
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
            for attr in ("state_dict", "_apply", "__deepcopy__", "__reduce_ex__"):
                if attr in vars(m):
                    delattr(m, attr)


def _counted_state_dict(m: nn.Module, calls: threading.local, *args, **kwargs):
    """``Module.state_dict``, counting nested calls: only the outermost one fills the entries."""
    if kwargs.get("keep_vars") or (len(args) > 2 and args[2]):
        raise OffloadError(f"{type(m).__name__} is offloaded: state_dict(keep_vars=True) would return the "
                           "placeholder parameters, not the weights; call state_dict() for the weights' values, "
                           "or tiered.detach(model) first for the parameters themselves")
    depth = getattr(calls, "depth", 0)
    calls.depth = depth + 1
    try:
        return type(m).state_dict(m, *args, **kwargs)
    finally:
        calls.depth = depth


def _slot_names(m: nn.Module, rt: "OffloadedModule") -> list[tuple[str, "_Slot"]]:
    """The state-dict names (relative to ``m``) of every offloaded tensor under ``m`` (a shared
    submodule has several)."""
    where: dict[int, list[str]] = {}
    for n, sub in m.named_modules(remove_duplicate=False):
        where.setdefault(id(sub), []).append(n)
    out = []
    for u in rt.units:
        for s in u.slots:
            for n in where.get(id(s.module), []):
                out.append((f"{n}.{s.attr}" if n else s.attr, s))
    return out


def _fill_state(rt_ref, calls: threading.local, module, state_dict, prefix, _meta) -> None:
    rt = rt_ref()
    if rt is None or getattr(calls, "depth", 0) > 1:
        return  # an enclosing guarded module's state_dict() fills the entries once, when it ends
    # names found now: wrappers added since offload (peft's LoRA layers) move tensors to new names
    want = [(prefix + n, s) for n, s in _slot_names(module, rt) if prefix + n in state_dict]
    if not want:
        return
    made: dict[int, torch.Tensor] = {}  # id(tensor) -> its copy: tied weights stay one tensor
    rt.mark_busy()  # other models of the store leave this model's units alone meanwhile
    try:
        for key in dict.fromkeys(s.key for _n, s in want):
            lease = _acquire(rt, key)
            try:
                for _name, s in want:
                    if s.key == key and id(s.tensor()) not in made:
                        made[id(s.tensor())] = s.source(lease.tensor).clone(memory_format=torch.contiguous_format)
            finally:
                lease.release()
    finally:
        rt.unmark_busy()
    for name, s in want:
        state_dict[name] = made[id(s.tensor())]


def _acquire(rt: "OffloadedModule", key: str):
    """The host copy of ``key``; prefetches of the next forward give their room back if needed."""
    try:
        return rt.store.acquire(key, wait=0.0, owner=rt.owner).result(timeout=_WAIT)
    except OutOfBudget:  # the store asked the other owners already; this model's prefetches go too
        rt._drop_prefetches(keep=None)
        return rt.store.acquire(key, wait=_WAIT, owner=rt.owner).result(timeout=_WAIT)


def _guarded_modules(rt: "OffloadedModule") -> list[nn.Module]:
    """Every module whose subtree holds an offloaded tensor (the root included)."""
    owners = {id(s.module) for u in rt.units for s in u.slots} | {id(b.module) for b in rt.banks}
    return [m for m in rt.model.modules() if any(id(x) in owners for x in m.modules())]


def _slot_types(m: nn.Module, rt: "OffloadedModule") -> list[tuple[torch.dtype, torch.device]]:
    inside = {id(x) for x in m.modules()}
    banks = [(b.module._parameters[a].dtype, b.module._parameters[a].device) for b in rt.banks
             if id(b.module) in inside for a in b.attrs]
    return list(dict.fromkeys([(s.dtype, s.tensor().device) for u in rt.units for s in u.slots
                               if id(s.module) in inside] + banks))


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


def _load_into_store(rt_ref, loaded: list, module: nn.Module, state_dict, prefix, local_metadata, *_args) -> None:
    """``load_state_dict``: the values of offloaded tensors are written to their store objects
    (and taken out of ``state_dict``, so torch does not copy them into the placeholders);
    a value of another shape is left for torch to report."""
    if local_metadata.get("assign_to_params_buffers"):
        raise OffloadError(f"{type(module).__name__} is offloaded: load_state_dict(assign=True) would replace "
                           "parameters the store no longer serves; call tiered.detach(model) first, load, then "
                           "offload again (or load without assign=True)")
    rt = rt_ref()
    if rt is None:
        return
    _refuse_bank_values(rt, module, state_dict, prefix)
    values, names = {}, []
    for n, s in _slot_names(module, rt):
        v = state_dict.get(prefix + n)
        if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(s.shape):
            values[id(s.tensor())] = v
            names.append(prefix + n)
    rt.load_values(values)
    for n in names:
        state_dict.pop(n)
    loaded.extend(names)


def _refuse_bank_values(rt: "OffloadedModule", module: nn.Module, state_dict, prefix: str) -> None:
    """Refuse, before anything is loaded, a state dict that holds a parameter of an expert bank."""
    banks = {id(b.module): b for b in rt.banks}
    for n, sub in module.named_modules(remove_duplicate=False):
        b = banks.get(id(sub))
        if b is None:
            continue
        for a in b.attrs:
            name = prefix + (f"{n}.{a}" if n else a)
            if name in state_dict:
                raise OffloadError(
                    f"expert bank {b.name!r} is offloaded one object per expert: load_state_dict cannot write "
                    f"{name!r} into it; call tiered.detach(model) first, load, then offload again (or load "
                    "the other weights without the experts' entries)")


def _not_missing(loaded: list, _module, incompatible) -> None:
    """What the pre-hook loaded is not a missing key."""
    done, loaded[:] = set(loaded), []
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in done]


def _refuse_copy(what: str, name: str, _arg=None):
    raise OffloadError(f"{name} is offloaded: {what} would copy placeholders, not the weights, and the runtime "
                       "attached to it; call tiered.detach(model) first, or save model.state_dict() (the real "
                       "weights) and load it into a new model")
