"""Which stores this process has open, for :meth:`TieredStore.shared` and for lock errors.

A store directory is locked (:mod:`tiered.dirlock`) by one open store at a time. Within one
process, clients that want the same store (an offload wrapper, an optimizer, a KV
cache) share one instance through :meth:`TieredStore.shared`, which counts its
users; the last ``close()`` closes it. The lock file holds the pid of the process
that holds it, so a refused open can say who holds the store.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import TieredStore

from .. import dirlock, ranks
from .errors import StoreError

_lock = threading.Lock()  # guards _open
_shared_lock = threading.Lock()  # held while a shared store is looked up, opened or closed
_open: dict[str, "TieredStore"] = {}  # resolved root directory -> the store of this process that has it open
_pid = os.getpid()
CLOSE_WAIT = 120.0  # seconds shared() waits for a store its last user is closing


def _forget_after_fork() -> None:
    """A fork child holds none of its parent's stores (their threads did not survive the fork) nor
    their locks (tiered.dirlock closes its copies of the lock files)."""
    global _lock, _shared_lock, _pid
    for store in list(_open.values()):
        store._lock_fds = []
    _lock, _shared_lock = threading.Lock(), threading.Lock()
    _open.clear()
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forget_after_fork)


def root_key(root: Path) -> str:
    return os.path.realpath(root)


def lock_directories(store: "TieredStore", lock_name: str) -> list[int]:
    """Lock every storage tier directory of the store (the root first): a tier directory is used by
    one open store at a time, whichever tier order its config gives."""
    fds: list[int] = []
    try:
        for tier in store._tiers.values():
            fds.append(lock_directory(store, tier.path / lock_name, register=tier.path == store.root))
    except BaseException:
        unlock_directory(store, fds)
        raise
    return fds


def lock_directory(store: "TieredStore", lock_path: Path, register: bool = True) -> int:
    """Take a directory lock and write our pid into it; a clear StoreError naming the holder
    when it is taken (another process's pid, or this process's own open store)."""

    try:
        fd = dirlock.acquire(lock_path, f"the store at {store.root}")
    except dirlock.HeldHere as e:
        raise StoreError(_held_message(lock_path.parent, lock_path, str(os.getpid()), e.who)) from None
    except dirlock.HeldElsewhere as e:
        raise StoreError(_held_message(lock_path.parent, lock_path, e.holder)) from None
    if register:
        with _lock:
            _open[root_key(store.root)] = store
    return fd


def _held_message(root: Path, lock_path: Path, holder: str, here: str = "") -> str:
    with _lock:
        mine = _open.get(root_key(root))
    if mine is None and here:
        return (f"store directory {root} is already open in this process (pid {os.getpid()}) as a tier of "
                f"{here} (lock {lock_path}): a tier directory belongs to one store")
    if mine is not None:
        how = ("a TieredStore.shared() store; get it with TieredStore.shared(config)" if mine._shared_users
               else "a TieredStore opened with open(); close() it first, or open every user of the "
                    "directory with TieredStore.shared(config) to share one store")
        return f"store at {root} is already open in this process (pid {os.getpid()}) by {how} (lock {lock_path})"
    who = f"pid {holder}" if holder.isdigit() else "pid unknown"
    return f"store at {root} is open in another process ({who}; lock {lock_path}){_rank_hint()}"


def _rank_hint() -> str:
    """In a job of several ranks, the likely cause of a store held elsewhere: ranks sharing a path."""
    try:
        me = ranks.current()
    except ranks.RankError:
        return ""
    if me.world_size == 1:
        return ""
    return (f"; this process is {me.describe()}: every rank needs its own store directory, "
            "put {rank} (or {local_rank} for node-local disks) in the tier paths")


def unlock_directory(store: "TieredStore", fds: list[int]) -> None:
    with _lock:
        if _open.get(root_key(store.root)) is store:
            del _open[root_key(store.root)]
    for fd in fds:
        dirlock.release(fd)


def shared_store(cls: type, config: Any, kwargs: dict, *, check_layout: bool = True) -> "TieredStore":
    """The open store of this process for ``config``'s directories (one more user), or a new one."""
    from ..config import load_config

    cfg = load_config(config)
    if not cfg.storage_tiers:
        raise StoreError(f"{cfg.source}: the store needs at least one storage tier")
    while True:
        with _shared_lock:
            with _lock:
                store = _open.get(root_key(Path(cfg.storage_tiers[0].path)))
            if store is None or not store._closing:
                return _shared_store(cls, cfg, kwargs, store, check_layout)
        # its last user is closing it: wait (not holding the registry lock), then open anew
        if not store._closed_event.wait(CLOSE_WAIT):
            raise StoreError(f"store at {store.root} is still closing after {CLOSE_WAIT} s")


def _shared_store(cls: type, cfg: Any, kwargs: dict, store: "TieredStore | None",
                  check_layout: bool = True) -> "TieredStore":
    if store is None:
        store = cls(cfg, **kwargs)
        store._shared_users = 1
        store._shared_kwargs = dict(kwargs)
        try:
            return store.open(check_layout=check_layout)
        except BaseException:
            store._shared_users = 0
            raise
    if not store._shared_users:
        raise StoreError(_held_message(store.root, store.root / ".lock", str(os.getpid())))
    diff = config_differences(store.config, cfg) + [
        f"{k}: {store._shared_kwargs.get(k)!r} (open) vs {kwargs.get(k)!r} (asked)"
        for k in sorted(set(store._shared_kwargs) | set(kwargs))
        if store._shared_kwargs.get(k) != kwargs.get(k)]
    if diff:
        raise StoreError(f"store at {store.root} is open in this process with another config "
                         f"({store.config.source}) than the one asked for ({cfg.source}); differing: "
                         + "; ".join(diff))
    store._shared_users += 1
    return store


def close_shared(store: "TieredStore") -> None:
    """One user of a shared store is done; the last one closes it (outside the registry's lock:
    a close waits for I/O, and other directories' stores need not wait for it)."""
    with _shared_lock:
        store._shared_users -= 1
        last = store._shared_users == 0
        if last:
            store._closing = True  # shared() of this directory now opens a new store only after this one closed
    if last:
        store._close_now()


def config_differences(a: Any, b: Any) -> list[str]:
    """``key: a vs b`` for each setting the store uses (tiers, engine, policy) that differs."""
    fa, fb = _flat(_store_part(a.to_dict())), _flat(_store_part(b.to_dict()))
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _store_part(d: dict) -> dict:
    return {k: d[k] for k in ("tiers", "engine", "policy") if k in d}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if k.endswith("_human"):
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
