"""Checkpoint directories are one checkpointer's: claimed in this process and locked across processes.

A checkpointer deletes manifests its retention does not keep and the leftovers of saves it does
not know, so two checkpointers writing one directory (the storage level of one and the cold level
of another, or two processes given the same ``directory=``) would delete each other's
checkpoints. Every directory a checkpointer writes is registered in this process (the same,
or one inside the other, is refused) and locked with ``flock`` on ``<dir>/.lock`` from
``open`` to ``close`` (another process holding it is refused). A forked child closes its copies
of the lock files at once, so it cannot keep a directory locked after the parent closed it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from .format import CheckpointError

LOCK_NAME = ".lock"

_claimed: dict[Path, str] = {}  # directory -> what claims it, for this process
_claimed_lock = threading.Lock()
_held_fds: set[int] = set()  # lock files open in this process


def _forget_after_fork() -> None:
    """In a forked child: close the copies of the lock files (the parent's stay locked); no lock
    taken, another thread of the parent may have held it at the fork."""
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


class DirectoryClaim:
    """The directories one checkpointer writes, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs  # role ("directory", "cold_directory") -> path
        self._fds: list[int] = []
        self._registered: list[Path] = []

    def acquire(self) -> None:
        roles = list(self.dirs.items())
        for i, (role, d) in enumerate(roles):
            for role2, d2 in roles[i + 1:]:
                if _overlaps(d, d2):
                    raise CheckpointError(f"{role}={d} and {role2}={d2} overlap: each level of a checkpointer "
                                          "needs a directory of its own")
        try:
            with _claimed_lock:
                for role, d in roles:
                    for other, who in _claimed.items():
                        if _overlaps(d, other):
                            raise CheckpointError(f"{role}={d} is already in use in this process as {who} "
                                                  f"({other}): a checkpoint directory belongs to one checkpointer")
                for role, d in roles:
                    _claimed[d] = f"the {role} of another LazyCheckpointer"
                    self._registered.append(d)
            for role, d in roles:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = _flock(d, role)
                with _claimed_lock:
                    _held_fds.add(fd)
                self._fds.append(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        fds, self._fds = self._fds, []
        with _claimed_lock:
            for fd in fds:
                if fd in _held_fds:  # else a fork child closed it already
                    _held_fds.discard(fd)
                    os.close(fd)  # drops the flock
            for d in self._registered:
                _claimed.pop(d, None)
        self._registered = []


def _flock(d: Path, role: str) -> int:
    path = d / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"{role}={d} is open in another process (lock {path} is held): a checkpoint "
                              "directory belongs to one checkpointer") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
