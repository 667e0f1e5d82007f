"""dtype names as manifests write them (``"bfloat16"``), one spelling for every format."""

from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from(name: object, *, error: type[Exception] = ValueError, where: str = "manifest") -> torch.dtype:
    """The torch dtype a manifest names; ``error`` (naming ``where``) for anything else."""
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise error(f"{where}: unknown dtype {name!r}")
    return dt


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
