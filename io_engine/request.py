"""What callers ask of the engine: frozen requests with a priority."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Op(enum.Enum):
    READ = "read"
    WRITE = "write"


class Priority(enum.IntEnum):
    """Lower runs first: a demand read must not wait behind prefetches or write-back."""

    DEMAND = 0
    PREFETCH = 1
    WRITEBACK = 2


@dataclass(frozen=True)
class Request:
    """Read ``length`` bytes at ``offset`` of ``path`` into ``buffer`` (or write them from it).

    ``buffer`` is anything exposing the buffer protocol (numpy array, mmap
    slice, bytearray) or a CPU torch tensor; device buffers only for backends
    that support them. ``sync`` makes a write durable (fdatasync) before its
    future completes.
    """

    op: Op
    path: str
    offset: int
    length: int
    buffer: Any
    priority: Priority = Priority.DEMAND
    sync: bool = False

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 0:
            raise ValueError(f"{self.op.value} of {self.path}: offset {self.offset} and length {self.length} must be >= 0")
