"""DistributedCheckpointer: lazy checkpoints of every rank, committed as one global step.

Each rank snapshots its own state as :class:`~.lazy.LazyCheckpointer` does (in the background,
guarded against the optimizer step) into its own store shard (``{rank}`` in the tier path, or in
``directory=``) and commits it locally (its manifest). A background thread then, for each step
in save order and on every rank: (1) gathers whether every rank's local commit succeeded (and
checks that every rank is at the same save of the same step);
(2) with ``peer=True``, sends this rank's snapshot to rank ``(rank + 1) % world`` and receives the
previous rank's (:mod:`.peer`); (3) gathers every rank's tensor extents to rank 0, which writes
the global record (:mod:`.globalrec`: the DCP metadata of the step, the commit point) and
broadcasts that it did. A step is globally committed only then; a rank that dies before leaves
every rank at the previous global step (at the next ``open``, each rank deletes the local steps it
committed after the newest global step's). ``latest()``, ``steps()`` and ``load()`` see global
steps only. Failures and how the ranks stay in step: :mod:`.distcommit`, :mod:`.distjoin`.

Loading: at the same world size ``load`` is collective and restores each rank's shard (from the
peer's memory where the peer holds it and its copy passes its crc32 check, else from the rank's
storage; every rank ends with the same verdict). At another world size,
:func:`load_resharded` reads the global record with :class:`~.dcp.TieredStorageReader` through DCP's
resharding planner: every globally committed step is also a DCP checkpoint, with no export step,
because a job that must shrink or grow after a failure has no chance to export first.

Collectives run on two gloo groups of their own (one for the background thread, one for
``open``/``load``), created by ``open`` (every rank calls it); every wait ends after ``timeout``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tiered.allocators import align_up

from .. import ranks
from ._wire import all_gather_ints, wait_all
from .distcommit import GlobalCommits, GlobalHandle, GlobalSteps, failed_vote
from .distjoin import Joining, everyone_ok
from .format import SEGMENT, CheckpointError, StoreRef, decode_tree, encode_tree
from .globalrec import describe_state, latest_step, localize, step_dir
from .lazy import LazyCheckpointer
from .load import _load_tensor, _targets
from .peer import read_held

__all__ = ["DistributedCheckpointer", "GlobalHandle", "load_resharded"]

log = logging.getLogger("tiered.checkpoint")


class DistributedCheckpointer(Joining, GlobalCommits, LazyCheckpointer):
    """:class:`LazyCheckpointer` of one rank of a ``torch.distributed`` job (see the module
    docstring). Create and ``open`` it on every rank after ``init_process_group``; every rank
    calls ``save`` the same number of times, with the same steps, in the same order.

    ``directory`` may contain ``{rank}``; by default it is ``<tier path>/checkpoints/<name>`` of the
    rank's store shard. ``global_directory`` (rank 0 writes it; a resharded load reads it, so it
    and the shards must be on a file system every loading rank sees): default, next to rank 0's
    directory, ``<name>.global``. ``peer``: keep each rank's snapshot in the next rank's host memory
    too (:mod:`.peer`). ``timeout``: seconds any wait of the checkpointer may take (a collective,
    a step becoming durable on this rank). Other arguments as for :class:`LazyCheckpointer` (no
    cold tier: its copies are not coordinated).
    """

    # an earlier failure raised by save() on one rank only would stop the training loop there and
    # leave the other ranks waiting in its next collective: wait(), wait_all() and close() raise it
    _save_raises_earlier_failures = False

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
        self._view = GlobalSteps()  # the global steps kept and their world sizes (replaced whole)
        self._in_flight: Counter[int] = Counter()  # step -> saves of it whose global commit is pending
        self._undecided: set[int] = set()  # steps whose global commit broke off (kept until rejoin)
        self._slots = 0  # save() calls so far: each takes one slot of the global sequence
        self._global_seq = 0  # rank 0: commit_seq of the last global record
        self._groups: tuple | None = None  # (background thread's group, open/load group)
        self._peer = None  # PeerCopies with peer=True, from open
        self._global_claim = None  # rank 0: its claim on the global directory
        self.restored_from_peer: int | None = None  # the rank the last load() got this rank's state from
        self._broken: str | None = None  # the step whose collectives broke the background group

    def _default_global(self, template: str | None, tier: str | None) -> Path:
        if template is None:
            spec = self._storage_tier(tier, "tier")
            template = str(Path(spec.path_template or spec.path) / "checkpoints" / self.name)
        rank0 = Path(ranks.expand(template, ranks.Ranks(0, 0, self.world))).resolve()
        return rank0.parent / f"{rank0.name}.global"

    # -- lifecycle (open and rejoin: distjoin.Joining) ---------------------------------
    def _start_threads(self) -> None:
        super()._start_threads()
        self._global_q: queue.Queue = queue.Queue()
        self._globals: list[GlobalHandle] = []
        t = threading.Thread(target=self._global_loop, name="tiered-ckpt-global", daemon=True)
        self._threads.append(t)
        t.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish pending saves (each global commit included), then close as LazyCheckpointer
        does. ``timeout``: default ``timeout`` x (2 + the saves still pending)."""
        if self._threads and timeout is None:
            timeout = self.timeout * (2 + sum(not g.done() for g in self._pending_global()))
        if self._opened and self._threads:
            self._global_q.put(None)
        super().close(timeout)

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
        their place in the global tensor recorded for resharding. A save that raises here still
        takes its place in the global sequence: the step fails on every rank."""
        self._check_open()
        with self._lock:
            self._slots += 1
            slot = self._slots
        try:
            local = self._save_here(state_dict, step)
        except BaseException as e:
            self._enqueue(failed_vote(step, slot, e))
            raise
        return self._enqueue(GlobalHandle(local, slot))

    def _enqueue(self, g: GlobalHandle) -> GlobalHandle:
        with self._lock:
            self._globals = [x for x in self._globals if not x.done()] + [g]
        self._global_q.put(g)
        return g

    def _save_here(self, state_dict: Any, step: int):
        """This rank's local save of ``step``, marked in flight (kept from retirement) until
        its global commit is decided."""
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**12:
            raise CheckpointError(f"save(step={step!r}): expected an int in [0, 10**12)")
        desc = describe_state(state_dict)
        local_sd = localize(state_dict)
        if self.peer:
            self._check_peer_state(local_sd, step)
        with self._lock:
            if step in self._view.steps:
                raise CheckpointError(f"save(step={step}): step {step} is globally committed already (in "
                                      f"{self.global_directory}); a committed step is not overwritten")
            if self._in_flight[step]:
                raise CheckpointError(f"save(step={step}): step {step} is still being committed globally (an "
                                      "earlier save of it); wait for that save, or save another step")
            self._in_flight[step] += 1
        try:
            local = super().save(local_sd, step)
        except BaseException:
            with self._lock:
                self._in_flight[step] -= 1
                if self._in_flight[step] <= 0:
                    del self._in_flight[step]
            raise
        local.dcp = desc
        return local

    def _check_peer_state(self, local_sd: Any, step: int) -> None:
        """peer=True: copied tensors only, and room in host memory for the peer copies."""
        found: list = []
        encode_tree(local_sd, found)
        refs = [n for n, t in found if isinstance(t, StoreRef)]
        if refs:
            raise CheckpointError(f"save(step={step}): {refs[0]!r} is a StoreRef; peer=True holds copied "
                                  "tensors only")
        nbytes = sum(align_up(t.numel() * t.element_size()) for _n, t in found)
        share = self.host.res.reserved if self.host.res is not None else 0
        room = (share or self.store.arena.capacity) - SEGMENT  # and one segment for the snapshot itself
        what = f"host_share ({share} bytes)" if share else f"the host tier ({self.store.arena.capacity} bytes)"
        if 3 * nbytes > room:
            raise CheckpointError(
                f"save(step={step}): peer=True holds up to three copies of a snapshot ({nbytes} bytes here) in "
                f"host memory (this rank's outgoing copy, the previous rank's held one and the one it receives), "
                f"{3 * nbytes} bytes; {what} less one segment for the snapshot leaves {room}: raise host_share or "
                "the host tier's capacity")

    def _put_piece(self, h, p) -> None:
        if self._peer is not None:
            self._peer.keep(h, p)  # before the store is given the buffer
        super()._put_piece(h, p)

    def _pending_global(self) -> list[GlobalHandle]:
        with self._lock:
            return list(self._globals)

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every save so far is globally committed or failed (at most ``timeout`` s
        in all); raises the first failure (each failure once)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        first = None
        for g in self._pending_global():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if g.counted:
                    g.wait(left)
                else:
                    g.committed.exception(left)  # a save that raised: only its slot to wait for
            except TimeoutError:
                raise TimeoutError(f"wait_all: checkpoint step {g.step} not committed globally within "
                                   f"{timeout} s") from None
            except BaseException as e:  # noqa: BLE001 - the first is raised below
                first = first or (g, e)
        with self._lock:
            self._globals = [x for x in self._globals if not x.done()]
            self._handles = [x for x in self._handles if not x.durable.done()]
        if first is not None:
            g, e = first
            raise CheckpointError(f"checkpoint step {g.step} was not committed globally: {e}") from e
        self._raise_unobserved()

    # -- inspection and load ------------------------------------------------------------
    def steps(self) -> dict[int, str]:
        """Globally committed steps (each one's level: "storage")."""
        return {s: "storage" for s in sorted(self._view.steps)}

    def local_steps(self) -> dict[int, str]:
        """This rank's locally committed steps (a step newer than ``latest()`` is not global yet)."""
        return super().steps()

    def latest(self) -> int | None:
        """The last globally committed step (the same on every rank)."""
        steps = self._view.steps
        return steps[-1] if steps else None

    def _visible(self, step: int | None) -> tuple:
        try:
            return super()._visible(step)
        except FileNotFoundError as e:
            raise CheckpointError(f"load(step={step}): step {step} is globally committed, but rank {self.rank}'s "
                                  f"local copy {e.filename} is gone") from e

    def load(self, step: int | None = None, *, into: Any = None) -> Any:
        """Collective: this rank's state of global ``step`` (default: the latest), from the peer's
        memory where the peer holds it (and its copy passes the crc32 check), else from this
        rank's storage. ``into`` as for :meth:`LazyCheckpointer.load` (DTensors are filled through
        their local shards)."""
        self._check_open()
        step = self.latest() if step is None else step
        if step is None:
            raise CheckpointError(f"no globally committed checkpoint in {self.global_directory}")
        if step not in self.steps():
            raise CheckpointError(f"load(step={step}): not globally committed; committed: {sorted(self.steps())}")
        saved_world = self._view.worlds[step]
        if saved_world != self.world:
            raise CheckpointError(f"load(step={step}): saved by a world of {saved_world} ranks, this one has "
                                  f"{self.world}: load it with load_resharded(state_dict, "
                                  f"{str(self.global_directory)!r})")
        into = localize(into) if into is not None else None
        self.restored_from_peer = None
        if self._peer is None:
            return super().load(step, into=into)
        return self._load_with_peers(step, into)

    def _load_with_peers(self, step: int, into: Any) -> Any:
        """Every rank says which step it holds of its previous rank; a rank whose next rank holds
        ``step`` receives it from there; the ranks then agree that every load succeeded."""
        group = self._groups[1]
        nxt, prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        held = [s for (s,) in all_gather_ints([self._peer.held_step(prev, self.world)], group)]
        works = self._peer.send_held(prev, group) if held[self.rank] == step else []
        out, error = None, None
        try:
            out = self._load_held(step, into, nxt, group) if held[nxt] == step else super().load(step, into=into)
        except CheckpointError as e:
            error = e
        finally:
            wait_all(works)
        everyone_ok(error, group, f"load(step={step})")
        return out

    def _load_held(self, step: int, into: Any, src: int, group) -> Any:
        """Receive this rank's copy from ``src``; read storage instead if it fails a check."""
        got = self._peer.receive(src, group)
        try:
            return self._decode_held(got, step, into, src)
        except CheckpointError as e:
            log.warning("checkpoint step %d: the copy rank %d holds of rank %d failed its check (%s); reading "
                        "storage instead", step, src, self.rank, e)
        finally:
            self._peer.free(got)
        return super().load(step, into=into)

    def _decode_held(self, got, step: int, into: Any, src: int) -> Any:
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
        state = decode_tree(doc["tree"], out, where)
        self.restored_from_peer = src
        return state


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
