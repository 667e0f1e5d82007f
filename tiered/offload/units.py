"""The public unit API: what workloads that change an offloaded model's weights in place
(:class:`~tiered.optim.OffloadedAdamW`, :class:`~tiered.optim.zo.ZOSGD`) use instead of the
runtime's internals.

``units = offload_units(model)`` lists the model's units (:class:`Unit`: name, store keys,
bytes, parameters) and lets a caller

- load a unit outside a forward and see its parameters bound to the host copy
  (``with units.load_unit(u) as lease: lease.views``), exactly as the unit's forward hooks
  do (a resident unit stays loaded; a unit loaded by a running forward is shared);
- write the bytes it changed in place back as new versions (``write_back_unit``), or open
  writable copies of a unit's parameters without binding them (``open_unit_params`` /
  ``write_unit_params``), then wait for every write (``wait_writes``);
- hear when backward fetches a unit's weights again (``on_backward_load``).

A lease must not be held across a forward of the model: a forward that starts releases
what an interrupted one left loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from .common import OffloadError
from .training import UnitEdit

if TYPE_CHECKING:
    from .layout import _Unit
    from .runtime import OffloadedModule


class Unit:
    """One unit of an offloaded model (a live view: ``resident`` follows the runtime)."""

    def __init__(self, rt: "OffloadedModule", u: "_Unit") -> None:
        self._rt = rt
        self._u = u

    @property
    def index(self) -> int:
        return self._u.index

    @property
    def name(self) -> str:
        return self._u.name

    @property
    def module(self) -> nn.Module:
        return self._u.module

    @property
    def keys(self) -> tuple[str, ...]:
        """The store objects holding the unit's tensors."""
        return tuple(self._u.keys)

    @property
    def nbytes(self) -> int:
        """Host bytes the unit takes while loaded."""
        return self._u.nbytes

    @property
    def resident(self) -> bool:
        """Kept loaded between forwards (on the compute device or in pinned host memory)."""
        return self._u.resident or self._u.host_resident

    @property
    def leaf(self) -> bool:
        """Encloses no other unit."""
        return self._rt._is_leaf_unit(self._u)

    @property
    def loaded(self) -> bool:
        """Its parameters are bound to the host copy now."""
        return bool(self._u.bound)

    def params(self) -> list[torch.Tensor]:
        """The model's parameters (not buffers) this unit holds, each once, in unit order.
        Outside a forward or lease they are placeholders: right shape and dtype, no data."""
        seen: dict[int, torch.Tensor] = {}
        for s in self._u.slots:
            if not s.is_buffer:
                seen.setdefault(id(s.tensor()), s.tensor())
        return list(seen.values())

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, the view it is bound to now) for each parameter of the loaded unit;
        writing into a view changes the unit's host copy (then :meth:`OffloadUnits.write_back_unit`)."""
        return [(s.tensor(), view) for s, view in self._u.bound if not s.is_buffer]

    def __repr__(self) -> str:
        return f"<Unit {self.index} {self.name or '<root>'!r} {self.nbytes} bytes>"


class UnitLease:
    """A unit loaded by :meth:`OffloadUnits.load_unit`; released by :meth:`release` or ``with``."""

    def __init__(self, units: "OffloadUnits", unit: Unit) -> None:
        self._units = units
        self.unit = unit
        self._held = True

    @property
    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.unit.views()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._units._unload(self.unit)

    def __enter__(self) -> "UnitLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Listener:
    def __init__(self, rt: "OffloadedModule", fn: Callable) -> None:
        self._rt, self._fn = rt, fn

    def remove(self) -> None:
        if self._fn in self._rt.backward_listeners:
            self._rt.backward_listeners.remove(self._fn)


class OffloadUnits:
    """The units of one offloaded model (see the module docstring)."""

    def __init__(self, rt: "OffloadedModule") -> None:
        self._rt = rt
        self._units = [Unit(rt, u) for u in rt.units]

    # -- what there is ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Unit]:
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)

    def __getitem__(self, which: int | str) -> Unit:
        return self.unit(which)

    def unit(self, which: "int | str | Unit") -> Unit:
        """A unit by index, name or itself."""
        if isinstance(which, Unit):
            if which._rt is not self._rt:
                raise OffloadError(f"unit {which.name!r} belongs to another offloaded model")
            return which
        if isinstance(which, int) and 0 <= which < len(self._units):
            return self._units[which]
        for u in self._units:
            if u.name == which:
                return u
        raise OffloadError(f"{self._rt.name} has no unit {which!r}; its units: "
                           f"{', '.join(repr(u.name) for u in self._units)}")

    @property
    def store(self):
        return self._rt.store

    @property
    def owner(self) -> str:
        """The store owner the model's memory is charged to."""
        return self._rt.prefix

    @property
    def lookahead(self) -> int:
        """Units read ahead of the one computing."""
        return self._rt.lookahead

    @property
    def budget(self) -> int:
        """Compute-tier bytes the model plans with: its share, or what other owners' shares leave
        (a workload that keeps more units loaded at once checks against this)."""
        return self._rt._budget()

    @property
    def resident_bytes(self) -> int:
        """Bytes of the units kept loaded between forwards."""
        return self._rt.stats.resident_bytes + self._rt.stats.host_resident_bytes

    def owns_param(self, p: torch.Tensor) -> bool:
        """``p`` is a parameter of one of the units."""
        return self._rt.owns_param(p)

    def check_trainable(self) -> None:
        """Raise OffloadError unless weights can be changed in place (CPU, packed layout)."""
        self._rt.check_trainable()

    # -- loading and writing back ------------------------------------------------------
    def load_unit(self, which: "int | str | Unit") -> UnitLease:
        """Bind ``which``'s parameters to its host copy (reading it unless loaded already) until
        the lease is released, as its forward hooks do; the model is busy meanwhile (other
        models of the store leave its units alone)."""
        unit = self.unit(which)
        rt, u = self._rt, unit._u
        rt.mark_busy()
        try:
            u.active += 1
            if u.active == 1 and not u.bound:
                rt._load(u)
        except BaseException:
            self._unload(unit)
            raise
        return UnitLease(self, unit)

    def _unload(self, unit: Unit) -> None:
        rt, u = self._rt, unit._u
        try:
            u.active -= 1
            if u.active == 0:
                rt._done_with(u)
        finally:
            rt.unmark_busy()

    def write_back_unit(self, which: "int | str | Unit") -> None:
        """Write the loaded unit's objects back as new versions (after changing its views in
        place); :meth:`wait_writes` waits for them."""
        unit = self.unit(which)
        if not unit.loaded:
            raise OffloadError(f"write_back_unit({unit.name!r}): the unit is not loaded; load_unit() it first")
        self.check_trainable()  # where views are copies (bundled layout, CUDA), writes would be lost
        self._rt.write_unit(unit._u)

    def open_unit_params(self, which: "int | str | Unit") -> UnitEdit:
        """Writable host copies of the unit's parameters (and of other units tying them):
        ``edit.views[id(param)]`` lists each parameter's views; give it to
        :meth:`write_unit_params`, or ``edit.abandon()`` it."""
        self.check_trainable()
        return self._rt.open_unit_params(self.unit(which)._u)

    def write_unit_params(self, edit: UnitEdit) -> None:
        """Write an edit's copies back as new versions; :meth:`wait_writes` waits for them."""
        self._rt.write_unit_params(edit)

    def wait_writes(self) -> None:
        """Wait until every write-back is durable (raises the first error)."""
        self._rt.wait_writes()

    def on_backward_load(self, fn: Callable[[Unit], None]) -> _Listener:
        """Call ``fn(unit)`` when backward reads a unit's weights again; ``.remove()`` stops it."""
        by_index = {u.index: u for u in self._units}

        def listener(u: "_Unit") -> None:
            fn(by_index[u.index])

        self._rt.backward_listeners.append(listener)
        return _Listener(self._rt, listener)


def offload_units(model: nn.Module) -> OffloadUnits:
    """The units of a model wrapped by :func:`tiered.offload` (one object per model: units
    compare by identity)."""
    rt = getattr(model, "_tiered", None)
    if rt is None:
        raise OffloadError(f"{type(model).__name__} is not wrapped by tiered.offload")
    if rt._public_units is None:
        rt._public_units = OffloadUnits(rt)
    return rt._public_units
