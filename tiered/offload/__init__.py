"""``tiered.offload(model)``: run a module whose weights live in the tiered store.

Each *unit* (by default every transformer block, plus the modules owning the
remaining parameters: embeddings, norms, head) is one store object holding
its parameters packed together, so loading a block is one large read. Hooks
bind a unit's parameters to zero-copy views of its host copy just before the
unit's forward and unbind them after, following accelerate's hook lifecycle
(``always_call`` post-hooks, and ``detach`` that removes every hook), plus
the overlap accelerate lacks: the execution order is learned from the first
forward, and while unit *i* computes, units *i+1..i+k* are already being read
(wrapping around into the next forward, which is what decoding needs).

The store owns every byte: the model is the store owner ``offload/<model prefix>``;
its host copies, device copies and objects are charged to it, and its compute budget
is a reservation of the host tier (CPU) or of the store's GPU tier (CUDA): the
``share`` given to ``offload``, else the config's ``[owners.offload]`` share, else
elastic. Units that fit in what the streaming window leaves over stay resident, and
are given back when another owner of the store finds no room while this model is idle.
On CUDA units reach the GPU through a :class:`~tiered.DeviceCache` over the GPU tier
unless ``[offload] device_cache = false``.

Lifecycle: ``offload()`` packs and writes the weights as ephemeral objects (the
store deletes them when it closes, or on its next open after a crash), takes a
handle on this process's shared store for the config unless given one, installs
hooks; ``detach()`` restores ordinary in-memory parameters, removes the hooks,
deletes the objects (``keep=True``: makes them durable instead) and closes what
``offload()`` opened. A model dropped without ``detach`` is cleaned up once
collected (:mod:`tiered.offload_life`). ``state_dict()`` reads the real weights
from the store (:mod:`tiered.offload_state`).

Modules, by job: :mod:`.layout` (unit discovery and packing), :mod:`.budget`
(reservations, residents, giving back), :mod:`.runtime` (the hooks), :mod:`.loading`
(loading, binding, prefetching), :mod:`.training` (backward and write-back),
:mod:`.teardown`, :mod:`.stats`, :mod:`.api` (``offload``/``detach``/``offload_stats``),
:mod:`.units` (the public unit API for optimizers and other workloads), and for mixture-of-experts
models :mod:`.experts` (expert banks: one object per expert, sparse slabs) and :mod:`.expert_cache`
(only routed experts read, the next layers' experts read ahead, a frequency-aware cache).
"""

from .api import detach, offload, offload_stats
from .common import OffloadError
from .layout import _model_prefix  # noqa: F401 - used by tiered.pretrained
from .runtime import OffloadedModule
from .stats import OffloadStats
from .training import UnitEdit
from .units import OffloadUnits, Unit, UnitLease, offload_units

__all__ = ["OffloadError", "OffloadStats", "OffloadUnits", "OffloadedModule", "Unit", "UnitEdit", "UnitLease",
           "detach", "offload", "offload_stats", "offload_units"]
