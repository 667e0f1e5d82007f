"""The GPU tier's object cache: store objects resident on the compute device.

Objects come from a :class:`~tiered.store.TieredStore` (host arena, pinned
when CUDA is present) and are copied into buffers of the store's GPU tier (one
region the store reserves once, shared by every owner) on a dedicated copy
stream, so device memory is never allocated per object and the copies overlap
the compute stream. The buffers are charged to the cache's owner through a
:class:`~tiered.store.Reservation` of that tier (given, or opened by the cache for
``owner`` and ``share``); the cache keeps itself within ``limit`` bytes (default:
the reservation's share, else the tier) by evicting entries nobody holds, chosen
by an eviction policy from ``policies/``, and gives them back when another owner
of the tier finds no room (``on_pressure``, when the cache opened the reservation).

Call order: ``open()``; ``acquire(key)`` → future of a :class:`DeviceLease`;
use ``lease.tensor``; ``lease.release()`` (records an event on the current
stream, so a buffer is reused only after the kernels that read it finished);
``close()``. An entry whose store version changed (a newer ``put``) is
reloaded, never served stale. The tier's device may be ``"cpu"`` (tests).

On CUDA nothing here blocks the host on the GPU: a load's future completes
once its copy is *queued*; ``lease.tensor`` makes the caller's current stream
wait for that copy (an event), the host copy is released by a completion
thread when the copy has run, and a buffer given back is refilled only after
the copy stream waited for the kernels that last read it.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from concurrent.futures import CancelledError
from dataclasses import dataclass, field

import torch

from tiered.allocators import DEVICE_ALIGN, DeviceBuffer, OutOfBudget
from tiered.io_engine import IOFuture, Priority, chain, completed
from tiered.policies import Observation, create_eviction_policy

from .store import Lease, Reservation, StoreError, TieredStore


@dataclass
class _Entry:
    key: str
    version: int
    nbytes: int
    buffer: DeviceBuffer
    ready: IOFuture  # completes (shared by every waiter) when the device copy is in place (CUDA: queued)
    tensor: torch.Tensor | None = None
    copied: object = None  # CUDA event: the host -> device copy has run
    loading: bool = True
    pins: int = 0
    stale: bool = False  # superseded or evicted while pinned: free on last release
    used: dict = field(default_factory=dict)  # CUDA stream -> event of its last release (its readers' end)


@dataclass
class DeviceCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    reloads: int = 0  # entries dropped because the store holds a newer version
    bytes_loaded: int = 0


class DeviceLease:
    """A pinned device copy of one object version; release it when the kernels using it are queued."""

    def __init__(self, cache: "DeviceCache", entry: _Entry) -> None:
        self._cache = cache
        self._entry = entry
        self.key = entry.key
        self.version = entry.version
        self._tensor = entry.tensor
        self._released = False

    @property
    def offset(self) -> int:
        """Where the copy starts in the cache's device region."""
        return self._entry.buffer.offset

    @property
    def nbytes(self) -> int:
        return self._entry.nbytes

    @property
    def tensor(self) -> torch.Tensor:
        """The device copy; on CUDA the current stream is first ordered after the copy into it."""
        if self._entry.copied is not None:
            torch.cuda.current_stream(self._cache.device).wait_event(self._entry.copied)
        return self._tensor

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cache._unpin(self._entry)

    def __enter__(self) -> "DeviceLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _weak_give_back(cache: "DeviceCache"):
    """The cache's ``on_pressure``, without the store's reservation keeping the cache alive."""
    ref = weakref.ref(cache)

    def on_pressure(nbytes: int) -> int:
        c = ref()
        return 0 if c is None else c._give_back(nbytes)
    return on_pressure


class DeviceCache:
    """Store objects copied onto the store's GPU tier (see the module docstring).

    ``reservation``: the owner's reservation of the GPU tier to allocate from (kept open by
    its owner); else the cache reserves ``share`` of the tier for ``owner`` on ``open()``
    (None: the config's share, else elastic) and closes it on ``close()``. ``limit``: bytes
    the cache holds at most (default: the share, else the tier's capacity).
    """

    def __init__(self, store: TieredStore, reservation: Reservation | None = None, *, owner: str = "device_cache",
                 share: int | str | None = None, limit: int | None = None, policy: str = "lru",
                 wait: float = 30.0) -> None:
        tier = store.device_tier
        if tier is None:
            raise StoreError(f"{store.config.source}: DeviceCache needs a device tier in the store "
                             "(e.g. [tiers.gpu] kind = \"device\", capacity = \"8GiB\")")
        if reservation is not None and reservation.tier != tier:
            raise StoreError(f"DeviceCache: reservation of {reservation.owner!r} is on tier {reservation.tier!r}, "
                             f"not on the device tier {tier!r}")
        spec = next(t for t in store.config.device_tiers if t.name == tier)
        self.store = store
        self.device = torch.device(spec.device or "cuda:0")
        self.capacity = spec.capacity
        self.owner = reservation.owner if reservation is not None else owner
        self._given = reservation  # owned by the caller
        self._share = share
        self._limit = limit
        self.reservation: Reservation | None = reservation
        self.held = 0  # bytes of the tier the entries hold (aligned buffer sizes)
        self.peak = 0
        self._region: int | None = None  # address of the tier's region (the storage every buffer views)
        self.policy = create_eviction_policy(policy)
        self.wait = wait
        self.stats = DeviceCacheStats()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Condition()
        self._stream = None
        self._copy_lock = threading.Lock()  # fences are waited and copies queued as one step
        self._fences: list = []  # CUDA events of freed buffers' last readers: the next copy waits on them
        self._landing: queue.Queue | None = None  # (event, host lease): released once the copy ran
        self._completer: threading.Thread | None = None
        self._landing_error: BaseException | None = None  # the first failure of the completion thread
        self._opened = False
        self._loading: set = set()  # ready futures of loads in flight (discarded entries' included)

    # -- lifecycle -----------------------------------------------------------------
    @property
    def limit(self) -> int:
        """Bytes the cache holds at most."""
        if self._limit is not None:
            return self._limit
        reserved = self.reservation.reserved if self.reservation is not None else 0
        return reserved or self.capacity

    def open(self) -> "DeviceCache":
        if self._opened:
            return self
        if self._given is None:
            self.reservation = self.store.reserve(self.store.device_tier, self._share, owner=self.owner,
                                                  on_pressure=_weak_give_back(self))
        self._opened = True
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._landing = queue.Queue()
            self._completer = threading.Thread(target=self._complete, name="tiered-device-cache-landing",
                                               daemon=True)
            self._completer.start()
        return self

    def _complete(self) -> None:
        """Run each queued release once the device work it waits for has run: a host copy after
        its copy to the device, a device buffer given back to the shared GPU tier after the
        kernels that read it (another owner may fill it at once). A failure (a sticky CUDA error)
        is kept for close() to raise; the queue is drained either way, so nothing stays held."""
        while True:
            item = self._landing.get()
            if item is None:
                return
            events, release = item
            try:
                for event in events:
                    event.synchronize()
            except BaseException as e:  # noqa: BLE001 - kept and raised by close()
                if self._landing_error is None:
                    self._landing_error = e
            try:
                release()
            except BaseException as e:  # noqa: BLE001 - kept and raised by close()
                if self._landing_error is None:
                    self._landing_error = e

    def close(self) -> None:
        """Wait for in-flight copies, then give the device region back."""
        if not self._opened:
            return
        with self._lock:
            loading = list(self._loading)  # discarded entries' loads too: they write into the region
        for f in loading:
            try:
                f.result(self.wait)
            except BaseException:  # noqa: BLE001 - the failure was already handed to its callers
                pass
        if self._stream is not None:
            self._stream.synchronize()
        stuck = False
        if self._completer is not None:
            self._landing.put(None)
            self._completer.join(self.wait)
            stuck = self._completer.is_alive()
            self._completer = self._landing = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # every kernel reading the region finished
        with self._lock:
            for entry in list(self._entries.values()):
                self._discard(entry)  # a buffer still leased goes back when its holder releases it
            self._fences.clear()
        if self._given is None and self.reservation is not None:
            self.reservation.close()
            self.reservation = None
        self._stream = None
        self._opened = False
        if stuck:
            raise RuntimeError(f"device cache on {self.device}: host copies not released after {self.wait} s")
        if self._landing_error is not None:
            err, self._landing_error = self._landing_error, None
            raise RuntimeError(f"device cache on {self.device}: a host copy's landing failed") from err

    def __enter__(self) -> "DeviceCache":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- access --------------------------------------------------------------------
    def acquire(self, key: str, *, priority: Priority = Priority.DEMAND, wait: float | None = None) -> IOFuture:
        """A future of a :class:`DeviceLease` on the current version of ``key``.

        Raises KeyError at once for an unknown key, and OutOfBudget when the
        object cannot be placed within ``wait`` seconds (default: the cache's
        ``wait``; 0 for a prefetch that must not block) because every resident
        entry is held, or its host copy finds no room in the host tier.
        """
        version = self.store.meta(key)["version"]
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.version != version:
                self._discard(entry)
                self.stats.reloads += 1
                entry = None
            if entry is not None:
                entry.pins += 1
                self.stats.hits += 1
                self.policy.touch(Observation(key, entry.nbytes, op="read", tier="gpu"))
                if not entry.loading:
                    return completed(DeviceLease(self, entry), f"device {key}")
                return chain(entry.ready, lambda _: DeviceLease(self, entry), f"device {key}")
        return self._load(key, priority, self.wait if wait is None else wait)

    def get(self, key: str, *, priority: Priority = Priority.DEMAND) -> IOFuture:
        """A future of a device tensor the caller owns (a copy out of the cache)."""

        def copy(lease: DeviceLease) -> torch.Tensor:
            with lease:
                out = lease.tensor.clone()
                if out.is_cuda:  # the caller may use it on any stream: the clone has run when this resolves
                    torch.cuda.current_stream(out.device).synchronize()
                return out

        return chain(self.acquire(key, priority=priority), copy, f"device get {key}")

    def evict(self, key: str) -> bool:
        """Drop ``key`` from the device now, or as soon as its holders release it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._discard(entry)
            self.stats.evictions += 1
            return True

    def trim(self) -> int:
        """Drop every entry nobody holds (a last resort against fragmentation); returns how many."""
        with self._lock:
            victims = [e for e in self._entries.values() if e.pins == 0 and not e.loading]
            for entry in victims:
                self._discard(entry)
            self.stats.evictions += len(victims)
            return len(victims)

    def alloc_scratch(self, nbytes: int, wait: float | None = None) -> DeviceBuffer:
        """A buffer of the cache's reservation for the caller's own use (not an entry), counted
        with the entries in ``held``, so within ``limit``: unheld entries are evicted to make room
        as for a load. Raises OutOfBudget as :meth:`acquire` does. Give it back with
        :meth:`release_after_use`."""
        return self._make_room("a scratch buffer", nbytes, self.wait if wait is None else wait)

    def release_after_use(self, buffer: DeviceBuffer) -> None:
        """Give ``buffer`` (from :meth:`alloc_scratch`) back to the tier once the kernels queued so
        far on the current stream have run: another owner may fill it at once. On a CPU device,
        now. It leaves ``held`` at once (as an evicted entry does)."""
        with self._lock:
            if buffer.released:
                raise StoreError(f"device cache of {self.owner!r}: scratch buffer released twice")
            self.held -= buffer.reserved
            self._lock.notify_all()
        landing = self._landing
        if self.device.type != "cuda":
            buffer.release()
            return
        if landing is None or self._completer is None or not self._completer.is_alive():
            torch.cuda.current_stream(self.device).synchronize()
            buffer.release()
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        landing.put(([done], buffer.release))

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    # -- internals -----------------------------------------------------------------
    def _load(self, key: str, priority: Priority, wait: float) -> IOFuture:
        meta = self.store.meta(key)
        nbytes = meta["nbytes"]
        buffer = self._make_room(key, nbytes, wait)
        with self._lock:
            if key in self._entries:  # another caller started the same load meanwhile
                self.held -= buffer.reserved
                buffer.release()
                self._lock.notify_all()
                return self.acquire(key, priority=priority, wait=wait)
            self.stats.misses += 1
            ready = IOFuture(f"device load {key}")
            ready.set_running_or_notify_cancel()  # shared by every waiter: one caller cannot cancel it
            entry = _Entry(key, meta["version"], nbytes, buffer, ready, pins=1)
            self._entries[key] = entry
            self._loading.add(ready)
        try:
            host = self.store.acquire(key, priority=priority, wait=wait, owner=self.owner)
        except BaseException as e:
            with self._lock:
                self._loading.discard(ready)
                self._forget(entry)
            ready.set_exception(e)
            raise
        copied = chain(host, lambda lease: self._copy_in(entry, lease), f"device load {key}")
        copied.add_done_callback(lambda f: self._loaded(entry, f))
        return chain(ready, lambda _: DeviceLease(self, entry), f"device {key}")

    def _copy_in(self, entry: _Entry, lease: Lease) -> None:
        """Runs on an engine worker once the host copy is pinned: host → device on the copy stream.

        On CUDA the copy is only queued: the host copy stays pinned until the completion
        thread has seen it run, and readers wait for ``entry.copied`` on their stream."""
        queued = landed = False
        try:
            src = lease.tensor
            dst = entry.buffer.tensor(src.dtype, src.shape)
            if self._stream is None:
                dst.copy_(src)
            else:
                with self._copy_lock, torch.cuda.stream(self._stream):
                    with self._lock:
                        fences, self._fences = self._fences, []
                    for fence in fences:  # the buffer may be one whose last readers are still queued
                        self._stream.wait_event(fence)
                    queued = True
                    dst.copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                entry.copied = done
                landing = self._landing
                if landing is None or not self._completer.is_alive():
                    raise RuntimeError(f"device cache on {self.device} is closed or its completion thread died")
                landing.put(([done], lease.release))
                landed = True
            entry.tensor = dst
            entry.version = lease.version
        except BaseException:
            if queued:  # the DMA may still read the host copy
                self._stream.synchronize()
            if not landed:
                lease.release()
            raise
        if self._stream is None:
            lease.release()

    def _loaded(self, entry: _Entry, f) -> None:
        failed = f.cancelled() or f.exception() is not None
        with self._lock:
            entry.loading = False
            self._loading.discard(entry.ready)
            if failed:
                self._forget(entry)
            else:
                self.stats.bytes_loaded += entry.nbytes
                if not entry.stale:
                    self.policy.admit(Observation(entry.key, entry.nbytes, op="read", tier="gpu"))
        if not failed:
            entry.ready.set_result(None)
        elif f.cancelled():
            entry.ready.set_exception(CancelledError(f"device load of {entry.key!r} was cancelled"))
        else:
            entry.ready.set_exception(f.exception())

    def _make_room(self, key: str, nbytes: int, wait: float) -> DeviceBuffer:
        """A device buffer for ``nbytes``: evicting unheld entries to stay within ``limit`` (never
        past it: with nothing to evict it waits for releases), then from the tier (whose other
        owners are asked to give room back); waits for releases up to ``wait`` s. No lock is held
        while allocating: another owner's ``on_pressure`` may trim this cache meanwhile."""
        deadline = time.monotonic() + wait
        claim = -(-nbytes // DEVICE_ALIGN) * DEVICE_ALIGN
        while True:
            with self._lock:
                over = self.held + claim - self.limit
                if over > 0 and self._evict(over):
                    continue
                if over <= 0:
                    self.held += claim  # claimed now: a load checking meanwhile sees the room taken
            buffer = self._alloc(nbytes, claim) if over <= 0 else None  # never past the limit
            if buffer is not None:
                return buffer
            with self._lock:
                if self._evict(nbytes):
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.limit < nbytes:
                    raise OutOfBudget(
                        f"device cache of {self.owner!r} on {self.device}: no room for {key!r} ({nbytes} bytes) "
                        f"after {wait} s: it holds {self.held} of its limit {self.limit} bytes in "
                        f"{sum(e.pins > 0 for e in self._entries.values())} leased objects "
                        f"(tier {self.store.device_tier!r}: {self.capacity} bytes)")
                self._lock.wait(min(remaining, 0.05))  # other owners' frees do not notify this cache

    def _alloc(self, nbytes: int, claim: int) -> DeviceBuffer | None:
        """The tier's buffer for ``nbytes``, its room (``claim`` bytes) already counted in ``held``;
        None (the claim given back) when the tier has none now."""
        try:
            buffer = self.reservation.alloc(nbytes, wait=0.0)
        except BaseException as e:
            with self._lock:
                self.held -= claim
                self._lock.notify_all()
            if isinstance(e, OutOfBudget):
                return None
            raise
        with self._lock:
            self.held += buffer.reserved - claim
            self.peak = max(self.peak, self.held)
            if self._region is None:
                self._region = buffer.tensor().untyped_storage().data_ptr()
        return buffer

    def _evict(self, nbytes: int) -> bool:
        """Discard unheld entries (policy's choice) for ``nbytes`` (lock held); False if none."""
        victims = self.policy.victims(nbytes, self._evictable)
        for victim in victims:
            self._discard(self._entries[victim])
            self.stats.evictions += 1
        return bool(victims)

    def _give_back(self, wanted: int) -> int:
        """``on_pressure``: another owner of the tier finds no room; drop what nobody holds."""
        held = self.held
        self.trim()
        return held - self.held

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Where ``t`` starts in the tier's region, or None when it is not a view of it."""
        if self._region is None or t.untyped_storage().data_ptr() != self._region:
            return None
        return t.data_ptr() - self._region

    def _evictable(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.pins == 0 and not entry.loading

    def _unpin(self, entry: _Entry) -> None:
        event = stream = None
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            event = torch.cuda.Event()
            event.record(stream)
        with self._lock:
            entry.pins -= 1
            if event is not None:  # an event of a stream supersedes its earlier ones
                entry.used[stream.cuda_stream] = event
            if entry.stale and entry.pins == 0:
                self._free(entry)
            self._lock.notify_all()

    def _discard(self, entry: _Entry) -> None:
        """Forget ``entry`` (lock held); its buffer goes back once nobody holds it."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.policy.remove(entry.key)
        entry.stale = True
        if entry.pins == 0 and not entry.loading:
            self._free(entry)

    def _forget(self, entry: _Entry) -> None:
        """A failed or cancelled load (lock held): nobody can hold it, give the buffer back."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        entry.pins = 0
        entry.stale = True
        self._free(entry)
        self._lock.notify_all()

    def _free(self, entry: _Entry) -> None:
        # kernels that read the buffer must finish before it is refilled: the next copy waits for
        # them, and the buffer goes back to the tier (which other owners share) only once they ran;
        # so does a copy into it still queued (an entry placed but never read: no reader waited for it)
        readers = [e for e in entry.used.values() if not e.query()]
        if entry.copied is not None and not entry.copied.query():
            readers.append(entry.copied)
        self._fences.extend(entry.used.values())
        entry.used.clear()
        if not entry.buffer.released:
            self.held -= entry.buffer.reserved
            landing = self._landing
            if readers and landing is not None and self._completer is not None and self._completer.is_alive():
                landing.put((readers, entry.buffer.release))
            else:
                if readers:
                    for e in readers:
                        e.synchronize()
                entry.buffer.release()
