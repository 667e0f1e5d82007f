"""DTensor parameters (FSDP2's ``fully_shard``): the optimizer updates each rank's local shard.

A sharded parameter's bytes on this rank are its local tensor; its gradient (after FSDP2's
reduce-scatter) is a DTensor over the same placements, whose local tensor lines up with them
element for element. So the update is the same element-wise AdamW on the local shards, and the
state in each rank's store covers that rank's shard only (``{rank}`` in the tier path gives
each rank a store of its own). Global operations across the shards (the gradient norm for
clipping, loss scaling's inf check) would need a collective and are refused.
"""

from __future__ import annotations

import torch

try:  # torch.distributed may be missing from a build
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - no distributed support in this torch
    DTensor = None


def local_shards(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """The tensors the optimizer updates (a DTensor's local shard, else the parameter itself)
    and the DTensor parameters by index."""
    if DTensor is None:
        return list(params), {}
    out, sharded = [], {}
    for i, p in enumerate(params):
        if isinstance(p, DTensor):
            with torch.no_grad():
                out.append(p.to_local())  # the local shard itself, not a copy
            sharded[i] = p
        else:
            out.append(p)
    return out, sharded


def local_grad(p: torch.Tensor) -> torch.Tensor | None:
    """``p.grad`` as the tensor lining up with the local shard."""
    g = p.grad
    if g is not None and DTensor is not None and isinstance(g, DTensor):
        with torch.no_grad():
            return g.to_local()
    return g


def refuse_global_ops(sharded: dict[int, torch.Tensor], *, model, max_grad_norm, loss_scale, grads) -> None:
    """What needs all of a parameter's gradient on one rank is refused, naming the setting."""
    if not sharded:
        return
    what = ("model= (offloaded models are not sharded)" if model is not None
            else "max_grad_norm (the global norm needs a collective over the shards)" if max_grad_norm is not None
            else "loss_scale (the inf/nan check needs a collective over the shards)" if loss_scale is not None
            else f"grads={grads!r} (gradients stay in .grad)" if grads not in (None, "stream", "keep")
            else None)
    if what is not None:
        raise ValueError(f"OffloadedAdamW: DTensor (sharded) parameters do not support {what}; clip with "
                         "torch.nn.utils.clip_grad_norm_ before step(), which handles DTensor gradients")
