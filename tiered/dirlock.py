"""Directory locks against other processes that a fork child does not inherit.

A store's tier directories and a checkpointer's directories belong to one process at a time. The
lock is a POSIX record lock (``lockf``) on a lock file: unlike ``flock``, a forked child (a
DataLoader worker) never holds it, so the parent can close and reopen a directory while its
children live, with no window in which a child that has not yet run its fork hooks still holds it.

A POSIX lock is dropped when its process closes *any* descriptor of the file, so each lock file
is opened once per process: the table below refuses a second lock of the same file in this
process (:class:`HeldHere`) before opening it, and nothing else in tiered opens lock files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path


class HeldHere(Exception):
    """The lock file is held by this process; ``who`` says by what."""

    def __init__(self, path: Path, who: str):
        super().__init__(f"{path} is held in this process by {who}")
        self.who = who


class HeldElsewhere(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote, or "" when unknown."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by pid {holder or 'unknown'}")
        self.holder = holder


_table_lock = threading.Lock()
_held: dict[str, tuple[int, str]] = {}  # real path of the lock file -> (descriptor, who holds it)


def acquire(path: Path, who: str) -> int:
    """Lock ``path`` (created if missing) for this process, write our pid into it, return its fd."""
    key = os.path.realpath(path)
    with _table_lock:
        if key in _held:
            raise HeldHere(path, _held[key][1])
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)  # we hold no lock on this file, so closing drops nothing
            raise HeldElsewhere(path, holder if holder.isdigit() else "") from None
        except BaseException:
            os.close(fd)
            raise
        _held[key] = (fd, who)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Drop a lock taken by :func:`acquire` (a no-op for one this process no longer holds)."""
    with _table_lock:
        for key, (held_fd, _who) in list(_held.items()):
            if held_fd == fd:
                del _held[key]
                os.close(fd)
                return


def _forget_after_fork() -> None:
    """A fork child holds none of the locks: it closes its copies of the lock files (closing them
    drops nothing of the parent's) and starts with an empty table; no lock taken, another thread
    of the parent may have held it at the fork."""
    global _table_lock
    for fd, _who in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()
    _table_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
