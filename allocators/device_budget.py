"""The GPU tier's byte budget.

GPU memory is allocated by torch's caching allocator (or, for the device
cache, from one pre-reserved tensor); what the runtime must guarantee is
that the bytes *it* keeps resident never exceed the configured budget. This
is the same :class:`Budget` accounting the host arena reports, tied to a
device name so errors say which device is full.
"""

from __future__ import annotations

from .budget import Budget


class DeviceBudget(Budget):
    def __init__(self, capacity: int, device: str = "cuda:0") -> None:
        super().__init__(capacity, name=f"device budget {device}")
        self.device = device

    @classmethod
    def from_free_memory(cls, fraction: float = 0.8, device: str = "cuda:0") -> "DeviceBudget":
        """A budget of ``fraction`` of the device's currently free memory."""
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return cls(int(free * fraction), device)
