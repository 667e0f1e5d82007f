"""``tiered bench replay``: run placement/migration policies over a trace, simulated or for real.

* ``sim`` replays the trace through :func:`policies.sim.simulate` against
  tier cost models (:mod:`.models`): speeds from the config's tiers (a storage tier's
  ``read_bandwidth``/``write_bandwidth`` when set, else typical NVMe figures),
  or measured by ``tiered probe --json`` (``--probe FILE``);
  capacities by default a fraction of the trace's footprint (the fast tier
  is ``--fast-fraction`` of it, 8% unless told: the regime where policies differ).
* ``real`` replays the trace through a live :class:`~tiered.store.TieredStore` of its own
  (:mod:`.real`): two storage tiers (fast and backing, directories on the config's storage
  tiers), the policy as the store's ``[policy] migration``, so the store's governor makes every
  move; closed loop, synchronous with the governor (``belady`` and ``rl`` run in sim mode only).

Both produce one row per policy (:mod:`.runner`): hit ratio per tier, mean and p99 latency,
bytes migrated, total time; learning policies also get a row over the final
window (``--window``, the last 20% of accesses) since they start cold. The
command is :mod:`.command`, the table and plot :mod:`.report`.
"""

from .command import add_replay_arguments, replay_main
from .models import choose_loop, measured_bandwidths, tier_models
from .real import ReplayDataError, check_live, run_real
from .record import record_workloads
from .report import format_table, plot_rows
from .runner import DEFAULT_POLICIES, rows_for, run_replay

__all__ = ["DEFAULT_POLICIES", "ReplayDataError", "add_replay_arguments", "check_live", "choose_loop", "format_table",
           "measured_bandwidths", "plot_rows", "record_workloads", "replay_main", "rows_for", "run_real", "run_replay",
           "tier_models"]
