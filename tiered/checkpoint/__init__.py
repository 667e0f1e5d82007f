"""Checkpoints on the tiers: lazy, asynchronous, multi-level, crash-safe (issue 8).

- :class:`LazyCheckpointer` — ``save`` returns at once; tensors are snapshotted in the
  background before the optimizer mutates them, written through the :class:`~tiered.TieredStore`
  (its host tier, then retained objects on a storage tier) -> optional zarr cold tier.
- :class:`TieredStorageWriter` / :class:`TieredStorageReader` — the same crash safety and
  tiers behind ``torch.distributed.checkpoint`` (``dcp.save`` / ``dcp.async_save``).
"""

from .format import CheckpointChecksumError, CheckpointError
from .lazy import CheckpointHandle, LazyCheckpointer, StoreRef

__all__ = ["CheckpointChecksumError", "CheckpointError", "CheckpointHandle", "LazyCheckpointer", "StoreRef",
           "TieredStorageReader", "TieredStorageWriter"]


def __getattr__(name: str):
    # the DCP backend imports torch.distributed, which plain checkpointing does not need
    if name in ("TieredStorageReader", "TieredStorageWriter"):
        from . import dcp

        return getattr(dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
