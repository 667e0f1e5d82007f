"""Steps committed by every rank: OffloadedAdamW over the ranks of a process group (FSDP2).

Each rank keeps the state of its shards in a store of its own (``{rank}`` in the tier path)
and commits a step there as one process does (chunks under keys of parity ``s % 2``, then its
marker). Over the ranks, step *s* is complete only once every rank's marker of *s* is durable.
Three rules keep every rank able to return to the last complete step after any rank is killed:

- after its marker of step *s* is durable, a rank waits (one all-reduce) until every rank's is
  before it writes anything of step *s+1*, which goes over the keys of step *s-1*. So while
  any rank lacks marker *s*, every rank still holds step *s-1* whole: the ranks' markers name
  at most two steps, *s-1* and *s*.
- a marker names its step and the step before it (and each parameter's step count at both),
  whose chunks are intact under the other parity.
- on open with ``resume=True`` the ranks agree (all-reduce) on the lowest step their markers
  name, the last one every rank has durable, and read that step's chunks as one process
  resumes; a rank whose marker is a step ahead then rewrites it to name that step alone,
  durably, before any rank goes on (a second all-reduce): the keys of the step it abandons are
  the ones the next step writes over, so a later crash cannot bring it back.

Which calls talk to the other ranks: ``open()`` (two all-reduces), ``step()`` (one each call,
skipped steps included) and ``load_state_dict()`` (two); every rank makes them together, as it
makes FSDP2's forward and backward. ``state_dict()``, ``flush()``, ``close()`` and leaving a
``with`` block (also on an exception) commit the last step on this rank only, so one rank may
call them alone: the agreement on that step comes in the next ``step()`` (or at resume).

In ``step()`` the agreement is before anything of the step is written (``sync=False``: on the
step before it, committed there) or once the step is committed (``sync=True``): one all-reduce
of five int64, the step (twice, for a state dict being loaded), their negations and whether
this rank is fine, so every rank learns at once whether all of them committed the same step.
A rank that fails before the agreement (checking gradients, committing, an invalid state dict,
a failed open) says so in it instead of leaving the others waiting; one that fails after it
(its update, or a commit in ``flush``/``close``/``state_dict``) says so in the next agreement
it joins. Any failure breaks the optimizer on every rank; reopen every rank with
``resume=True``. The all-reduce waits for the slowest rank's fdatasync, which the step needs
anyway, and fails as soon as a rank is gone (the process group's timeout at most). The group
is ``process_group=`` if given, else the default group when any parameter is a DTensor; a
process alone in its group does none of this.
"""

from __future__ import annotations

import torch

from .layout import OptimStateError

try:  # torch.distributed may be missing from a build
    import torch.distributed as dist
except ImportError:  # pragma: no cover - no distributed support in this torch
    dist = None


def commit_group(sharded: dict, process_group):
    """The process group whose ranks commit each step together, or None (one process)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("OffloadedAdamW: process_group= given but torch.distributed is not initialized")
        return None
    group = process_group if process_group is not None else (dist.group.WORLD if sharded else None)
    if group is None or dist.get_world_size(group) == 1:
        return None
    return group


def _all_min(group, values: list[int]) -> list[int]:
    """Element-wise minimum of ``values`` over the ranks of ``group`` (a tensor on the device
    the group's backend works on: CUDA for NCCL, else the CPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return [int(x) for x in t.cpu()]


class _RankCommit:
    """Part of :class:`~tiered.optim.OffloadedAdamW` (see the module docstring)."""

    _group = None
    _told = False  # the other ranks know this optimizer is broken (it raised in an agreement)

    @property
    def _rank_label(self) -> str:
        return "" if self._group is None else f"rank {dist.get_rank(self._group)}: "

    def _group_min(self, values: list[int], what: str) -> list[int]:
        """:func:`_all_min` over this optimizer's group; a rank gone or the group's timeout is
        an :class:`OptimStateError` naming ``what`` was being agreed."""
        try:
            return _all_min(self._group, values)
        except RuntimeError as e:  # a rank is gone (its connection closed) or the group timed out
            raise OptimStateError(
                f"OffloadedAdamW {self.name!r}: {self._rank_label}could not learn whether every rank of the process "
                f"group {what} ({e}); reopen every rank with resume=True: they continue from the last step all "
                "of them committed") from e

    def _agree(self, s: int, loading: int | None = None, error: BaseException | None = None) -> None:
        """Every rank's last committed step is ``s``, durable, (``loading``: and every rank
        loads a state dict as the same step) and no rank failed (``error``: this one did),
        before any rank writes the step after it. One all-reduce of five int64: both steps,
        their negations (min == max) and the rank's verdict. Raises on every rank when any rank
        failed or they differ; under a process group that breaks the optimizer on every rank."""
        if self._group is None:
            if error is not None:
                raise error
            return
        steps = [s, s if loading is None else loading]
        try:
            got = self._group_min([*steps, *(-x for x in steps), int(error is None)], f"committed step {s}")
            if error is not None:
                raise error
            low, high = got[:2], [-x for x in got[2:4]]
            if not got[-1]:
                raise OptimStateError(
                    f"OffloadedAdamW {self.name!r}: {self._rank_label}another rank of the process group failed "
                    f"(see its error); this rank committed step {s}: reopen every rank with resume=True: "
                    "they continue from the last step all of them committed")
            if low != high:
                raise OptimStateError(
                    f"OffloadedAdamW {self.name!r}: {self._rank_label}the ranks of the process group are not at one "
                    f"step: this rank at {steps}, the lowest {low}, the highest {high} (did a rank skip a step, or "
                    "load a state dict of another step?); reopen every rank with resume=True")
        except BaseException as e:
            self._break(e, told=True)
            raise

    def _break(self, e: BaseException, told: bool = False) -> None:
        """No step after a failed one (see ``_breaks_on_error``); ``told``: the other ranks of
        the group know (they raised in the same agreement)."""
        if self._broken is None:
            self._broken = e
        self._told = self._told or told

    def _tell_broken(self) -> None:
        """A rank broken where the others could not hear of it (its step failed after the
        agreement, or its commit in ``flush``/``close``/``state_dict``) joins the next agreement
        the others make, once, saying it failed, so they raise instead of waiting for it."""
        if self._group is None or self._told:
            return
        self._told = True
        try:
            self._agree(self._step, error=self._broken)
        except BaseException as e:  # noqa: BLE001 - the caller raises the broken error
            if e is not self._broken:
                self._broken.add_note(f"telling the other ranks failed too: {e!r}")

    def _agree_step(self, mine: int, prev: int, error: BaseException | None) -> int:
        """The step every rank resumes from: the lowest step the ranks' markers name (``mine``,
        0 without a marker; ``prev``: the step before it this rank can return to, else -1).
        ``error``: this rank cannot open its state; it is raised on this rank, and every other
        rank raises too instead of waiting for it."""
        if self._group is None:
            if error is not None:
                raise error
            return mine
        low, all_ok = self._group_min([mine, int(error is None)], "can open its optimizer state")
        if error is not None:
            raise error
        if not all_ok:
            raise OptimStateError(f"OffloadedAdamW {self.name!r}: {self._rank_label}another rank of the process "
                                  "group cannot open its optimizer state (see its error)")
        return low

    def _check_agreed(self, low: int, able: bool, mine: int, prev: int, error: BaseException | None) -> None:
        """Every rank has returned to step ``low`` (``able``: this one has, its marker rewritten
        to name that step where it rolled back; ``error``: why it could not), before any rank
        writes a step after it."""
        all_able = (self._group_min([int(able)], f"returned to step {low}")[0] if self._group is not None
                    else able)
        if error is not None:
            raise error
        if not able:
            before = f" and {prev} before it" if prev >= 0 else ""
            raise OptimStateError(
                f"OffloadedAdamW {self.name!r}: {self._rank_label}the ranks' last common step is {low}, but this "
                f"rank's marker {self._marker_key!r} names step {mine}{before}, so it cannot return to step {low}: "
                "the ranks' stores do not belong to one run")
        if not all_able:
            raise OptimStateError(f"OffloadedAdamW {self.name!r}: {self._rank_label}another rank of the process "
                                  f"group cannot return to step {low}, the ranks' last common step (see its error)")
