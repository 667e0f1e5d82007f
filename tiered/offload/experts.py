"""Expert units: the routed experts of mixture-of-experts blocks, one store object per expert.

transformers keeps a layer's experts as fused 3-D parameters (``experts.gate_up_proj``
[E, 2I, H], ``experts.down_proj`` [E, H, I]), and its kernels (eager loop, ``batched_mm``,
``grouped_mm``) index them by expert. An *expert bank* is such a module, recognised by its
structure: no parameters below it, two or more 3-D parameters, every parameter's first
dimension the same E >= 2, whose forward takes ``(hidden_states, top_k_index, top_k_weights)``
as transformers' fused experts do (a per-head module of the same shapes is no bank). Its router
is the sibling module whose ``weight`` is [E, H]; with ``experts = "auto"`` a bank needs one.

Expert ``e`` of a bank is one store object holding ``p[e]`` of every parameter ``p``, contiguous
(gate, up and down of one expert are one read). The bank's parameters are bound, during the
bank's forward, to *slabs*: one anonymous memory mapping per parameter, of the parameter's full
shape and strides, whose pages are committed only where an expert was copied in. The module's
code path and kernels are unchanged (so are its results, bit for bit); experts it is not routed
to are never read, and occupy no memory. Each expert present in a slab is charged to the model's
compute reservation (a host buffer whose pages are handed back to the kernel: the bytes live in
the slab). Loading, the cache policy and prediction are in :mod:`.expert_cache`; on the
device-cache path (CUDA) experts live in the GPU tier instead, see :mod:`.expert_device`.
"""

from __future__ import annotations

import ctypes
import inspect
import mmap
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from tiered.allocators import align_up

from .common import _ALIGN, _WAIT, OffloadError, _itemsize, _placeholder
from .layout import _ffn_groups

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10  # Linux
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def drop_pages(address: int, nbytes: int) -> None:
    """Hand the whole pages inside ``[address, address + nbytes)`` back to the kernel (they read
    as zeros afterwards): memory charged to the model but kept elsewhere is not committed twice."""
    start = align_up(address, _PAGE)
    end = (address + nbytes) // _PAGE * _PAGE
    if end > start and _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                     mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), f"madvise(MADV_DONTNEED) of {end - start} bytes failed")


def _experts_size(mod: nn.Module) -> int | None:
    """E when ``mod`` is a bank of fused experts (see the module docstring), else None."""
    params = [p for p in mod._parameters.values() if p is not None]
    if len(params) < 2 or any(True for _ in mod.children() for _p in _.parameters()):
        return None
    num = params[0].shape[0] if params[0].dim() else 0
    if num < 2 or any(p.dim() < 2 or p.shape[0] != num for p in params):
        return None
    return num if sum(p.dim() == 3 for p in params) >= 2 else None


def _routing_args(mod: nn.Module) -> str | None:
    """The name of ``mod``'s hidden-states argument when its forward takes ``(hidden_states,
    top_k_index, top_k_weights)`` (the router's choice comes in), else None."""
    try:
        params = list(inspect.signature(mod.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    if len(positional) < 3 or [p.name for p in positional[1:3]] != ["top_k_index", "top_k_weights"]:
        return None
    return positional[0].name


def _router_of(parent: nn.Module, bank: nn.Module, num: int) -> nn.Module | None:
    """The sibling of ``bank`` that scores its experts: a 2-D ``weight`` of E rows."""
    for child in parent.children():
        w = getattr(child, "weight", None)
        if child is not bank and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num:
            return child
    return None


_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def _map_fixed(address: int, nbytes: int, flags: int, fd: int = -1, offset: int = 0) -> None:
    """mmap(MAP_FIXED): replace the mapping of ``[address, address + nbytes)`` in place."""
    got = _libc.mmap(ctypes.c_void_p(address), nbytes, _PROT_RW, flags | _MAP_FIXED, fd, offset)
    if got != address:
        raise OSError(ctypes.get_errno(), f"mmap(MAP_FIXED) of {nbytes} bytes at {address:#x} failed")


class _Pool:
    """Committed memory for expert slices of one size (a memfd), lent slot by slot to slabs: a
    slice is mapped where its expert sits in a slab, so loading an expert neither faults nor
    zeroes fresh pages, and dropping one hands its slot to the next without freeing anything."""

    def __init__(self, slice_bytes: int, slots: int) -> None:
        self.slice_bytes, self.slots = slice_bytes, slots
        self.fd = os.memfd_create(f"tiered-experts-{slice_bytes}", getattr(os, "MFD_CLOEXEC", 1))
        os.ftruncate(self.fd, slice_bytes * slots)
        self.free = list(range(slots))

    def lend(self, address: int) -> int:
        if not self.free:
            raise OffloadError(f"expert pool of {self.slots} slices of {self.slice_bytes} bytes is exhausted")
        slot = self.free.pop()
        _map_fixed(address, self.slice_bytes, mmap.MAP_SHARED, self.fd, slot * self.slice_bytes)
        return slot

    def take_back(self, slot: int) -> None:
        """The slot is free again. Its old place keeps showing it (an expert no call is routed to,
        so nothing reads it) until another slot is mapped there: one mmap per load, none per drop."""
        self.free.append(slot)

    def uncommit(self) -> None:
        """Every slot free (the experts given back): hand the pool's pages back to the kernel."""
        if self.fd >= 0 and len(self.free) == self.slots and \
                _libc.fallocate(self.fd, _FALLOC_PUNCH_HOLE, 0, self.slice_bytes * self.slots) != 0:
            raise OSError(ctypes.get_errno(), f"fallocate(PUNCH_HOLE) of expert pool {self.slice_bytes} failed")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Slab:
    """One bank parameter's memory: an anonymous mapping of its full size, committed per expert
    (from a :class:`_Pool` when an expert's slice is whole pages, else by the copy itself)."""

    def __init__(self, dtype: torch.dtype, shape: torch.Size) -> None:
        self.dtype, self.shape = dtype, shape
        self.expert_bytes = shape[1:].numel() * _itemsize(dtype)
        size = max(align_up(shape[0] * self.expert_bytes, _PAGE), _PAGE)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address = raw.data_ptr()
        self.tensor = raw[: shape[0] * self.expert_bytes].view(dtype).view(shape)
        self.pool: _Pool | None = None
        self.lent: dict[int, int] = {}  # expert -> pool slot mapped at its place

    @property
    def pooled(self) -> bool:
        return self.expert_bytes % _PAGE == 0

    def fill(self, e: int) -> None:
        """Before expert ``e`` is copied in: give its place committed memory."""
        if self.pool is not None and e not in self.lent:
            self.lent[e] = self.pool.lend(self.address + e * self.expert_bytes)

    def drop(self, e: int, present=()) -> None:
        """Expert ``e`` is gone: its pool slot is free, or its pages go back to the kernel, those
        it shares with neighbours too once no expert of ``present`` is on them."""
        if e in self.lent:
            self.pool.take_back(self.lent.pop(e))
            return
        eb, start, end = self.expert_bytes, e * self.expert_bytes, (e + 1) * self.expert_bytes
        lo, hi = start // _PAGE * _PAGE, align_up(end, _PAGE)
        if not any(i in present for i in range(lo // eb, e)):
            start = lo
        if not any(i in present for i in range(e + 1, min(-(-hi // eb), self.shape[0]))):
            end = hi
        drop_pages(self.address + start, end - start)


@dataclass
class _Bank:
    """One MoE block's routed experts (see the module docstring)."""

    index: int
    name: str
    module: nn.Module
    router: nn.Module | None
    num: int
    attrs: list[str]
    offsets: list[int]  # where each parameter's slice of an expert sits in the expert's object
    nbytes: int  # one expert object
    footprint: int  # memory one expert may commit in the slabs (whole pages touched)
    keys: list[str]
    hidden_arg: str = "hidden_states"  # the name of the forward's first argument
    predictor: nn.Module | None = None  # a private copy of the router (weights kept) for prediction
    direct: bool = False  # every slice is whole pages: experts are read straight into the slabs
    slabs: dict[str, _Slab] = field(default_factory=dict)
    cached: dict[int, object] = field(default_factory=dict)  # expert -> its charge (a host buffer)
    pending: dict[int, object] = field(default_factory=dict)  # expert -> acquire future (prefetch)
    predicted: set[int] = field(default_factory=set)  # experts predicted for this bank's next call
    bound: bool = False
    renumbered: bool = False  # device cache: the module's num_experts reads the call's staged experts
    in_call: bool = False  # device cache: a call of this bank took the staging (kept until its post-hook)
    score: list[float] = field(default_factory=list)  # decayed routing frequency per expert
    last_use: list[int] = field(default_factory=list)
    uses: list[int] = field(default_factory=list)  # per expert: calls routed to it
    reads: list[int] = field(default_factory=list)  # per expert: loads from storage or the host tier

    def ranges(self, e: int) -> list[tuple[str, int, int, object]]:
        """``read_ranges`` requests reading expert ``e``'s slices straight into its slab places."""
        return [(self.keys[e], off, self.slabs[a].expert_bytes,
                 self.slabs[a].tensor[e].view(torch.uint8).reshape(-1).numpy())
                for a, off in zip(self.attrs, self.offsets)]

    def slices(self, raw: torch.Tensor, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(object view, slab view) of each parameter of expert ``e``; ``raw``: its object's bytes."""
        out = []
        for attr, off in zip(self.attrs, self.offsets):
            slab = self.slabs[attr]
            src = raw[off : off + slab.expert_bytes].view(slab.dtype).view(slab.shape[1:])
            out.append((src, slab.tensor[e]))
        return out


def find_banks(model: nn.Module, external: dict[int, str] | None,
               insist: bool = False) -> list[tuple[str, nn.Module, nn.Module | None, str]]:
    """(name, experts module, router, hidden argument) of every bank of fused experts in ``model``,
    in module order. Banks whose parameters are read in place from checkpoint files are left to
    their units; so, unless ``insist``, are those without a router and those sharing a parameter
    with another module (``insist``: refused, a bank's parameters being replaced by slabs)."""
    out = []
    modules = dict(model.named_modules())
    holders: dict[int, list[str]] = {}  # id(parameter) -> the modules holding it
    for name, mod in modules.items():
        for p in mod._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append(name)
    for name, mod in modules.items():
        num = _experts_size(mod)
        hidden_arg = _routing_args(mod) if num is not None else None
        if hidden_arg is None:
            continue
        if external and any(id(p) in external for p in mod.parameters()):
            continue
        parent = modules[name.rpartition(".")[0]] if "." in name else model
        router = _router_of(parent, mod, num)
        shared = sorted({n for p in mod._parameters.values() if p is not None for n in holders[id(p)]} - {name})
        if shared and insist:
            raise OffloadError(f"expert bank {name!r} shares parameters with {', '.join(map(repr, shared))}: "
                               "its experts cannot be stored on their own; set [offload] experts = \"auto\" "
                               "(such banks stay in their layers' units) or false")
        if shared or (router is None and not insist):
            continue
        out.append((name, mod, router, hidden_arg))
    return out


class _ExpertPacking:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: building and writing banks."""

    def build_banks(self, want: bool | None, external: dict[int, str] | None, layout: str | None = None) -> None:
        """Find the banks (``[offload] experts``: None for auto, True to insist, False for none).
        ``layout``: the units' layout (default ``[offload] layout``)."""
        self.banks = []
        if want is False or (want is None and self._bundles_on_cuda(layout or self.config.offload.layout)):
            return
        found = find_banks(self.model, external, insist=bool(want))
        if found and self._two_level and not self._wants_device_cache:  # CUDA with device_cache = false
            if want:
                raise OffloadError(f"{self.name}: [offload] experts = true needs the device cache on CUDA "
                                   "(device_cache = true or unset); set experts = \"auto\" or false")
            return
        if want and not found:
            raise OffloadError(f"{self.name}: [offload] experts = true, but the model has no fused experts "
                               "module (parameters [E, ...] with E >= 2, two or more of them 3-D, "
                               "called as forward(hidden_states, top_k_index, top_k_weights))")
        for i, (name, mod, router, hidden_arg) in enumerate(found):
            attrs = [a for a, p in mod._parameters.items() if p is not None]
            offsets, off = [], 0
            for a in attrs:
                p = mod._parameters[a]
                off = align_up(off, _ALIGN)
                offsets.append(off)
                off += p.shape[1:].numel() * _itemsize(p.dtype)
            num = mod._parameters[attrs[0]].shape[0]
            keys = [f"{self.prefix}/{name}/expert{e}" for e in range(num)]
            predictor = None
            if router is not None:  # before the weights leave memory; routers are small
                predictor = _private_copy(router)
            self.banks.append(_Bank(i, name, mod, router, num, attrs, offsets, align_up(max(off, 1)), _footprint(mod),
                                    keys,
                                    hidden_arg, predictor, score=[0.0] * num, last_use=[-1] * num, uses=[0] * num,
                                    reads=[0] * num))

    def _bundles_on_cuda(self, layout: str) -> bool:
        """The bundled layout will bundle FFNs on CUDA with the device cache left to its default:
        that cache cannot serve bundled units, so expert units (which live in it) are not made and
        the experts stay in their layers' units."""
        return layout == "bundled" and self.cuda and self.config.offload.device_cache is None \
            and bool(_ffn_groups(self.model))

    def bank_param_ids(self) -> set[int]:
        return {id(b.module._parameters[a]) for b in getattr(self, "banks", []) for a in b.attrs}

    def write_banks(self) -> None:
        """One object per expert, then each bank parameter becomes a placeholder backed by a slab."""
        for b in self.banks:
            params = [b.module._parameters[a].detach() for a in b.attrs]
            for p, a in zip(params, b.attrs):
                if p.device.type == "meta":
                    raise OffloadError(f"expert bank {b.name!r}: {a} is on the meta device and has no data")
            # two staging buffers, each reused once its put is done: a bank's experts never sit in
            # memory a second time (freed blobs would stay in the allocator's heap)
            b.direct = not self.experts_on_device and \
                all(p[0].numel() * p.element_size() % _PAGE == 0 for p in params) and \
                all(off % _PAGE == 0 for off in b.offsets)
            block = _PAGE if b.direct else 0  # checksummed per page: slices can be read alone
            blobs = [torch.zeros(b.nbytes, dtype=torch.uint8) for _ in range(2)]
            inflight: list = [None, None]  # per buffer: (future, key) of its put
            for e, key in enumerate(b.keys):
                self._finish_put(inflight[e % 2])
                blob = blobs[e % 2]
                for p, off in zip(params, b.offsets):
                    src = p[e].contiguous().reshape(-1).view(torch.uint8)
                    blob[off : off + src.numel()] = src
                inflight[e % 2] = (self.store.put(key, blob, kind="weight", ephemeral=self._ephemeral(key),
                                                  owner=self.owner, block=block), key)
            for put in inflight:
                self._finish_put(put)
            for a in b.attrs:
                p = b.module._parameters[a]
                b.slabs[a] = _Slab(p.dtype, p.shape)
                p.data = _placeholder(p.dtype, p.shape, self.device)

    def _finish_put(self, put) -> None:
        """Wait for a put; drop the host copy it cached (experts are read when routed to)."""
        if put is not None:
            put[0].result(timeout=_WAIT)
            self.store.evict(put[1])

    def open_pools(self, room: int) -> None:
        """One pool per slice size, of as many slices as ``room`` bytes of experts hold (no more
        than the room charged for them)."""
        slots: dict[int, int] = {}
        for b in self.banks:
            for size in {s.expert_bytes for s in b.slabs.values() if s.pooled}:
                per_expert = sum(1 for s in b.slabs.values() if s.expert_bytes == size)
                slots[size] = max(slots.get(size, 0), max(room // max(b.nbytes, b.footprint), 1) * per_expert)
        self.pools = {size: _Pool(size, n) for size, n in slots.items()}
        for b in self.banks:
            for slab in b.slabs.values():
                slab.pool = self.pools.get(slab.expert_bytes) if slab.pooled else None

    def close_pools(self) -> None:
        for pool in getattr(self, "pools", {}).values():
            pool.close()
        self.pools = {}

    def bank_keys(self) -> list[str]:
        return [k for b in getattr(self, "banks", []) for k in b.keys]

    def bind_bank(self, b: _Bank) -> None:
        with torch.inference_mode(False):
            for a in b.attrs:
                b.module._parameters[a].data = b.slabs[a].tensor
        b.bound = True

    def unbind_bank(self, b: _Bank) -> None:
        with torch.inference_mode(False):
            for a in b.attrs:
                s = b.slabs[a]
                b.module._parameters[a].data = _placeholder(s.dtype, s.shape, self.device)
        b.bound = False
        self.unstage_bank(b)

    def bank_tensors(self, b: _Bank) -> dict[str, torch.Tensor]:
        """Each of ``b``'s parameters whole, in ordinary host memory, read expert by expert."""
        full = {a: torch.empty(s.shape, dtype=s.dtype) for a, s in b.slabs.items()}
        self.mark_busy()  # other models of the store leave this model's memory alone meanwhile
        try:
            for e, key in enumerate(b.keys):
                lease = self.store.acquire(key, wait=_WAIT, owner=self.owner).result(timeout=_WAIT)
                try:
                    raw = lease.tensor.view(torch.uint8).reshape(-1)
                    for a, (src, _dst) in zip(b.attrs, b.slices(raw, e)):
                        full[a][e].copy_(src)
                finally:
                    lease.release()
        finally:
            self.unmark_busy()
        return full

    def materialize_banks(self) -> None:
        """Every bank parameter in ordinary memory again (``detach``)."""
        for b in self.banks:
            full = self.bank_tensors(b)
            with torch.inference_mode(False):
                for a in b.attrs:
                    b.module._parameters[a].data = full[a].to(self.device)
            b.bound = False
            b.slabs.clear()  # the mappings go with their last view

    def fill_bank_state(self, b: _Bank, state_dict: dict, prefix: str) -> None:
        """``state_dict()`` of a module holding ``b``: its parameters' real values, not placeholders."""
        names = [prefix + a for a in b.attrs]
        if any(n in state_dict for n in names):
            full = self.bank_tensors(b)
            for a, n in zip(b.attrs, names):
                if n in state_dict:
                    state_dict[n] = full[a]


def _footprint(mod: nn.Module) -> int:
    """Bytes one expert may commit in the slabs: a slice of whole pages its own (pooled) pages,
    any other the pages it touches (up to one more than its size rounds to)."""
    total = 0
    for p in mod._parameters.values():
        if p is not None:
            size = p.shape[1:].numel() * _itemsize(p.dtype)
            total += size if size % _PAGE == 0 else (-(-size // _PAGE) + 1) * _PAGE
    return total


def _private_copy(router: nn.Module) -> nn.Module:
    """The router with its own copy of its weights and no hooks: scoring the next layer's
    experts ahead must not load or count anything."""
    import copy

    clone = copy.copy(router)
    clone._parameters = {a: (None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False))
                         for a, p in router._parameters.items()}
    clone._buffers = {a: (None if t is None else t.detach().clone()) for a, t in router._buffers.items()}
    clone._modules = dict(router._modules)
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                 "_backward_pre_hooks"):
        if hasattr(clone, attr):
            setattr(clone, attr, type(getattr(router, attr))())
    return clone
