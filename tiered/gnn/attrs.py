"""What the feature store knows of each attribute: its catalog entry and its runtime state."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from io_engine import IOFuture

from ..dtypes import dtype_name
from ..store import StoreError
from .cache import RowCache
from .gather import Layout


class FeatureStoreError(StoreError):
    """Misuse of the feature store; the message names the attribute."""


def _label(group, attr) -> str:
    return f"{attr!r}" if group is None else f"{group!r}/{attr!r}"


def _jsonable_group(group):
    return list(group) if isinstance(group, tuple) else group


def _group_from_json(g):
    return tuple(g) if isinstance(g, list) else g


@dataclass
class _Attr:
    group: Any
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunk_rows: int
    tier: str
    keys: list[str]
    gen: int
    external: dict | None = None  # {"path", "offset", "identity"}
    zarr_path: str | None = None
    block: int = 0  # >0: the chunk objects carry a crc32 per ``block`` bytes (read_ranges verifies them)
    # runtime state
    layout: Layout | None = None  # chunk c is object keys[c]; offsets in layout coordinates (see rows.py)
    cache: RowCache | None = None
    zarr: Any = None
    lock: threading.RLock = field(default_factory=threading.RLock)  # engine callbacks may run inline
    inflight: list[tuple[np.ndarray, IOFuture]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    @property
    def label(self) -> str:
        return _label(self.group, self.name)

    def chunk_nbytes(self, c: int) -> int:
        return min(self.chunk_rows, self.num_rows - c * self.chunk_rows) * self.row_bytes

    def describe(self) -> dict:
        return {"group": _jsonable_group(self.group), "attr": self.name, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape), "chunk_rows": self.chunk_rows, "tier": self.tier,
                "keys": self.keys, "gen": self.gen, "external": self.external, "zarr": self.zarr_path,
                "block": self.block}
