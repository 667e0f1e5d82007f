"""``OffloadedAdamW``: AdamW whose fp32 master weights and moments live in the tiered store.

The state is cut into chunks (whole parameters, or 4096-element-aligned slices
of large ones; one chunk per unit for a model wrapped by ``tiered.offload``).
A chunk is one store object ``[master | exp_avg | exp_avg_sq | step tag]``
(fp32), so one read and one write, when its parameters are not all fp32 (the
master is their fp32 copy) or live in offloaded units. For fp32 parameters in
memory the parameter *is* the master: the chunk is ``[exp_avg | exp_avg_sq |
step tag]``, updated with the parameter in place, and the master is only
written (its own object ``[master | step tag]``, what resume and crash
recovery restore the parameters from), never read back during training, so
a step reads 8 bytes per parameter instead of 12. ``step()`` streams them as the
ZeRO-Infinity pipeline does: while chunk *i* is updated on the CPU, chunks
*i+1..i+k* are being read by the engine and chunk *i-1* is being written.
The update itself is torch's own functional AdamW on views of the chunk, so
results are bitwise those of ``torch.optim.AdamW`` with the same
``foreach``/``fused`` setting.

Host memory: the optimizer is the store owner ``optim/<name>``; every buffer
it takes and every object it writes is charged to it (see :mod:`.host`). What
its host share holds beyond the pipeline's working set (``lookahead`` chunks
being read, one updated, two being written) keeps whole chunks *resident*:
they stay in host memory across steps and are never read back from storage,
so a step reads fewer bytes than the state holds. Without a share the owner is
elastic and gives resident chunks back when another owner is short of room. Every
chunk, resident or not, is still written every step (the moments from the
buffer they were updated in, without a copy; a master staged from the
parameters), so storage always holds complete steps. Streamed chunks go in
reverse order every other step: those written last in one step are still
cached in the pipeline's part of the host tier and come first in the next,
without a read.

Crash consistency: step *s* writes its chunks under keys of parity ``s % 2``
(written without a per-object fdatasync or manifest commit) and, only once all
of them are written, one fdatasync per data file, one manifest commit and a
marker object naming step *s*. The state of step *s-1* (the other parity) is
never touched by step *s*, and step *s+1* writes nothing before the marker of
*s* is durable, so a kill at any point leaves the marker naming a step whose
chunks are all present; each chunk also carries the step it belongs to,
checked on every read, so a state that mixes steps is refused with
:class:`OptimStateError` instead of being used. Under FSDP2 (each rank its own store), a step
is complete once every rank's marker is durable and every rank resumes from the same step
(:mod:`.distributed_commit`).

By default ``step()`` returns once every chunk is updated and its write is
issued: the rest of the writes and the commit overlap what the caller does
next (forward and backward of the next step), and the step is made durable
when the next step begins, before it writes anything (or in ``flush()``,
``state_dict()``, ``load_state_dict()``, ``close()``; under a process group only
``open()``, ``step()`` and ``load_state_dict()`` are collectives, see
:mod:`.distributed_commit`). So a crash loses at most the last step that
``step()`` returned from, never mixes steps. ``sync=True`` makes ``step()``
return only once its step is durable.

Training a model wrapped by ``tiered.offload`` (``model=``): in backward each
unit's gradients are handed to the optimizer as soon as they are complete
(post-accumulate-grad hooks); the unit's state chunk is updated right away
(its read was started when the unit's backward began), the new weights are
written into the unit's store objects, and the gradients are released. So
neither the weights, nor the gradients, nor the optimizer state need to be in
memory at once. ``step()`` then updates what backward did not (parameters
outside units, unused ones) and commits the step. That is ``grads="stream"``, the default;
``grads="park"`` (gradients written to the store until ``step()``: global clipping, loss
scaling, accumulation) and ``grads="keep"`` (left in ``.grad``: Trainer, GradScaler) defer the
update to ``step()``, see :mod:`.clipping`.

Weights changed between updates (``model.load_state_dict`` of the offloaded model, in either
order with the optimizer's own ``load_state_dict``, or any in-place write to parameters in
memory) are what the next update starts from, as with ``torch.optim.AdamW``: a parameter whose
weights are not its fp32 master rounded to their dtype (compared bit for bit when its chunk is
updated) takes its master from them.

The class is assembled from one module per job: :mod:`.layout` (chunks),
:mod:`.host` (host memory), :mod:`.pipeline` (the step's stream),
:mod:`.durability` (commit, recovery), :mod:`.state_dict`, :mod:`.backward`
(``model=``), :mod:`.clipping` (where gradients wait, ``max_grad_norm``) and :mod:`.scaling`
(``LossScale``).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from ..config import load_config
from ..store import TieredStore
from .backward import _Backward
from .clipping import _Clipping, check_clip_args, norm_order
from .distributed_commit import _RankCommit, commit_group
from .durability import _Durability
from .host import _HostMemory
from .layout import ALIGN_ELEMS, Chunk, OptimStateError, drop, plan_chunks
from .sharded import local_grad, local_shards, refuse_global_ops
from .pipeline import _Pipeline
from .scaling import LossScale
from .state_dict import _StateDict

_drop = drop  # older spelling

__all__ = ["OffloadedAdamW", "OptimStateError"]


class OffloadedAdamW(_HostMemory, _Pipeline, _Durability, _RankCommit, _StateDict, _Backward, _Clipping,
                     Optimizer):
    """AdamW with its state in a :class:`~tiered.TieredStore`; see the module docstring.

    ``store``: an open store (the caller closes it); else ``config`` (TOML path, dict,
    Config or None) names one that :meth:`open` opens and :meth:`close` closes; with
    ``model`` (a model wrapped by ``tiered.offload``) the model's store is the default.
    ``name``: key prefix of this optimizer's objects; its store owner is ``optim/<name>``.
    ``host_share``: host memory reserved for it (bytes, "64MiB" or "25%" of the host tier;
    default: the config's ``[owners.optim]`` host share, else none: elastic, see :mod:`.host`).
    ``chunk_bytes``: target size of one chunk object (12 bytes per element; default: what the
    share, else the host tier less other owners' shares, holds ``lookahead + 3`` of, at most
    16 MiB; pass it for a layout that does not depend on the store a run resumes in).
    ``lookahead``: chunks read ahead of the update. ``resume``: continue from the last
    complete step found in the store (else finding state there is an error, so two runs
    cannot silently share it). ``resident_bytes``: host memory for chunks kept resident
    across steps (default: what the share holds beyond the pipeline; without a share, what is
    free beyond it when this optimizer opened the store itself and no model shares it, else
    0). ``sync``: ``step()`` returns only once its step is durable (default: the step is
    committed when the next one begins, see the module docstring; always so with ``model``).
    ``loss_scale``: a :class:`~tiered.optim.LossScale` for fp16 (``scale_loss(loss)``, then
    ``step()`` skips on inf/nan and moves the scale; see :mod:`.scaling`).
    ``max_grad_norm``: clip the gradients' global 2-norm to this, as ``clip_grad_norm_`` does
    (``clip="deferred"``) or each unit's by its own norm (``clip="per_unit"``); ``grads``:
    where a ``model=``'s unit gradients wait for the update ("stream", "park", "keep"); see
    :mod:`.clipping`. ``last_grad_norm`` is the global norm of the last step (deferred).
    ``process_group``: the ranks that commit each step together and resume from one step
    (default: torch.distributed's default group when a parameter is a DTensor, FSDP2); see
    :mod:`.distributed_commit`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False,
                 foreach: bool | None = False, fused: bool | None = None, config=None,
                 store: TieredStore | None = None, model: nn.Module | None = None, name: str = "adamw",
                 chunk_bytes: int | None = None, lookahead: int = 2, resume: bool = False,
                 resident_bytes: int | None = None, host_share: int | str | None = None,
                 sync: bool = False, max_grad_norm: float | None = None, clip: str = "deferred",
                 grads: str | None = None, loss_scale: LossScale | None = None, process_group=None) -> None:
        _check_args(lr, betas, eps, chunk_bytes, lookahead, resident_bytes)
        self._grads_given = grads is not None
        grads = check_clip_args(max_grad_norm, clip, grads, model is not None, loss_scale)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, fused=fused, amsgrad=False)
        super().__init__(params, defaults)
        self._units = _offload_units(model) if model is not None else None
        self._config = config
        self._store = store if store is not None else (self._units.store if self._units is not None else None)
        self._owns_store = self._store is None
        self.name = name
        self.chunk_bytes = chunk_bytes
        self.lookahead = lookahead
        self.resume = resume
        self.resident_bytes = resident_bytes
        self.host_share = host_share
        # with model=, backward updates units and writes weights before step(): each step is
        # committed before step() returns, so that nothing of it is left for the next backward
        self.sync = sync or self._units is not None
        self._pending: int | None = None  # a step that step() returned from, not committed yet
        self._broken: BaseException | None = None  # a step failed to become durable
        self._marked = False  # the parameters carry the mark of a step 1 not committed yet
        self._model = model
        self._process_group = process_group
        self._index_params()
        refuse_global_ops(self._sharded, model=model, max_grad_norm=max_grad_norm, loss_scale=loss_scale,
                          grads=grads)
        self._chunks: list[Chunk] = []
        self._step = 0  # last committed step
        self._updated: set[int] = set()  # chunk indexes already updated in the step in progress
        self._stepped_params: set[int] = set()
        self._writes: list = []
        self._state_reads: dict[int, object] = {}  # chunk index -> acquire future started in backward
        self._hooks: list = []
        self._init_clipping(max_grad_norm, clip, grads, loss_scale)
        self._init_host()
        self._open = False

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> "OffloadedAdamW":
        """Open the store (if this optimizer owns it), reserve host memory, plan the chunks,
        find earlier state."""
        if self._open:
            return self
        if self._owns_store:
            self._store = TieredStore(load_config(self._config)).open()
        try:
            self._group = commit_group(self._sharded, self._process_group)
            error = None
            try:
                self._prepare_open()
            except Exception as e:  # noqa: BLE001 - raised by _find_state once the other ranks know
                error = e
            self._find_state(error)
            if self._units is not None and self.grads != "keep":
                self._install_grad_hooks()
        except BaseException:
            self._remove_hooks()
            self._release_resident()
            self._end_host()
            if self._owns_store:
                self._store.close()
            raise
        self._open = True
        return self

    def _prepare_open(self) -> None:
        """Reserve host memory, check the parameters, plan the chunks and place resident ones."""
        self._reserve_host()
        self._check_params()
        if self._units is not None:
            self._units.check_trainable()
        self._chunks = plan_chunks(self._params, self._group_of,
                                   self.chunk_bytes or self._default_chunk_bytes(), self._units,
                                   trainable=[p.requires_grad for p in self._param_objs])
        self._check_per_unit()
        self._check_budget()
        self._place_resident()

    def close(self) -> None:
        """Commit the last step on this rank (see :meth:`flush`; never a collective, also when
        leaving a ``with`` block on an exception); close the store if this optimizer opened it."""
        if not self._open:
            return
        self._remove_hooks()
        self._drop_state_reads()
        try:
            self._drop_parked()
            self._settle()
        finally:
            self._open = False
            try:
                self._wait_writes()  # resident buffers are write sources until their writes are done
            finally:
                self._release_resident()
                self._end_host()
                if self._owns_store:
                    self._store.close()
                else:
                    self._store.plan([], owner=self.owner)  # nothing more will be read
                    self._evict_cached()

    def flush(self) -> None:
        """Make the last step durable on this rank now (it is otherwise committed when the next
        step begins); not a collective: under a process group the ranks agree in ``step()``."""
        self._check_open()
        self._settle()

    def __enter__(self) -> "OffloadedAdamW":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self, agreeing: bool = False) -> None:
        """Open and not broken; ``agreeing``: the caller is where the ranks agree (``step()``,
        ``load_state_dict``), so a broken rank first tells the others (see ``_tell_broken``)."""
        if not self._open:
            raise OptimStateError("OffloadedAdamW is not open: call open() or use it as a context manager")
        if self._broken is not None:
            if agreeing:
                self._tell_broken()
            every = " by every rank of the process group" if self._group is not None else ""
            raise OptimStateError(f"OffloadedAdamW {self.name!r}: {self._rank_label}a step failed after step "
                                  f"{self._step} ({self._broken!r}); reopen with resume=True to continue from the "
                                  f"last step committed{every}") from self._broken

    def _settle(self) -> None:
        """Commit the step that step() returned from, if any, on this rank (no collective):
        before the next one writes, or for flush/state_dict/close."""
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        try:
            self._commit(s)
        except BaseException as e:
            self._break(e)
            raise

    def _next_step(self) -> int:
        """The step to write now, once the last one is committed (step 1: the parameters are
        about to change with no stored weights of step 0, see ``_mark_changing``)."""
        self._settle()
        if self._step == 0:
            self._mark_changing()
        return self._step + 1

    @property
    def store(self) -> TieredStore:
        return self._store

    @property
    def chunks(self) -> int:
        """How many chunks the state is cut into."""
        return len(self._chunks)

    @property
    def state_elements(self) -> int:
        """Parameter elements that have optimizer state (frozen parameters have none)."""
        return sum(c.numel for c in self._chunks)

    @property
    def resident_chunks(self) -> int:
        """How many of them are resident in host memory now."""
        return sum(c.resident is not None for c in self._chunks)

    @property
    def _marker_key(self) -> str:
        return f"{self.name}/step"

    def _chunk_key(self, c: Chunk, step: int) -> str:
        return f"{self.name}/c{c.index:06d}/{step % 2}"

    def _master_key(self, c: Chunk, step: int) -> str:
        """A split chunk's master object (the parameters as of that step)."""
        return f"{self.name}/w{c.index:06d}/{step % 2}"

    # -- stepping --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Update every chunk backward did not; the step is committed when the next one begins
        (``sync=True``: before this returns)."""
        self._check_open(agreeing=True)
        self._refuse_amp_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._before_update():
            return loss  # loss scaling found inf/nan: skipped, nothing updated
        s = self._next_step()
        todo = [c for c in self._chunks if c.index not in self._updated]
        try:
            with self._breaks_on_error():
                self._run(todo, s)
                if self.loss_scale is not None:
                    self.loss_scale.update(False)
                if self.sync:
                    self._commit(s)
        except Exception as e:
            if self.sync:  # the other ranks are agreeing on step s now
                self._agree(self._step, error=e)
            raise
        if self.sync:
            self._agree(s)
            self._unmark_changing()
        else:
            self._pending = s
        return loss

    def _before_update(self) -> bool:
        """Gradients checked and prepared (False: the step is skipped, see ``_prepare_grads``)
        and the last step committed. Under a process group each ``step()`` is one agreement:
        here (``sync=False``, or a skipped step), before anything of this step is written, else
        once this step is committed; a rank failing before it tells the others there."""
        error, go = None, False
        try:
            self._check_frozen_grads()
            go = self._prepare_grads()
            self._settle()
        except Exception as e:  # noqa: BLE001 - raised by _agree once the other ranks know
            error = e
        if error is not None or not self.sync or not go:
            self._agree(self._step, error=error)
            if self._step > 0:
                self._unmark_changing()
        return go

    @contextlib.contextmanager
    def _breaks_on_error(self):
        """A step that fails part-way cannot be retried: parameters (their own masters) may be
        updated already, resident chunks' writes may be lost, and a later marker would name a
        step some chunk never reached. The optimizer refuses further steps; resume=True
        continues from the last committed step."""
        try:
            yield
        except BaseException as e:
            self._break(e)
            raise

    def _check_params(self) -> None:
        """With ``model=``, every parameter is one of that model's: parameters of another (an
        un-offloaded copy) would be trained while the offloaded weights never change. The update
        runs on the CPU wherever the parameters are: gradients on a GPU come over per chunk, and
        new weights go back."""
        for i, p in enumerate(self._params):
            if p.device.type == "meta":
                raise ValueError(f"OffloadedAdamW: parameter {self._param_name(i)} is on meta: it has no data "
                                 "to update (materialize the model first)")
            in_unit = self._units is not None and self._units.owns_param(p)
            if p.requires_grad and not in_unit and torch._debug_has_internal_overlap(p) == 1:
                raise ValueError(f"OffloadedAdamW: parameter {self._param_name(i)} has elements sharing one memory "
                                 "location, so it cannot be updated in place: a placeholder of a model wrapped by "
                                 "tiered.offload? pass that model as model=")
        if self._units is not None:
            self._check_foreign_params()

    def _check_foreign_params(self) -> None:
        """With ``model=``, parameters of another module (an in-memory head) are trained in
        memory beside the model's; what looks like an un-offloaded copy of the model is refused:
        no parameter of the model at all, one named as a model parameter of that shape, or a
        set of parameters shaped like every parameter of the model's units."""
        foreign = [i for i in range(len(self._params)) if i not in self._names]
        if not foreign:
            return
        hint = ("(of another model, e.g. an un-offloaded copy?): pass that model's own parameters; "
                "parameters of other modules may be given beside them")
        if len(foreign) == len(self._params):
            raise ValueError(f"OffloadedAdamW: parameter {self._param_name(foreign[0])} is not a parameter of the "
                             f"model given as model= {hint}")
        shapes = {n: (tuple(p.shape), p.dtype) for n, p in self._model.named_parameters()}
        given = [n for g in self.param_groups for n in g.get("param_names", [None] * len(g["params"]))]
        for i in foreign:
            p = self._params[i]
            if given[i] in shapes and shapes[given[i]] == (tuple(p.shape), p.dtype):
                raise ValueError(f"OffloadedAdamW: parameter {i} is named {given[i]!r} like a parameter of the "
                                 f"model given as model=, but is another tensor {hint}")
        unit_params = collections.Counter((tuple(q.shape), q.dtype) for u in self._units for q in u.params())
        others = collections.Counter((tuple(self._params[i].shape), self._params[i].dtype) for i in foreign)
        if unit_params and not (unit_params - others):
            raise ValueError(f"OffloadedAdamW: parameters {foreign[0]}.. are shaped like every parameter of the model "
                             f"given as model= but are other tensors {hint}")

    def _check_frozen_grads(self) -> None:
        """A parameter frozen at open() has no state: a gradient it got since is not silently ignored."""
        planned = {seg.param for c in self._chunks for seg in c.segments}
        for i in range(len(self._params)):
            if self._params[i].numel() == 0:
                continue  # nothing to update (a rank's empty shard of a small sharded parameter)
            if self._param_grad(i) is not None and i not in planned:
                raise OptimStateError(f"OffloadedAdamW {self.name!r}: parameter {self._param_name(i)} has a gradient "
                                      "but was frozen (requires_grad=False) when the optimizer opened, so it has no "
                                      "state; unfreeze parameters before open()")

    def _param_grad(self, i: int) -> torch.Tensor | None:
        """Parameter ``i``'s gradient as the tensor lining up with what is updated."""
        return local_grad(self._param_objs[i])

    def _index_params(self) -> None:
        """Index the parameters over the param groups (again after :meth:`add_param_group`)."""
        # the tensors updated: each DTensor parameter's local shard (FSDP2), else the parameter
        self._param_objs: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._params, self._sharded = local_shards(self._param_objs)
        self._group_of: list[int] = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._param_steps: list[int] = [0] * len(self._params)
        model = self._model
        self._names = _param_names(model, self._params) if model is not None else {}
        self._norm_order = norm_order(model, self._param_objs)

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, before :meth:`open` only (the chunk layout is planned
        there and fixed in the store from then on)."""
        if getattr(self, "_open", False):
            raise OptimStateError("OffloadedAdamW: add_param_group after open() is not supported "
                                  "(the chunk layout in the store is fixed)")
        super().add_param_group(param_group)
        if "_param_objs" not in self.__dict__:
            return  # torch's __init__ adding the constructor's groups
        try:
            refuse_global_ops(local_shards(list(self.param_groups[-1]["params"]))[1], model=self._model,
                              max_grad_norm=self.max_grad_norm, loss_scale=self.loss_scale, grads=self.grads)
        except ValueError:
            self.param_groups.pop()
            raise
        self._index_params()


def _check_args(lr, betas, eps, chunk_bytes, lookahead, resident_bytes) -> None:
    if not 0.0 <= lr:
        raise ValueError(f"OffloadedAdamW: lr must be >= 0, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"OffloadedAdamW: betas must be in [0, 1), got {betas}")
    if not 0.0 <= eps:
        raise ValueError(f"OffloadedAdamW: eps must be >= 0, got {eps}")
    if chunk_bytes is not None and chunk_bytes < 12 * ALIGN_ELEMS:
        raise ValueError(f"OffloadedAdamW: chunk_bytes must be >= {12 * ALIGN_ELEMS}, got {chunk_bytes}")
    if lookahead < 0:
        raise ValueError(f"OffloadedAdamW: lookahead must be >= 0, got {lookahead}")
    if resident_bytes is not None and resident_bytes < 0:
        raise ValueError(f"OffloadedAdamW: resident_bytes must be >= 0, got {resident_bytes}")


def _param_names(model: nn.Module, params: list[torch.Tensor]) -> dict[int, str]:
    """Index of each of ``params`` that ``model`` holds -> its name there."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {i: by_id[id(p)] for i, p in enumerate(params) if id(p) in by_id}


def _offload_units(model: nn.Module):
    from ..offload import offload_units

    try:
        return offload_units(model)
    except Exception as e:
        raise ValueError(f"OffloadedAdamW(model=...): {e}") from None
