"""What every module of the package shares: the error, alignments and waits, placeholders."""

from __future__ import annotations

import threading

import torch

_ALIGN = 64  # byte alignment of each tensor inside a packed unit (any dtype can view it)
_WAIT = 600.0  # seconds a forward waits for a unit's weights before giving up

#: set while this thread prefetches: other offloaded models give nothing back for a read that can
#: wait (the store asks them from inside the allocation, in this thread)
prefetching = threading.local()


class OffloadError(RuntimeError):
    """The model cannot be offloaded as asked; the message names the unit and sizes."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _placeholder(dtype: torch.dtype, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A 1-element tensor expanded to ``shape``: right shape/dtype/device, no memory.

    Floating placeholders hold NaN so that a weight used outside its unit's
    forward shows up as NaN output instead of silently computing with zeros.
    """
    fill = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
    return torch.full((), fill, dtype=dtype, device=device).expand(shape)

