"""Checkpoints on the tiers: lazy, asynchronous, multi-level, crash-safe (issue 8).

- :class:`LazyCheckpointer` — ``save`` returns at once; tensors are snapshotted in the
  background before the optimizer mutates them, written through the :class:`~tiered.TieredStore`
  (its host tier, then retained objects on a storage tier) -> optional zarr cold tier.
- :class:`TieredStorageWriter` / :class:`TieredStorageReader` — the same crash safety and
  tiers behind ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.async_save``).
- :class:`DistributedCheckpointer` — lazy checkpoints of every rank of a ``torch.distributed``
  job, committed as one global step (also a DCP checkpoint: :func:`load_resharded` loads it at
  another world size), optionally with peer snapshots in the next rank's memory.
"""

from .format import CheckpointChecksumError, CheckpointError
from .lazy import CheckpointHandle, LazyCheckpointer, StoreRef

__all__ = ["CheckpointChecksumError", "CheckpointError", "CheckpointHandle", "DistributedCheckpointer",
           "LazyCheckpointer", "StoreRef", "TieredStorageReader", "TieredStorageWriter", "load_resharded"]


def __getattr__(name: str):
    # the DCP backend imports torch.distributed, which plain checkpointing does not need
    if name in ("TieredStorageReader", "TieredStorageWriter"):
        from . import dcp

        return getattr(dcp, name)
    if name in ("DistributedCheckpointer", "load_resharded"):
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
