"""Worker processes: what a DataLoader worker gets (a read-only snapshot of where the rows are,
``worker.py``), how a forked or spawned copy finds it, and how long its extents stay held
(``snapshots.py``)."""

from __future__ import annotations

import os
import weakref

from .attrs import FeatureStoreError
from .worker import SnapshotAttr, WorkerRows


# open feature stores of this process, by id: snapshotted for the child just before a fork
_OPEN: dict[int, weakref.ref] = {}


def _snapshot_before_fork() -> None:
    """Give each open feature store a worker snapshot for a forked child (a DataLoader worker)
    to read from: the child must never use the parent's engine, whose threads it lacks. The
    snapshot of the current catalog is made once and reused by later forks; the child holds
    it (``snapshots.py``) until it exits or its copy is closed."""
    for ref in list(_OPEN.values()):
        fs = ref()
        if fs is not None and fs._opened and fs._pid == os.getpid():
            try:
                fs._fork_snapshot = fs._snapshot()
            except BaseException as e:  # noqa: BLE001 - raised in the child when it reads
                fs._fork_snapshot = e


os.register_at_fork(before=_snapshot_before_fork)


class _Workers:
    """Part of :class:`~tiered.gnn.TieredFeatureStore` (see its docstring)."""

    def __getstate__(self) -> dict:
        """What a worker process gets (DataLoader with spawn): a read-only snapshot of where
        the rows are, not the store, its engine, locks or caches (see ``worker.py``). A process
        being spawned also inherits the parent's lock on the snapshot, so it is held from now on."""
        w = self._reader()
        state = {"tensor_attr_cls": self._tensor_attr_cls, "namespace": self.namespace, "policy": self.policy}
        if w is None:
            w = self._snapshot()
            state["hold"] = self._lock_for_spawned_child(w)
        state["rows"] = w  # after "hold": the copy takes its own lock while the inherited one is open
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(_tensor_attr_cls=state["tensor_attr_cls"], namespace=state["namespace"],
                             policy=state["policy"], _worker=state["rows"], _pid=os.getpid(), _opened=False,
                             _attrs={}, _fork_snapshot=None, _session=None, _static={}, _cache_plan={},
                             reads={"requests": 0, "bytes": 0, "rows": 0, "prefetch_skipped": 0})
        if state.get("hold") is not None:
            os.close(state["hold"].detach())  # the copy holds its own lock now

    def _lock_for_spawned_child(self, rows: WorkerRows):
        """The parent's shared-lock descriptor on snapshot ``rows``, duplicated into the process
        being spawned (multiprocessing spawn/forkserver), or None for a plain pickle (the copy
        then takes the lock when it is unpickled, if the snapshot is still held then)."""
        from multiprocessing.context import get_spawning_popen

        popen = get_spawning_popen()
        with self._lock:
            exports = self._session.exports if self._session is not None else []
            export = next((e for e in exports if e.rows is rows), None)
            if popen is None or export is None or export.hold_fd is None:
                return None
            return popen.DupFd(popen.duplicate_for_child(export.hold_fd))

    def _reader(self) -> WorkerRows | None:
        """The worker snapshot to read from, or None in the process that opened the store."""
        pid = os.getpid()
        w = self._worker
        if w is not None:
            if w.pid != pid:  # a worker copy forked again
                w = self._worker = w.fresh()
            return w
        if pid == self._pid:
            return None
        snap = self._fork_snapshot  # a forked child of the process that opened the store
        if isinstance(snap, BaseException):
            raise FeatureStoreError(f"feature store {self.namespace!r}: the snapshot for this forked process "
                                    f"failed in the parent ({snap})") from snap
        if snap is None:
            raise FeatureStoreError(f"feature store {self.namespace!r} was not open when this process was forked")
        self._worker = snap.fresh()
        return self._worker

    def _snapshot(self) -> WorkerRows:
        """Every attribute with its chunks' extents, each held while a process may read the
        snapshot (see ``snapshots.py``); made once per catalog generation."""
        self._check_open()
        with self._lock:
            if not self._opened:  # closed since the check
                raise FeatureStoreError("the feature store is not open: call open() or use it as a context manager")
            current = self._session.current
            if current is not None and current.gen == self._catalog_gen:
                return current.rows
            attrs, leases = [], []
            try:
                for a in list(self._attrs.values()):
                    chunks = []
                    for key in ([] if a.tier == "zarr" else a.keys):
                        leases.append(lease := self.store.locate(key))
                        chunks.append((lease.path, lease.offset, lease.nbytes))
                    attrs.append(SnapshotAttr(a.group, a.name, a.dtype, tuple(a.shape), a.chunk_rows, a.tier,
                                              chunks, a.zarr_path, a.block if a.tier == "store" else 0,
                                              [] if a.tier == "zarr" else list(a.keys)))
                export = self._session.add(self._catalog_gen, WorkerRows(self.namespace, attrs, self.max_read),
                                           leases)
            except BaseException:
                for lease in leases:
                    lease.release()
                raise
            self._session.reap(self._catalog_gen)
            return export.rows

    def _release_superseded(self) -> None:
        """Give back the extents of snapshots older than the catalog that no process holds."""
        with self._lock:
            if self._session is not None:
                self._session.reap(self._catalog_gen)
