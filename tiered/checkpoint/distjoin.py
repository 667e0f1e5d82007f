"""Joining a process group: what ``open`` and ``rejoin`` of a
:class:`~.distributed.DistributedCheckpointer` settle with the other ranks.

Every step is collective and ends on every rank with the same verdict: a rank that fails to
open its side (its directory is locked, its store does not open) or a rank 0 that cannot read
the global directory tells the others, who raise at once instead of waiting for a collective
to time out. Rank 0 holds the claim on the global directory (moved with the rank number on
``rejoin``). Local steps committed after the newest global step's local commit never committed
globally and are deleted; nothing else is. A global directory without records while a rank
has local steps is an error on every rank (the directory is likely lost or misplaced, and
deleting the steps would lose the only copies).
"""

from __future__ import annotations

import datetime
import logging

import torch.distributed as dist

from ._wire import all_gather_json, broadcast_json
from .commit import commit_order
from .dirs import DirectoryClaim
from .distcommit import GlobalSteps
from .format import CheckpointError
from .globalrec import committed, remove_leftovers, remove_record
from .peer import PeerCopies

log = logging.getLogger("tiered.checkpoint")


class Joining:
    """The open/rejoin half of :class:`~.distributed.DistributedCheckpointer`."""

    def open(self):
        """Open this rank's side, then join the others (collective: every rank calls it)."""
        if self._opened:
            return self
        error = None
        try:
            super().open()
            if self.peer:
                self._peer = PeerCopies(self.host, self.host_wait)
        except BaseException as e:  # noqa: BLE001 - told to every rank by _join, then raised here
            error = e
        try:
            self._join(error)
        except BaseException:
            if self._opened:
                self.close()
            else:
                self._release_resources()
            raise
        return self

    def rejoin(self) -> None:
        """Join a new process group (after a rank failed and was restarted, every rank of the old
        job that lives on calls this while the restarted ones ``open``): new groups, the global
        steps from rank 0, and the peer snapshot held here kept if it is still the previous rank's."""
        self._check_open()
        busy = [g.step for g in self._pending_global() if not g.done()]
        if busy:
            raise CheckpointError(f"rejoin(): steps {busy} are still being committed in the old group; wait for "
                                  "them first (they fail once its ranks are gone)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._join()
        self._broken = None

    def _join(self, error: BaseException | None = None) -> None:
        """Collective: new groups; every rank's ``error`` (of opening its side) told to all;
        the global steps from rank 0 (its newest ``keep_last``: older records are retired); the
        local steps that never committed globally deleted."""
        if self.rank != 0 and self._global_claim is not None:  # rank 0 no more: the new one claims it
            claim, self._global_claim = self._global_claim, None
            claim.release()
        timeout = datetime.timedelta(seconds=self.timeout)
        self._groups = tuple(dist.new_group(backend="gloo", timeout=timeout) for _ in range(2))
        group = self._groups[1]
        everyone_ok(error, group, "open()")
        head = broadcast_json(self._global_head() if self.rank == 0 else None, 0, group)
        if "error" in head:
            raise CheckpointError(f"rank 0 could not read the global directory {self.global_directory}: "
                                  f"{head['error']}")
        order = head["order"]
        steps = [s for _seq, s, _w in order]
        doomed, problem = self._uncommitted(steps)
        everyone_ok(problem, group, "open()")
        with self._lock:
            self._slots = 0  # the saves of every rank are counted from here, in the new group
            self._undecided = set()  # decided now, by the records
        with self._retire_lock:
            self._view = GlobalSteps(tuple(steps), {s: w for _seq, s, w in order})
            for step in doomed:
                self.delete(step, _directory=self.directory)
        if self._peer is not None and self._peer.held_step((self.rank - 1) % self.world, self.world) not in steps:
            self._peer.close()  # another layout's, or a step that is no longer committed

    def _global_head(self) -> dict:
        """Rank 0: claim the global directory, clean it, read its records (or the error)."""
        try:
            if self._global_claim is None:
                claim = DirectoryClaim({"global_directory": self.global_directory})
                claim.acquire()
                self._global_claim = claim
            remove_leftovers(self.global_directory)
            order = committed(self.global_directory)
        except BaseException as e:  # noqa: BLE001 - broadcast, then raised on every rank
            return {"error": f"{type(e).__name__}: {e}"}
        self._global_seq = order[-1][0] if order else 0
        for _seq, old, _w in order[:-self.keep_last]:  # left by a retirement that failed
            try:
                remove_record(self.global_directory, old)
            except OSError as e:
                log.error("checkpoint %s: retiring global step %d in %s: %s", self.name, old,
                          self.global_directory, e)
        return {"order": [list(x) for x in order[-self.keep_last:]]}

    def _uncommitted(self, steps: list[int]) -> tuple[list[int], CheckpointError | None]:
        """The local steps committed after the newest global step's local commit and named by
        no record: saves that never committed globally. An error where the records are gone."""
        order = commit_order(self.directory)
        if not steps:
            if order:
                return [], CheckpointError(
                    f"the global directory {self.global_directory} has no records, but rank {self.rank} has local "
                    f"steps {order} in {self.directory}: nothing was deleted. If the global directory was lost "
                    "(it is on rank 0's disk by default), pass global_directory= where the records are, or "
                    "delete the local steps to start afresh")
            return [], None
        if steps[-1] not in order:  # this rank's copies are gone (a new disk) or older: keep what is here
            return [], None
        return [s for s in order[order.index(steps[-1]) + 1:] if s not in steps], None


def everyone_ok(error: BaseException | None, group, what: str) -> None:
    """Collective: raise ``error`` here, and a CheckpointError naming it on every other rank."""
    said = all_gather_json(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    others = [f"rank {r}: {m}" for r, m in enumerate(said) if m]
    if others:
        raise CheckpointError(f"{what} failed on another rank: {'; '.join(others)}")
