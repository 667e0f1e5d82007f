"""The optimizer's host memory: one reservation of the store's host tier, owner ``optim/<name>``.

Every host buffer the optimizer takes (pipeline buffers, resident chunks, cached copies its
reads load) is charged to that owner. Its size comes from ``host_share=`` or the config's
``[owners.optim]`` share; with neither the owner is elastic: it competes for what is free.

- chunk size (default): what the share holds ``lookahead + 3`` of (elastic: the host tier less
  other owners' shares), at most 16 MiB;
- resident chunks (kept in host memory across steps, never read back): with a share, what it
  holds beyond the pipeline; elastic, what is free beyond it when this optimizer opened the
  store itself and no model shares it (else none unless ``resident_bytes=``). Resident chunks
  beyond the share are given back when another owner is short of room (``on_pressure``): a
  chunk whose last write is done is dropped (storage holds it) and streamed from then on.
"""

from __future__ import annotations

import threading
import weakref

import torch

from allocators import HostBuffer, OutOfBudget

from .layout import MAX_CHUNK_BYTES, TAG, Chunk, OptimStateError, encode_step

_SLACK = 64 << 10  # host bytes left free when resident chunks take what is free


class _HostMemory:
    """Part of :class:`~tiered.optim.OffloadedAdamW` (see the module docstring)."""

    def _init_host(self) -> None:
        self._res = None  # the host tier Reservation, while open
        self._res_lock = threading.Lock()  # resident buffers: taken by on_pressure or by an update

    @property
    def owner(self) -> str:
        """The store owner this optimizer's memory and objects are charged to."""
        return f"optim/{self.name}"

    def _reserve_host(self) -> None:
        # held weakly: the store's reservation table must not keep a dropped optimizer alive
        ref = weakref.WeakMethod(self._give_back)
        self._res = self._store.reserve("host", self.host_share, owner=self.owner,
                                        on_pressure=lambda n: (fn(n) if (fn := ref()) is not None else 0))

    def _end_host(self) -> None:
        if self._res is not None:
            res, self._res = self._res, None
            res.close()

    def _alloc(self, nbytes: int, wait: float) -> HostBuffer:
        return self._res.alloc(nbytes, wait)

    # -- what the tier gives this owner ------------------------------------------------
    def _host_figures(self) -> tuple[int, int, int]:
        """(host tier capacity, bytes in use, bytes other owners' shares keep free)."""
        host = self._store.stats()["tiers"]["host"]
        kept = 0
        for owner, tiers in self._store.owners().items():
            fig = tiers.get("host")
            if owner != self.owner and fig is not None:
                kept += max(0, fig["reserved"] - fig["held"])
        return host["capacity"], host["used"], kept

    def _host_limit(self) -> tuple[int, str]:
        """The most host memory this optimizer can count on, and what it is (for messages)."""
        share = self._res.reserved
        if share:
            return share, f"host share of {self.owner!r} of {share} bytes"
        cap = self._store.stats()["tiers"]["host"]["capacity"]
        others = sum(t["host"]["reserved"] for o, t in self._store.owners().items()
                     if o != self.owner and "host" in t)
        return cap - others, f"host tier of {cap} bytes ({others} reserved by other owners)"

    def _default_chunk_bytes(self) -> int:
        limit, _what = self._host_limit()
        # a chunk's host bytes: its state rounded up to a page, and a split chunk's master page
        return min(MAX_CHUNK_BYTES, limit // (self.lookahead + 3) - 2 * 4096 - 4 * TAG)

    def _pipeline_bytes(self) -> int:
        """Host memory the streaming pipeline needs: lookahead reads, one update, two writes."""
        if not self._chunks:
            return 0
        return (self.lookahead + 3) * max(c.host_bytes for c in self._chunks)

    def _check_budget(self) -> None:
        if not self._chunks:
            return
        biggest = max(c.host_bytes for c in self._chunks)
        need = (self.lookahead + 3) * biggest
        limit, what = self._host_limit()
        if need > limit:
            raise OptimStateError(
                f"OffloadedAdamW: {what} cannot hold {self.lookahead + 3} state chunks of "
                f"{biggest} bytes (lookahead {self.lookahead} + the one updated + 2 being written); lower "
                "chunk_bytes or lookahead, or raise host_share=, [owners.optim] host or [tiers.host] capacity")

    # -- resident chunks ---------------------------------------------------------------
    def _resident_room(self) -> int:
        share = self._res.reserved
        if share:
            room = share - self._pipeline_bytes()
            return room if self.resident_bytes is None else min(self.resident_bytes, room)
        cap, used, kept = self._host_figures()
        free = cap - used - kept - self._pipeline_bytes() - _SLACK
        if self.resident_bytes is not None:
            return min(self.resident_bytes, free)
        return free if self._owns_store and self._units is None else 0

    def _place_resident(self) -> None:
        """Keep the last chunks resident in the room :meth:`_resident_room` finds."""
        room = self._resident_room()
        for c in reversed(self._chunks):
            if c.host_bytes > room:
                break
            state = master = None
            try:  # filled here, published under the lock: another owner's pressure may drop it meanwhile
                state = self._alloc(4 * c.state_numel, wait=0.0)
                if c.split:
                    master = self._alloc(4 * (c.numel + TAG), wait=0.0)
            except OutOfBudget:  # taken meanwhile: the rest is streamed
                for buf in (state, master):
                    if buf is not None:
                        buf.release()
                break
            encode_step(state.tensor(torch.float32), -1)  # holds no step yet: loaded on first use
            with self._res_lock:
                c.resident, c.resident_master = state, master
            room -= c.host_bytes

    def _drop_resident(self, c: Chunk) -> int:
        freed = 0
        for attr in ("resident", "resident_master"):
            buf = getattr(c, attr)
            if buf is not None:
                setattr(c, attr, None)
                freed += buf.reserved
                buf.release()
        c.resident_writes = []
        return freed

    def _evict_cached(self) -> None:
        """Drop the cached copies of this optimizer's objects (a closed owner holds no host memory)."""
        keys = [self._marker_key] + [k for c in self._chunks for s in (0, 1)
                                     for k in (self._chunk_key(c, s), self._master_key(c, s))]
        for key in keys:
            if key in self._store:
                self._store.evict(key)

    def _release_resident(self) -> None:
        with self._res_lock:
            for c in self._chunks:
                self._drop_resident(c)

    def _take_resident(self, c: Chunk) -> bool:
        """Claim ``c``'s resident buffers for an update (on_pressure leaves them alone until
        :meth:`_resident_written`); False when it is streamed."""
        with self._res_lock:
            if c.resident is None:
                return False
            c.busy = True
            return True

    def _resident_written(self, c: Chunk, futures: list) -> None:
        """``c``'s writes from its resident buffers are issued: they may be given back once done."""
        with self._res_lock:
            c.resident_writes = list(futures)
            c.busy = False

    def _give_back(self, wanted: int) -> int:
        """on_pressure: drop resident chunks whose last write is done (the store holds them;
        they are streamed from then on), as far as this owner holds more than its share. Never
        waits: a chunk being updated or written is skipped (the store asks again)."""
        res = self._res
        if res is None:
            return 0
        over = res.held - res.reserved
        given = 0
        with self._res_lock:
            for c in self._chunks:
                if given >= min(wanted, over):
                    break
                if c.resident is None or c.busy or not all(f.done() for f in c.resident_writes):
                    continue
                if any(f.exception() is not None for f in c.resident_writes):
                    continue  # that step is broken: what storage holds is not the buffer
                given += self._drop_resident(c)
        return given
