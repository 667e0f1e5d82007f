"""Optimizers whose state lives in the tiered store.

- :class:`OffloadedAdamW`: AdamW with fp32 master weights and both moments in
  the store, streamed in chunks by a pipelined ``step()``; bitwise equal to
  ``torch.optim.AdamW``; crash-consistent (double-buffered by step parity; under FSDP2 a
  step is complete once every rank committed it, and every rank resumes from one step). Its
  memory and objects are charged to the store owner ``optim/<name>``.
- :class:`ZOSGD`: zeroth-order (MeZO / ZO2) fine-tuning of a model wrapped by
  :func:`tiered.offload`, one read of every weight per step; the noise it draws is host
  memory of the owner ``zo/<name>``.
"""

from .adamw import OffloadedAdamW, OptimStateError
from .scaling import LossScale
from .zo import ZOSGD, mezo_noise

__all__ = ["LossScale", "OffloadedAdamW", "OptimStateError", "ZOSGD", "mezo_noise"]
