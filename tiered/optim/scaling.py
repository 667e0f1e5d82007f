"""Dynamic loss scaling for fp16 training where gradients are parked in the store.

``torch.amp.GradScaler`` unscales and checks ``param.grad``; with ``OffloadedAdamW(grads=
"park")`` the unit gradients are in the store instead, so the optimizer scales itself:
``opt.scale_loss(loss).backward()`` then ``opt.step()``, which checks every gradient for
inf/nan (a skipped step updates nothing), unscales, clips and updates, then moves the scale
with GradScaler's own rule (``torch._amp_update_scale_``: back off on inf/nan, grow after
``growth_interval`` good steps) and its own unscale kernel, so the result is bitwise that of
``scaler.scale(loss).backward(); scaler.unscale_(opt); clip_grad_norm_(...);
scaler.step(opt); scaler.update()`` in memory.
"""

from __future__ import annotations

import math

import torch


class LossScale:
    """The scale and GradScaler's dynamic rule (same defaults as ``torch.amp.GradScaler``)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"LossScale: init_scale must be a finite number > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"LossScale: growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"LossScale: backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"LossScale: growth_interval must be a whole number > 0, got {growth_interval!r}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self._scale = torch.full((), float(init_scale), dtype=torch.float32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32)
        self.skipped_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.device)

    def get_scale(self) -> float:
        return float(self._scale)

    def inv_scale(self) -> torch.Tensor:
        """1/scale as GradScaler computes it (in double, then float)."""
        return self._scale.double().reciprocal().float()

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.skipped_steps += 1
        torch._amp_update_scale_(self._scale, self._growth_tracker, torch.full((), float(found_inf)),
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "growth_tracker": int(self._growth_tracker), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["growth_tracker"]))
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


def check_and_unscale(g: torch.Tensor, inv_scale: torch.Tensor, found: torch.Tensor) -> None:
    """GradScaler's kernel on one gradient: ``found`` set to 1 on inf/nan, ``g`` multiplied by
    ``inv_scale`` in place."""
    torch._amp_foreach_non_finite_check_and_unscale_([g], found, inv_scale.to(g.device))


def has_inf_or_nan(g: torch.Tensor) -> bool:
    return not bool(torch.isfinite(g).all())
