"""The runtime attached to an offloaded model: its state and the forward hooks that load units
(see the package docstring for the whole picture)."""

from __future__ import annotations

import os
import threading
from typing import Callable

import torch
from torch import nn

from ..config import Config
from ..device_cache import DeviceCache
from ..store import TieredStore
from .activations import ActivationOffload
from .budget import _Budget
from .expert_cache import _ExpertCache, new_expert_stats
from .expert_device import _ExpertDevice
from .experts import _ExpertPacking
from .layout import _Packing, _Unit
from .loading import _Loading
from .recompute import _Recompute
from .stats import OffloadStats, _Stats
from .teardown import _Teardown
from .training import _Training


class OffloadedModule(_Packing, _ExpertPacking, _ExpertCache, _ExpertDevice, _Budget, _Loading, _Recompute,
                      _Training, _Teardown, _Stats):
    """The runtime attached to an offloaded model (``model._tiered``)."""

    def __init__(self, model: nn.Module, store: TieredStore, owns_store: bool, config: Config,
                 device: torch.device) -> None:
        self.model = model
        self.store = store
        self.owns_store = owns_store
        self.config = config
        self.device = device
        self.units: list[_Unit] = []
        self.banks = []  # expert banks (.experts): routed experts loaded one by one
        self.expert_stats = new_expert_stats()
        self._calls = 0  # bank calls so far (the expert cache's clock)
        self._expert_capacity = self._expert_prefetch_room = 0
        self._expert_room = None  # the host buffer charging the room for experts to the model
        self.pools = {}  # expert slice size -> its pool (.experts)
        self._staging = None  # device cache: the GPU tier buffer a bank call's experts are gathered in
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
        self.compute_res = None  # the model's reservation of its compute tier (host, or the GPU tier)
        self.host_res = None  # of the host tier (the compute one on a CPU)
        self._explicit = False  # the compute share is a given guarantee (argument or config), not elastic
        self._forward_budget = 0  # compute bytes prefetches may fill, refreshed by each forward
        self._device_tokens: dict = {}  # CUDA without device cache: unit index -> its GPU tier charge
        self.dcache: DeviceCache | None = None  # places unit objects on the compute device (CUDA default)
        self._resident_ranges: list[tuple[int, int]] = []  # device cache: region bytes of resident units
        self.prefix = ""
        # training: saved tensors that alias a unit's weights are packed as handles and fetched again
        self._storage_of: dict[int, tuple[_Unit, str]] = {}  # host storage address -> (unit, key)
        self._saved: dict[int, int] = {}  # unit index -> handles packed and not yet unpacked
        self._bw_order: list[int] = []  # units in the order their handles were packed (forward order)
        self._bw_hold: dict[int, list[torch.Tensor]] = {}  # unit index -> tensors unpacked for backward
        self._bw_done: list[_Unit] = []  # units whose handles are all unpacked: released once unused
        # units bound outside the model's forward (activation checkpointing recomputing in
        # backward): held until another recompute starts or backward ends (see recompute.py)
        self._recomputed: list[_Unit] = []
        self._recompute_node = None  # the autograd node whose recompute holds them
        self._sth = None  # the saved_tensors_hooks context of the forward in progress
        self.activations: ActivationOffload | None = None  # [offload] activations = "host" (set by offload())
        self.backward_listeners: list[Callable[[_Unit], None]] = []  # unit fetched again in backward
        self._writes: list = []  # puts of updated weights (optimizers)
        self._finished = False  # detached, abandoned, or never attached (offload failed)
        self._pid = os.getpid()  # a fork child's copy cleans up nothing of its parent's
        self._idle_lock = threading.Lock()  # on_pressure (in another owner's thread) reads the flags under it
        self._running = False  # a forward is in progress (root pre-hook to root post-hook)
        # a grad-enabled forward's graph may hold views of resident units until finish_backward()
        self._graph = False
        self._busy = 0  # state_dict(), detach(), a unit lease or edit: other owners' pressure leaves our units alone
        self._orphaned = False  # dropped without detach, queued for cleanup (set without a lock)
        self._durable: set[str] | None = None  # packed keys kept (durable) before offload: written durable
        self._floor = self._host_floor = 0  # compute / host bytes one forward needs besides residents
        self.name = type(model).__name__
        self._public_units = None  # the OffloadUnits of offload_units(model), made on first use

    def install_hooks(self) -> None:
        st = self.store.stats()
        self._read_base = {n: t["bytes_read"] for n, t in st["tiers"].items() if t and t["kind"] == "storage"}
        self._external_base = st["external_bytes_read"]
        for u in self.units:
            self._hooks.append(u.module.register_forward_pre_hook(self._pre_hook(u)))
            self._hooks.append(u.module.register_forward_hook(self._post_hook(u), always_call=True))
        for m, units in self._parts().values():
            self._hooks.append(m.register_forward_pre_hook(self._part_hook(units)))
        self.install_bank_hooks()
        # first of all pre-hooks (the root may also be a unit): clears what an interrupted forward left
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre, prepend=True))
        self._hooks.append(self.model.register_forward_hook(self._root_post, always_call=True))
        from .. import offload_state  # imports this module

        # state_dict() reads the real weights; conversions and deep copies are refused
        self._hooks += offload_state.install(self)

    def _root_pre(self, _m, _args) -> None:
        if self.activations is not None:  # first: what it raises leaves the runtime as it was
            self.activations.begin_forward()
        with self._idle_lock:
            self._running = True
        self._forward_budget = self._budget()
        # a forward interrupted by a BaseException (Ctrl-C) skips always_call post-hooks:
        # units it left active are released here, before they can pin the budget forever
        for u in self.units:
            if u.active:
                u.active = 0
                self._done_with(u)
        for b in self.banks:
            if b.bound:
                self.unbind_bank(b)
        self._pop_saved_hooks()
        if self._bw_hold or self._saved or self._recomputed:
            self.finish_backward()
        self._bw_order = []
        self._pass = []
        self._cursor = 0
        self._declare_plan(torch.is_grad_enabled())
        if torch.is_grad_enabled():
            with self._idle_lock:
                self._graph = True
            self._sth = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._sth.__enter__()

    def _declare_plan(self, backward: bool) -> None:
        """Tell the store the streamed units this forward reads, in the order the last forward
        ran them (and in reverse for backward), so that evictions keep what is read soonest."""
        streamed = [self.units[i] for i in self.order if not self.units[i].bound]
        keys = [k for u in streamed for k in u.keys]
        if backward:  # units in reverse, each unit's keys in the order a load reads them
            keys += [k for u in reversed(streamed) for k in u.keys]
        if keys:
            self.store.plan(keys, owner=self.owner)

    def _root_post(self, _m, _args, _out) -> None:
        with self._idle_lock:
            self._running = False
        self._pop_saved_hooks()
        if self.activations is not None:
            self.activations.end_forward()
        self.stats.forwards += 1
        if self._pass and self._pass != self.order:
            self.order = self._pass
        self._pass = []

    def _pre_hook(self, u: _Unit) -> Callable:
        def hook(_m, _args):
            recomputing = self._recomputing()
            if recomputing and not u.active and not u.bound:
                self._enter_recompute()
            u.active += 1
            if u.active == 1:
                if u.bound:  # a resident unit stays bound between forwards
                    self.stats.unit_loads += 1
                    self.stats.prefetch_hits += 1
                else:
                    self._load(u)
            if not recomputing:  # the forward order is learned, and read ahead in, from real forwards
                self._pass.append(u.index)
                self._prefetch_after(u)
        return hook

    def _post_hook(self, u: _Unit) -> Callable:
        def hook(_m, _args, _out):
            u.active -= 1
            if u.active == 0:
                if self._recomputing():
                    self._hold_recomputed(u)
                else:
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
