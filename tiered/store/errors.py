"""The store's errors: each names the object (and file) concerned."""

from __future__ import annotations

from tiered.allocators import OutOfBudget


class StoreError(RuntimeError):
    """Misuse of the store or a store-level failure; the message names the object."""


class HostBudgetError(StoreError, OutOfBudget):
    """The host tier cannot hold what an operation on an object needs; names the object."""


class TierFullError(StoreError):
    """A storage tier has no extent free for the object (for its owner); names tier and object."""


class ChecksumError(StoreError):
    """Bytes read back do not match the checksum recorded when they were written."""
