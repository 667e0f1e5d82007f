"""What becomes of an offloaded model that is never detached.

The runtime's objects are ephemeral in the store (deleted when the store closes, or by
its next open after a crash), so no run leaves a copy of the weights behind. A model
dropped without ``detach`` (a notebook cell run again, ``del model``) must also give back
its pins, its device cache and its handle on the shared store, else they last as long as
the process. The runtime is in a reference cycle with its model (hooks refer to it, it
refers to the modules; the root module itself may be a unit), which only the garbage
collector frees: its ``__del__`` runs then, with the cycle still intact (PEP 442), and
hands the runtime to :func:`orphaned`. The garbage collector can run inside any thread,
an I/O worker or a store method holding the store's lock included, so the cleanup is not
done there: it is done by the next ``offload`` / ``from_pretrained`` / ``detach`` of the
process (:func:`collect`), by a forward that finds the budget full, or at exit. At exit every
runtime still alive is cleaned up too, so the store is closed and its ephemeral objects
deleted before the process ends.

:func:`orphaned` takes no lock: the garbage collector may run it in a thread that holds
``_lock`` already (inside :func:`watch`, :func:`forget`, ...). An orphan's cleanup that
fails is logged (naming the model) and the others go on: it must not fail an unrelated
``offload`` or ``detach`` that happened to collect it.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .offload.runtime import OffloadedModule

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: runtimes whose model was collected without detach (appended and popped without a lock: both atomic)
_orphans: "collections.deque[OffloadedModule]" = collections.deque()
_live: "weakref.WeakSet[OffloadedModule]" = weakref.WeakSet()  # runtimes attached to a model
_exiting = False


def _forget_after_fork() -> None:
    """A fork child holds none of its parent's models' resources (the store's threads did not
    survive the fork): it neither cleans them up nor collects them."""
    global _lock
    _lock = threading.Lock()
    _orphans.clear()
    _live.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def watch(rt: "OffloadedModule") -> None:
    with _lock:
        _live.add(rt)


def forget(rt: "OffloadedModule") -> None:
    with _lock:
        _live.discard(rt)


def orphaned(rt: "OffloadedModule") -> None:
    """Called by the runtime's ``__del__``: clean it up at the next safe point. Takes no lock."""
    rt._orphaned = True  # the garbage collector has already dropped it from ``_live`` (a weak set)
    if not _exiting:
        _orphans.append(rt)
        return
    _abandon_all([rt])  # the exit handler has run: nothing will collect it later


def collect() -> None:
    """Clean up the runtimes of models collected since the last call (in the caller's thread)."""
    todo = []
    while True:
        try:
            todo.append(_orphans.popleft())
        except IndexError:
            break
    _abandon_all(todo)


def _abandon_all(runtimes: list["OffloadedModule"]) -> None:
    """Clean up each runtime; a failure is logged with the model it served and the rest go on."""
    for rt in runtimes:
        if rt._finished:
            continue
        try:
            rt.abandon()
        except Exception:  # noqa: BLE001 - an orphan's failure is not the caller's: logged, not raised
            log.exception("cleaning up offloaded %s, dropped without detach, failed", rt.describe())


@atexit.register
def _at_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
        todo = list(_live)
        _live.clear()
    collect()
    _abandon_all(todo)
