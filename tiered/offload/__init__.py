"""``tiered.offload(model)``: run a module whose weights live in the tiered store.

The package's modules, by job: :mod:`.runtime` (the runtime attached to a model, its
forward hooks and loading), :mod:`.units` (the public unit API for workloads that update
the weights in place: optimizers, zeroth-order training). ``offload``, ``detach`` and
``offload_stats`` are re-exported by :mod:`tiered`.
"""

from .runtime import (  # noqa: F401
    OffloadedModule,
    OffloadError,
    OffloadStats,
    UnitEdit,
    _model_prefix,
    detach,
    offload,
    offload_stats,
)
from .units import OffloadUnits, Unit, UnitLease, offload_units  # noqa: F401

__all__ = ["OffloadError", "OffloadStats", "OffloadUnits", "OffloadedModule", "Unit", "UnitEdit", "UnitLease",
           "detach", "offload", "offload_stats", "offload_units"]
