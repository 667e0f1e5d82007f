"""``tiered.offload(model)``: run a module whose weights live in the tiered store.

Each *unit* (by default every transformer block, plus the modules owning the
remaining parameters: embeddings, norms, head) is one store object holding
its parameters packed together, so loading a block is one large read. Hooks
bind a unit's parameters to zero-copy views of its host copy just before the
unit's forward and unbind them after, following accelerate's hook lifecycle
(``always_call`` post-hooks, and ``detach`` that removes every hook), plus
the overlap accelerate lacks: the execution order is learned from the first
forward, and while unit *i* computes, units *i+1..i+k* are already being read
(wrapping around into the next forward, which is what decoding needs). The
compute budget (the host tier on CPU, the gpu tier on CUDA) bounds what is
loaded at once; units that fit in what the streaming window leaves over stay
resident, so a model slightly larger than the budget does not re-read
everything on every token. On CUDA units reach the GPU through a
:class:`~tiered.DeviceCache` (one pre-reserved region; a prefetch is copied to
the device ahead of use on the cache's stream) unless ``[offload]
device_cache = false``.

Lifecycle: ``offload()`` packs and writes the weights as ephemeral objects (the
store deletes them when it closes, or on its next open after a crash), takes a
handle on this process's shared store for the config unless given one, installs
hooks; ``detach()`` restores ordinary in-memory parameters, removes the hooks,
deletes the objects (``keep=True``: makes them durable instead) and closes what
``offload()`` opened. A model dropped without ``detach`` is cleaned up once
collected (:mod:`tiered.offload_life`). ``state_dict()`` reads the real weights
from the store (:mod:`tiered.offload_state`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from allocators import DeviceBudget, OutOfBudget, align_up
from allocators.device_arena import DEVICE_ALIGN
from io_engine import Priority, gather

from ..config import Config, load_config
from .. import offload_life
from ..device_cache import DeviceCache
from ..sizes import format_size
from ..store import Lease, StoreError, TieredStore

_ALIGN = 64  # byte alignment of each tensor inside a packed unit (any dtype can view it)
_WAIT = 600.0  # seconds a forward waits for a unit's weights before giving up


class OffloadError(RuntimeError):
    """The model cannot be offloaded as asked; the message names the unit and sizes."""


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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


@dataclass(frozen=True)
class _SavedWeight:
    """A saved-for-backward tensor that views a unit's weights: fetched again on unpack."""

    unit: int
    key: str
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int


class UnitEdit:
    """Writable host copies of some units' objects (see ``OffloadedModule.open_unit_params``)."""

    def __init__(self) -> None:
        self.tensors: dict[str, tuple[_Unit | None, torch.Tensor]] = {}  # key -> (unit holding it, bytes)
        self.leases: dict[str, Lease] = {}  # leases taken for the edit (units not loaded)
        self.views: dict[int, list[torch.Tensor]] = {}  # id(parameter) -> its views in those copies
        self.store: TieredStore | None = None

    def abandon(self) -> None:
        """Give the copies back unwritten; copies changed in place are dropped from the cache."""
        for k, lease in self.leases.items():
            lease.release()
            if self.store is not None and k in self.store:
                self.store.evict(k)
        self.leases.clear()
        self.tensors.clear()


@dataclass
class OffloadStats:
    forwards: int = 0
    unit_loads: int = 0
    prefetch_hits: int = 0  # unit loads whose bytes were already in memory when needed
    stall_seconds: float = 0.0  # time forwards waited for weights
    bytes_read: dict = field(default_factory=dict)  # tier -> bytes read since offload()
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0  # CUDA: weights bound on the GPU at once (<= the gpu tier)
    resident_bytes: int = 0
    host_resident_bytes: int = 0
    lookahead: int = 0
    prefetch_skipped: int = 0  # prefetches not started because the budget was full
    device_cache: dict = field(default_factory=dict)  # hits/misses/evictions/bytes of the device cache, if used

    @property
    def prefetch_hit_rate(self) -> float:
        return self.prefetch_hits / self.unit_loads if self.unit_loads else 1.0

    def as_dict(self) -> dict:
        return {
            "forwards": self.forwards, "unit_loads": self.unit_loads,
            "prefetch_hit_rate": round(self.prefetch_hit_rate, 4),
            "stall_seconds": round(self.stall_seconds, 4), "bytes_read": dict(self.bytes_read),
            "peak_host_bytes": self.peak_host_bytes, "peak_device_bytes": self.peak_device_bytes,
            "resident_bytes": self.resident_bytes,
            "host_resident_bytes": self.host_resident_bytes,
            "lookahead": self.lookahead, "prefetch_skipped": self.prefetch_skipped,
            **({"device_cache": dict(self.device_cache)} if self.device_cache else {}),
        }


def _placeholder(dtype: torch.dtype, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A 1-element tensor expanded to ``shape``: right shape/dtype/device, no memory.

    Floating placeholders hold NaN so that a weight used outside its unit's
    forward shows up as NaN output instead of silently computing with zeros.
    """
    fill = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
    return torch.full((), fill, dtype=dtype, device=device).expand(shape)


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


class OffloadedModule:
    """The runtime attached to an offloaded model (``model._tiered``)."""

    def __init__(self, model: nn.Module, store: TieredStore, owns_store: bool, config: Config,
                 device: torch.device) -> None:
        self.model = model
        self.store = store
        self.owns_store = owns_store
        self.config = config
        self.device = device
        self.units: list[_Unit] = []
        self.order: list[int] = []
        self._pass: list[int] = []
        self._cursor = 0
        self._hooks: list = []
        self.lookahead = 0
        self.stats = OffloadStats()
        self._read_base: dict = {}  # tier -> bytes read before offload()
        self._external_base = 0
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._bindings: dict[int, list[tuple[_Unit, torch.Tensor]]] = {}  # tensor id -> (unit, view)
        self.device_budget: DeviceBudget | None = None  # CUDA: accounts the weights bound on the GPU
        self.dcache: DeviceCache | None = None  # places unit objects on the compute device (CUDA default)
        self._resident_ranges: list[tuple[int, int]] = []  # device cache: region bytes of resident units
        self.prefix = ""
        # training: saved tensors that alias a unit's weights are packed as handles and fetched again
        self._storage_of: dict[int, tuple[_Unit, str]] = {}  # host storage address -> (unit, key)
        self._saved: dict[int, int] = {}  # unit index -> handles packed and not yet unpacked
        self._bw_order: list[int] = []  # units in the order their handles were packed (forward order)
        self._bw_hold: dict[int, list[torch.Tensor]] = {}  # unit index -> tensors unpacked for backward
        self._bw_done: list[_Unit] = []  # units whose handles are all unpacked: released once unused
        self._sth = None  # the saved_tensors_hooks context of the forward in progress
        self.backward_listeners: list[Callable[[_Unit], None]] = []  # unit fetched again in backward
        self._writes: list = []  # puts of updated weights (optimizers)
        self._finished = False  # detached, abandoned, or never attached (offload failed)
        self._pid = os.getpid()  # a fork child's copy cleans up nothing of its parent's
        self._idle_lock = threading.Lock()  # another model of the store checks ``_running``/``_busy`` under it
        self._running = False  # a forward is in progress (root pre-hook to root post-hook)
        self._busy = 0  # state_dict() reads or detach() runs: other models leave our units alone
        self._orphaned = False  # dropped without detach, queued for cleanup (set without a lock)
        self._durable: set[str] | None = None  # packed keys kept (durable) before offload: written durable
        self._stream_reserve = 0  # host bytes this model's forward needs beyond its pinned units
        self.name = type(model).__name__
        self._public_units = None  # the OffloadUnits of offload_units(model), made on first use

    # -- building ------------------------------------------------------------------
    def build_units(self, spec, external: dict[int, str] | None, layout: str = "packed") -> None:
        prefix = self.prefix
        for i, (name, mod, subtree) in enumerate(_named_units(self.model, spec)):
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
            futures.append(self.store.put(key, blob, kind="weight", ephemeral=self._ephemeral(key)))
        for f in futures:
            f.result(timeout=_WAIT)

    def note_durable(self) -> None:
        """Remember which of the model's packed objects a ``detach(keep=True)`` made durable: writing
        them again keeps them durable (else a crash would lose the only durable copy)."""
        self._durable = set()
        for u in self.units:
            k = u.packed_key
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
        for key in dict.fromkeys(u.packed_key for u in self.units if u.packed_key is not None):
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

    def plan_budget(self) -> None:
        """Choose the lookahead and what stays resident, within the budgets.

        The host arena streams units like a ring, which can waste up to one unit
        where it wraps, so it keeps one unit spare. On CPU the arena is also the
        compute memory. On CUDA the gpu tier bounds the weights on the device
        (units bound there), and the arena separately bounds pinned host copies:
        units that do not fit on the GPU but fit in the arena stay in pinned host
        memory and only cross PCIe again, instead of being read from storage.
        """
        budget = self._budget()
        largest = max(self.units, key=lambda u: u.nbytes)
        parents = sum(u.nbytes for u in self.units if not self._is_leaf_unit(u))
        if largest.nbytes + parents > budget and not self.cuda and self._held_by_others():
            self.residents_from_others()  # idle models' resident units stream from now on
            budget = self._budget()
        if largest.nbytes + parents > budget:
            raise OffloadError(
                f"compute budget {format_size(budget)} ({self._budget_name()}) is smaller than unit "
                f"{largest.name or '<root>'!r} ({format_size(largest.nbytes)})"
                + (f" plus enclosing units ({format_size(parents)})" if parents else "")
                + "; raise the budget or split the unit with units=[...]"
            )
        if self.cuda:
            self.device_budget = DeviceBudget(budget, str(self.device))
        host = self.store.arena.capacity - self._held_by_others()
        if self._two_level and host < 2 * largest.nbytes:
            raise OffloadError(
                f"host tier of {format_size(host)} cannot stage unit {largest.name or '<root>'!r} "
                f"({format_size(largest.nbytes)}) twice; raise [tiers.host] capacity")
        want = self.config.offload.lookahead
        # Prefetches take whatever budget is free when they are issued (and are skipped,
        # then read on demand, when it is not), so the lookahead is not cut to what k copies
        # of the largest unit would need: most units are far smaller than the largest
        # (embeddings, head). The static reservation below only sizes the resident set.
        self.lookahead = 2 if want is None else want
        self.stats.lookahead = self.lookahead
        fit_host = (host - parents) // largest.nbytes - 2
        # Residents are planned around one streaming unit: when weights stream faster than
        # they compute (decoding), bytes not read at all save more than reading ahead does
        window = largest.nbytes
        # the host room left unpinned must also let each other model of the store stream (their
        # forwards take turns with ours: the largest of the reserves, not their sum)
        others = max((o._stream_reserve for o in offload_life.others_on(self.store) if o is not self), default=0)
        if self._two_level:
            self._stream_reserve = parents + window + largest.nbytes
            self._resident_budget = budget - parents - window
            self._host_resident_budget = host - max(self._stream_reserve, others)
        else:
            self._stream_reserve = parents + window + (largest.nbytes if fit_host >= 0 else 0)
            self._resident_budget = budget - max(self._stream_reserve, others)
            self._host_resident_budget = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def _wants_device_cache(self) -> bool:
        want = self.config.offload.device_cache
        if want is None:  # the bundled layout's strided views would be copied beside the cache's bytes
            return self.cuda and not self._bundled
        return want

    @property
    def _bundled(self) -> bool:
        return any(s.bundle is not None for u in self.units for s in u.slots)

    @property
    def _two_level(self) -> bool:
        """Compute memory apart from the host arena (CUDA, or a device cache forced on a CPU)."""
        return self.cuda or self._wants_device_cache

    def _is_leaf_unit(self, u: _Unit) -> bool:
        return not any(v is not u and any(m is v.module for m in u.module.modules()) for v in self.units)

    def _budget(self) -> int:
        if self.cuda:
            gpu = next((t for t in self.config.device_tiers), None)
            if gpu is None:
                raise OffloadError(f"{self.config.source}: a CUDA compute device needs a [tiers.gpu] budget")
            return gpu.capacity
        return self.store.arena.capacity - self._held_by_others()

    def _budget_name(self) -> str:
        if self.cuda:
            return "gpu tier"
        held = self._held_by_others()
        return "host tier" + (f", less {format_size(held)} kept resident by other offloaded models of the store"
                              if held else "")

    def host_pinned_bytes(self) -> int:
        """Host bytes this model keeps pinned between forwards (its resident units)."""
        return sum(u.nbytes for u in self.units if (u.resident and not self._two_level) or u.host_resident)

    def _held_by_others(self) -> int:
        return sum(o.host_pinned_bytes() for o in offload_life.others_on(self.store) if o is not self)

    def room_from_others(self) -> None:
        """Take back the room the idle prefetches of the store's other models hold."""
        for other in offload_life.others_on(self.store):
            if other is not self:
                other.give_back_prefetches()

    def residents_from_others(self) -> int:
        """Take back the host room the idle resident units of the store's other models hold."""
        freed = sum(o.give_back_residents() for o in offload_life.others_on(self.store) if o is not self)
        if freed:
            self.store.trim()
        return freed

    def give_back_prefetches(self) -> None:
        """Release the prefetched units of the next forward, unless a forward or backward is in
        progress: for another model of the store that needs the room now."""
        with self._idle_lock:
            if self._idle():
                self._drop_prefetches(keep=None)

    def _idle(self) -> bool:
        """No forward, backward, state_dict() or detach() in progress (under ``_idle_lock``)."""
        return not (self._running or self._busy or self._finished or self._saved or self._bw_hold)

    def give_back_residents(self) -> int:
        """Unpin the units kept in host memory, unless busy: for another model of the store that
        finds no room for a unit even with every prefetch given back. They stream from now on.
        The host bytes given back."""
        with self._idle_lock:
            if not self._idle():
                return 0
            freed = 0
            for u in self.units:
                if (u.resident and not self._two_level) or u.host_resident:
                    freed += u.nbytes
                    self.stats.resident_bytes -= u.nbytes if u.resident else 0
                    self.stats.host_resident_bytes -= u.nbytes if u.host_resident else 0
                    u.resident = u.host_resident = False
                    self._unbind(u)
                    self._drop_pending(u)
                    self._release(u)
                    for lease in u.host_pins.values():
                        lease.release()
                    u.host_pins.clear()
            return freed

    def mark_busy(self) -> None:
        with self._idle_lock:
            self._busy += 1

    def unmark_busy(self) -> None:
        with self._idle_lock:
            self._busy -= 1

    def describe(self) -> str:
        return f"{self.name} (objects {self.prefix}/...)"

    def pin_residents(self) -> None:
        if not self.config.offload.resident:
            return
        left, host_left = self._resident_budget, self._host_resident_budget
        for u in self.units:
            if u.nbytes <= left:
                left -= u.nbytes
                u.resident = True
                self.stats.resident_bytes += u.nbytes
            elif u.nbytes <= host_left:
                host_left -= u.nbytes
                u.host_resident = True
                self.stats.host_resident_bytes += u.nbytes

    def install_hooks(self) -> None:
        st = self.store.stats()
        self._read_base = {n: t["bytes_read"] for n, t in st["tiers"].items() if t and t["kind"] == "storage"}
        self._external_base = st["external_bytes_read"]
        for u in self.units:
            self._hooks.append(u.module.register_forward_pre_hook(self._pre_hook(u)))
            self._hooks.append(u.module.register_forward_hook(self._post_hook(u), always_call=True))
        # first of all pre-hooks (the root may also be a unit): clears what an interrupted forward left
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre, prepend=True))
        self._hooks.append(self.model.register_forward_hook(self._root_post, always_call=True))
        from .. import offload_state  # imports this module

        # state_dict() reads the real weights; conversions and deep copies are refused
        self._hooks += offload_state.install(self)

    # -- hooks ---------------------------------------------------------------------
    def _root_pre(self, _m, _args) -> None:
        with self._idle_lock:
            self._running = True
        # a forward interrupted by a BaseException (Ctrl-C) skips always_call post-hooks:
        # units it left active are released here, before they can pin the budget forever
        for u in self.units:
            if u.active:
                u.active = 0
                self._done_with(u)
        self._pop_saved_hooks()
        if self._bw_hold or self._saved:
            self.finish_backward()
        self._bw_order = []
        self._pass = []
        self._cursor = 0
        if torch.is_grad_enabled():
            self._sth = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._sth.__enter__()

    def _root_post(self, _m, _args, _out) -> None:
        with self._idle_lock:
            self._running = False
        self._pop_saved_hooks()
        self.stats.forwards += 1
        if self._pass and self._pass != self.order:
            self.order = self._pass
        self._pass = []

    def _pre_hook(self, u: _Unit) -> Callable:
        def hook(_m, _args):
            u.active += 1
            if u.active == 1:
                if u.bound:  # a resident unit stays bound between forwards
                    self.stats.unit_loads += 1
                    self.stats.prefetch_hits += 1
                else:
                    self._load(u)
            self._pass.append(u.index)
            self._prefetch_after(u)
        return hook

    def _post_hook(self, u: _Unit) -> Callable:
        def hook(_m, _args, _out):
            u.active -= 1
            if u.active == 0:
                self._done_with(u)
        return hook

    def _done_with(self, u: _Unit) -> None:
        """After a unit's forward: unbind it unless resident; keep its pinned host copy if host-resident."""
        if u.resident:
            return
        self._unbind(u)
        if u.host_resident and self.dcache is None:
            self._wait_copies(u)  # its leases are the pinned host copies it keeps
        else:
            self._release(u)

    # -- loading -------------------------------------------------------------------
    def _acquire(self, u: _Unit, priority: Priority, wait: float | None = None) -> bool:
        """Start acquiring ``u``'s objects. A prefetch never waits for host memory: when
        the budget is full of pinned units it stops (False) and the unit is read on demand."""
        if priority is Priority.PREFETCH:
            wait = 0.0
        source = self.dcache if self.dcache is not None else self.store
        for k in u.keys:
            if k not in u.leases and k not in u.pending:
                try:
                    u.pending[k] = source.acquire(k, priority=priority, wait=wait)
                except OutOfBudget:
                    if priority is not Priority.PREFETCH:
                        raise
                    self.stats.prefetch_skipped += 1
                    return False
        return True

    def _load(self, u: _Unit) -> None:
        t0 = time.perf_counter()
        ready = all(k in u.leases or (k in u.pending and u.pending[k].done()) for k in u.keys)
        try:
            self._acquire(u, Priority.DEMAND, wait=0.0)
        except OutOfBudget:
            # prefetches for a path the forward did not take hold the budget: drop them (and what
            # models dropped without detach still pin)
            offload_life.collect()
            self._drop_prefetches(keep=u)
            self.room_from_others()
            try:
                self._acquire(u, Priority.DEMAND, wait=0.0)
            except OutOfBudget:
                # the unit's own partly prefetched objects can split the free space (a unit of many
                # checkpoint tensors): give them back too and take the unit in one go. Giving the
                # leases back is not enough: the copies stay cached where they are, and acquiring
                # them again is a cache hit that pins them there again, so the rest of the unit may
                # still find no block that fits. Drop every unpinned cached copy (the unit's own
                # included) so the free space is one merged range but for what stays pinned.
                self._drop_pending(u)
                self._make_room()
                try:
                    self._acquire(u, Priority.DEMAND, wait=0.0)
                except OutOfBudget:  # other models' residents take the room this model streams in
                    self._drop_pending(u)
                    if self.residents_from_others():
                        self._make_room()
                    self._acquire(u, Priority.DEMAND)
        self._collect(u)
        self.stats.stall_seconds += time.perf_counter() - t0
        self.stats.unit_loads += 1
        self.stats.prefetch_hits += int(ready)
        self._bind(u)

    def _make_room(self) -> None:
        """Drop every unpinned cached copy, so that the free space is one merged range."""
        if self.dcache is not None:
            self.dcache.trim()
        self.store.trim()
        self.store.arena.rewind()

    def _collect(self, u: _Unit) -> None:
        """Wait for ``u``'s pending acquisitions; their leases become the unit's."""
        for k, f in list(u.pending.items()):
            u.leases[k] = f.result(timeout=_WAIT)
            del u.pending[k]

    def _bind(self, u: _Unit) -> None:
        # views made under torch.inference_mode() would be inference tensors, unusable by a later
        # grad-enabled forward while a resident unit stays bound: make them as ordinary tensors
        with torch.inference_mode(False):
            self._bind_views(u)

    def _bind_views(self, u: _Unit) -> None:
        if self.device_budget is not None:  # the invariant, checked: never more than the gpu tier
            self.device_budget.reserve(u.nbytes, timeout=0)
        try:
            self._bind_slots(u)
        except BaseException:
            if self.device_budget is not None and not u.bound:
                self.device_budget.release(u.nbytes)  # nothing bound: _unbind would not give it back
            raise

    def _bind_slots(self, u: _Unit) -> None:
        if self.dcache is not None:
            # the leases are device copies already (copied ahead on the cache's stream when prefetched);
            # a strided (bundled) view is made contiguous, the layout the in-memory model has
            for s in u.slots:
                view = s.source(u.leases[s.key].tensor)
                if not view.is_contiguous():
                    view = view.contiguous()
                self._bindings.setdefault(id(s.tensor()), []).append((u, view))
                s.tensor().data = view
                u.bound.append((s, view))
            return
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for s in u.slots:
            view = s.source(u.leases[s.key].tensor)
            if s.bundle is not None and s.bundle[1] == s.bundle[0] - 1 and self._copy_stream is None:
                # a down projection read as bundled neuron rows: transposed back into the layout the
                # in-memory model has, so matmuls take the same kernels and results stay bitwise
                view = view.contiguous()
            if self._copy_stream is not None:
                # allocated on the compute stream (which frees it), filled on the copy stream
                dst = torch.empty(s.shape, dtype=s.dtype, device=self.device)
                with torch.cuda.stream(self._copy_stream):
                    dst.copy_(view, non_blocking=True)  # strided (bundled) sources land contiguous
                view = dst
            self._bindings.setdefault(id(s.tensor()), []).append((u, view))
            s.tensor().data = view
            u.bound.append((s, view))
        if self._copy_stream is not None:
            u.copied = torch.cuda.Event()
            u.copied.record(self._copy_stream)
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        else:
            self._map_storages(u)

    def _unbind(self, u: _Unit) -> None:
        with torch.inference_mode(False):
            self._unbind_views(u)

    def _unbind_views(self, u: _Unit) -> None:
        for s, _view in u.bound:
            # a tensor shared by several units (tied weights) keeps another unit's binding
            rest = [b for b in self._bindings.get(id(s.tensor()), []) if b[0] is not u]
            self._bindings[id(s.tensor())] = rest
            s.tensor().data = rest[-1][1] if rest else _placeholder(s.dtype, s.shape, self.device)
        if u.bound and self.device_budget is not None:
            self.device_budget.release(u.nbytes)
        u.bound.clear()

    def _wait_copies(self, u: _Unit) -> None:
        if u.copied is not None:  # host buffers may be reused or changed only after the DMA
            u.copied.synchronize()
            u.copied = None

    def _release(self, u: _Unit) -> None:
        self._wait_copies(u)
        for k, lease in u.leases.items():
            ptr = lease.tensor.untyped_storage().data_ptr()
            if self._storage_of.get(ptr, (None,))[0] is u:
                del self._storage_of[ptr]
        leases = list(u.leases.values())
        u.leases.clear()
        writing = [f for f in u.writing if not f.done()]
        u.writing = []
        if not writing:
            for lease in leases:
                lease.release()
            return
        # a put of this unit's updated objects copies from these buffers' cached versions: they stay
        # pinned until it is durable, so no reader can meanwhile fetch the replaced bytes from storage
        gather(writing).add_done_callback(lambda _f: [lease.release() for lease in leases])

    def _drop_prefetches(self, keep: _Unit | None) -> None:
        """Release every prefetched (not running, not resident) unit's host copies."""
        for v in self.units:
            if v is keep or v.active or v.resident or (v.host_resident and self.dcache is None):
                continue
            self._drop_pending(v)
            self._release(v)

    def _drop_pending(self, v: _Unit) -> None:
        pending, v.pending = list(v.pending.values()), {}
        for f in pending:
            if f.cancel():
                continue
            try:
                lease = f.result(timeout=_WAIT)
            except Exception:  # noqa: BLE001 - a failed read pins nothing; its error reached (or reaches) the load
                continue
            lease.release()

    def _prefetch_after(self, u: _Unit) -> None:
        if not self.order or self.lookahead == 0:
            return
        try:
            pos = self.order.index(u.index, self._cursor)
        except ValueError:
            try:
                pos = self.order.index(u.index)
            except ValueError:
                return  # a unit not seen in the learned order: the pass will re-learn it
        self._cursor = pos + 1
        n = len(self.order)
        for j in range(1, self.lookahead + 1):
            nxt = self.units[self.order[(pos + j) % n]]
            # with the device cache a host-resident unit is prefetched too: onto the device
            if nxt is not u and not nxt.resident and (self.dcache is not None or not nxt.host_resident) \
                    and not self._acquire(nxt, Priority.PREFETCH):
                break

    # -- training: weights fetched again in backward ---------------------------------
    def _map_storages(self, u: _Unit) -> None:
        for k, lease in u.leases.items():
            self._storage_of[lease.tensor.untyped_storage().data_ptr()] = (u, k)

    def _pop_saved_hooks(self) -> None:
        if self._sth is not None:
            sth, self._sth = self._sth, None
            sth.__exit__(None, None, None)

    def _pack(self, t: torch.Tensor):
        """A saved tensor that views a streamed unit's host copy becomes a handle (the memory
        goes back to the budget); everything else is saved as usual."""
        if self.dcache is not None and t.layout is torch.strided:
            at = self.dcache.arena.offset_of(t)
            if at is not None and not any(lo <= at < hi for lo, hi in self._resident_ranges):
                # the region is refilled with other units once this one is released: autograd keeps
                # its own copy (refetching in backward is the CPU path's; training on CUDA is not supported)
                return t.clone()
            return t
        if not self._storage_of or t.layout is not torch.strided or t.device.type != "cpu":
            return t
        hit = self._storage_of.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        u, key = hit
        if u.resident or u.host_resident or key not in u.leases:
            return t  # stays in memory anyway
        if u.index not in self._saved or self._saved[u.index] == 0:
            self._bw_order.append(u.index)
        self._saved[u.index] = self._saved.get(u.index, 0) + 1
        return _SavedWeight(u.index, key, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def _unpack(self, h):
        if not isinstance(h, _SavedWeight):
            return h
        self._release_unused()
        u = self.units[h.unit]
        if not all(k in u.leases for k in u.keys):
            self._acquire(u, Priority.DEMAND)
            self._collect(u)
            self.stats.unit_loads += 1
            self._prefetch_backward(u)
            for fn in self.backward_listeners:
                fn(u)
        out = torch.empty(0, dtype=h.dtype).set_(u.leases[h.key].tensor.untyped_storage(), h.offset, h.shape,
                                                 h.stride)
        self._bw_hold.setdefault(u.index, []).append(out)
        self._saved[u.index] = self._saved.get(u.index, 1) - 1
        if self._saved[u.index] <= 0 and u not in self._bw_done:
            self._bw_done.append(u)
        return out

    def _prefetch_backward(self, u: _Unit) -> None:
        """Backward visits units in reverse: read the ones before ``u`` that still hold handles."""
        try:
            pos = len(self._bw_order) - 1 - self._bw_order[::-1].index(u.index)
        except ValueError:
            return
        for j in range(pos - 1, max(pos - 1 - self.lookahead, -1), -1):
            v = self.units[self._bw_order[j]]
            if self._saved.get(v.index, 0) > 0 and not v.active and not v.resident and not v.host_resident \
                    and not self._acquire(v, Priority.PREFETCH):
                break

    def _release_unused(self, force: bool = False) -> None:
        """Release units whose backward is over: every handle unpacked and no tensor unpacked
        from them still used by autograd (only our reference left)."""
        keep = []
        for u in self._bw_done:
            held = self._bw_hold.get(u.index, [])
            if not force and any(t._use_count() > 1 for t in held):
                keep.append(u)
                continue
            self._bw_hold.pop(u.index, None)
            if not u.active and not u.resident and not u.host_resident:
                self._drop_pending(u)
                self._release(u)
        self._bw_done = keep

    def finish_backward(self) -> None:
        """Give back every unit still held for backward (called between steps)."""
        for i in list(self._bw_hold):
            u = self.units[i]
            if u not in self._bw_done:
                self._bw_done.append(u)
        self._release_unused(force=True)
        for u in self.units:
            if u.leases and not u.active and not u.resident and not u.host_resident:
                self._release(u)
        self._saved.clear()

    def check_trainable(self) -> None:
        """Updating weights in place needs each parameter's bytes in the store objects themselves."""
        if self.cuda or self.dcache is not None:
            raise OffloadError("training offloaded weights runs on the CPU without a device cache in this "
                               f"version (model is on {self.device})")
        for u in self.units:
            for s in u.slots:
                if s.bundle is not None:
                    raise OffloadError(f"unit {u.name!r}: the bundled layout cannot be trained; "
                                       "offload with layout='packed'")

    def owns_param(self, p: torch.Tensor) -> bool:
        return any(s.tensor() is p for u in self.units for s in u.slots)

    def open_unit_params(self, u: _Unit) -> "UnitEdit":
        """Writable host copies of ``u``'s objects and of every other unit holding one of its
        parameters (tied weights); ``edit.views[id(param)]`` lists that parameter's views."""
        params = {id(s.tensor()) for s in u.slots if not s.is_buffer}
        units = [u] + [v for v in self.units if v is not u and any(id(s.tensor()) in params for s in v.slots)]
        edit = UnitEdit()
        try:
            for v in units:
                for k in v.keys:
                    if k in edit.tensors:
                        continue
                    if k in v.leases:
                        edit.tensors[k] = (v, v.leases[k].tensor)
                    else:
                        lease = self.store.acquire(k, wait=_WAIT).result(timeout=_WAIT)
                        edit.leases[k] = lease
                        edit.tensors[k] = (None, lease.tensor)
                for s in v.slots:
                    if not s.is_buffer and id(s.tensor()) in params:
                        edit.views.setdefault(id(s.tensor()), []).append(s.source(edit.tensors[s.key][1]))
        except BaseException:
            edit.abandon()
            raise
        edit.store = self.store
        return edit

    def write_unit_params(self, edit: "UnitEdit") -> None:
        """Write the objects of ``edit`` back as new versions (their leases outlive the puts)."""
        for k, (owner, t) in edit.tensors.items():
            f = self.store.put(k, t, kind="weight", ephemeral=self._ephemeral(k))
            self._writes.append(f)
            if owner is not None:
                owner.writing = [w for w in owner.writing if not w.done()] + [f]  # resident units never release
            elif k in edit.leases:
                lease = edit.leases.pop(k)
                f.add_done_callback(lambda _f, lease=lease: lease.release())
        edit.tensors.clear()

    def write_unit(self, u: _Unit) -> None:
        """Write the objects ``u`` has bound back as new versions (after changing them in place)."""
        for k, lease in u.leases.items():
            f = self.store.put(k, lease.tensor, kind="weight", ephemeral=self._ephemeral(k))
            self._writes.append(f)
            u.writing = [w for w in u.writing if not w.done()] + [f]  # resident units never release

    def wait_writes(self) -> None:
        """Wait until every weight update is durable; release what backward still held."""
        writes, self._writes = self._writes, []
        try:
            gather(writes).result(timeout=_WAIT)  # waits for every put; raises the first error
        finally:
            self.finish_backward()

    # -- teardown ------------------------------------------------------------------
    def materialize(self) -> None:
        """Give every parameter its own in-memory copy again (for ``detach``)."""
        for u in self.units:
            self._acquire(u, Priority.DEMAND)
            self._collect(u)
            for s in u.slots:
                view = s.source(u.leases[s.key].tensor)
                s.tensor().data = view.to(self.device, copy=True).contiguous()
            self._release(u)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def release_all(self) -> None:
        for u in self.units:
            self._drop_pending(u)
            self._release(u)
            for lease in u.host_pins.values():
                lease.release()
            u.host_pins.clear()

    def open_device_cache(self) -> None:
        """The device cache over the compute budget: on by default on CUDA (``[offload] device_cache``).
        On a CPU device it only adds a copy; forcing it there is how its path is tested."""
        if self._wants_device_cache:
            if self._bundled:
                raise OffloadError("[offload] device_cache = true cannot serve the bundled layout (each FFN weight "
                                   "would be copied contiguous beside the cached bytes, twice the budget); "
                                   "use layout = \"packed\" or device_cache = false")
            # each object's buffer is aligned to DEVICE_ALIGN: the arena adds that padding to the budget
            pad = DEVICE_ALIGN * len({k for u in self.units for k in u.keys})
            self.dcache = DeviceCache(self.store, self._budget() + pad, str(self.device), wait=_WAIT).open()

    def close_device_cache(self) -> None:
        if self.dcache is not None:
            dcache, self.dcache = self.dcache, None
            dcache.close()

    def hold_residents(self) -> None:
        """Load what stays: resident units bound on the compute device, host-resident ones pinned."""
        for u in self.units:
            if u.resident or (u.host_resident and self.dcache is None):
                self._acquire(u, Priority.DEMAND)
            elif u.host_resident:  # the device cache copies from these pinned host copies each forward
                for k in u.keys:
                    if k not in u.host_pins:
                        u.host_pins[k] = self.store.acquire(k, wait=_WAIT).result(timeout=_WAIT)
        for u in self.units:
            if u.resident or u.host_resident:
                self._collect(u)
        if self.dcache is not None:
            self._resident_ranges = [(lease.offset, lease.offset + lease.nbytes)
                                     for u in self.units if u.resident for lease in u.leases.values()]

    def keep_objects(self) -> None:
        """Make the model's objects durable (``detach(keep=True)``): those written as this
        process's scratch (packed units, and checkpoint tensors updated by training), which the
        store deletes when it closes, are written again as durable."""
        for key in dict.fromkeys(k for u in self.units for k in u.keys):
            if not self.store.meta(key)["ephemeral"]:
                continue
            lease = self.store.acquire(key, wait=_WAIT).result(timeout=_WAIT)
            try:
                self.store.put(key, lease.tensor, kind="weight").result(timeout=_WAIT)
            finally:
                lease.release()

    def delete_objects(self) -> None:
        for key in dict.fromkeys(k for u in self.units for k in u.keys):
            if key in self.store:
                self.store.delete(key)

    def abandon(self) -> None:
        """Give back what a model dropped without ``detach`` held: pins, device cache, its
        objects and its store handle (see :mod:`tiered.offload_life`)."""
        if self._finished:
            return
        self._finished = True
        if not self.store._opened:  # a store the caller owns, closed already: it took all of it along
            return
        try:
            self.remove_hooks()
            self.release_all()
        finally:
            try:
                self.close_device_cache()
            finally:
                try:
                    self.delete_objects()
                finally:
                    if self.owns_store:
                        self.store.close()

    def __del__(self) -> None:
        if not self._finished and self._pid == os.getpid():
            offload_life.orphaned(self)

    def report(self) -> dict:
        st = self.store.stats()
        if st["external_bytes_read"] - self._external_base:
            self.stats.bytes_read["checkpoint files"] = st["external_bytes_read"] - self._external_base
        for name, t in st["tiers"].items():
            if t and t["kind"] == "storage":
                self.stats.bytes_read[name] = t["bytes_read"] - self._read_base.get(name, 0)
        self.stats.peak_host_bytes = self.store.arena.stats().peak
        if self.device_budget is not None:
            self.stats.peak_device_bytes = self.device_budget.stats().peak
        if self.dcache is not None:
            c = self.dcache.stats
            self.stats.device_cache = {"hits": c.hits, "misses": c.misses, "evictions": c.evictions,
                                       "bytes_loaded": c.bytes_loaded, "peak": self.dcache.arena.stats().peak}
        return self.stats.as_dict()


def offload(model: nn.Module, config=None, *, units=None, layout: str | None = None,
            store: TieredStore | None = None,
            device: str | torch.device | None = None, _external: dict[int, str] | None = None,
            _owns_store: bool = False) -> nn.Module:
    """Move ``model``'s weights into the tiered store and stream them through its forward.

    ``config``: path of an offload TOML, a ``Config`` or None (embedded default).
    ``units``: None (automatic), a list of submodule names, or ``fn(name, module) -> bool``.
    ``layout``: "packed" (each tensor whole) or "bundled" (each FFN neuron's up/gate rows and
    down column stored together, so one neuron is one contiguous read, as in "LLM in a
    flash"); default from ``[offload] layout``.
    ``store``: an open store to use (else one is opened from ``config`` and closed by ``detach``).
    ``device``: the compute device (default: where the parameters are).
    Returns ``model`` itself, changed in place.
    """
    if getattr(model, "_tiered", None) is not None:
        raise OffloadError(f"{type(model).__name__} is already offloaded; call tiered.detach(model) first")
    offload_life.collect()
    cfg = store.config if store is not None else load_config(config)
    if device is None:
        p = next((p for p in model.parameters() if p.device.type != "meta"), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    owns = store is None or _owns_store
    opened = store is None  # closed here if offload fails; a store handed in is the caller's to close
    if opened:  # shared with this process's other users of the directories
        store = TieredStore.shared(cfg)
    rt = OffloadedModule(model, store, owns, cfg, device)
    try:
        # the same model keeps its prefix (objects kept by detach(keep=True) are overwritten)
        rt.prefix = getattr(model, "_tiered_prefix", None) or _model_prefix(model)
        model._tiered_prefix = rt.prefix
        layout = layout or cfg.offload.layout
        if layout not in ("packed", "bundled"):
            raise OffloadError(f"layout must be 'packed' or 'bundled', got {layout!r}")
        rt.build_units(units, _external, layout)
        if not rt.units:
            raise OffloadError(f"{type(model).__name__} has no parameters to offload")
        rt.note_durable()
        rt.plan_budget()
        rt.open_device_cache()
        rt.write_units()
        rt.unbind_all()
        for u in rt.units:  # drop the copies cached by the writes: residents then pack together
            if u.packed_key is not None:
                rt.store.evict(u.packed_key)
        if rt.config.offload.resident:
            # and next to what is pinned already, so that the room left for streaming (this
            # model's and the store's other models') stays one free range
            rt.room_from_others()
            rt._make_room()
        rt.pin_residents()
        rt.hold_residents()
        rt.install_hooks()
    except BaseException:
        rt._finished = True
        try:
            rt.remove_hooks()
            rt.release_all()
        finally:
            try:
                rt.close_device_cache()
                rt.delete_scratch()
            finally:
                if opened:
                    store.close()
        raise
    model._tiered = rt
    offload_life.watch(rt)
    return model


def detach(model: nn.Module, *, keep: bool = False) -> nn.Module:
    """Undo :func:`offload`: ordinary in-memory parameters, no hooks, store closed if owned.

    The model's objects are deleted from the store unless ``keep`` is true; kept, they are
    made durable (offload writes them as ephemeral: deleted when the store closes).
    """
    rt: OffloadedModule | None = getattr(model, "_tiered", None)
    if rt is None:
        raise OffloadError(f"{type(model).__name__} is not offloaded")
    offload_life.collect()
    rt.mark_busy()  # from here other models of the store leave this model's units alone
    rt.remove_hooks()
    try:
        for u in rt.units:
            rt._unbind(u)
        rt.release_all()
        rt.room_from_others()
        rt.materialize()
    finally:
        try:
            rt.close_device_cache()
        except BaseException:
            rt._finished = True
            if rt.owns_store:
                rt.store.close()
            raise
    rt._finished = True  # from here on the store handle is closed below, whatever happens
    offload_life.forget(rt)
    try:
        if keep:
            rt.keep_objects()
        else:
            rt.delete_objects()
    finally:
        if rt.owns_store:
            rt.store.close()
    model._tiered = None
    return model


def offload_stats(model: nn.Module) -> dict:
    """Bytes read per tier, prefetch hit rate, stall time, peak host bytes of an offloaded model."""
    rt: OffloadedModule | None = getattr(model, "_tiered", None)
    if rt is None:
        raise OffloadError(f"{type(model).__name__} is not offloaded")
    return rt.report()
