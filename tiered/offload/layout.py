"""Units: which modules are loaded together, and how their tensors are packed into store objects."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

import torch
from torch import nn

from tiered.allocators import align_up

from ..store import Lease
from .common import _ALIGN, OffloadError, _itemsize, _placeholder, _WAIT


@dataclass
class _Slot:
    """One parameter or buffer of a unit: where it lives in the unit's store objects."""

    module: nn.Module
    attr: str
    is_buffer: bool
    key: str
    offset: int
    dtype: torch.dtype
    shape: torch.Size
    #: bundled FFN layout: (parts, index) in a region (inter, parts, hidden) starting at ``offset``
    bundle: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * torch.empty((), dtype=self.dtype).element_size()

    @property
    def span(self) -> int:
        """Bytes this slot occupies in its object (a bundled FFN region counts all its parts)."""
        return self.nbytes * (self.bundle[0] if self.bundle else 1)

    def view_in(self, raw: torch.Tensor) -> torch.Tensor:
        """This tensor inside ``raw``, the flat uint8 bytes of its store object."""
        if self.bundle is None:
            return raw[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)
        parts, index = self.bundle
        inter, hidden = (self.shape[0], self.shape[1]) if index < parts - 1 else (self.shape[1], self.shape[0])
        region = raw[self.offset : self.offset + inter * parts * hidden * _itemsize(self.dtype)]
        rows = region.view(self.dtype).view(inter, parts, hidden)[:, index, :]
        return rows if index < parts - 1 else rows.t()

    def source(self, leased: torch.Tensor) -> torch.Tensor:
        """This tensor in ``leased``, its object's host copy (packed bytes, or the tensor itself)."""
        if self.offset or self.bundle or leased.dtype != self.dtype or leased.shape != self.shape:
            return self.view_in(leased.view(torch.uint8).reshape(-1))
        return leased

    def tensor(self) -> torch.Tensor:
        return (self.module._buffers if self.is_buffer else self.module._parameters)[self.attr]


#: (up-projection names, down-projection name) of the FFNs the bundled layout knows
_FFN_NAMES = ((("gate_proj", "up_proj"), "down_proj"), (("w1", "w3"), "w2"), (("up_proj",), "down_proj"),
              (("fc1",), "fc2"))


def _ffn_groups(mod: nn.Module) -> list[tuple[list[nn.Linear], nn.Linear]]:
    """FFNs inside ``mod`` whose neurons can be bundled: up projections (inter x hidden) and a
    down projection (hidden x inter), all nn.Linear of one dtype."""
    out = []
    for m in mod.modules():
        for ups, down in _FFN_NAMES:
            lin = [getattr(m, n, None) for n in ups] + [getattr(m, down, None)]
            if not all(isinstance(x, nn.Linear) for x in lin):
                continue
            *up, dn = lin
            inter, hidden = up[0].weight.shape
            if all(u.weight.shape == (inter, hidden) for u in up) and dn.weight.shape == (hidden, inter) \
                    and len({x.weight.dtype for x in lin}) == 1:
                out.append((up, dn))
                break
    return out


@dataclass
class _Unit:
    index: int
    name: str
    module: nn.Module
    slots: list[_Slot]
    keys: list[str]
    nbytes: int
    packed_key: str | None = None  # the object holding this unit's packed tensors
    resident: bool = False  # stays bound on the compute device between forwards
    host_resident: bool = False  # CUDA: keeps its pinned host copy; only the device copy is dropped
    active: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)
    pending: dict[str, object] = field(default_factory=dict)
    bound: list[tuple[_Slot, torch.Tensor]] = field(default_factory=list)
    copied: object = None  # CUDA event: host->device copies of this unit done (host buffers reusable)
    host_pins: dict[str, Lease] = field(default_factory=dict)  # device cache: a host-resident unit's host copies
    writing: list = field(default_factory=list)  # puts of this unit's objects its leases must outlive


def _default_units(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, whole_subtree) for every unit, in module order.

    Children of the outermost ModuleLists (transformer blocks) are whole-subtree
    units; every other module that directly owns parameters is a unit of just
    those parameters.
    """
    blocks: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            if any(name == b or name.startswith(b + ".") for b in blocks):
                continue
            for i, child in enumerate(mod):
                if any(True for _ in child.parameters()):
                    blocks[f"{name}.{i}" if name else str(i)] = child
    out: list[tuple[str, nn.Module, bool]] = []
    for name, mod in model.named_modules():
        if name in blocks:
            out.append((name, mod, True))
        elif not any(name == b or name.startswith(b + ".") for b in blocks):
            if mod._parameters and any(p is not None for p in mod._parameters.values()):
                out.append((name, mod, False))
    return out


def _named_units(model: nn.Module, spec) -> list[tuple[str, nn.Module, bool]]:
    if spec is None:
        return _default_units(model)
    modules = dict(model.named_modules())
    if callable(spec):
        chosen = [n for n, m in modules.items() if spec(n, m)]
    else:
        chosen = list(spec)
        for n in chosen:
            if n not in modules:
                raise OffloadError(f"unit {n!r} is not a submodule of {type(model).__name__}")
    for n in chosen:
        if isinstance(modules[n], (nn.ModuleList, nn.ModuleDict)):
            raise OffloadError(f"unit {n!r} is a {type(modules[n]).__name__}, whose forward is never "
                               "called (its hooks would never load the weights); name its children instead")
    units = [(n, modules[n], True) for n in chosen]
    covered = {id(p) for _n, m, _s in units for p in m.parameters()}
    for n, m in modules.items():  # parameters outside the chosen units: per owning module
        own = [p for p in m._parameters.values() if p is not None and id(p) not in covered]
        if own and not any(n == c or n.startswith(c + ".") for c in chosen):
            units.append((n, m, False))
    return units


def _unit_tensors(mod: nn.Module, subtree: bool) -> list[tuple[nn.Module, str, bool]]:
    owners = mod.modules() if subtree else [mod]
    out = []
    for owner in owners:
        out += [(owner, a, False) for a, p in owner._parameters.items() if p is not None]
        if subtree:
            out += [(owner, a, True) for a, b in owner._buffers.items()
                    if b is not None and a not in owner._non_persistent_buffers_set]
    return out


def _model_prefix(model: nn.Module) -> str:
    h = hashlib.sha256()
    for n, p in model.state_dict(keep_vars=True).items():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    # the architecture hash names what it is; the random part keeps two models of the same
    # architecture in one store apart (their objects are deleted by detach())
    return f"offload/{type(model).__name__}-{h.hexdigest()[:12]}-{uuid.uuid4().hex[:8]}"



class _Packing:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: building and writing the units."""

    def build_units(self, spec, external: dict[int, str] | None, layout: str = "packed") -> None:
        prefix = self.prefix
        experts = self.bank_param_ids()  # expert banks' parameters: their own objects (.experts)
        for name, mod, subtree in _named_units(self.model, spec):
            i = len(self.units)
            slots, keys, off = [], [], 0
            key = f"{prefix}/{name or 'root'}"
            bundled: dict[int, tuple[int, int, int]] = {}  # id(weight) -> (group, parts, index)
            if layout == "bundled" and subtree:
                for g, (ups, down) in enumerate(_ffn_groups(mod)):
                    ws = [x.weight for x in ups] + [down.weight]
                    if external is None or not any(id(w) in external for w in ws):
                        bundled.update({id(w): (g, len(ws), j) for j, w in enumerate(ws)})
            regions: dict[int, int] = {}  # group -> offset of its region
            for owner, attr, is_buf in _unit_tensors(mod, subtree):
                t = (owner._buffers if is_buf else owner._parameters)[attr]
                if id(t) in experts:
                    continue
                if id(t) in bundled:
                    g, parts, j = bundled[id(t)]
                    if g not in regions:
                        off = align_up(off, _ALIGN)
                        regions[g] = off
                        off += parts * t.numel() * _itemsize(t.dtype)
                    slots.append(_Slot(owner, attr, is_buf, key, regions[g], t.dtype, t.shape, (parts, j)))
                    continue
                if external is not None and id(t) in external:
                    k = external[id(t)]
                    slots.append(_Slot(owner, attr, is_buf, k, 0, t.dtype, t.shape))
                    keys.append(k)
                    continue
                off = align_up(off, _ALIGN)
                slots.append(_Slot(owner, attr, is_buf, key, off, t.dtype, t.shape))
                off += slots[-1].nbytes
            if not slots:
                continue
            packed = any(s.key == key for s in slots)
            if packed:
                keys.insert(0, key)
            nbytes = sum(align_up(max(s.nbytes, 1) + 4096) for s in slots if s.key != key)  # + unaligned lead
            nbytes += align_up(max(off, 1)) if packed else 0
            self.units.append(_Unit(i, name, mod, slots, list(dict.fromkeys(keys)), nbytes,
                                    packed_key=key if packed else None))

    def write_units(self) -> None:
        """Pack each unit's tensors into one object, write it, free the in-memory copy."""
        futures = []
        for u in self.units:
            packed = [s for s in u.slots if s.key == u.packed_key]
            if not packed:
                continue
            end = max(s.offset + s.span for s in packed)
            blob = torch.empty(end, dtype=torch.uint8)
            for s in packed:
                src = s.tensor().detach()
                if src.device.type == "meta":
                    raise OffloadError(f"unit {u.name!r}: {s.attr} is on the meta device and has no checkpoint file")
                if s.bundle is None:
                    blob[s.offset : s.offset + s.nbytes] = src.contiguous().reshape(-1).view(torch.uint8)
                else:
                    s.view_in(blob).copy_(src)
            key = packed[0].key
            futures.append(self.store.put(key, blob, kind="weight", ephemeral=self._ephemeral(key),
                                         owner=self.owner))
        for f in futures:
            f.result(timeout=_WAIT)

    def note_durable(self) -> None:
        """Remember which of the model's packed objects a ``detach(keep=True)`` made durable: writing
        them again keeps them durable (else a crash would lose the only durable copy)."""
        self._durable = set()
        for k in [u.packed_key for u in self.units] + self.bank_keys():
            if k is not None and k in self.store:
                try:
                    meta = self.store.meta(k)
                except KeyError:
                    continue
                if not meta["ephemeral"] and meta["tier"] != "external":
                    self._durable.add(k)

    def _ephemeral(self, key: str) -> bool:
        return self._durable is None or key not in self._durable

    def delete_scratch(self) -> None:
        """After a failed ``offload``: delete the packed objects it wrote, but those kept before."""
        if self._durable is None:
            return
        for key in dict.fromkeys([u.packed_key for u in self.units if u.packed_key is not None] + self.bank_keys()):
            if key not in self._durable and key in self.store:
                self.store.delete(key)

    def unbind_all(self) -> None:
        """Replace every unit tensor by a placeholder (frees the original memory)."""
        seen: dict[int, torch.Tensor] = {}
        for u in self.units:
            for s in u.slots:
                t = s.tensor()
                if id(t) in seen:
                    continue
                ph = _placeholder(s.dtype, s.shape, self.device)
                if isinstance(t, nn.Parameter) and t.device.type != self.device.type:
                    new = nn.Parameter(ph, requires_grad=t.requires_grad)
                    seen[id(t)] = new
                    self._replace_everywhere(t, new)
                else:
                    t.data = ph
                    seen[id(t)] = t

    def _replace_everywhere(self, old: torch.Tensor, new: torch.Tensor) -> None:
        for m in self.model.modules():
            for a, p in list(m._parameters.items()):
                if p is old:
                    m._parameters[a] = new
            for a, b in list(m._buffers.items()):
                if b is old:
                    m._buffers[a] = new

    def _is_leaf_unit(self, u: _Unit) -> bool:
        return not any(v is not u and any(m is v.module for m in u.module.modules()) for v in self.units)

    @property
    def _bundled(self) -> bool:
        return any(s.bundle is not None for u in self.units for s in u.slots)

    def owns_param(self, p: torch.Tensor) -> bool:
        return any(s.tensor() is p for u in self.units for s in u.slots) or id(p) in self.bank_param_ids()

    def describe(self) -> str:
        return f"{self.name} (objects {self.prefix}/...)"
