"""Host and device memory for the tiers: aligned/pinned arenas and byte budgets.

Imports nothing else of the project; everything above uses it.
"""

from .budget import Budget, BudgetStats, OutOfBudget
from .arena import NO_OWNER, Arena, OwnerStats
from .device_arena import DEVICE_ALIGN, DeviceArena, DeviceArenaStats, DeviceBuffer
from .device_budget import DeviceBudget
from .freelist import FreeList
from .host_arena import HUGE_PAGE, PAGE, ArenaStats, HostArena, HostBuffer, align_up, aligned_empty, anon_hugepage_bytes

__all__ = [
    "Arena", "DEVICE_ALIGN", "NO_OWNER", "OwnerStats", "ArenaStats", "Budget", "BudgetStats", "DeviceArena", "DeviceArenaStats", "DeviceBuffer", "DeviceBudget", "FreeList", "HUGE_PAGE", "HostArena",
    "HostBuffer", "OutOfBudget", "PAGE", "align_up", "aligned_empty", "anon_hugepage_bytes",
]
