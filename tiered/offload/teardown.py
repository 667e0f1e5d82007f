"""Taking an offloaded model apart: in-memory weights again, objects kept or deleted, pins given back."""

from __future__ import annotations

import os

from tiered.io_engine import Priority

from .. import offload_life
from .common import _WAIT


class _Teardown:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: detach and cleanup."""

    def materialize(self) -> None:
        """Give every parameter its own in-memory copy again (for ``detach``)."""
        for u in self.units:
            self._acquire(u, Priority.DEMAND)
            self._collect(u)
            for s in u.slots:
                view = s.source(u.leases[s.key].tensor)
                s.tensor().data = view.to(self.device, copy=True).contiguous()
            self._release(u)
        self.materialize_banks()

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
        self.drop_experts()

    def keep_objects(self) -> None:
        """Make the model's objects durable (``detach(keep=True)``): those written as this
        process's scratch (packed units, and checkpoint tensors updated by training), which the
        store deletes when it closes, are written again as durable."""
        for key in dict.fromkeys([k for u in self.units for k in u.keys] + self.bank_keys()):
            if not self.store.meta(key)["ephemeral"]:
                continue
            lease = self.store.acquire(key, wait=_WAIT, owner=self.owner).result(timeout=_WAIT)
            try:
                self.store.put(key, lease.tensor, kind="weight", owner=self.owner).result(timeout=_WAIT)
            finally:
                lease.release()

    def delete_objects(self) -> None:
        for key in dict.fromkeys([k for u in self.units for k in u.keys] + self.bank_keys()):
            if key in self.store:
                self.store.delete(key)

    def abandon(self) -> None:
        """Give back what a model dropped without ``detach`` held: pins, device cache, its
        objects and its store handle (see :mod:`tiered.offload_life`)."""
        if self._finished:
            return
        self._finished = True
        if not self.store.is_open:  # a store the caller owns, closed already: it took all of it along
            return
        try:
            self.remove_hooks()
            self.release_all()
        finally:
            try:
                self.close_device_cache()
                self.close_pools()
                self.close_reservations()
            finally:
                try:
                    self.delete_objects()
                finally:
                    if self.owns_store:
                        self.store.close()

    def __del__(self) -> None:
        if not self._finished and self._pid == os.getpid():
            offload_life.orphaned(self)
