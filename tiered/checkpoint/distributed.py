"""DistributedCheckpointer: lazy checkpoints of every rank, committed as one global step.

Each rank snapshots its own state as :class:`~.lazy.LazyCheckpointer` does (in the background,
guarded against the optimizer step) into its own store shard (``{rank}`` in the tier path, or in
``directory=``) and commits it locally (its manifest). A background thread then, for each step
in save order and on every rank: (1) gathers whether every rank's local commit succeeded;
(2) with ``peer=True``, sends this rank's snapshot to rank ``(rank + 1) % world`` and receives the
previous rank's (:mod:`.peer`); (3) gathers every rank's tensor extents to rank 0, which writes
the global record (:mod:`.globalrec`: the DCP metadata of the step, the commit point) and
broadcasts that it did. A step is globally committed only then; a rank that dies before leaves
every rank at the previous global step (at the next ``open``, each rank deletes the local steps no
global record names). ``latest()``, ``steps()`` and ``load()`` see global steps only.

Loading: at the same world size ``load`` is collective and restores each rank's shard (from the
peer's memory where the peer holds it, else from the rank's storage). At another world size,
:func:`load_resharded` reads the global record with :class:`~.dcp.TieredStorageReader` through DCP's
resharding planner: every globally committed step is also a DCP checkpoint, with no export step,
because a job that must shrink or grow after a failure has no chance to export first.

Collectives run on two gloo groups of their own (one for the background thread, one for
``open``/``load``), created by ``open`` (every rank calls it); every wait ends after ``timeout``.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tiered.io_engine import IOFuture

from .. import ranks
from ._wire import all_gather_ints, all_gather_json, broadcast_ints, broadcast_json, wait_all
from .commit import commit_order
from .dirs import DirectoryClaim
from .format import CheckpointError, StoreRef, decode_tree, encode_tree
from .globalrec import (
    committed, describe_state, latest_step, localize, rank_items, remove_leftovers, remove_record, step_dir,
    write_record,
)
from .lazy import LazyCheckpointer
from .load import _load_tensor, _targets
from .peer import PeerCopies, read_held

__all__ = ["DistributedCheckpointer", "GlobalHandle", "load_resharded"]


class _Agreed(CheckpointError):
    """A step every rank failed to commit, knowingly: the group is still in step."""


class GlobalHandle:
    """One distributed ``save``: ``wait`` returns once the step is globally committed."""

    def __init__(self, local) -> None:
        self.local = local  # this rank's CheckpointHandle (its snapshot and local commit)
        self.step = local.step
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


class DistributedCheckpointer(LazyCheckpointer):
    """:class:`LazyCheckpointer` of one rank of a ``torch.distributed`` job (see the module
    docstring). Create and ``open`` it on every rank after ``init_process_group``.

    ``directory`` may contain ``{rank}``; by default it is ``<tier path>/checkpoints/<name>`` of the
    rank's store shard. ``global_directory`` (rank 0 writes it; a resharded load reads it, so it
    and the shards must be on a file system every loading rank sees): default, next to rank 0's
    directory, ``<name>.global``. ``peer``: keep each rank's snapshot in the next rank's host memory
    too (:mod:`.peer`). ``timeout``: seconds any collective of the checkpointer may wait. Other
    arguments as for :class:`LazyCheckpointer` (no cold tier: its copies are not coordinated).
    """

    def __init__(self, config: Any = None, *, name: str = "default", directory: str | os.PathLike | None = None,
                 global_directory: str | os.PathLike | None = None, tier: str | None = None, peer: bool = False,
                 timeout: float = 600.0, **kwargs: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise CheckpointError("DistributedCheckpointer needs torch.distributed initialised first "
                                  "(torch.distributed.init_process_group)")
        for key in ("cold_tier", "cold_directory"):
            if kwargs.get(key) is not None:
                raise CheckpointError(f"{key}=: a DistributedCheckpointer keeps no cold level")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if peer and self.world < 2:
            raise CheckpointError(f"peer=True needs a world of at least 2 ranks, this one has {self.world}")
        template = str(directory) if directory is not None else None
        if template is not None and ranks.is_template(template):
            directory = ranks.expand(template)
        super().__init__(config, name=name, directory=directory, tier=tier, **kwargs)
        if global_directory is None:
            global_directory = self._default_global(template, tier)
        self.global_directory = Path(global_directory).resolve()
        self.peer = peer
        self.timeout = timeout
        self._global: list[int] = []  # globally committed steps kept, oldest commit first
        self._worlds: dict[int, int] = {}  # global step -> the world size that saved it
        self._global_seq = 0  # rank 0: commit_seq of the last global record
        self._groups: tuple | None = None  # (background thread's group, open/load group)
        self._peer: PeerCopies | None = None
        self._global_claim: DirectoryClaim | None = None
        self.restored_from_peer: int | None = None  # the rank the last load() got this rank's state from
        self._broken: str | None = None  # the step whose collectives broke the background group

    def _default_global(self, template: str | None, tier: str | None) -> Path:
        if template is None:
            spec = self._storage_tier(tier, "tier")
            template = str(Path(spec.path_template or spec.path) / "checkpoints" / self.name)
        rank0 = Path(ranks.expand(template, ranks.Ranks(0, 0, self.world))).resolve()
        return rank0.parent / f"{rank0.name}.global"

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> "DistributedCheckpointer":
        """Open this rank's side, then join the others (collective: every rank calls it)."""
        if self._opened:
            return self
        super().open()
        try:
            if self.peer:
                self._peer = PeerCopies(self.host, self.host_wait)
            if self.rank == 0:
                self._global_claim = DirectoryClaim({"global_directory": self.global_directory})
                self._global_claim.acquire()
                remove_leftovers(self.global_directory)
            self._join()
        except BaseException:
            self.close()
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

    def _join(self) -> None:
        """Collective: create this checkpointer's groups, learn the global steps from rank 0 and
        delete the local steps no global record names (saves that never committed globally)."""
        timeout = datetime.timedelta(seconds=self.timeout)
        self._groups = (dist.new_group(backend="gloo", timeout=timeout), dist.new_group(backend="gloo", timeout=timeout))
        order = committed(self.global_directory) if self.rank == 0 else None
        if order is not None:
            self._global_seq = order[-1][0] if order else 0
        pairs = broadcast_ints(None if order is None else [x for _seq, s, w in order for x in (s, w)], 0,
                               self._groups[1])
        steps = pairs[0::2]
        with self._retire_lock:
            self._global = steps
            self._worlds = dict(zip(steps, pairs[1::2]))
            for step in commit_order(self.directory):
                if step not in steps:
                    self.delete(step, _directory=self.directory)
        if self._peer is not None and self._peer.held_step((self.rank - 1) % self.world, self.world) not in steps:
            self._peer.close()  # another layout's, or a step that is no longer committed

    def _start_threads(self) -> None:
        super()._start_threads()
        self._global_q: queue.Queue = queue.Queue()
        self._globals: list[GlobalHandle] = []
        t = threading.Thread(target=self._global_loop, name="tiered-ckpt-global", daemon=True)
        self._threads.append(t)
        t.start()

    def close(self) -> None:
        """Finish pending saves (each global commit included), then close as LazyCheckpointer does."""
        if self._opened and self._threads:
            self._global_q.put(None)
        super().close()

    def _release_resources(self) -> None:
        try:
            if self._peer is not None:
                self._peer.close()
                self._peer = None
        finally:
            try:
                super()._release_resources()
            finally:
                claim, self._global_claim = self._global_claim, None
                if claim is not None:
                    claim.release()

    # -- save ------------------------------------------------------------------------
    def save(self, state_dict: Any, step: int) -> GlobalHandle:
        """Start checkpointing this rank's ``state_dict`` as ``step`` (every rank saves the same
        steps in the same order); returns at once. DTensors are saved as their local shards, with
        their place in the global tensor recorded for resharding."""
        self._check_open()
        with self._retire_lock:
            if step in self._global:
                raise CheckpointError(f"save(step={step}): step {step} is globally committed already (in "
                                      f"{self.global_directory}); a committed step is not overwritten")
        desc = describe_state(state_dict)
        local_sd = localize(state_dict)
        if self.peer:
            found: list = []
            encode_tree(local_sd, found)
            refs = [n for n, t in found if isinstance(t, StoreRef)]
            if refs:
                raise CheckpointError(f"save(step={step}): {refs[0]!r} is a StoreRef; peer=True holds copied "
                                      "tensors only")
        local = super().save(local_sd, step)
        local.dcp = desc
        g = GlobalHandle(local)
        with self._lock:
            self._globals = [x for x in self._globals if not x.done()] + [g]
        self._global_q.put(g)
        return g

    def _put_piece(self, h, p) -> None:
        if self._peer is not None:
            self._peer.keep(h, p)  # before the store is given the buffer
        super()._put_piece(h, p)

    def _pending_global(self) -> list[GlobalHandle]:
        with self._lock:
            return list(self._globals)

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every save so far is globally committed (raises the first failure)."""
        super().wait_all(timeout)
        for g in self._pending_global():
            try:
                g.wait(timeout)
            except TimeoutError:
                raise
            except BaseException as e:
                with self._lock:
                    self._failures = [(f, x) for f, x in self._failures if f is not g]
                raise CheckpointError(f"checkpoint step {g.step} was not committed globally: {e}") from e
        self._raise_unobserved()

    # -- the global commit ---------------------------------------------------------------
    def _global_loop(self) -> None:
        while (g := self._global_q.get()) is not None:
            try:
                info = self._commit_globally(g)
            except BaseException as e:  # noqa: BLE001 - delivered through the handle
                if not isinstance(e, CheckpointError):  # a collective failed: a rank died, or timed out
                    wrapped = CheckpointError(f"checkpoint step {g.step} is not committed globally: {e}")
                    wrapped.__cause__ = e
                    e = wrapped
                g.committed.set_exception(e)
                with self._lock:
                    self._failures.append((g, e))
            else:
                g.committed.set_result(info)
            finally:
                if self._peer is not None:
                    self._peer.drop_outgoing(g.local)

    def _agree(self, step: int, ok: bool) -> list[int]:
        """Collective: which ranks made their snapshot of ``step`` durable."""
        return [r for r, (flag,) in enumerate(all_gather_ints([int(ok)], self._groups[0])) if flag]

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
            raise

    def _commit_steps(self, g: GlobalHandle) -> dict:
        h, group = g.local, self._groups[0]
        try:
            h.durable.result()
            err = None
        except BaseException as e:  # noqa: BLE001 - reported below, on every rank
            err = e
        good = self._agree(g.step, err is None)
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
            failure = None
            if self.rank == 0:
                try:
                    self._write_global(g.step, everyone)
                except BaseException as e:  # noqa: BLE001 - broadcast, then raised on every rank
                    failure = f"{type(e).__name__}: {e}"
            failure = broadcast_json(failure, 0, group)
            if failure is not None:
                raise _Agreed(f"checkpoint step {g.step}: rank 0 could not write its global record in "
                              f"{self.global_directory}: {failure}")
        except BaseException:
            if held is not None:
                self._peer.free(held)
            raise
        with self._retire_lock:
            self._global = ([s for s in self._global if s != g.step] + [g.step])[-self.keep_last:]
            self._worlds = {s: self._worlds.get(s, self.world) for s in self._global}
        if held is not None:
            self._peer.hold(held)
        self._retire(self.directory, self.keep_last)
        return {"step": g.step, "global": str(step_dir(self.global_directory, g.step)), "manifest": str(mpath)}

    def _write_global(self, step: int, everyone: list[dict]) -> None:
        """Rank 0: the global record of ``step``, then retire the records beyond ``keep_last``."""
        self._global_seq += 1
        write_record(self.global_directory, step, everyone, self._global_seq)
        order = [s for _seq, s, _w in committed(self.global_directory)]
        for old in order[:-self.keep_last]:
            remove_record(self.global_directory, old)

    def _retire(self, directory: Path, keep: int) -> None:
        """Local steps: keep those a kept global record names, and those newer than the latest
        global step (not committed globally yet); delete the rest."""
        with self._retire_lock:
            kept = set(self._global)
            if not kept:
                return
            order = commit_order(directory)
            last = self._global[-1]
            if last not in order:
                return
            for step in order[:order.index(last)]:
                if step not in kept:
                    self.delete(step, _directory=directory)

    # -- inspection and load ------------------------------------------------------------
    def steps(self) -> dict[int, str]:
        """Globally committed steps (each one's level: "storage")."""
        with self._retire_lock:
            return {s: "storage" for s in sorted(self._global)}

    def local_steps(self) -> dict[int, str]:
        """This rank's locally committed steps (a step newer than ``latest()`` is not global yet)."""
        return super().steps()

    def latest(self) -> int | None:
        """The last globally committed step (the same on every rank)."""
        with self._retire_lock:
            return self._global[-1] if self._global else None

    def load(self, step: int | None = None, *, into: Any = None) -> Any:
        """Collective: this rank's state of global ``step`` (default: the latest), from the peer's
        memory where the peer holds it, else from this rank's storage. ``into`` as for
        :meth:`LazyCheckpointer.load` (DTensors are filled through their local shards)."""
        self._check_open()
        step = self.latest() if step is None else step
        if step is None:
            raise CheckpointError(f"no globally committed checkpoint in {self.global_directory}")
        if step not in self.steps():
            raise CheckpointError(f"load(step={step}): not globally committed; committed: {sorted(self.steps())}")
        saved_world = self._worlds[step]
        if saved_world != self.world:
            raise CheckpointError(f"load(step={step}): saved by a world of {saved_world} ranks, this one has "
                                  f"{self.world}: load it with load_resharded(state_dict, {str(self.global_directory)!r})")
        into = localize(into) if into is not None else None
        self.restored_from_peer = None
        if self._peer is None:
            return super().load(step, into=into)
        group = self._groups[1]
        held = [s for (s,) in all_gather_ints([self._peer.held_step((self.rank - 1) % self.world, self.world)],
                                              group)]
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        works = self._peer.send_held(prev, group) if held[self.rank] == step else []
        try:
            if held[nxt] != step:
                return super().load(step, into=into)
            return self._load_held(step, into, nxt, group)
        finally:
            wait_all(works)

    def _load_held(self, step: int, into: Any, src: int, group) -> Any:
        got = self._peer.receive(src, group)
        try:
            doc = got.header
            where = f"step {step} as held by rank {src}"
            if doc["step"] != step or doc["rank"] != self.rank:
                raise CheckpointError(f"{where}: rank {src} sent step {doc['step']} of rank {doc['rank']}")
            targets = _targets(into, doc, step, where)
            out = []
            for i, t in enumerate(doc["tensors"]):
                def read(_t, put, what, i=i) -> None:
                    read_held(got, i, put, what)

                out.append(_load_tensor(t, targets, into is not None, step, where, read))
            self.restored_from_peer = src
            return decode_tree(doc["tree"], out, where)
        finally:
            self._peer.free(got)


def load_resharded(state_dict: dict, global_directory: str | os.PathLike, *, step: int | None = None,
                   store: Any = None, config: Any = None) -> int:
    """Load a step a :class:`DistributedCheckpointer` committed (default: the latest) into
    ``state_dict`` (DTensors, plain tensors and values, as for ``dcp.load``) at any world size,
    through DCP's resharding planner and :class:`~.dcp.TieredStorageReader` (every byte checked
    against its crc32). Collective when a process group is initialised. ``store``/``config``: as
    for the reader (staging memory; by default a store of its own per rank). Returns the step."""
    import torch.distributed.checkpoint as dcp

    from .dcp import TieredStorageReader

    root = Path(global_directory)
    if step is None:
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"no globally committed checkpoint in {root}")
    path = step_dir(root, step)
    dcp.load(state_dict, storage_reader=TieredStorageReader(path, store=store, config=config))
    return step
