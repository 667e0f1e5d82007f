"""Training through offloaded weights: saved tensors fetched again in backward, weights written back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tiered.io_engine import Priority, gather

from ..store import Lease, TieredStore
from .activations import SavedActivation, check_version
from .common import _WAIT, OffloadError
from .layout import _Unit


@dataclass(frozen=True)
class _SavedWeight:
    """A saved-for-backward tensor that views a unit's weights: fetched again on unpack."""

    unit: int
    key: str
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int  # elements into the host copy's storage; with a device cache, bytes into the object's copy
    in_region: bool = False  # a view of the device cache's region (its copy there is refetched)


class _Kept:
    """A saved tensor kept as it is, with its version when saved: with saved-tensor hooks
    autograd leaves the check for in-place changes before backward to the hooks."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int) -> None:
        self.tensor, self.version = tensor, version


def _saved_view(copy: torch.Tensor, h: _SavedWeight) -> torch.Tensor:
    """The saved tensor ``h`` describes, as a view of the unit's copy fetched again."""
    storage = copy.untyped_storage()
    if not h.in_region:
        return torch.empty(0, dtype=h.dtype).set_(storage, h.offset, h.shape, h.stride)
    at = copy.data_ptr() - storage.data_ptr() + h.offset  # bytes into the region
    item = torch.empty(0, dtype=h.dtype).element_size()
    return torch.empty(0, dtype=h.dtype, device=copy.device).set_(storage, at // item, h.shape, h.stride)


class UnitEdit:
    """Writable host copies of some units' objects (see ``OffloadedModule.open_unit_params``)."""

    def __init__(self, on_end: Callable[[], None] | None = None) -> None:
        self.tensors: dict[str, tuple[_Unit | None, torch.Tensor]] = {}  # key -> (unit holding it, bytes)
        self.leases: dict[str, Lease] = {}  # leases taken for the edit (units not loaded)
        self.views: dict[int, list[torch.Tensor]] = {}  # id(parameter) -> its views in those copies
        self.store: TieredStore | None = None
        self._on_end = on_end  # the model is busy (keeps its units) until the edit is written or abandoned

    def abandon(self) -> None:
        """Give the copies back unwritten; copies changed in place are dropped from the cache."""
        try:
            for k, lease in self.leases.items():
                lease.release()
                if self.store is not None and k in self.store:
                    self.store.evict(k)
            self.leases.clear()
            self.tensors.clear()
        finally:
            self.end()

    def end(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()



class _Training:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: backward and write-back."""

    def _map_storages(self, u: _Unit) -> None:
        for k, lease in u.leases.items():
            self._storage_of[lease.tensor.untyped_storage().data_ptr()] = (u, k)

    def _pop_saved_hooks(self) -> None:
        if self._sth is not None:
            sth, self._sth = self._sth, None
            sth.__exit__(None, None, None)

    def _pack(self, t: torch.Tensor):
        """A saved tensor that views a streamed unit's weights becomes a handle fetching them
        again; with ``[offload] activations = "host"`` other large ones go into the store; the
        rest are kept with their version, which unpack checks as autograd would."""
        out = self._pack_weight(t)
        if out is t and self.activations is not None:
            out = self.activations.pack(t)
        if out is not t:
            return out
        # a node's output saved as itself would hold the node (its grad_fn): a reference cycle
        # keeping the graph, and all it saved, alive after a forward whose backward never runs
        return _Kept(t.detach() if t.grad_fn is not None else t, t._version)

    def _wrapper_memory(self, t: torch.Tensor) -> bool:
        """``t`` is memory the wrapper manages: in the host arena (units' host copies), the
        device cache, or a copy a unit is bound to."""
        if self.dcache is not None and self.dcache.offset_of(t) is not None:
            return True
        ptr = t.untyped_storage().data_ptr()
        arena = self.store.arena
        if arena is not None and arena.address <= ptr < arena.address + arena.capacity:
            return True
        return any(view.untyped_storage().data_ptr() == ptr for u in self.units for _s, view in u.bound)

    def _pack_weight(self, t: torch.Tensor):
        """A saved tensor that views a streamed unit's copy becomes a handle (the memory goes
        back to the budget, the copy is fetched again in backward); everything else is saved
        as usual."""
        if self.dcache is not None:
            return self._pack_device(t)
        if not self._storage_of or t.layout is not torch.strided or t.device.type != "cpu":
            return t
        hit = self._storage_of.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        u, key = hit
        if u.resident or u.host_resident or key not in u.leases:
            return t  # stays in memory anyway
        self._count_saved(u)
        return _SavedWeight(u.index, key, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def _pack_device(self, t: torch.Tensor):
        """With a device cache: a view of a non-resident unit's copy in the cache's region becomes
        a handle (the region is refilled with other units once this one is released)."""
        if t.layout is not torch.strided:
            return t
        at = self.dcache.offset_of(t)
        if at is None or any(lo <= at < hi for lo, hi in self._resident_ranges):
            return t
        for u in self.units:
            if u.resident or not u.bound:
                continue
            for key, lease in u.leases.items():
                if lease.offset <= at < lease.offset + lease.nbytes:
                    self._count_saved(u)
                    return _SavedWeight(u.index, key, t.dtype, tuple(t.shape), tuple(t.stride()),
                                        t.data_ptr() - lease.tensor.data_ptr(), in_region=True)
        raise OffloadError(f"a tensor saved for backward views the device cache at byte {at}, "
                           "in no unit bound now")

    def _count_saved(self, u: _Unit) -> None:
        if u.index not in self._saved or self._saved[u.index] == 0:
            self._bw_order.append(u.index)
        self._saved[u.index] = self._saved.get(u.index, 0) + 1

    def _unpack(self, h):
        if self.activations is not None:
            self.activations.drain_after_backward()
        if isinstance(h, _Kept):
            check_version(h.tensor, h.version)  # a detached alias shares the version counter
            return h.tensor
        if isinstance(h, SavedActivation):
            return self.activations.unpack(h)
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
        out = _saved_view(u.leases[h.key].tensor, h)
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
            if self._saved.get(v.index, 0) > 0 and not v.active and not v.resident and not self._keeps_host_copy(v) \
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
            if not u.active and not u.resident and not self._keeps_host_copy(u):
                self._drop_pending(u)
                self._release(u)
        self._bw_done = keep

    def finish_backward(self) -> None:
        """Give back every unit still held for backward (called between steps)."""
        self._release_recomputed()
        for i in list(self._bw_hold):
            u = self.units[i]
            if u not in self._bw_done:
                self._bw_done.append(u)
        self._release_unused(force=True)
        for u in self.units:
            if u.leases and not u.active and not u.resident and not self._keeps_host_copy(u):
                self._release(u)
        self._saved.clear()
        with self._idle_lock:
            self._graph = False  # resident units may be given back again

    def _keeps_host_copy(self, u: _Unit) -> bool:
        """``u``'s leases are the pinned host copies it keeps between forwards (without a device
        cache; with one, a host-resident unit's device copies come and go like a streamed one's)."""
        return u.host_resident and self.dcache is None

    def check_trainable(self) -> None:
        """Updating weights in place needs each parameter's bytes in the store objects themselves,
        or in device copies the store's versions are placed from (the device cache)."""
        self._refuse_unshared_device_copies("training offloaded weights")
        for u in self.units:
            for s in u.slots:
                if s.bundle is not None:
                    raise OffloadError(f"unit {u.name!r}: the bundled layout cannot be trained; "
                                       "offload with layout='packed'")

    def _refuse_unshared_device_copies(self, what: str) -> None:
        """On CUDA without the device cache, units are bound to device copies made per forward
        apart from the host copies an edit writes: a change would reach one and not the other."""
        if self.cuda and self.dcache is None:
            raise OffloadError(f"{what} on {self.device} needs the device cache ([offload] device_cache = true "
                               "or \"auto\"); with device_cache = false the bound device copies are not the "
                               "store's")

    def open_unit_params(self, u: _Unit) -> "UnitEdit":
        """Writable host copies of ``u``'s objects and of every other unit holding one of its
        parameters (tied weights); ``edit.views[id(param)]`` lists that parameter's views."""
        params = {id(s.tensor()) for s in u.slots if not s.is_buffer}
        units = [u] + [v for v in self.units if v is not u and any(id(s.tensor()) in params for s in v.slots)]
        self.mark_busy()  # a resident unit's copies are edited in place: it is not given back meanwhile
        edit = UnitEdit(self.unmark_busy)
        try:
            for v in units:
                for k in v.keys:
                    if k not in edit.tensors:
                        self._open_copy(v, k, edit)
                for s in v.slots:
                    if not s.is_buffer and id(s.tensor()) in params:
                        edit.views.setdefault(id(s.tensor()), []).append(s.source(edit.tensors[s.key][1]))
        except BaseException:
            edit.abandon()
            raise
        edit.store = self.store
        return edit

    def _open_copy(self, v: _Unit, k: str, edit: "UnitEdit") -> None:
        """The copy of ``v``'s object ``k`` an edit changes: the bound one where the unit keeps it
        (so its next forward sees the change; with a device cache, a resident unit's device copy),
        else a host copy leased from the store. A streamed unit's device copy is not edited: the
        new version the edit writes is copied in again when the unit is next placed."""
        if k in v.leases and (self.dcache is None or v.resident):
            edit.tensors[k] = (v, v.leases[k].tensor)
        else:
            lease = self.store.acquire(k, wait=_WAIT, owner=self.owner).result(timeout=_WAIT)
            edit.leases[k] = lease
            edit.tensors[k] = (None, lease.tensor)

    def write_unit_params(self, edit: "UnitEdit") -> None:
        """Write the objects of ``edit`` back as new versions (their leases outlive the puts)."""
        try:
            for k, (owner, t) in edit.tensors.items():
                f = self.store.put(k, t, kind="weight", ephemeral=self._ephemeral(k), owner=self.owner)
                self._writes.append(f)
                if owner is not None:
                    owner.writing = [w for w in owner.writing if not w.done()] + [f]  # resident units never release
                elif k in edit.leases:
                    lease = edit.leases.pop(k)
                    f.add_done_callback(lambda _f, lease=lease: lease.release())
            edit.tensors.clear()
        finally:
            edit.end()

    def write_unit(self, u: _Unit) -> None:
        """Write the objects ``u`` has bound back as new versions (after changing them in place)."""
        for k, lease in u.leases.items():
            f = self.store.put(k, lease.tensor, kind="weight", ephemeral=self._ephemeral(k), owner=self.owner)
            self._writes.append(f)
            u.writing = [w for w in u.writing if not w.done()] + [f]  # resident units never release

    def wait_writes(self) -> None:
        """Wait until every weight update is durable; release what backward still held."""
        writes, self._writes = self._writes, []
        try:
            gather(writes).result(timeout=_WAIT)  # waits for every put; raises the first error
            if self.dcache is not None:
                self._drop_stale_device_copies()
        finally:
            self.finish_backward()

    def _drop_stale_device_copies(self) -> None:
        """With a device cache, an edit changes host copies, not the device copies units hold:
        copies placed ahead (a prefetch begun before the new versions were written) are given
        back, to be placed again at their current version; host-resident units pin the new
        versions' host copies instead of the old ones (held twice otherwise)."""
        for u in self.units:
            if u.pending and not u.active and not u.bound and not u.resident and self._placed_stale(u):
                self._drop_pending(u)
            for k, lease in list(u.host_pins.items()):
                if self.store.meta(k)["version"] != lease.version:
                    del u.host_pins[k]
                    lease.release()  # first: on a full host tier the new copy needs the old one's room
                    u.host_pins[k] = self.store.acquire(k, wait=_WAIT, owner=self.owner).result(timeout=_WAIT)

    def _placed_stale(self, u: _Unit) -> bool:
        """Some copy placed ahead for ``u`` is of an older version than the store's (or failed)."""
        for k, f in u.pending.items():
            try:
                lease = f.result(timeout=_WAIT)
            except Exception:  # noqa: BLE001 - the load that uses it reports the error
                return True
            if lease.version != self.store.meta(k)["version"]:
                return True
        return False

    def _drop_stale_prefetches(self, u: _Unit) -> None:
        """Reads of ``u``'s objects (and of units tying its parameters) started before new
        values are written would bind the old bytes in the next forward: give them back."""
        params = {id(s.tensor()) for s in u.slots if not s.is_buffer}
        for v in self.units:
            if v is u or any(id(s.tensor()) in params for s in v.slots):
                if v.pending and not v.active and not v.bound:
                    self._drop_pending(v)

    def load_values(self, values: dict[int, torch.Tensor]) -> None:
        """``load_state_dict``: write ``values`` (``id(parameter or buffer)`` -> new value) into
        every unit holding that tensor (tied weights: each copy) as new versions, since the
        parameters are placeholders between forwards; returns once the writes are durable."""
        if not values:
            return
        self._refuse_unshared_device_copies("load_state_dict into an offloaded model")
        for u in self.units:
            if not any(id(s.tensor()) in values for s in u.slots):
                continue
            self._drop_stale_prefetches(u)
            edit = self.open_unit_params(u)
            try:
                with torch.no_grad():
                    for s in u.slots:
                        v = values.get(id(s.tensor()))
                        if v is not None:
                            s.source(edit.tensors[s.key][1]).copy_(v)
            except BaseException:
                edit.abandon()
                raise
            self.write_unit_params(edit)
        self.wait_writes()
