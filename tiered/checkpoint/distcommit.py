"""The global commit of a :class:`~.distributed.DistributedCheckpointer` (its background thread).

Every ``save`` call on every rank takes one slot of the global sequence, in call order, also a
save that raised (it votes "not durable"): so one rank's failing ``save`` fails that step on
every rank instead of shifting its later steps against the other ranks'. For each slot every
rank gathers (durable?, step, slot number); ranks whose slots differ saved different steps in
one slot, and the group stops (every later step fails until ``rejoin``) rather than commit a
record that mixes them.

Rank 0 writes the global record; once it is renamed into place the step is committed on every
rank. What rank 0 does after that (fsync of the directory, retiring old records) can fail
without undoing the commit: it is logged and raised by rank 0's next ``wait_all`` or
``close``. A rank deletes its local copy of a step once every rank agreed the step
did not commit; where the collectives broke off instead (a rank died, a timeout) the outcome is
unknown here and the copy stays until ``open``/``rejoin`` reads the records.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from tiered.io_engine import IOFuture

from ..atomic import fsync_dir
from ._wire import all_gather_ints, all_gather_json, broadcast_json
from .commit import commit_order
from .format import CheckpointError
from .globalrec import committed, rank_items, remove_leftovers, remove_record, step_dir, write_record
from .snapshot import CheckpointHandle

log = logging.getLogger("tiered.checkpoint")


class _Agreed(CheckpointError):
    """A step every rank failed to commit, knowingly: the group is still in step."""


class GlobalSteps(NamedTuple):
    """The globally committed steps kept (oldest commit first) and the world size of each:
    replaced as a whole, so readers need no lock."""

    steps: tuple[int, ...] = ()
    worlds: dict = {}


class GlobalHandle:
    """One distributed ``save``: ``wait`` returns once the step is globally committed."""

    def __init__(self, local, slot: int, *, counted: bool = True) -> None:
        self.local = local  # this rank's CheckpointHandle (its snapshot and local commit)
        self.step = local.step
        self.slot = slot  # which save() call of this rank it is (the same on every rank)
        self.counted = counted  # registered as in flight (a save that raised is not)
        self.committed = IOFuture(f"checkpoint step {local.step} global commit")
        self._observed = False

    @property
    def stall_s(self) -> float:
        return self.local.stall_s

    @property
    def stats(self) -> dict:
        return self.local.stats

    def wait_snapshot(self, timeout: float | None = None) -> None:
        self.local.wait_snapshot(timeout)

    def done(self) -> bool:
        return self.committed.done()

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the step is globally committed; raises what stopped it (on every rank)."""
        self._observed = self.local._observed = True
        return self.committed.result(timeout)

    def __repr__(self) -> str:
        return f"<GlobalHandle step={self.step} {'committed' if self.done() else 'pending'}>"


def failed_vote(step, slot: int, error: BaseException) -> GlobalHandle:
    """The slot of a ``save`` that raised (its caller saw the error): votes "not durable"."""
    local = CheckpointHandle(step if isinstance(step, int) and not isinstance(step, bool) else -1, 0)
    local.durable.set_exception(error)
    local._snapshot.set()
    local._observed = True
    g = GlobalHandle(local, slot, counted=False)
    g._observed = True
    return g


class GlobalCommits:
    """The global-commit half of :class:`~.distributed.DistributedCheckpointer`."""

    def _global_loop(self) -> None:
        while (g := self._global_q.get()) is not None:
            try:
                info = self._commit_globally(g)
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                if not isinstance(e, CheckpointError):  # a collective failed: a rank died, or timed out
                    wrapped = CheckpointError(f"checkpoint step {g.step} is not committed globally: {e}")
                    wrapped.__cause__ = e
                    e = wrapped
                self._decided(g)
                g.committed.set_exception(e)
                with self._lock:
                    self._failures.append((g, e))
                self._retire_quietly(g.step)  # the local copy of a step that will never be global
            else:
                self._decided(g)
                g.committed.set_result(info)

    def _decided(self, g: GlobalHandle) -> None:
        """The slot is decided: its outgoing peer copies and its in-flight mark go."""
        if self._peer is not None:
            self._peer.drop_outgoing(g.local)
        if g.counted:
            with self._lock:
                self._in_flight[g.step] -= 1
                if self._in_flight[g.step] <= 0:
                    del self._in_flight[g.step]

    def _retire_quietly(self, step: int) -> None:
        try:
            self._retire(self.directory, self.keep_last)
        except BaseException as e:  # noqa: BLE001 - raised by wait_all() or close()
            self._record_after(step, f"retiring local steps in {self.directory}: {e}", e)

    def _agree(self, g: GlobalHandle, ok: bool) -> list[int]:
        """Collective: which ranks made their snapshot of ``g`` durable. Ranks whose slot holds
        another step (or another slot) are out of step: a CheckpointError that breaks the group."""
        votes = all_gather_ints([int(ok), g.step, g.slot], self._groups[0])
        if any((s, n) != (g.step, g.slot) for _ok, s, n in votes):
            seen = ", ".join(f"rank {r} step {s} (save #{n})" for r, (_ok, s, n) in enumerate(votes))
            raise CheckpointError(f"checkpoint step {g.step}: the ranks' saves are out of step ({seen}): every "
                                  "rank must call save() the same number of times, with the same steps, in the "
                                  "same order")
        return [r for r, (flag, _s, _n) in enumerate(votes) if flag]

    def _commit_globally(self, g: GlobalHandle) -> dict:
        """The global commit of one step; a failure every rank agrees on leaves the group usable,
        any other (a rank died, a collective timed out or broke mid-way) leaves it unusable: later
        steps fail at once until every rank calls ``rejoin``."""
        if self._broken is not None:
            raise CheckpointError(f"checkpoint step {g.step} is not committed globally: the checkpointer's process "
                                  f"group broke at {self._broken}; every rank must rejoin() a new group")
        try:
            return self._commit_steps(g)
        except _Agreed:
            raise
        except BaseException as e:
            self._broken = f"step {g.step} ({type(e).__name__}: {e})"
            with self._lock:  # rank 0 may have written its record: the next open or rejoin decides
                self._undecided.add(g.step)
            raise

    def _durable(self, g: GlobalHandle) -> BaseException | None:
        """Wait (at most ``timeout``) for this rank's local commit; what stopped it, if anything."""
        try:
            g.local.durable.result(self.timeout)
        except TimeoutError:
            return CheckpointError(f"checkpoint step {g.step} was not durable on rank {self.rank} within "
                                   f"timeout={self.timeout} s")
        except BaseException as e:  # noqa: BLE001 - reported by the caller, on every rank
            return e
        return None

    def _commit_steps(self, g: GlobalHandle) -> dict:
        h, group = g.local, self._groups[0]
        err = self._durable(g)
        good = self._agree(g, err is None)
        if len(good) < self.world:
            bad = sorted(set(range(self.world)) - set(good))
            raise _Agreed(f"checkpoint step {g.step} is not committed globally: rank(s) {bad} did not "
                          f"make their snapshot durable" + (f" (here: {err})" if err else "")) from err
        mpath = self.directory / f"step-{g.step:012d}.json"
        try:
            items = rank_items(h.dcp, h.doc, self._retained_paths(h.doc, mpath))
        except CheckpointError as e:  # every rank learns it from the gather
            items = {"error": f"rank {self.rank}: {e}"}
        everyone = all_gather_json(items, group)
        errors = [p["error"] for p in everyone if "error" in p]
        if errors:
            raise _Agreed(f"checkpoint step {g.step} is not committed globally: {'; '.join(errors)}")
        held = self._peer.exchange(h, self.rank, self.world, group) if self._peer is not None else None
        try:
            self._record_globally(g.step, everyone)
        except BaseException:
            if held is not None:
                self._peer.free(held)
            raise
        self._add_global(g.step)
        if held is not None:
            self._peer.hold(held)
        self._retire_quietly(g.step)  # committed: a failure from here on does not undo it
        if self.rank == 0:
            self._after_record(g.step)
        return {"step": g.step, "global": str(step_dir(self.global_directory, g.step)), "manifest": str(mpath)}

    def _record_globally(self, step: int, everyone: list[dict]) -> None:
        """Rank 0 writes the record (the commit point) and tells every rank whether it did."""
        failure = None
        if self.rank == 0:
            try:
                self._write_global(step, everyone)
            except BaseException as e:  # noqa: BLE001 - broadcast, then raised on every rank
                failure = f"{type(e).__name__}: {e}"
        failure = broadcast_json(failure, 0, self._groups[0])
        if failure is not None:
            raise _Agreed(f"checkpoint step {step}: rank 0 could not write its global record in "
                          f"{self.global_directory}: {failure}")

    def _write_global(self, step: int, everyone: list[dict]) -> None:
        """Rank 0: the global record of ``step``; committed once its metadata is renamed in."""
        self._global_seq += 1
        write_record(self.global_directory, step, everyone, self._global_seq)

    def _add_global(self, step: int) -> None:
        view = self._view
        steps = ([s for s in view.steps if s != step] + [step])[-self.keep_last:]
        self._view = GlobalSteps(tuple(steps), {s: view.worlds.get(s, self.world) for s in steps})

    def _after_record(self, step: int) -> None:
        """Rank 0, after a commit: retire the records beyond ``keep_last`` (and what an earlier
        failed retirement left); a failure here does not undo the commit."""
        root = self.global_directory
        try:
            fsync_dir(root)
            order = [s for _seq, s, _w in committed(root)]
            for old in order[:-self.keep_last]:
                remove_record(root, old)
            remove_leftovers(root)
        except BaseException as e:  # noqa: BLE001 - raised by wait_all() or close()
            self._record_after(step, f"after committing step {step}: retiring old global records in {root}: {e}", e)

    def _record_after(self, step: int, what: str, e: BaseException) -> None:
        log.error("checkpoint %s: %s", self.name, what)
        failed = CheckpointHandle(step, 0)
        failed.durable.set_exception(e)
        err = CheckpointError(what)
        err.__cause__ = e
        with self._lock:
            self._failures.append((failed, err))

    def _retire(self, directory, keep: int) -> None:
        """Local steps: keep those a kept global record names, those whose global commit is
        still in flight and those whose commit broke off undecided; delete the rest (older ones,
        and ones every rank agreed did not commit)."""
        with self._retire_lock:
            kept = set(self._view.steps)
            with self._lock:
                kept |= set(self._in_flight) | self._undecided
            for step in commit_order(directory):
                if step not in kept:
                    self.delete(step, _directory=directory)
