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
process (:func:`collect`), or at exit. At exit every runtime still alive is cleaned up too,
so the store is closed and its ephemeral objects deleted before the process ends.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .offload import OffloadedModule

_lock = threading.Lock()
_orphans: list["OffloadedModule"] = []  # runtimes whose model was collected without detach
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


def others_on(store) -> list["OffloadedModule"]:
    """The live runtimes serving models from ``store``."""
    with _lock:
        return [rt for rt in _live if rt.store is store]


def orphaned(rt: "OffloadedModule") -> None:
    """Called by the runtime's ``__del__``: clean it up at the next safe point."""
    with _lock:
        _live.discard(rt)
        if not _exiting:
            _orphans.append(rt)
            return
    rt.abandon()  # the exit handler has run: nothing will collect it later


def collect() -> None:
    """Clean up the runtimes of models collected since the last call (in the caller's thread)."""
    with _lock:
        todo = list(_orphans)
        _orphans.clear()
    _abandon_all(todo)


def _abandon_all(runtimes: list["OffloadedModule"]) -> None:
    errors = []
    for rt in runtimes:
        try:
            rt.abandon()
        except Exception as e:  # noqa: BLE001 - every runtime gets its turn; the first error is raised
            errors.append(e)
    if errors:
        raise errors[0]


@atexit.register
def _at_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
        todo = list(_orphans) + list(_live)
        _orphans.clear()
        _live.clear()
    _abandon_all(todo)
