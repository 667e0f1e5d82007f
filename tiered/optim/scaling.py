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
        _check_rule(init_scale, growth_factor, backoff_factor, growth_interval)
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
        """Load :meth:`state_dict`'s dict, or ``torch.amp.GradScaler.state_dict()``'s (its
        ``_growth_tracker``); every value is checked as the constructor checks it."""
        if not isinstance(state, dict):
            raise ValueError(f"LossScale.load_state_dict: expected a dict, got {type(state).__name__}")
        tracker_key = "growth_tracker" if "growth_tracker" in state else "_growth_tracker"
        need = ("scale", "growth_factor", "backoff_factor", "growth_interval", tracker_key)
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"LossScale.load_state_dict: missing {', '.join(map(repr, missing))} (expected "
                             f"LossScale.state_dict() or torch.amp.GradScaler.state_dict(); got keys "
                             f"{sorted(map(str, state))})")
        scale, growth, backoff, interval = (state[k] for k in need[:4])
        _check_rule(scale, growth, backoff, interval)
        tracker, skipped = state[tracker_key], state.get("skipped_steps", 0)
        for key, v in ((tracker_key, tracker), ("skipped_steps", skipped)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LossScale.load_state_dict: {key} must be a whole number >= 0, got {v!r}")
        self._scale.fill_(float(scale))
        self._growth_tracker.fill_(tracker)
        self.growth_factor = float(growth)
        self.backoff_factor = float(backoff)
        self.growth_interval = interval
        self.skipped_steps = skipped


def _check_rule(init_scale, growth_factor, backoff_factor, growth_interval) -> None:
    """GradScaler's rule is well defined: a finite scale > 0, growth > 1, backoff in (0, 1)."""
    for name, v in (("scale", init_scale), ("growth_factor", growth_factor), ("backoff_factor", backoff_factor)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"LossScale: {name} must be a number, got {v!r}")
    if not (math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"LossScale: init_scale must be a finite number > 0, got {init_scale!r}")
    if not growth_factor > 1.0:
        raise ValueError(f"LossScale: growth_factor must be > 1, got {growth_factor!r}")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"LossScale: backoff_factor must be in (0, 1), got {backoff_factor!r}")
    if not (isinstance(growth_interval, int) and not isinstance(growth_interval, bool) and growth_interval > 0):
        raise ValueError(f"LossScale: growth_interval must be a whole number > 0, got {growth_interval!r}")


def check_and_unscale(g: torch.Tensor, inv_scale: torch.Tensor, found: torch.Tensor) -> None:
    """GradScaler's kernel on one gradient: ``found`` set to 1 on inf/nan, ``g`` multiplied by
    ``inv_scale`` in place."""
    torch._amp_foreach_non_finite_check_and_unscale_([g], found, inv_scale.to(g.device))


def has_inf_or_nan(g: torch.Tensor) -> bool:
    return not bool(torch.isfinite(g).all())
