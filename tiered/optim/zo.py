"""Zeroth-order fine-tuning (MeZO, with ZO2's dual forward) of models wrapped by ``tiered.offload``.

MeZO estimates the gradient from two forwards with the weights perturbed by
``+eps*z`` and ``-eps*z`` (``z`` Gaussian, regenerated from a seed, never
stored) and updates ``theta -= lr * g * z`` with the scalar projected gradient
``g = (L+ - L-) / (2 eps)``. Run naively on offloaded weights that is two
passes over storage per step plus one for the update. :class:`ZOSGD` does what
ZO2 does, for any module structure: the batch is doubled, and each unit's
forward is wrapped so that, while its weights are resident, it runs the first
half with ``+eps*z`` and the second half with ``-eps*z``; the previous step's
update is applied to the unit right before (when its ``g`` is known), and the
unit is written back once. So each step reads and writes every weight once.

The in-place operation sequence per parameter is exactly :func:`mezo_step`'s
(the in-memory reference), so losses and projected gradients are bitwise equal
to it on every step (fp32, CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..offload import OffloadError, offload_units


def mezo_noise(seed: int, index: int, shape, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The perturbation of parameter ``index`` at the step of ``seed``: N(0, 1), regenerated
    from the seed whenever needed (fp32 samples, cast to the parameter's dtype). ``out``: an
    fp32 tensor of ``shape`` the samples are drawn into (the same samples)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (1 << 63))
    if out is None:
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(dtype)
    torch.randn(tuple(shape), generator=g, dtype=torch.float32, out=out)
    return out.to(dtype)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (labels -100 ignored), as transformers computes it."""
    return F.cross_entropy(logits[:, :-1, :].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


@dataclass(frozen=True)
class ZOStep:
    loss_plus: float
    loss_minus: float
    projected_grad: float
    seed: int


def _process_group(group: Any) -> Any:
    """The group whose ranks share the step's two losses: "auto" is torch.distributed's default
    group when one with two or more ranks is initialised, else none; None: this process alone."""
    if group != "auto":
        return group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _mean_over_ranks(lp: torch.Tensor, lm: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Distributed ZO (DistZO2): each rank ran the same perturbations (same seeds) on its own
    shard of the data; only the two scalar losses cross the network, averaged, so every rank
    takes the same projected gradient and makes the same update."""
    import torch.distributed as dist

    both = torch.stack([lp.detach().to(torch.float64), lm.detach().to(torch.float64)])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    both /= dist.get_world_size(group)
    return both[0], both[1]


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def mezo_step(model: nn.Module, batch: dict, *, seed: int, lr: float, eps: float,
              loss_fn: Callable = causal_lm_loss) -> ZOStep:
    """One MeZO step on an ordinary in-memory model (the reference :class:`ZOSGD` matches)."""
    params = _unique_params(model)
    labels = batch.get("labels", batch["input_ids"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    zs = [_on(mezo_noise(seed, j, p.shape, p.dtype), p) for j, (_n, p) in enumerate(params)]
    for (_n, p), z in zip(params, zs):
        p.data.add_(z, alpha=eps)
    lp = loss_fn(_logits(model(**inputs, use_cache=False)), labels)
    for (_n, p), z in zip(params, zs):
        p.data.add_(z, alpha=-2 * eps)
    lm = loss_fn(_logits(model(**inputs, use_cache=False)), labels)
    for (_n, p), z in zip(params, zs):
        p.data.add_(z, alpha=eps)
    g = ((lp - lm) / (2 * eps)).item()
    for (_n, p), z in zip(params, zs):
        p.data.add_(z, alpha=-lr * g)
    return ZOStep(lp.item(), lm.item(), g, seed)


def _on(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The noise (drawn on the CPU, so every device sees the same values) where ``like`` is."""
    return z if z.device == like.device else z.to(like.device)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def _half(x: Any, batch: int, i: int) -> Any:
    """The ``i``-th half of every tensor whose first dimension is the doubled batch."""
    if isinstance(x, torch.Tensor):
        return x[i * batch:(i + 1) * batch] if x.dim() > 0 and x.shape[0] == 2 * batch else x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_half(e, batch, i) for e in x)
    if isinstance(x, list):
        return [_half(e, batch, i) for e in x]
    if isinstance(x, dict):
        return type(x)({k: _half(v, batch, i) for k, v in x.items()}) if type(x) is dict else \
            {k: _half(v, batch, i) for k, v in x.items()}
    return x


def _join(a: Any, b: Any, batch: int, where: str) -> Any:
    """The two halves' outputs put back together along the batch (an output broadcast over the
    batch, such as position embeddings of shape (1, T, H), is expanded to it first)."""
    if isinstance(a, torch.Tensor):
        if a.dim() == 0:
            raise OffloadError(f"ZOSGD: unit {where!r} returned a scalar tensor, which has no batch "
                               "dimension to split the +eps and -eps halves along")
        if a.shape[0] == 1 and batch > 1:
            a, b = a.expand(batch, *a.shape[1:]), b.expand(batch, *b.shape[1:])
        return torch.cat([a, b])
    if a is None:
        return None
    if isinstance(a, tuple) and not hasattr(a, "_fields"):
        return tuple(_join(x, y, batch, where) for x, y in zip(a, b))
    if isinstance(a, list):
        return [_join(x, y, batch, where) for x, y in zip(a, b)]
    if isinstance(a, dict):
        out = {k: _join(a[k], b[k], batch, where) for k in a}
        try:
            return type(a)(**out)
        except TypeError:
            return type(a)(out)
    if a == b:
        return a
    raise OffloadError(f"ZOSGD: unit {where!r} returned {type(a).__name__}, which cannot be joined along the batch")


class ZOSGD:
    """MeZO / ZO2 for a model wrapped by :func:`tiered.offload`; see the module docstring.

    Use as a context manager (or call :meth:`close`): the units' forwards are wrapped
    until then. ``step(batch)`` runs one step on ``batch`` (``input_ids``, optional
    ``attention_mask`` and ``labels``; labels default to ``input_ids``). Updates are
    applied lazily, when each unit is next loaded; :meth:`flush` applies the last one
    everywhere (``close`` does) so the stored weights are the trained ones.

    The noise of the unit computing (fp32, as many elements as its parameters) is drawn into
    host memory of the store owner ``zo/<name>`` (default name: the model's); ``host_share``
    reserves it (bytes, "1MiB", "5%"; default: the config's ``[owners.zo]`` host share, else
    none: it competes for what is free).

    Under torch.distributed (``group``: "auto" = the default group when it has two or more
    ranks; a group; None = this process alone) each rank runs the step on its own shard of the
    data with the same seeds, and only the two losses are all-reduced (averaged), so every rank
    makes the same update: with equal shards, the step of one process on the whole batch up to
    float rounding (the mean of the shards' mean losses, in float64).
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-6, eps: float = 1e-3, seed: int = 0,
                 loss_fn: Callable = causal_lm_loss, name: str | None = None,
                 host_share: int | str | None = None, group: Any = "auto") -> None:
        try:
            units = offload_units(model)
        except OffloadError:
            raise OffloadError(f"ZOSGD: {type(model).__name__} is not wrapped by tiered.offload "
                               "(use tiered.optim.zo.mezo_step for an in-memory model)") from None
        if eps <= 0:
            raise ValueError(f"ZOSGD: eps must be > 0, got {eps}")
        units.check_trainable()
        for u in units:
            if not u.leaf:
                raise OffloadError(f"ZOSGD: unit {u.name or '<root>'!r} encloses other units; the dual forward "
                                   "needs every unit to be a leaf (pass units=[...] without nesting)")
        self.model = model
        self.lr, self.eps, self.seed, self.loss_fn = lr, eps, seed, loss_fn
        self.group = _process_group(group)
        self._units = units
        self.owner = f"zo/{name or units.owner.split('/', 1)[-1]}"
        self._index = {id(p): j for j, (_n, p) in enumerate(_unique_params(model))}
        self._noise_bytes = max((4 * sum(p.numel() for p in u.params() if id(p) in self._index) for u in units),
                                default=0)
        self._check_room(host_share)
        self._res = units.store.reserve("host", host_share, owner=self.owner)
        self._history: list[tuple[int, float]] = []  # (seed, projected grad) of every step
        self._applied = {u.index: 0 for u in units}  # updates applied to each unit
        self._batch: int | None = None  # half batch of the dual forward in progress
        self._seed_now = 0
        self._wrapped: list[nn.Module] = []
        for u in units:
            u.module.forward = self._wrap(u, u.module.forward)
            self._wrapped.append(u.module)

    def _check_room(self, host_share) -> None:
        """A unit being written back is pinned until its put (which copies it) is durable, while
        the next ``lookahead`` units are read, and the noise of the unit computing is held: the
        host tier, less other owners' shares, must hold lookahead + 2 units and that noise."""
        units, store = self._units, self._units.store
        streamed = [u.nbytes for u in units if not u.resident]
        largest = max(streamed, default=0)
        cap = store.stats()["tiers"]["host"]["capacity"]
        others = sum(t["host"]["reserved"] for o, t in store.owners().items()
                     if o not in (self.owner, units.owner) and "host" in t)
        need = (units.lookahead + 2) * largest + units.resident_bytes + self._noise_bytes
        if need > cap - others:
            raise OffloadError(
                f"ZOSGD: host tier of {cap} bytes ({others} reserved by other owners) cannot hold "
                f"{units.lookahead + 2} units of {largest} bytes (the one computing, its write-back copy, "
                f"lookahead {units.lookahead}) plus {units.resident_bytes} resident bytes and {self._noise_bytes} "
                "bytes of noise; raise [tiers.host] capacity or lower [offload] lookahead")

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "ZOSGD":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Apply the pending update everywhere, wait for the writes, unwrap the units."""
        if not self._wrapped:
            return
        try:
            self.flush()
        finally:
            for m in self._wrapped:
                del m.forward
            self._wrapped = []
            self._res.close()

    @property
    def steps(self) -> int:
        return len(self._history)

    # -- stepping --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: dict) -> ZOStep:
        if not self._wrapped:
            raise OffloadError("ZOSGD is closed")
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        inputs = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
                  for k, v in batch.items() if k != "labels"}
        seed = self.seed + len(self._history)
        self._batch, self._seed_now = ids.shape[0], seed
        try:
            out = _logits(self.model(**inputs, use_cache=False))
        finally:
            self._batch = None
        b = ids.shape[0]
        lp, lm = self.loss_fn(out[:b], labels), self.loss_fn(out[b:], labels)
        if self.group is not None:
            lp, lm = _mean_over_ranks(lp, lm, self.group)
        g = ((lp - lm) / (2 * self.eps)).item()
        self._history.append((seed, g))
        self._units.wait_writes()
        return ZOStep(lp.item(), lm.item(), g, seed)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the updates not yet applied to every unit and wait until they are durable."""
        for u in self._units:
            if self._applied[u.index] < len(self._history):
                with self._units.load_unit(u):
                    self._catch_up(u)
                    self._units.write_back_unit(u)
        self._units.wait_writes()

    def _views(self, u) -> list[tuple[int, torch.Tensor]]:
        return [(self._index[id(p)], view) for p, view in u.views() if id(p) in self._index]

    @contextlib.contextmanager
    def _noise(self, views):
        """A function drawing the noise of ``views`` for a seed into host memory of this owner
        (one fp32 buffer for the unit, held while the context is)."""
        n = sum(v.numel() for _j, v in views)
        buf = self._res.alloc(4 * n) if n else None
        try:
            flat = buf.tensor(torch.float32)[:n] if buf is not None else None

            def draw(seed: int) -> list[torch.Tensor]:
                zs, off = [], 0
                for j, v in views:
                    out = flat[off:off + v.numel()].view(v.shape)
                    zs.append(mezo_noise(seed, j, v.shape, v.dtype, out=out))
                    off += v.numel()
                return zs
            yield draw
        finally:
            if buf is not None:
                buf.release()

    def _catch_up(self, u, draw=None) -> None:
        """Apply to ``u`` the updates of the steps since it was last loaded."""
        pending = self._history[self._applied[u.index]:]
        if pending:
            views = self._views(u)
            with (contextlib.nullcontext(draw) if draw is not None else self._noise(views)) as draw:
                for seed, g in pending:
                    for (_j, view), z in zip(views, draw(seed)):
                        view.add_(_on(z, view), alpha=-self.lr * g)
        self._applied[u.index] = len(self._history)

    def _wrap(self, u, forward: Callable) -> Callable:
        def dual_forward(*args, **kwargs):
            with torch.no_grad():
                b = self._batch
                if b is None:  # an ordinary forward (evaluation): current weights, one pass
                    if self._applied[u.index] < len(self._history):
                        self._catch_up(u)
                        self._units.write_back_unit(u)
                    return forward(*args, **kwargs)
                views = self._views(u)
                with self._noise(views) as draw:
                    self._catch_up(u, draw)
                    zs = draw(self._seed_now)
                    return self._perturbed_forwards(u, forward, views, zs, b, args, kwargs)
        return dual_forward

    def _perturbed_forwards(self, u, forward: Callable, views, zs, b: int, args, kwargs):
        """The first half of the batch with ``+eps*z``, the second with ``-eps*z``; the unit is
        written back once with its weights restored."""
        def shift(alpha: float) -> None:
            for (_j, v), z in zip(views, zs):
                v.add_(_on(z, v), alpha=alpha)

        shift(self.eps)
        sign = 1  # which perturbation the cached weights hold now
        try:
            plus = forward(*_half(args, b, 0), **_half(kwargs, b, 0))
            shift(-2 * self.eps)
            sign = -1
            minus = forward(*_half(args, b, 1), **_half(kwargs, b, 1))
        finally:
            # (theta + e z) - 2e z + e z is not theta bitwise: write it back. On an error in
            # either forward the perturbation is undone too, so no later forward sees it.
            shift(-sign * self.eps)
            self._units.write_back_unit(u)
        return _join(plus, minus, b, u.name)
