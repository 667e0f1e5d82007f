"""The tiered object store: named tensors with a durable home and cached copies (see
:mod:`tiered.store.core` for the call order, the layout and the invariants)."""

from ..checksums import SEGMENT, segment_checksums
from .core import TieredStore
from .errors import ChecksumError, HostBudgetError, StoreError, TierFullError
from .extents import punch_hole
from .leases import ExtentLease, Lease
from .owners import Reservation
from .objects import DEFAULT_OWNER, DATA_FILE, FORMAT, FORMAT_VERSION, LOCK_FILE, MANIFEST, check_key

__all__ = [
    "DATA_FILE", "DEFAULT_OWNER", "FORMAT", "FORMAT_VERSION", "LOCK_FILE", "MANIFEST", "SEGMENT", "ChecksumError", "ExtentLease",
    "HostBudgetError", "Lease", "Reservation", "StoreError", "TierFullError", "TieredStore", "check_key", "punch_hole", "segment_checksums",
]

from ..dtypes import dtype_name as _dtype_name  # noqa: E402  (older private spellings)


def _dtype_from(name):
    from ..dtypes import dtype_from

    return dtype_from(name, error=StoreError)
