"""One access to one object, as the store saw it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccessEvent:
    time: float  # seconds (time.monotonic() of the process that recorded it)
    key: str
    nbytes: int
    op: str  # "read" | "write" | "evict" | "delete"
    kind: str = "blob"  # weight | optim | kv | gnn | checkpoint | blob
    tier: str | None = None  # tier that served a read (or received a write); None on a miss
