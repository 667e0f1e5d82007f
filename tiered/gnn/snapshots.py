"""How long extents handed to worker processes stay reserved.

A worker snapshot (``worker.py``) names extents the parent holds leases on. Each
snapshot has a lock file, ``<store root>/gnn-snapshots/<session>/s<n>.lock``, and every
process that may read the snapshot holds a shared ``flock`` on it: the parent while the
snapshot is current (a forked child inherits that lock with the descriptor, so it holds it
from the instant of the fork), and each worker copy from when it is made (unpickled, or
first used in a forked child) until it is closed, collected, or its process exits (the
kernel drops the lock then). Once a write supersedes a snapshot, the parent drops its own
lock and releases the snapshot's leases as soon as an exclusive non-blocking ``flock``
succeeds, i.e. when no process can read the snapshot any more; it first unlinks the lock
file, so that a copy made later finds it gone and fails instead of reading reused bytes.
Closing the store unlinks every lock file of the session, then releases every lease.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..store import ExtentLease
from .worker import WorkerRows

SNAPSHOT_DIR = "gnn-snapshots"


@dataclass
class Export:
    """One snapshot handed out by the parent: its catalog generation, rows and leases."""

    gen: int
    rows: WorkerRows
    leases: list[ExtentLease]
    hold_fd: int | None = None  # the parent's shared lock while the snapshot is current

    def drop_hold(self) -> None:
        if self.hold_fd is not None:
            fd, self.hold_fd = self.hold_fd, None
            os.close(fd)

    def try_release(self) -> bool:
        """Release the leases if no process holds the snapshot; True when released."""
        self.drop_hold()
        try:
            fd = os.open(self.rows.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._release_leases()
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            os.unlink(self.rows.lock_path)
        finally:
            os.close(fd)
        self._release_leases()
        return True

    def release_now(self) -> None:
        """Unlink the lock file (readers fail from now on), then release the leases."""
        self.drop_hold()
        try:
            os.unlink(self.rows.lock_path)
        finally:
            self._release_leases()

    def _release_leases(self) -> None:
        leases, self.leases = self.leases, []
        for lease in leases:
            lease.release()


@dataclass
class Session:
    """The snapshots of one open() of a feature store (per-open token in the directory name)."""

    dir: Path
    pid: int
    token: str
    exports: list[Export] = field(default_factory=list)
    _count: int = 0

    @classmethod
    def create(cls, root: Path, namespace: str) -> "Session":
        base = Path(root) / SNAPSHOT_DIR
        tag = hashlib.sha1(namespace.encode()).hexdigest()[:12]
        _remove_dead_sessions(base, tag)
        pid, token = os.getpid(), secrets.token_hex(8)
        d = base / f"{tag}-{pid}-{token}"
        d.mkdir(parents=True, mode=0o700)
        return cls(d, pid, token)

    @property
    def current(self) -> Export | None:
        return self.exports[-1] if self.exports else None

    def add(self, gen: int, rows: WorkerRows, leases: list[ExtentLease]) -> Export:
        """Record a new current snapshot, with its lock file held shared by this process."""
        self._count += 1
        path = self.dir / f"s{self._count}.lock"
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        rows.lock_path, rows.owner_pid, rows.session = str(path), self.pid, self.token
        export = Export(gen, rows, leases, fd)
        self.exports.append(export)
        return export

    def reap(self, gen: int) -> None:
        """Release every snapshot older than catalog generation ``gen`` that no process holds."""
        self.exports = [e for e in self.exports if e.gen == gen or not e.try_release()]

    def close(self) -> None:
        exports, self.exports = self.exports, []
        try:
            for e in exports:
                e.release_now()
        finally:
            try:
                shutil.rmtree(self.dir)
            except FileNotFoundError:
                pass


def _remove_dead_sessions(base: Path, tag: str) -> None:
    """Lock files left by a process of this namespace that exited without closing."""
    if not base.is_dir():
        return
    for d in base.glob(f"{tag}-*-*"):
        try:
            os.kill(int(d.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
