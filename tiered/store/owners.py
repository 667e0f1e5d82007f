"""Owners: every workload (the module wrapper, the optimizer, the KV cache, the feature store, the
checkpointer...) takes its memory from the store's tiers under its own name, so the tiers'
budgets are shared and reported per workload.

A :class:`Reservation` is an owner's share of one tier. On the host and GPU tiers it allocates
buffers from the tier's arena charged to the owner; on a storage tier the owner's objects'
extents count against it. ``nbytes`` is a guarantee: other owners cannot take those bytes while
the owner does not use them (0: elastic, the owner competes for whatever is free). An owner that
caches data it could drop (rows, blocks, resident weights) passes ``on_pressure``: when another
owner cannot find room, the store calls it with the bytes wanted and it gives back what it can.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from ..sizes import parse_size
from .errors import StoreError
from .objects import DEFAULT_OWNER

if TYPE_CHECKING:
    from .core import TieredStore

#: ``on_pressure(nbytes_wanted) -> nbytes_given_back``
PressureCallback = Callable[[int], int]


class Reservation:
    """An owner's share of one tier of a store (see the module docstring and
    :meth:`TieredStore.reserve`). Close it (or use ``with``) to give the share back; buffers the
    owner still holds stay charged to it until released."""

    def __init__(self, store: "TieredStore", tier: str, owner: str, kind: str,
                 on_pressure: PressureCallback | None) -> None:
        self.store = store
        self.tier = tier
        self.owner = owner
        self.kind = kind  # "host" | "device" | "storage"
        self.on_pressure = on_pressure
        self._closed = False

    # -- figures ---------------------------------------------------------------------
    def _figures(self) -> dict:
        return self.store._owner_figures(self.tier).get(self.owner, {"held": 0, "peak": 0, "reserved": 0})

    @property
    def reserved(self) -> int:
        return self._figures()["reserved"]

    @property
    def held(self) -> int:
        return self._figures()["held"]

    @property
    def peak(self) -> int:
        return self._figures()["peak"]

    # -- use -------------------------------------------------------------------------
    def alloc(self, nbytes: int, wait: float | None = None):
        """A buffer of ``nbytes`` charged to this owner: a :class:`~allocators.HostBuffer` on the
        host tier (evicting cached copies, asking other owners to give memory back, then waiting
        up to ``wait`` seconds), a :class:`~allocators.DeviceBuffer` on the GPU tier."""
        self._check()
        if self.kind == "host":
            return self.store._alloc_host(nbytes, wait, self.owner)
        if self.kind == "device":
            return self.store._alloc_device(nbytes, wait, self.owner)
        raise StoreError(f"reservation of {self.owner!r} on storage tier {self.tier!r}: storage is allocated by "
                         f"put(..., owner={self.owner!r}), not alloc()")

    def resize(self, nbytes: int | str) -> None:
        """Change the guaranteed share (refused, naming the owners, when it would overcommit)."""
        self._check()
        self.store._set_share(self.tier, self.owner, self.store._share_bytes(self.tier, nbytes))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.store._end_reservation(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self) -> None:
        if self._closed:
            raise StoreError(f"reservation of {self.owner!r} on tier {self.tier!r} is closed")

    def __repr__(self) -> str:
        return f"<Reservation {self.owner!r} on {self.tier!r}: {self._figures()}>"


class _Owners:
    """Part of :class:`~tiered.store.TieredStore`: reservations, shares and per-owner figures."""

    def _init_owners(self) -> None:
        self._reservations: dict[tuple[str, str], Reservation] = {}
        self._relieving = threading.local()

    def reserve(self, tier: str, nbytes: int | str | None = None, *, owner: str,
                on_pressure: PressureCallback | None = None) -> Reservation:
        """``owner``'s share of ``tier`` ("host", a device tier's name such as "gpu", or a storage
        tier's name): ``nbytes`` bytes (a size such as "2GiB", or "25%" of the tier) that other
        owners cannot take; None takes the config's ``[owners.<owner>]`` entry, else 0 (elastic).
        Refused with a StoreError naming the tier, the owners and what they hold when the shares
        would overcommit the tier. One open reservation per owner and tier."""
        self._check_open()
        if not isinstance(owner, str) or not owner:
            raise StoreError(f"reserve({tier!r}): owner must be a non-empty name, got {owner!r}")
        tier = self._canonical_tier(tier)
        kind = self._tier_kind(tier)
        share = (self.config.share(owner, self._config_tier_name(tier)) if nbytes is None
                 else self._share_bytes(tier, nbytes))
        with self._lock:
            if (tier, owner) in self._reservations:
                raise StoreError(f"owner {owner!r} already holds a reservation on tier {tier!r}; close it first, "
                                 f"or use another owner name (e.g. {owner + '/2'!r})")
            self._set_share(tier, owner, share or 0)
            res = self._reservations[(tier, owner)] = Reservation(self, tier, owner, kind, on_pressure)
        return res

    def owners(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per owner and tier: ``held``, ``peak`` and ``reserved`` bytes."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for tier in self._tier_names():
            for owner, fig in self._owner_figures(tier).items():
                out.setdefault(owner, {})[tier] = fig
        return out

    # -- what the tiers know ---------------------------------------------------------------
    def _tier_names(self) -> list[str]:
        names = ["host"] + ([self._device_tier.name] if self._device_tier is not None else [])
        return names + list(self._tier_order)

    def _canonical_tier(self, tier: str) -> str:
        """The host tier answers to "host" and to its configured name."""
        host = self.config.host_tier
        return "host" if host is not None and tier == host.name else tier

    def _config_tier_name(self, tier: str) -> str:
        host = self.config.host_tier
        return host.name if tier == "host" and host is not None else tier

    def _tier_kind(self, tier: str) -> str:
        if tier == "host":
            return "host"
        if self._device_tier is not None and tier == self._device_tier.name:
            return "device"
        if tier in self._tiers:
            return "storage"
        raise StoreError(f"unknown tier {tier!r}; this store's tiers: {', '.join(self._tier_names())}")

    def _tier_capacity(self, tier: str) -> int:
        kind = self._tier_kind(tier)
        if kind == "host":
            return self.arena.capacity
        if kind == "device":
            return self._device_tier.capacity
        return self._tiers[tier].space.capacity

    def _share_bytes(self, tier: str, nbytes: int | str) -> int:
        if isinstance(nbytes, str) and nbytes.strip().endswith("%"):
            try:
                pct = float(nbytes.strip()[:-1])
            except ValueError:
                pct = -1.0
            if not 0 <= pct <= 100:
                raise StoreError(f"share {nbytes!r} of tier {tier!r}: expected a percentage from 0% to 100%")
            return int(self._tier_capacity(tier) * pct / 100)
        try:
            return parse_size(nbytes, where=f"share of tier {tier!r}")
        except ValueError as e:
            raise StoreError(str(e)) from None

    def _set_share(self, tier: str, owner: str, nbytes: int) -> None:
        from allocators import OutOfBudget

        kind = self._tier_kind(tier)
        if kind == "storage":
            self._set_storage_share(tier, owner, nbytes)
            return
        arena = self.arena if kind == "host" else self._device_arena()
        try:
            arena.set_share(owner, nbytes)
        except OutOfBudget as e:
            raise StoreError(f"tier {tier!r}: {e}") from None

    def _set_storage_share(self, tier: str, owner: str, nbytes: int) -> None:
        t = self._tiers[tier]
        with self._lock:
            others = sum(s for o, s in t.shares.items() if o != owner)
            in_use = t.used - t.held.get(owner, 0)
            if nbytes and (others + nbytes > t.space.capacity or
                           in_use + t.held_back(owner) + max(nbytes, t.held.get(owner, 0)) > t.space.capacity):
                holders = ", ".join(f"{o} holds {t.held.get(o, 0)} of share {t.shares.get(o, 0)}"
                                    for o in sorted(set(t.held) | set(t.shares)) if t.held.get(o) or t.shares.get(o))
                raise StoreError(f"tier {tier!r}: cannot reserve {nbytes} bytes for owner {owner!r}: the tier holds "
                                 f"{t.space.capacity} bytes, {others} are reserved by other owners and {in_use} are "
                                 f"in use by them ({holders or 'none'})")
            t.shares[owner] = nbytes

    def _owner_figures(self, tier: str) -> dict[str, dict[str, int]]:
        kind = self._tier_kind(tier)
        if kind == "storage":
            t = self._tiers[tier]
            with self._lock:
                names = set(t.held) | set(t.shares)
                return {o: {"held": t.held.get(o, 0), "peak": t.peak.get(o, 0), "reserved": t.shares.get(o, 0)}
                        for o in names}
        arena = self.arena if kind == "host" else self._device_arena_or_none()
        if arena is None:
            return {}
        return {o: {"held": s.held, "peak": s.peak, "reserved": s.reserved} for o, s in arena.owners().items()}

    def _describe_owners(self, tier: str) -> str:
        figs = self._owner_figures(tier)
        parts = [f"{o} holds {f['held']}" + (f" of share {f['reserved']}" if f["reserved"] else "")
                 for o, f in sorted(figs.items()) if f["held"] or f["reserved"]]
        return "by owner: " + (", ".join(parts) or "none")

    def _end_reservation(self, res: Reservation) -> None:
        """Give the share back, unless ``res`` is no longer the owner's reservation (the store was
        reopened, or the owner reserved anew): then it has nothing to give back."""
        with self._lock:
            if self._reservations.get((res.tier, res.owner)) is not res:
                return
            del self._reservations[(res.tier, res.owner)]
            if self._opened:
                self._set_share(res.tier, res.owner, 0)

    def _close_reservations(self) -> None:
        """The store closes: every reservation ends with it."""
        with self._lock:
            for res in self._reservations.values():
                res._closed = True
            self._reservations.clear()

    def _relieve(self, tier: str, nbytes: int, owner: str) -> bool:
        """Ask the other owners of ``tier`` that registered ``on_pressure`` for ``nbytes``; True
        when any gave memory back. First those holding more than their shares, for what is beyond
        them (freeing it helps at once); then, if that was not enough, the others (memory freed
        inside a share helps only when its owner also shrinks the share, as an elastic model's
        floor does). Not re-entered from inside a callback (a callback that allocates must not
        start another round)."""
        if getattr(self._relieving, "active", False):
            return False
        arena = self.arena if self._tier_kind(tier) == "host" else self._device_arena_or_none()
        over = arena.over_share() if arena is not None else {}
        with self._lock:
            helpers = [r for (t, o), r in self._reservations.items()
                       if t == tier and o != owner and r.on_pressure is not None]
        beyond = [(r, over[r.owner]) for r in helpers if over.get(r.owner, 0) > 0]
        within = [(r, None) for r in helpers if over.get(r.owner, 0) <= 0]
        self._relieving.active = True
        try:
            freed = 0
            for phase in (beyond, within):
                for r, cap in phase:
                    want = nbytes - freed if cap is None else min(nbytes - freed, cap)
                    freed += int(r.on_pressure(want) or 0)
                    if freed >= nbytes:
                        return True
            return freed > 0
        finally:
            self._relieving.active = False


__all__ = ["DEFAULT_OWNER", "PressureCallback", "Reservation"]
