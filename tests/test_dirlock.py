"""Directory locks are per process: a fork child never holds them, even one that keeps its copies
of the lock files open (a fork made outside Python's fork hooks), so the parent can close and
reopen a store or a checkpointer while its children live; another process is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from tiered import dirlock
from tiered.store import StoreError, TieredStore

T = 30.0


@contextmanager
def child_keeping_the_lock_files(monkeypatch):
    """A forked child that sleeps with every descriptor of the parent open: the fork hook that
    closes the lock files is made to see none, as a fork from C code would."""
    with monkeypatch.context() as m:
        m.setattr(dirlock, "_held", {})
        pid = os.fork()
        if pid == 0:
            time.sleep(T)
            os._exit(0)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def config(tmp_path):
    return {"tiers": {"host": {"capacity": "8MiB"}, "nvme": {"path": str(tmp_path / "nvme"),
                                                                "capacity": "16MiB"}}}


def test_a_store_closed_by_the_parent_reopens_while_a_forked_child_lives(tmp_path, monkeypatch):
    s = TieredStore(config(tmp_path)).open()
    with child_keeping_the_lock_files(monkeypatch):
        s.close()
        TieredStore(config(tmp_path)).open().close()


def test_a_checkpointer_closed_by_the_parent_reopens_while_a_forked_child_lives(tmp_path, monkeypatch):
    from tiered.checkpoint import LazyCheckpointer

    c = config(tmp_path)
    ck = LazyCheckpointer(c, prefault=False).open()
    with child_keeping_the_lock_files(monkeypatch):
        ck.close()
        LazyCheckpointer(c, prefault=False).open().close()


def test_another_process_is_refused_with_the_holders_pid(tmp_path):
    with TieredStore(config(tmp_path)):
        code = ("import sys; from tiered.store import TieredStore\n"
                f"try:\n    TieredStore({config(tmp_path)!r}).open()\n"
                "except Exception as e:\n    print(e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert f"open in another process (pid {os.getpid()}" in r.stdout


def test_a_second_lock_of_one_file_in_this_process_is_refused_before_it_is_opened(tmp_path):
    fd = dirlock.acquire(tmp_path / ".lock", "the first holder")
    try:
        with pytest.raises(dirlock.HeldHere, match="the first holder"):
            dirlock.acquire(tmp_path / ".lock", "a second")
        with TieredStore(config(tmp_path)):
            with pytest.raises(StoreError, match="already open in this process"):
                TieredStore(config(tmp_path)).open()
    finally:
        dirlock.release(fd)
    fd = dirlock.acquire(tmp_path / ".lock", "again")  # released: free to take
    dirlock.release(fd)
