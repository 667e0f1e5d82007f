"""Loading routed experts, keeping the useful ones, and reading the next layer's ahead (on the
device-cache path the experts are device cache entries: see :mod:`.expert_device`).

When a bank's forward starts (its pre-hook sees the router's choice, ``top_k_index``), the
experts chosen for the batch's tokens (each once) are made present in the bank's slabs:

- present already (the *compute* tier: used in place, nothing read or copied);
- prefetched (read ahead while the previous layer computed), or cached in the store's host tier:
  copied in from the host copy;
- else read from storage on demand.

Then the next bank's router (a private copy) scores the current hidden state, and the experts
it picks that are not present are read ahead at prefetch priority: a wrong guess costs a read
that may go unused and, later, a demand read; never a wrong result, since only the real
router's choice decides what is loaded and bound.

The room for experts is the model's compute budget less the streaming window and resident
units (``_expert_capacity``). When a new expert does not fit, the present expert with the
lowest decayed routing frequency (ties: least recently used) that this call does not need is
dropped: experts many tokens route to stay, one-off ones go.
"""

from __future__ import annotations

import time

import torch

from tiered.allocators import OutOfBudget
from tiered.io_engine import Priority

from ..sizes import format_size
from .common import _WAIT, OffloadError, prefetching
from .experts import _Bank, drop_pages

_DECAY = 0.9  # per call of a bank: how much an expert's routing frequency fades
_AHEAD = 2  # banks whose experts are read ahead (direct reads; one through the host tier)


class _ExpertCache:
    """Part of :class:`~tiered.offload.runtime.OffloadedModule`: the banks at run time."""

    # -- hooks -------------------------------------------------------------------------
    def install_bank_hooks(self) -> None:
        for b in self.banks:
            self._hooks.append(b.module.register_forward_pre_hook(self._bank_pre(b), with_kwargs=True))
            self._hooks.append(b.module.register_forward_hook(self._bank_post(b), always_call=True))
            self._hooks.append(b.module.register_state_dict_post_hook(
                lambda _m, state, prefix, _meta, b=b: self.fill_bank_state(b, state, prefix)))

    def _bank_pre(self, b: _Bank):
        def hook(_m, args, kwargs):
            hidden = args[0] if args else kwargs.get(b.hidden_arg)
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
            _check_routing(b, hidden, index)
            if torch.is_grad_enabled() and any(b.module._parameters[a].requires_grad for a in b.attrs):
                raise OffloadError(f"expert bank {b.name!r}: expert units serve inference (run under "
                                   "torch.no_grad() or inference_mode, or requires_grad_(False)); set [offload] "
                                   "experts = false to train")
            routed = [e for e in torch.unique(index.detach()).tolist() if 0 <= e < b.num]
            self.load_experts(b, routed)
            if b.index == 0:
                self.expert_stats["tokens"] += hidden.reshape(-1, hidden.shape[-1]).shape[0]
            if self.experts_on_device:
                args, kwargs = self.stage_bank(b, routed, args, kwargs)
                self._predict_next(b, hidden)
                return args, kwargs
            self.bind_bank(b)
            self._predict_next(b, hidden)
            return None
        return hook

    def _bank_post(self, b: _Bank):
        def hook(_m, _args, _out):
            self.unbind_bank(b)
        return hook

    # -- loading -----------------------------------------------------------------------
    def load_experts(self, b: _Bank, routed: list[int]) -> None:
        """Make ``routed`` present in ``b``'s slabs (see the module docstring)."""
        t0 = time.perf_counter()
        st = self.expert_stats
        self._calls += 1
        for e in range(b.num):
            b.score[e] *= _DECAY
        for e in routed:
            b.score[e] += 1.0
            b.last_use[e] = self._calls
            b.uses[e] += 1
        if b.predicted:
            st["predicted"] += len(b.predicted)
            st["predicted_used"] += len(b.predicted & set(routed))
            b.predicted = set()
        missing = [e for e in routed if e not in b.cached]
        st["routed"] += len(routed)
        st["hits"]["compute"] += len(routed) - len(missing)
        futures = {e: b.pending.pop(e) for e in missing if e in b.pending}
        st["hits"]["prefetched"] += len(futures)
        for e in list(b.pending):  # read ahead for this call but not routed to
            if not self._lands_in_room(b):  # its host copy: unpinned, still cached
                self._give_back_prefetch(b.pending.pop(e))
            elif b.pending[e].done():  # read into its slab place: present from now on
                self._settle(b, e, b.pending.pop(e))
        if missing:
            try:
                self.hold_expert_room()
                self._make_expert_room(b, len(missing), keep=set(routed))
                self._read_missing(b, [e for e in missing if e not in futures], futures)
            except BaseException:
                self._abandon_reads(b, futures)
                raise
        self.stats.stall_seconds += time.perf_counter() - t0

    def _abandon_reads(self, b: _Bank, futures: dict) -> None:
        """After a failed load: the reads of ``futures`` not used yet give their memory back (host
        copies unpinned; reads into the slabs awaited, then present, or dropped if they failed)."""
        for e, f in futures.items():
            if self._lands_in_room(b):
                self._settle(b, e, f)
            else:
                self._give_back_prefetch(f)
        futures.clear()

    def _read_missing(self, b: _Bank, demand: list[int], futures: dict) -> None:
        """Read ``demand`` (all at once while host memory lasts, then one by one as copies free
        it) and copy them and the prefetched ``futures`` into the slabs; each future is taken out
        of ``futures`` once used (what is left there after an error is the caller's to give back)."""
        st, later = self.expert_stats, []
        if self.experts_on_device:
            self.place_experts(b, demand, futures)
            return
        if b.direct:
            for e in demand:
                for slab in b.slabs.values():
                    slab.fill(e)
                futures[e] = self.store.read_ranges(b.ranges(e), owner=self.owner)
                st["hits"]["storage"] += 1
            for e in list(futures):
                f = futures[e]
                f.result(timeout=_WAIT)
                del futures[e]
                b.cached[e] = True
                b.reads[e] += 1
            return
        for e in demand:
            try:
                futures[e] = self.store.acquire(b.keys[e], priority=Priority.DEMAND, wait=0.0, owner=self.owner)
            except OutOfBudget:
                later.append(e)
                continue
            st["hits"]["host" if futures[e].done() else "storage"] += 1
        for e in list(futures):
            self._copy_in(b, e, futures.pop(e).result(timeout=_WAIT))
        for e in later:
            f = self._acquire_now(b.keys[e])
            st["hits"]["host" if f.done() else "storage"] += 1
            self._copy_in(b, e, f.result(timeout=_WAIT))

    def _settle(self, b: _Bank, e: int, f) -> None:
        """A direct read ahead that is done: its expert is present (or, if it failed, not)."""
        try:
            got = f.result(timeout=_WAIT)
        except Exception:  # noqa: BLE001 - a demand read of the expert reports the error, if it is routed to
            present = b.cached.keys() | b.pending.keys()
            for slab in b.slabs.values() if not self.experts_on_device else ():
                slab.drop(e, present)
            return
        b.cached[e] = got if self.experts_on_device else True  # on the device: its lease
        b.reads[e] += 1

    def _acquire_now(self, key: str):
        """A demand read that must get host memory: what was read ahead (units, experts) goes first."""
        try:
            return self.store.acquire(key, priority=Priority.DEMAND, wait=0.0, owner=self.owner)
        except OutOfBudget:
            self._drop_prefetches(keep=None)
            self._make_room()
            return self.store.acquire(key, priority=Priority.DEMAND, wait=_WAIT, owner=self.owner)

    def _copy_in(self, b: _Bank, e: int, lease) -> None:
        try:
            raw = lease.tensor.view(torch.uint8).reshape(-1)
            for slab in b.slabs.values():
                slab.fill(e)
            for src, dst in b.slices(raw, e):
                dst.copy_(src)
        finally:
            lease.release()
        b.cached[e] = True
        b.reads[e] += 1

    def _make_expert_room(self, b: _Bank, n: int, keep: set[int]) -> None:
        """Drop the least useful present experts until ``n`` more fit, within the room charged to
        the model for them (where experts are read through the host tier, the read-ahead room holds
        host copies, not experts: the cache's room alone). A call needing more is refused."""
        room, size = self._expert_capacity + self._expert_prefetch_room, self._room_bytes(b)
        staged = len(keep) * size if self.experts_on_device else 0  # the call's experts gathered
        if not self.experts_on_device:
            room = min(room, self._room_charge())
        if len(keep) * size + staged > room:
            raise OffloadError(
                f"expert bank {b.name!r}: this call routes to {len(keep)} experts "
                f"({format_size(len(keep) * size)}" + (", twice with their staging" if staged else "")
                + f"), more than the room for experts, {format_size(room)} ({self._budget_name()}); "
                "raise the budget or shorten the batch")
        limit = room - staged
        protect = {(b.index, e) for e in keep}
        while self._expert_held() + n * size > limit:
            if self._evict_one(protect):
                continue
            unsettled = [(v, e) for v in self.banks if self._lands_in_room(v) for e in v.pending
                         if e not in keep or v is not b]
            if not unsettled:
                break
            for v, e in unsettled:  # reads ahead still landing: once done, they can be dropped
                self._settle(v, e, v.pending.pop(e))

    def hold_expert_room(self) -> None:
        """Charge the room for experts to the model: one host buffer of the cache's size whose pages
        go back to the kernel (the experts live in the slabs, in pool memory)."""
        if self.experts_on_device:  # experts are device cache entries, charged as they are placed
            return
        if self.banks and self._expert_room is None and self._expert_capacity:
            try:
                self._expert_room = self.compute_res.alloc(self._room_charge(), wait=0.0)
            except OutOfBudget:
                self._make_room()  # merge what is free (the store has asked the other owners already)
                self._expert_room = self.compute_res.alloc(self._room_charge(), wait=_WAIT)
            drop_pages(self._expert_room.address, self._expert_room.nbytes)

    def _room_charge(self) -> int:
        """The cache, and the read-ahead room too where a bank reads into its slabs."""
        direct = any(b.direct for b in self.banks)
        return self._expert_capacity + (self._expert_prefetch_room if direct else 0)

    def release_expert_room(self) -> None:
        if self._expert_room is not None:
            room, self._expert_room = self._expert_room, None
            room.release()

    def _expert_held(self) -> int:
        """Slab bytes of present experts and of those being read in directly."""
        return sum((len(v.cached) + (len(v.pending) if self._lands_in_room(v) else 0)) * self._room_bytes(v)
                   for v in self.banks)

    def _room_bytes(self, b: _Bank) -> int:
        """What one present expert of ``b`` takes of the room: its object on the device; in the
        slabs at most its pages (a slice not of whole pages commits the pages it touches)."""
        return b.nbytes if self.experts_on_device else max(b.nbytes, b.footprint)

    def _evict_one(self, protect: set[tuple[int, int]]) -> bool:
        """Drop the present expert with the lowest decayed frequency (ties: oldest use), never one
        of ``protect`` (bank index, expert). False when nothing can go."""
        best = None
        for v in self.banks:
            for e in v.cached:
                if (v.index, e) in protect:
                    continue
                rank = (v.score[e], v.last_use[e])
                if best is None or rank < best[0]:
                    best = (rank, v, e)
        if best is None:
            return False
        self._drop_expert(best[1], best[2])
        self.expert_stats["evictions"] += 1
        return True

    def _drop_expert(self, b: _Bank, e: int) -> None:
        held = b.cached.pop(e)
        if self.experts_on_device:
            self.unplace(b, e, held)
            return
        present = b.cached.keys() | (b.pending.keys() if b.direct else set())
        for slab in b.slabs.values():
            slab.drop(e, present)

    # -- prediction --------------------------------------------------------------------
    def _predict_next(self, b: _Bank, hidden: torch.Tensor) -> None:
        """Score the next banks' experts with their routers on this hidden state; read them ahead
        (the next bank's first; those ``_AHEAD`` banks on where they read straight into slabs, so
        that more reads are in flight than one layer's experts)."""
        for ahead in range(1, _AHEAD + 1):
            if b.index + ahead >= len(self.banks):
                return
            nxt = self.banks[b.index + ahead]
            if ahead > 1 and not nxt.direct:
                return
            guess = self._guess(nxt, hidden)
            if guess is None:
                return
            if ahead == 1:  # what the next call is checked against (the prediction accuracy)
                nxt.predicted = guess
            self._read_ahead(b, nxt, guess)

    @staticmethod
    def _guess(nxt: _Bank, hidden: torch.Tensor) -> set[int] | None:
        """The experts ``nxt``'s router (a private copy) picks for ``hidden``; None if it cannot say."""
        if nxt.predictor is None:
            return None
        with torch.no_grad():
            out = nxt.predictor(hidden.detach().reshape(-1, hidden.shape[-1]))
        index = out[-1] if isinstance(out, tuple) else out
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
            return None
        return {e for e in torch.unique(index).tolist() if 0 <= e < nxt.num}

    def _read_ahead(self, b: _Bank, nxt: _Bank, guess: set[int]) -> None:
        for e in guess:
            if e in nxt.cached or e in nxt.pending:
                continue
            if self._lands_in_room(nxt):
                self._prefetch_direct(b, nxt, e, guess)
                continue
            if self._expert_pending_bytes() + nxt.nbytes > self._expert_prefetch_room:
                self.stats.prefetch_skipped += 1
                continue
            prefetching.active = True
            try:
                nxt.pending[e] = self.store.acquire(nxt.keys[e], priority=Priority.PREFETCH, wait=0.0,
                                                    owner=self.owner)
            except OutOfBudget:
                self.stats.prefetch_skipped += 1
            finally:
                prefetching.active = False

    def _prefetch_direct(self, b: _Bank, nxt: _Bank, e: int, guess: set[int]) -> None:
        """Read expert ``e`` of ``nxt`` ahead straight into its slab place, making room there by
        dropping the least useful present expert (never one the running call ``b`` uses)."""
        protect = {(b.index, i) for i in b.cached if b.last_use[i] == self._calls}
        protect |= {(nxt.index, i) for i in guess}
        protect |= {(b.index + 1, i) for i in self.banks[b.index + 1].predicted}
        limit = self._expert_capacity + self._expert_prefetch_room - self.staged_bytes()
        while self._expert_held() + self._room_bytes(nxt) > limit:
            if not self._evict_one(protect):
                self.stats.prefetch_skipped += 1
                return
        if self.experts_on_device:
            self.place_ahead(nxt, e)
            return
        for slab in nxt.slabs.values():
            slab.fill(e)
        nxt.pending[e] = self.store.read_ranges(nxt.ranges(e), owner=self.owner, priority=Priority.PREFETCH)

    def _expert_pending_bytes(self) -> int:
        """Host-tier bytes of experts read ahead (direct reads land in the slabs instead); on the
        device: the compute-tier bytes of every expert placed, being placed or staged."""
        if self.experts_on_device:
            return self._expert_held() + self.staged_bytes()
        return sum(len(v.pending) * v.nbytes for v in self.banks if not v.direct)

    def drop_expert_prefetches(self) -> int:
        """Give back the host copies read ahead for experts; the bytes given back."""
        freed = 0
        for b in self.banks:
            pending, b.pending = dict(b.pending), {}
            freed += len(pending) * b.nbytes
            for e, f in pending.items():
                if self.experts_on_device:
                    self.give_back_placement(b, e, f)
                elif b.direct:  # the read lands in pool memory: wait for it before the place is lent again
                    self._settle(b, e, f)
                else:
                    self._give_back_prefetch(f)
        return freed

    @staticmethod
    def _give_back_prefetch(f) -> None:
        if f.cancel():
            return
        try:
            lease = f.result(timeout=_WAIT)
        except Exception:  # noqa: BLE001 - a failed read pins nothing; a demand read reports it
            return
        lease.release()

    def drop_experts(self) -> int:
        """Drop every present expert (the model gives its memory back, or detaches)."""
        freed = self.drop_expert_prefetches()
        for b in self.banks:
            for e in list(b.cached):
                self._drop_expert(b, e)
        for pool in getattr(self, "pools", {}).values():
            pool.uncommit()
        if self._expert_room is not None:
            freed += self._expert_room.nbytes
        self.release_expert_room()
        if self._staging is not None:
            freed += self._staging.nbytes
            self.release_staging()
        return freed

    # -- budget and report -------------------------------------------------------------
    def _top_k(self) -> tuple[int, int]:
        """(experts one token is routed to, bytes of the largest expert) over the banks."""
        largest = max(self._room_bytes(b) for b in self.banks)
        top = max((getattr(b.router, "top_k", None) or getattr(b.module, "top_k", None) or 2) for b in self.banks)
        return min(top, max(b.num for b in self.banks)), largest

    def _staging_floor(self, top: int, largest: int) -> int:
        """On the device: room for one token's experts gathered for its call (see .expert_device)."""
        return top * largest if self.experts_on_device else 0

    def expert_floor(self) -> int:
        """Room for one token's experts, as many read ahead and one being read in, and on the device
        their staging (0 without banks)."""
        if not self.banks:
            return 0
        top, largest = self._top_k()
        return (2 * top + 1) * largest + self._staging_floor(top, largest)

    def check_expert_room(self, room: int) -> None:
        """Refuse a budget whose ``room`` for experts cannot hold the experts one token is routed
        to and one more being read in (checked before anything is written, and again when set)."""
        if not self.banks:
            return
        top, largest = self._top_k()
        need = (top + 1) * largest + self._staging_floor(top, largest)
        if room < need:
            raise OffloadError(f"compute budget {format_size(self._budget())} ({self._budget_name()}) leaves "
                               f"{format_size(max(room, 0))} for experts, less than the {top} experts of "
                               f"{format_size(largest)} one token is routed to and one read in"
                               + (" (and the token's experts staged for its call)" if self.experts_on_device else "")
                               + "; raise the budget")

    def plan_experts(self, room: int) -> None:
        """Set the room for experts from what the budget leaves (``room``), refusing a budget that
        cannot hold the experts one token is routed to."""
        if not self.banks:
            self._expert_capacity = self._expert_prefetch_room = 0
            return
        self.check_expert_room(room)
        top, largest = self._top_k()
        need = (top + 1) * largest + self._staging_floor(top, largest)
        # memory for reading experts in: what is read ahead, at least one expert
        self._expert_prefetch_room = min(top * largest, room - need) + largest
        self._expert_capacity = room - self._expert_prefetch_room
        if not self.experts_on_device:
            self.open_pools(room)

    def expert_report(self) -> dict:
        st = self.expert_stats
        tokens = max(st["tokens"], 1)
        predicted = st["predicted"]
        compute = "gpu" if self.experts_on_device else "compute"
        hits = {compute if k == "compute" else k: v for k, v in st["hits"].items()}
        loaded = hits["prefetched"] + hits["host"] + hits["storage"]
        return {
            "compute_tier": "gpu" if self.experts_on_device else "host",
            "banks": len(self.banks), "experts_per_bank": self.banks[0].num,
            "expert_bytes": self.banks[0].nbytes, "capacity_bytes": self._expert_capacity,
            "present_bytes": self._expert_held(), "tokens": st["tokens"], "routed": st["routed"],
            "hits": dict(hits), "evictions": st["evictions"],
            "hit_rate": round((hits[compute] + hits["prefetched"]) / st["routed"], 4) if st["routed"] else 1.0,
            "expert_bytes_loaded_per_token": round(loaded * self.banks[0].nbytes / tokens, 1),
            "prediction": {"predicted": predicted, "correct": st["predicted_used"],
                           "precision": round(st["predicted_used"] / predicted, 4) if predicted else None},
            "per_expert": {b.name: {"uses": list(b.uses), "loads": list(b.reads), "present": sorted(b.cached)}
                           for b in self.banks},
        }


def _check_routing(b: _Bank, hidden, index) -> None:
    """Refuse a call whose ``top_k_index`` is not the router's choice of experts per token."""
    if not isinstance(index, torch.Tensor) or not isinstance(hidden, torch.Tensor):
        raise OffloadError(f"expert bank {b.name!r} was called without ({b.hidden_arg}, top_k_index) tensors; "
                           "set [offload] experts = false for this model")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise OffloadError(f"expert bank {b.name!r}: top_k_index must hold integer expert ids, got {index.dtype}")
    if index.dim() != hidden.dim() or index.shape[:-1] != hidden.shape[:-1]:
        raise OffloadError(f"expert bank {b.name!r}: top_k_index of shape {tuple(index.shape)} does not match "
                           f"{b.hidden_arg} of shape {tuple(hidden.shape)} (expected [..., tokens, top_k])")


def new_expert_stats() -> dict:
    return {"tokens": 0, "routed": 0, "evictions": 0, "predicted": 0, "predicted_used": 0,
            "hits": {"compute": 0, "prefetched": 0, "host": 0, "storage": 0}}
