"""The compute budget: the model's reservations of the store's tiers, what stays resident, and
what it gives back when another owner of the store finds no room.

The model is the store owner ``offload/<prefix>`` (its prefix). Its compute tier is the host
tier on a CPU, the store's GPU tier on CUDA (or when ``[offload] device_cache = true`` forces
the device-cache path on a CPU, with a ``device = "cpu"`` tier). The budget there is

- an explicit ``offload(..., share=)``, else the config's ``[owners.offload]`` share: a
  guarantee, within which the model plans its lookahead and residents; or
- elastic: what the other owners' shares leave. The model then reserves its working set (its
  floor: the room a forward needs for the unit it runs, plus its resident units) when the
  tier can grant it, so that models offloaded later plan around it; an idle model gives its
  prefetches and residents back (``on_pressure``, its share shrinking to the floor) when
  another owner finds no room, and streams those units from then on.
"""

from __future__ import annotations

import weakref

import torch

from tiered.allocators import OutOfBudget
from tiered.io_engine import Priority

from ..device_cache import DeviceCache
from ..sizes import format_size
from ..store import StoreError
from .common import _WAIT, OffloadError, prefetching


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` are one device."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def _weak(method):
    """``on_pressure`` that does not keep the runtime alive (the store holds its reservations:
    a model dropped without detach must still be collected)."""
    ref = weakref.WeakMethod(method)

    def on_pressure(nbytes: int) -> int:
        m = ref()
        return 0 if m is None else m(nbytes)
    return on_pressure


class _Budget:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: planning and holding the budget."""

    # -- reservations ------------------------------------------------------------------
    @property
    def owner(self) -> str:
        return self.prefix

    @property
    def compute_tier(self) -> str:
        if not self._two_level:
            return "host"
        tier = self.store.device_tier
        if tier is None:
            raise OffloadError(f"{self.config.source}: a CUDA compute device (or [offload] device_cache = true) needs "
                               "a device tier in the store, e.g. [tiers.gpu] kind = \"device\", capacity = \"8GiB\"")
        return tier

    def _tier_capacity(self, tier: str) -> int:
        if tier == "host":
            return self.store.arena.capacity
        return next(t.capacity for t in self.store.config.device_tiers if t.name == tier)

    def open_reservations(self, share) -> None:
        """Reserve the compute tier (``share``, else the config's share, else elastic) and, when
        that is the GPU tier, the host tier that stages its copies."""
        tier = self.compute_tier
        if tier != "host":
            spec = next(t for t in self.store.config.device_tiers if t.name == tier)
            if not _same_device(torch.device(spec.device or "cuda:0"), self.device):
                raise OffloadError(f"tier {tier!r} of {self.config.source} is on {spec.device}, but the model computes "
                                   f"on {self.device}")
        try:
            self.compute_res = self.store.reserve(tier, share, owner=self.owner,
                                                  on_pressure=_weak(self._give_back_compute))
        except StoreError as e:
            raise OffloadError(f"offload of {self.name}: {e}") from None
        self._explicit = self.compute_res.reserved > 0
        self.host_res = self.compute_res
        if tier != "host":
            self.host_res = self.store.reserve("host", None, owner=self.owner,
                                               on_pressure=_weak(self._give_back_host))

    def close_reservations(self) -> None:
        if self.store.is_open:
            self.store.plan([], owner=self.owner)  # this model reads nothing more
        for res in {id(r): r for r in (self.compute_res, self.host_res) if r is not None}.values():
            res.close()
        self.compute_res = self.host_res = None

    def _budget(self) -> int:
        """Bytes of the compute tier this model plans with: its share, or what the others' leave."""
        if self._explicit:
            return self.compute_res.reserved
        return self._left_by_others(self.compute_tier)

    def _left_by_others(self, tier: str) -> int:
        taken = sum(fig.get(tier, {}).get("reserved", 0) for owner, fig in self.store.owners().items()
                    if owner != self.owner)
        return self._tier_capacity(tier) - taken

    def _budget_name(self) -> str:
        tier = self.compute_tier
        if self._explicit:
            return f"the share of tier {tier!r} reserved for {self.owner}"
        taken = self._tier_capacity(tier) - self._budget()
        return f"tier {tier!r}" + (f", less {format_size(taken)} reserved by other owners" if taken else "")

    def reserve_working_set(self) -> None:
        """Elastic: guarantee the streaming floor plus the resident units (what this model holds
        between forwards) when the tier can grant it, else the floor alone, else nothing."""
        if not self._explicit:
            self._claim_share(self.compute_res, [self._floor + self._resident_bytes(device=True), self._floor])
        if self.host_res is not self.compute_res and not self.host_res.reserved:
            self._claim_share(self.host_res, [self._host_floor + self._resident_bytes(device=False),
                                              self._host_floor])

    def _claim_share(self, res, sizes: list[int]) -> None:
        for n in sizes:
            try:
                res.resize(n)
                return
            except StoreError:
                pass
            if self.claim_room(res, n):
                try:
                    res.resize(n)
                    return
                except StoreError:
                    pass
        # elastic: compete for what is free

    def claim_room(self, res, nbytes: int) -> bool:
        """Make ``nbytes`` of ``res``'s tier free at once: allocating them asks idle owners to give
        room back (their ``on_pressure``); cached copies are dropped to merge what is left."""
        for attempt in range(2):
            try:
                res.alloc(nbytes, wait=0.0).release()
                return True
            except OutOfBudget:
                if attempt == 0:
                    self._make_room()
        return False

    def _resident_bytes(self, device: bool) -> int:
        return sum(u.nbytes for u in self.units if (u.resident if device else u.host_resident))

    def _shrink_share(self, res) -> None:
        """After giving residents back, an elastic model's share is its working set again."""
        if res is None or (res is self.compute_res and self._explicit) or not res.reserved:
            return
        compute = res is self.compute_res  # on a CPU the residents are the compute tier's
        floor = self._floor if compute else self._host_floor
        try:
            res.resize(min(res.reserved, floor + self._resident_bytes(device=compute)))
        except StoreError:
            pass  # shrinking is never refused; a closed store is

    # -- planning -------------------------------------------------------------------------
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
        if largest.nbytes + parents > budget and not self._explicit:
            # other owners' working sets leave too little: those idle give theirs back
            self.claim_room(self.compute_res, largest.nbytes + parents)
            budget = self._budget()
        if largest.nbytes + parents > budget:
            raise OffloadError(
                f"compute budget {format_size(budget)} ({self._budget_name()}) is smaller than unit "
                f"{largest.name or '<root>'!r} ({format_size(largest.nbytes)})"
                + (f" plus enclosing units ({format_size(parents)})" if parents else "")
                + "; raise the budget or split the unit with units=[...]"
            )
        # the host tier staging a device cache's copies: the model's own share of it when one is set
        host = budget if not self._two_level else (self.host_res.reserved or self._left_by_others("host"))
        if self._two_level and host < 2 * largest.nbytes:
            raise OffloadError(
                f"host tier of {format_size(host)} cannot stage unit {largest.name or '<root>'!r} "
                f"({format_size(largest.nbytes)}) twice; raise [tiers.host] capacity")
        want = self.config.offload.lookahead
        # Prefetches take whatever budget is free when they are issued (and are skipped,
        # then read on demand, when it is not), so the lookahead is not cut to what k copies
        # of the largest unit would need: most units are far smaller than the largest
        # (embeddings, head). The floor below only sizes the resident set.
        self.lookahead = 2 if want is None else want
        self.stats.lookahead = self.lookahead
        # Residents are planned around one streaming unit: when weights stream faster than
        # they compute (decoding), bytes not read at all save more than reading ahead does
        window = largest.nbytes
        if self._two_level:
            self._floor = parents + window
            self._host_floor = parents + window + largest.nbytes
            self._host_resident_budget = host - self._host_floor
            self._resident_budget = budget - self._floor
        else:
            # the ring can waste up to a unit where it wraps: the residents leave one spare, which
            # is not reserved (another model streaming meanwhile may use it)
            spare = largest.nbytes if (host - parents) // largest.nbytes - 2 >= 0 else 0
            self._floor = self._host_floor = parents + window
            self._host_resident_budget = 0
            self._resident_budget = budget - self._floor - spare
        # experts first get the room one token's experts (and as many read ahead) need, then what
        # resident units leave (pin_residents)
        self._expert_floor = self.expert_floor()
        self._resident_budget -= self._expert_floor
        # the least room pin_residents can leave experts (residents only take a non-negative
        # remainder): refused here, before any weight leaves the model
        self.check_expert_room(self._expert_floor + min(self._resident_budget, 0))

    def pin_residents(self) -> None:
        left, host_left = self._resident_budget, self._host_resident_budget
        if not self.config.offload.resident:
            self.plan_experts(self._expert_floor + left)
            return
        for u in self.units:
            if u.nbytes <= left:
                left -= u.nbytes
                u.resident = True
                self.stats.resident_bytes += u.nbytes
            elif u.nbytes <= host_left:
                host_left -= u.nbytes
                u.host_resident = True
                self.stats.host_resident_bytes += u.nbytes
        self.plan_experts(self._expert_floor + left)

    def hold_residents(self) -> None:
        """Load what stays: resident units bound on the compute device, host-resident ones pinned."""
        for u in self.units:
            if u.resident or (u.host_resident and self.dcache is None):
                self._acquire(u, Priority.DEMAND)
            elif u.host_resident:  # the device cache copies from these pinned host copies each forward
                for k in u.keys:
                    if k not in u.host_pins:
                        u.host_pins[k] = self.store.acquire(k, wait=_WAIT, owner=self.owner).result(timeout=_WAIT)
        for u in self.units:
            if u.resident or u.host_resident:
                self._collect(u)
        if self.dcache is not None:
            self._resident_ranges = [(lease.offset, lease.offset + lease.nbytes)
                                     for u in self.units if u.resident for lease in u.leases.values()]

    # -- the device cache -----------------------------------------------------------------
    def open_device_cache(self) -> None:
        """The device cache over the compute reservation: on by default on CUDA (``[offload]
        device_cache``). On a CPU device it only adds a copy; forcing it there (with a
        ``device = "cpu"`` tier) is how its path is tested."""
        if self._wants_device_cache:
            if self._bundled:
                raise OffloadError("[offload] device_cache = true (or expert units on CUDA) cannot serve the bundled "
                                   "layout (each FFN weight would be copied contiguous beside the cached bytes, "
                                   "twice the budget); use layout = \"packed\", or device_cache = false and "
                                   "experts = false")
            self.dcache = DeviceCache(self.store, self.compute_res, limit=self._budget(), wait=_WAIT).open()

    def close_device_cache(self) -> None:
        if self.dcache is not None:
            dcache, self.dcache = self.dcache, None
            dcache.close()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def _wants_device_cache(self) -> bool:
        want = self.config.offload.device_cache
        if want is None:  # the bundled layout's strided views would be copied beside the cache's bytes;
            # expert units on CUDA live in the device cache (a bundled layout is refused with them)
            return self.cuda and (not self._bundled or bool(self.banks))
        return want

    @property
    def _two_level(self) -> bool:
        """Compute memory apart from the host arena (CUDA, or a device cache forced on a CPU)."""
        return self.cuda or self._wants_device_cache

    # -- giving back ------------------------------------------------------------------------
    def host_pinned_bytes(self) -> int:
        """Host bytes this model keeps pinned between forwards (its resident units)."""
        return sum(u.nbytes for u in self.units if (u.resident and not self._two_level) or u.host_resident)

    def _idle(self) -> bool:
        """No forward, backward, state_dict(), detach() or unit lease in progress (under ``_idle_lock``)."""
        return not (self._running or self._busy or self._finished or self._saved or self._bw_hold)

    def _give_back_compute(self, wanted: int) -> int:
        """``on_pressure`` of the compute tier: another owner finds no room. An idle model gives
        back its prefetches, then (elastic only) its resident units, which stream from then on.
        Nothing for another model's prefetch (it is skipped and read on demand instead)."""
        if getattr(prefetching, "active", False):
            return 0
        with self._idle_lock:
            if not self._idle():
                return 0
            held = self.compute_res.held if self.dcache is not None else 0
            freed = self._drop_prefetches(keep=None)
            if self.dcache is not None:
                self.dcache.trim()
                freed = held - self.compute_res.held
            if freed < wanted and not self._explicit and not self._graph:  # autograd may hold resident views
                freed += self._give_back_residents(device=True)
                if self.dcache is not None:
                    self.dcache.trim()
                    freed = held - self.compute_res.held
                self._shrink_share(self.compute_res)
            return freed

    def _give_back_host(self, wanted: int) -> int:
        """``on_pressure`` of the host tier when it is not the compute tier: the pinned host copies
        of host-resident units."""
        if getattr(prefetching, "active", False):
            return 0
        with self._idle_lock:
            if not self._idle() or self._graph:
                return 0
            freed = self._give_back_residents(device=False)
            self._shrink_share(self.host_res)
            return freed

    def _give_back_residents(self, device: bool) -> int:
        """Unpin the resident (``device``) or host-resident units; the bytes given back."""
        freed = 0
        for u in self.units:
            if not (u.resident if device else u.host_resident):
                continue
            if u.resident:
                self.stats.resident_bytes -= u.nbytes
            else:
                self.stats.host_resident_bytes -= u.nbytes
            freed += u.nbytes
            u.resident = u.host_resident = False
            self._unbind(u)
            self._drop_pending(u)
            self._release(u)
            for lease in u.host_pins.values():
                lease.release()
            u.host_pins.clear()
        if freed and self.dcache is not None:
            self._resident_ranges = []
        if device or not self._two_level:
            freed += self.drop_experts()
        return freed

    def mark_busy(self) -> None:
        with self._idle_lock:
            self._busy += 1

    def unmark_busy(self) -> None:
        with self._idle_lock:
            self._busy -= 1
