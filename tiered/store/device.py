"""The GPU tier: one region of device memory reserved once (on first use), carved into buffers
charged to owners (offloaded models' device caches, KV caches), so every GPU workload of a
process shares one budget, the ``[tiers.<name>] kind = "device"`` tier's capacity.

A device tier whose ``device`` is ``"cpu"`` runs the same code on a machine without a GPU
(that is how its paths are tested)."""

from __future__ import annotations

import time

from allocators import DeviceArena, DeviceBuffer, OutOfBudget

from .errors import StoreError
from .objects import DEFAULT_OWNER


class _DeviceTier:
    """Part of :class:`~tiered.store.TieredStore` (see its docstring)."""

    def _device_arena_or_none(self) -> DeviceArena | None:
        return self._device_region

    def _device_arena(self) -> DeviceArena:
        """The GPU tier's region, reserved on first use."""
        if self._device_tier is None:
            raise StoreError(f"{self.config.source}: no device tier (e.g. [tiers.gpu] kind = \"device\"); "
                             "the store has no GPU budget to give")
        with self._lock:
            if self._device_region is None:
                spec = self._device_tier
                device = spec.device or "cuda:0"
                if device.startswith("cuda"):
                    import torch

                    if not torch.cuda.is_available():
                        raise StoreError(f"tier {spec.name!r} of {self.config.source} is on {device}, "
                                         "but this machine has no CUDA device")
                try:
                    self._device_region = DeviceArena(spec.capacity, device).open()
                except OutOfBudget as e:
                    raise StoreError(f"tier {spec.name!r}: {e}") from None
            return self._device_region

    @property
    def device_tier(self) -> str | None:
        """The name of the store's GPU tier, or None."""
        return None if self._device_tier is None else self._device_tier.name

    def _alloc_device(self, nbytes: int, wait: float | None = None, owner: str = DEFAULT_OWNER) -> DeviceBuffer:
        """A buffer of the GPU tier charged to ``owner``: when none fits, other owners are asked
        to give memory back (their reservations' ``on_pressure``), then it waits up to ``wait``
        (default ``host_wait``) seconds for buffers to be released."""
        arena = self._device_arena()
        wait = self.host_wait if wait is None else wait
        deadline = time.monotonic() + wait
        if nbytes > arena.limit_for(owner):
            raise OutOfBudget(f"tier {self._device_tier.name!r}: {nbytes} bytes for owner {owner!r} cannot fit beside "
                              f"the other owners' shares ({self._describe_owners(self._device_tier.name)})")
        relieved_late = False  # past the deadline, one more round after others gave memory back
        while True:
            seen = arena.changes
            buf = arena.try_alloc(nbytes, owner=owner)
            if buf is not None:
                return buf
            remaining = deadline - time.monotonic()
            if (remaining > 0 or not relieved_late) and self._relieve(self._device_tier.name, nbytes, owner) \
                    and arena.changes != seen:
                relieved_late = remaining <= 0
                continue
            if remaining <= 0:
                st = arena.stats()
                raise OutOfBudget(f"tier {self._device_tier.name!r}: no room for {nbytes} bytes for owner {owner!r} "
                                  f"within {wait} s ({st.in_use} of {st.capacity} bytes held; "
                                  f"{self._describe_owners(self._device_tier.name)})")
            arena.wait_change(seen, min(0.05, remaining))
