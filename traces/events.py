"""One access to one object, as the store saw it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccessEvent:
    time: float  # seconds (time.monotonic() of the process that recorded it)
    key: str
    nbytes: int
    op: str  # "read" | "write" | "evict" | "delete" | "prefetch" | "migrate" | "plan"
    kind: str = "blob"  # weight | optim | kv | gnn | checkpoint | blob
    tier: str | None = None  # tier that served a read (or received a write); None on a miss
    #: op "plan" only: the keys the owner named in ``key`` declared it reads next, in order
    #: (an empty tuple withdraws its plan)
    keys: tuple[str, ...] | None = None


#: other spellings of a kind that workloads emit, mapped to the name in ``policies.KINDS``
KIND_ALIASES = {"optimizer": "optim", "optimizer_state": "optim", "weights": "weight", "kv_cache": "kv",
                "kvcache": "kv", "features": "gnn", "ckpt": "checkpoint"}


def normalize_kind(kind: str, kinds: tuple[str, ...]) -> str | None:
    """``kind`` as one of ``kinds`` (through :data:`KIND_ALIASES`), or None when unknown."""
    if kind in kinds:
        return kind
    alias = KIND_ALIASES.get(kind)
    return alias if alias in kinds else None
