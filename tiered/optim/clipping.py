"""Gradient clipping (``max_grad_norm``) and where gradients wait for the update.

The global gradient norm is known only once the whole backward is over, but with ``model=``
(an offloaded model) each unit is updated as soon as its gradients are complete. So the
optimizer offers where a unit's gradients go in backward (``grads=``):

- ``"stream"`` (no clipping, or ``clip="per_unit"``): updated in backward, gradients released
  at once. ``clip="per_unit"`` scales each chunk's (one unit's) gradients by that chunk's
  own norm: ``min(1, max_grad_norm / (unit_norm + 1e-6))``; no gradient is ever held, but the
  result is not ``clip_grad_norm_`` over the model (units whose norm is small are not scaled
  at all). It needs ``model=`` and every trained parameter in a unit of it: chunks cut by
  size (no ``model=``, or an in-memory head) are refused, as their layout would decide the result.
- ``"park"`` (the default with ``max_grad_norm``): each unit's gradients are written to the
  store (the optimizer's objects ``<name>/g<param>``, which spill to storage like any other)
  with their norm; ``step()`` then knows the global norm, scales every gradient as
  ``torch.nn.utils.clip_grad_norm_`` does and updates. Gradient accumulation across several
  backward passes before ``step()`` adds into the parked gradients (old + new, as autograd).
- ``"keep"``: gradients stay in ``param.grad`` (host memory) until ``step()``, so whatever
  works on ``.grad`` between backward and step (``clip_grad_norm_``, ``GradScaler.unscale_``,
  Hugging Face ``Trainer``'s ``max_grad_norm``, gradient accumulation) works unchanged.

Deferred clipping computes the norm exactly as ``torch.nn.utils.clip_grad_norm_`` (per-tensor
norms grouped by device and dtype with torch's own grouping, then the norm of those), so the
result is bitwise that of ``clip_grad_norm_`` followed by the update: with ``model=``, of
``clip_grad_norm_(model.parameters())`` (then any other parameters of the optimizer, in group
order), whatever the param groups; without, of ``clip_grad_norm_`` over the optimizer's
parameters in group order.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from tiered.io_engine import gather

from .layout import WAIT, Chunk, OptimStateError
from .scaling import LossScale, check_and_unscale, has_inf_or_nan

GRADS = ("stream", "park", "keep")
CLIPS = ("deferred", "per_unit")


def check_clip_args(max_grad_norm, clip: str, grads: str | None, has_model: bool, loss_scale=None) -> str:
    """Validate the clipping and loss-scaling arguments; returns where gradients wait (see the
    module docstring)."""
    if loss_scale is not None and not isinstance(loss_scale, LossScale):
        raise ValueError(f"OffloadedAdamW: loss_scale must be a tiered.optim.LossScale or None, got "
                         f"{type(loss_scale).__name__} (a torch.amp.GradScaler steps the optimizer itself: "
                         "use it with grads='keep')")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and
                                          math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"OffloadedAdamW: max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
    if clip not in CLIPS:
        raise ValueError(f"OffloadedAdamW: clip must be one of {CLIPS}, got {clip!r}")
    if grads is not None and grads not in GRADS:
        raise ValueError(f"OffloadedAdamW: grads must be one of {GRADS}, got {grads!r}")
    if not has_model:
        if max_grad_norm is not None and clip == "per_unit":
            raise ValueError("OffloadedAdamW: clip='per_unit' clips each unit of an offloaded model (model=) by its "
                             "own norm; without model= the chunks are not units (their layout would decide the "
                             "result): use clip='deferred'")
        if grads not in (None, "keep"):
            raise ValueError(f"OffloadedAdamW: grads={grads!r} needs model= (an offloaded model); without it "
                             "gradients are always read from param.grad in step()")
        return "keep"
    if grads is None:
        deferred = (max_grad_norm is not None and clip == "deferred") or loss_scale is not None
        grads = "park" if deferred else "stream"
    if max_grad_norm is not None and clip == "deferred" and grads == "stream":
        raise ValueError("OffloadedAdamW: max_grad_norm with clip='deferred' needs the global norm before any "
                         "update: use grads='park' or 'keep' (or clip='per_unit' to update in backward)")
    if loss_scale is not None and grads == "stream":
        raise ValueError("OffloadedAdamW: loss_scale needs every gradient checked for inf/nan before any update: "
                         "use grads='park' or 'keep'")
    if clip == "per_unit" and max_grad_norm is not None and grads != "stream":
        raise ValueError(f"OffloadedAdamW: clip='per_unit' updates each unit in backward (grads='stream'), "
                         f"got grads={grads!r}")
    return grads


def grad_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor 2-norms computed by the kernel ``clip_grad_norm_`` uses for them."""
    out = []
    for g in grads:
        if _has_foreach_support([g], g.device):
            out.append(torch._foreach_norm([g], 2.0)[0])
        else:
            out.append(torch.linalg.vector_norm(g, 2.0))
    return out


def total_norm(keyed: list[tuple[tuple, torch.Tensor]]) -> torch.Tensor:
    """``clip_grad_norm_``'s total: the per-tensor norms (given with their grad's (device,
    dtype), in the order ``clip_grad_norm_`` would see the gradients) grouped by device and
    dtype as torch groups them (its own grouping function, so the groups come in its order),
    stacked on the first gradient's device."""
    if not keyed:
        return torch.tensor(0.0)
    probes = [torch.empty(0, dtype=dtype, device=device) for (device, dtype), _n in keyed]
    groups = _group_tensors_by_device_and_dtype([probes], with_indices=True)
    first = keyed[0][1].device
    norms = [keyed[i][1].to(first) for _key, (_tensors, indices) in groups.items() for i in indices]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def norm_order(model, params: list[torch.Tensor]) -> list[int]:
    """Indexes of ``params`` in the order deferred clipping stacks their norms: ``model``'s
    parameters in ``model.parameters()`` order (so the norm is ``clip_grad_norm_(model.parameters())``'s,
    whatever the param groups), then the others in group order."""
    if model is None:
        return list(range(len(params)))
    index_of = {id(p): i for i, p in enumerate(params)}
    first = [index_of[id(p)] for p in model.parameters() if id(p) in index_of]
    seen = set(first)
    return first + [i for i in range(len(params)) if i not in seen]


def clip_coef(max_norm: float, total: torch.Tensor) -> torch.Tensor:
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)


def trainer_max_grad_norm(depth: int = 8) -> float | None:
    """The ``max_grad_norm`` of the Hugging Face ``Trainer`` whose method (a few frames up the
    stack: ``training_step`` through accelerate's optimizer wrapper) called us, else None."""
    trainer_mod = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(trainer_mod, "Trainer", None)
    if trainer_cls is None:
        return None
    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(depth):
            if f is None:
                return None
            obj = f.f_locals.get("self")
            if isinstance(obj, trainer_cls):
                return float(getattr(obj.args, "max_grad_norm", 0) or 0)
            f = f.f_back
        return None
    finally:
        del frame


class _Clipping:
    """Part of :class:`~tiered.optim.OffloadedAdamW`: where gradients wait, clipping, loss
    scaling, and what ``torch.amp.GradScaler`` and Hugging Face ``Trainer`` are told."""

    def _init_clipping(self, max_grad_norm, clip: str, grads: str, loss_scale: LossScale | None) -> None:
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.clip = clip
        self.grads = grads
        self._parked: dict[int, tuple[str, tuple]] = {}  # param index -> (key, (device, dtype))
        self._park_norms: dict[int, torch.Tensor] = {}  # without loss scaling (else found at step)
        self._park_writes: dict[int, object] = {}  # param index -> put of its parked gradient, maybe not done
        self._grad_reads: dict[int, object] = {}  # param index -> get of its parked gradient, started early
        self._park_inf: dict[int, bool] = {}  # with loss scaling: the parked gradient holds inf/nan
        self.loss_scale = loss_scale
        self._inv_scale: torch.Tensor | None = None  # the step's 1/scale, once its gradients are checked
        self._coef: torch.Tensor | None = None  # the step's clip coefficient, once known
        self.last_grad_norm: torch.Tensor | None = None  # total norm before clipping, of the last step

    def _grad_key(self, i: int) -> str:
        return f"{self.name}/g{i:06d}"

    def _park(self, i: int) -> None:
        """Move parameter ``i``'s gradient into the store (added to one parked earlier in the
        same step: accumulation); remember its norm."""
        p = self._params[i]
        g = p.grad
        if g is None:
            return
        if g.is_sparse:
            raise ValueError(f"OffloadedAdamW: parameter {self._param_name(i)} has a sparse gradient")
        key = self._grad_key(i)
        if i in self._parked:  # the read may have started when the unit's backward began
            read = self._grad_reads.pop(i, None)
            if read is None:
                self._wait_parked(i)
                read = self._store.get(key, owner=self.owner)
            g = read.result(timeout=WAIT).view(g.shape) + g
        if self.loss_scale is not None:
            self._check_unscalable(i, g)
            self._park_inf[i] = has_inf_or_nan(g)
        elif self.max_grad_norm is not None:
            self._park_norms[i] = grad_norms([g])[0]
        # the bytes are copied before put returns; the write finishes while backward goes on
        self._park_writes[i] = self._store.put(key, g.detach(), kind="grad", ephemeral=True, owner=self.owner)
        self._parked[i] = (key, (g.device, g.dtype))
        p.grad = None

    def _prepare_grads(self) -> bool:
        """Before the update: with loss scaling, check every gradient for inf/nan (False: the
        step is skipped, its gradients dropped) and unscale those in ``.grad`` in place; with
        deferred clipping, the global norm over every gradient (parked or in ``.grad``) and
        ``.grad`` scaled in place, as ``clip_grad_norm_`` does. Parked gradients are unscaled
        and scaled when read (:meth:`_grad`)."""
        self._coef = self._inv_scale = None
        self._wait_parked()
        in_grad = {i: p.grad for i, p in enumerate(self._params) if i not in self._parked and p.grad is not None}
        if self.loss_scale is not None:
            inv = self.loss_scale.inv_scale()
            found = False
            for i, g in in_grad.items():
                self._check_unscalable(i, g)
                flag = torch.zeros((), device=g.device)
                check_and_unscale(g, inv, flag)
                found = found or bool(flag)
            if found or any(self._park_inf.values()):
                self._drop_parked()
                self.loss_scale.update(True)
                return False
            self._inv_scale = inv
        if self.max_grad_norm is None or self.clip != "deferred":
            return True
        keyed = []
        for i in self._norm_order:
            if i in self._parked:
                n = self._park_norms.get(i)
                if n is None:  # parked scaled: its norm is the unscaled gradient's
                    n = grad_norms([self._grad(i)])[0]
                keyed.append((self._parked[i][1], n))
            elif i in in_grad:
                g = in_grad[i]
                keyed.append(((g.device, g.dtype), grad_norms([g])[0]))
        total = total_norm(keyed)
        self.last_grad_norm = total
        coef = clip_coef(self.max_grad_norm, total)
        for g in in_grad.values():
            g.mul_(coef.to(g.device))
        self._coef = coef
        return True

    def _check_unscalable(self, i: int, g: torch.Tensor) -> None:
        """As torch.amp.GradScaler: fp16 gradients are not unscaled (in fp16 that loses the
        small values scaling was for); mixed precision keeps fp32 parameters under autocast."""
        if g.dtype == torch.float16:
            raise ValueError(f"OffloadedAdamW: parameter {self._param_name(i)} has an fp16 gradient, which loss "
                             "scaling cannot unscale without losing precision (GradScaler refuses it too): keep "
                             "the parameters fp32 and run the forward under torch.autocast")

    def _grad(self, i: int) -> torch.Tensor | None:
        parked = self._parked.get(i)
        if parked is None:
            return self._param_grad(i)
        f = self._grad_reads.pop(i, None) or self._store.get(parked[0], owner=self.owner)
        g = f.result(timeout=WAIT).view(self._params[i].shape)
        if self._inv_scale is not None:
            check_and_unscale(g, self._inv_scale, torch.zeros((), device=g.device))
        if self._coef is not None:
            g.mul_(self._coef.to(g.device))
        return g

    def _prefetch_grads(self, c: Chunk) -> None:
        """Start reading the chunk's parked gradients (with its state: the step's pipeline)."""
        for seg in c.segments:
            parked = self._parked.get(seg.param)
            if parked is not None and seg.param not in self._grad_reads:
                self._grad_reads[seg.param] = self._store.get(parked[0], owner=self.owner)

    def _unpark(self, c: Chunk) -> None:
        """The chunk's parked gradients were used: delete them."""
        for seg in c.segments:
            parked = self._parked.pop(seg.param, None)
            if parked is not None:
                self._park_norms.pop(seg.param, None)
                self._park_inf.pop(seg.param, None)
                self._store.delete(parked[0])

    def _check_per_unit(self) -> None:
        """``clip='per_unit'`` is defined for units only: a parameter outside the model's units
        (cut into chunks by size) is refused rather than clipped by a layout-dependent norm."""
        if self.max_grad_norm is None or self.clip != "per_unit":
            return
        for c in self._chunks:
            if c.unit is None:
                raise ValueError(f"OffloadedAdamW: clip='per_unit' clips each unit of the model by its own norm, "
                                 f"but parameter {self._param_name(c.segments[0].param)} is in no unit of it; "
                                 "use clip='deferred' (grads='park' or 'keep')")

    def _clip_chunk(self, c: Chunk) -> None:
        """``clip='per_unit'``: scale the unit chunk's gradients (whole parameters) by its own norm."""
        if self.max_grad_norm is None or self.clip != "per_unit" or c.unit is None:
            return
        grads = []
        for i in dict.fromkeys(seg.param for seg in c.segments):
            g = self._params[i].grad
            if g is not None:
                grads.append(g)
        if not grads:
            return
        norms = grad_norms(grads)
        coef = clip_coef(self.max_grad_norm, total_norm([((g.device, g.dtype), n) for g, n in zip(grads, norms)]))
        for g in grads:
            g.mul_(coef.to(g.device))

    def _forget_grad_reads(self) -> None:
        """Gradient reads started for a step that did not use them: wait for them (a read in
        flight must not outlive the key it reads), then drop the copies."""
        reads, self._grad_reads = self._grad_reads, {}
        if reads:
            gather(list(reads.values())).result(timeout=WAIT)

    def _wait_parked(self, i: int | None = None) -> None:
        """Every parked gradient (or parameter ``i``'s) written; raises the first write error."""
        if i is not None:
            f = self._park_writes.pop(i, None)
            if f is not None:
                f.result(timeout=WAIT)
            return
        writes, self._park_writes = list(self._park_writes.values()), {}
        if writes:
            gather(writes).result(timeout=WAIT)

    def _prefetch_parked(self, c: Chunk) -> None:
        """A unit's backward begins: start reading its gradients parked by earlier backward
        passes (once each one's own write is done), which its hooks add the new ones to: the
        reads overlap the unit's backward."""
        for seg in c.segments:
            i = seg.param
            if i in self._parked and i not in self._grad_reads:
                self._wait_parked(i)
                self._grad_reads[i] = self._store.get(self._parked[i][0], owner=self.owner)

    def _drop_parked(self) -> None:
        """Forget parked gradients (``zero_grad``, ``close``, a skipped step)."""
        self._wait_parked()
        self._forget_grad_reads()
        parked, self._parked = self._parked, {}
        self._park_norms.clear()
        self._park_inf.clear()
        if self._store is None or not parked:
            return
        for key, _ in parked.values():
            if key in self._store:
                self._store.delete(key)

    def _param_name(self, i: int) -> str:
        names = getattr(self, "_names", None) or {}
        name = names.get(i)
        return f"{i} ({name!r})" if name else f"{i} (shape {tuple(self._params[i].shape)})"

    def _check_second_gradient(self, c: Chunk, i: int) -> None:
        """Updated in backward already: another gradient before ``step()`` is accumulation,
        which streaming cannot do (the update used the first one)."""
        if c.index in self._updated:
            raise OptimStateError(
                f"OffloadedAdamW {self.name!r}: parameter {self._param_name(i)} received a second gradient "
                "before step(); with grads='stream' each backward updates the weights at once, so gradient "
                "accumulation across backward passes is not possible: use grads='park' or grads='keep'")

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (``loss_scale=``), to call ``backward()`` on."""
        if self.loss_scale is None:
            raise OptimStateError(f"OffloadedAdamW {self.name!r}: scale_loss() needs loss_scale=LossScale(...)")
        return self.loss_scale.scale(loss)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; gradients parked in the store (``grads="park"``) are dropped too."""
        super().zero_grad(set_to_none)
        if getattr(self, "_open", False):
            self._drop_parked()

    @property
    def _streams_units(self) -> bool:
        """Some trainable parameters live in units and their gradients never reach ``.grad``
        as a whole (``grads="stream"`` or ``"park"``)."""
        chunks = getattr(self, "_chunks", ())  # also asked before __init__ is done
        return getattr(self, "grads", "keep") != "keep" and any(c.unit is not None for c in chunks)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler unscales and checks ``.grad`` itself unless this is true; then it
        hands step() its scale (``grad_scale``, ``found_inf``). So it is where the gradients are
        not in ``.grad``, and step() refuses the scaler instead of stepping on scaled gradients."""
        return self._streams_units

    def _refuse_amp_scaler(self) -> None:
        if getattr(self, "grad_scale", None) is None and getattr(self, "found_inf", None) is None:
            return
        for attr in ("grad_scale", "found_inf"):
            self.__dict__.pop(attr, None)
        raise OptimStateError(
            f"OffloadedAdamW {self.name!r}: stepped by a GradScaler, but with grads={self.grads!r} the unit "
            "gradients are not in .grad, where GradScaler unscales and checks them (grads='stream' has updated "
            "the weights in backward already); use grads='keep' with a GradScaler")

    def train(self) -> None:
        """Hugging Face Trainer calls this (through accelerate) when an epoch begins. Trainer clips
        (``max_grad_norm``, default 1.0), unscales and accumulates ``.grad`` between backward and
        step, which the default ``grads="stream"`` (units updated in backward) never fills: so an
        optimizer left in the default mode keeps gradients in ``.grad`` from here on
        (``grads="keep"``). A ``grads=`` chosen explicitly is left as it is; a Trainer that clips
        is then refused where the unit gradients are not in ``.grad`` (it would clip nothing and
        log a norm of 0)."""
        if self._grads_given and self._streams_units:
            clips = trainer_max_grad_norm()
            if clips:
                raise OptimStateError(
                    f"OffloadedAdamW {self.name!r}: a Trainer with max_grad_norm={clips} clips .grad, but with "
                    f"grads={self.grads!r} the unit gradients are not in .grad, so it would clip nothing (and log "
                    "grad_norm 0.0); pass grads='keep' (or leave grads unset), or set max_grad_norm=0 in "
                    "TrainingArguments and give OffloadedAdamW max_grad_norm= (with grads='park')")
        if self.grads != "stream" or self._grads_given or not self._streams_units:
            return
        if self._updated or any(c.arrived for c in self._chunks):
            raise OptimStateError(
                f"OffloadedAdamW {self.name!r}: train() (a Trainer starting) between a backward and step(): the "
                "default grads='stream' has updated units already; pass grads='keep' to use it under a Trainer")
        self._remove_hooks()  # no update in backward: step() updates every unit from .grad
        self.grads = "keep"
