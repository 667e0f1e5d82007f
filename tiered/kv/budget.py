"""Where a TieredCache's K/V bytes live and how it keeps them within its budgets.

Device: resident blocks, staging slots and tails are taken through :class:`~tiered.kv.memory.DeviceMemory`
(buffers of the store's GPU tier, or PyTorch's allocator under a private budget). After each step
blocks are spilled to the store (oldest first, through an eviction policy) until the device total fits
the budget: the tier share (``device_budget``, else the config's) or the private ``device_budget``. An
elastic cache on the GPU tier (no share) spills when the tier has no room for a new tensor, and, after
the step in which another owner asked for room, as many bytes as it asked for.

Host: a prefill under a budget copies the full blocks of its new tokens into host block buffers of
the cache's host reservation, right after each layer's attention; at the last layer they go to the
store without ever being whole on the device.
"""

from __future__ import annotations

import torch

from tiered.allocators import OutOfBudget

from .blocks import Block, KVCacheError
from .plan import checksum_block, checksum_table_bytes


class BudgetMixin:
    """Part of :class:`~tiered.kv.cache.TieredCache` (see the module docstring)."""

    def _token_bytes(self) -> int:
        b, dtype, _ = self._geometry
        return b * self.kv_heads * self.head_dim * dtype.itemsize

    def device_bytes(self) -> dict:
        """Bytes on the compute device: resident blocks, staging slots, tails."""
        blocks = sum(b.nbytes for b in self._blocks)
        staging = sum(t.numel() * t.element_size() for s in self._slots for t in s if t is not None)
        tails = sum(2 * (layer.tail_k.numel() * layer.tail_k.element_size())
                    for layer in self._tlayers if layer.tail_k is not None)
        return {"blocks": blocks, "staging": staging, "tails": tails, "total": blocks + staging + tails}

    def _budget(self) -> int | None:
        """The device bytes the cache keeps within after a step (None: no limit of its own)."""
        return self._device.budget(self.device_budget)

    # -- device tensors -------------------------------------------------------------------
    def _dev_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor on the compute device (compute thread only): on the GPU tier, resident blocks
        are spilled while the tier has no room, then it waits for other owners to give some back."""
        device = self._geometry[2]
        while True:
            try:
                return self._device.empty(shape, dtype, device)
            except OutOfBudget:
                if self._spill_one():
                    continue
            try:
                return self._device.empty(shape, dtype, device, wait=self.io_timeout)
            except OutOfBudget as e:
                raise KVCacheError(f"TieredCache {self.owner}: no device memory for {dtype}{tuple(shape)} with "
                                   f"every block spilled ({e})") from e

    def _set_tail(self, layer, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Give ``layer`` a new tail, freeing the old one; on the GPU tier the new tail is copied
        into buffers of the tier (the model's own tensors are not the cache's to account)."""
        old = (layer.tail_k, layer.tail_v)
        if self._device.shared and k is not None:
            k = k if self._device.owns(k) else self._adopt(k)
            v = v if self._device.owns(v) else self._adopt(v)
        layer.tail_k, layer.tail_v = k, v
        kept = {t.data_ptr() for t in (k, v) if t is not None}
        for t in old:
            if t is not None and t.data_ptr() not in kept:
                self._device.free(t)

    def _append_tail(self, layer, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer.tail_k is None:
            self._set_tail(layer, k, v)
        elif not self._device.shared:
            self._set_tail(layer, torch.cat([layer.tail_k, k], dim=-2), torch.cat([layer.tail_v, v], dim=-2))
        else:
            shape = (*k.shape[:-2], layer.tail_len + k.shape[-2], k.shape[-1])
            nk, nv = self._dev_empty(shape, k.dtype), self._dev_empty(shape, v.dtype)
            torch.cat([layer.tail_k, k], dim=-2, out=nk)
            torch.cat([layer.tail_v, v], dim=-2, out=nv)
            self._set_tail(layer, nk, nv)

    def _adopt(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in a tensor of the cache's own (on the GPU tier: a copy into one of its buffers)."""
        if not self._device.shared:
            return t
        out = self._dev_empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def _own_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` in a tensor of the cache's own."""
        return self._adopt(t) if self._device.shared else t.clone()

    def _set_block_data(self, blk: Block, data: torch.Tensor | None) -> None:
        """A block's device copy (None: it has none), the previous one freed."""
        old, blk.data = blk.data, data
        self._blocks_gen += 1  # the step plan no longer says where this block is
        if old is not None and old is not data:
            self._device.free(old)

    def _free_device(self) -> None:
        """Give back every device tensor (reset or close: no gather is in flight)."""
        for blk in self._blocks:
            self._set_block_data(blk, None)
        self._free_slots()
        self._free_retired()
        for layer in self._tlayers:
            self._set_tail(layer, None, None)
        self._free_staging()
        self._device_closer()

    def _retire(self, t: torch.Tensor | None) -> None:
        """Free ``t`` (a slot tensor) once the step's forward is over: the K/V an update returned
        from it may still be read by this layer's attention (or, KV sharing, by later layers)."""
        if t is not None and self._device.shared:
            self._retired.append(t)

    def _free_retired(self) -> None:
        retired, self._retired = self._retired, []
        for t in retired:
            self._device.free(t)

    def _free_slots(self) -> None:
        """Give back the staging slots (sized again for the next step)."""
        for pair in self._slots:
            for i, t in enumerate(pair):
                pair[i] = None
                self._device.free(t)

    def _device_pressure(self, nbytes: int) -> int:
        """``on_pressure`` of the GPU-tier reservation: called from another owner's thread while
        a step may be running, so it only notes the request; the cache spills that many bytes of
        resident blocks after its current step (the asking owner waits for them)."""
        with self._pin_lock:
            self._device_wanted += nbytes
        return 0

    # -- keeping the budget ---------------------------------------------------------------
    def _enforce_budget(self) -> None:
        """After a step's last layer (no gather in flight): size the staging slots for the next
        decode step, then spill blocks until everything fits the budget."""
        span = max(self._committed + layer.tail_len + 1 - self._slot_start(layer) for layer in self._tlayers)
        for slot in range(len(self._slots)):
            self._reserve(slot, span)  # grows (by a block of headroom) only when needed
        used = self.device_bytes()
        self.counters["device_peak"] = max(self.counters["device_peak"], used["total"])
        budget = self._budget()
        total = max(used["total"], self._device.held() or 0)  # the tier counts aligned buffers
        over = 0 if budget is None else total - budget
        with self._pin_lock:
            wanted, self._device_wanted = self._device_wanted, 0
        over = max(over, min(wanted, used["blocks"]))
        if over <= 0:
            return
        by_key = {f"b{b.index}": b for b in self._blocks if b.data is not None}
        for name in self._device_policy.victims(over, lambda k: k in by_key):
            self._spill(by_key[name])
            self._device_policy.remove(name)
        rest = used["staging"] + used["tails"]
        if budget is not None and rest > budget:
            raise KVCacheError(
                f"TieredCache: device budget {budget} bytes is smaller than the attention staging "
                f"({used['staging']} bytes: {self.lookahead + 1} slots of one layer's "
                f"{self._committed} tokens) plus tails ({used['tails']} bytes); raise device_budget or lower lookahead")

    def _spill_one(self) -> bool:
        """Spill one resident block (the policy's victim); False when none is resident."""
        by_key = {f"b{b.index}": b for b in self._blocks if b.data is not None}
        if not by_key or self.kv is None:
            return False
        for _l, _t, _s, fut in self._pending:  # a gather in flight may be reading it
            fut.result(timeout=self.io_timeout)
        for name in self._device_policy.victims(1, lambda k: k in by_key):
            self._spill(by_key[name])
            self._device_policy.remove(name)
        return True

    def _spill(self, blk: Block) -> None:
        """Move a resident block off the device: it must be readable from the store first."""
        moved = blk.nbytes or blk.host_nbytes
        if blk.keys is None:
            blk.keys = [self.kv.session_key(self._session, blk.index, p) for p in self._parts]
            blk.saving = [self._put_part(k, blk.part(i, lo, hi))
                          for i, (k, (lo, hi)) in enumerate(zip(blk.keys, self._parts))]
        for f in blk.saving or ():
            f.result(timeout=self.io_timeout)  # visible (and durable) before the device copy goes
        blk.saving = None
        self.counters["spilled_blocks"] += 1
        self.counters["spilled_bytes"] += moved
        self._set_block_data(blk, None)

    def _put_part(self, key: str, part):
        """Put a session block part: a tensor (copied), or a host buffer handed to the store."""
        if isinstance(part, tuple):
            buf, dtype, shape = part
            return self.kv.store.put_buffer(key, buf, dtype, shape, kind="kv", give=True,
                                            block=checksum_block(shape, dtype))
        return self.kv.store.put(key, part, kind="kv", owner=self.owner, block=checksum_block(part.shape, part.dtype))

    # -- prefill through host block buffers ------------------------------------------------------
    def _stage_to_host(self, layer) -> None:
        """Prefill under a budget: move the full blocks of ``layer``'s tail into host block buffers
        (its attention already has them in its slot), so the device holds only the remainder."""
        bs = self.block_size
        base = len(self._blocks) + layer.staged
        if layer is self._tlayers[0]:  # the step's first layer takes the buffers (as many as fit)
            self._take_host_blocks(base, layer.tail_len // bs)
        full = 0  # every layer stages the blocks the first one got buffers for
        while full < layer.tail_len // bs and base + full in self._host_blocks:
            full += 1
        part = self._part_of[layer.index]
        at = layer.index - self._parts[part][0]
        for j in range(full):
            host = self._host_blocks[base + j][part][1]
            host[at, 0].copy_(layer.tail_k[:, :, j * bs:(j + 1) * bs])
            host[at, 1].copy_(layer.tail_v[:, :, j * bs:(j + 1) * bs])
        rest = layer.tail_len - full * bs
        if rest:
            self._set_tail(layer, layer.tail_k[:, :, full * bs:].clone(), layer.tail_v[:, :, full * bs:].clone())
        else:
            self._set_tail(layer, None, None)
        layer.staged += full

    def _take_host_blocks(self, first: int, count: int) -> None:
        """Host buffers for blocks ``first..first+count-1``, one per stored part
        (``[layers in part, 2, B, H, bs, D]``, put later without a copy), from the cache's host
        reservation, without waiting: as many blocks as the host tier has room for (the blocks
        without them stay on the device until the step ends, then are spilled)."""
        b, dtype, _device = self._geometry
        elem = torch.empty((), dtype=dtype).element_size()
        for index in range(first, first + count):
            if index in self._host_blocks:
                continue
            parts, tables = [], []
            try:
                for lo, hi in self._parts:
                    shape = (hi - lo, 2, b, self.kv_heads, self.block_size, self.head_dim)
                    buf = self._host.alloc(torch.Size(shape).numel() * elem, wait=0)
                    parts.append((buf, buf.tensor(dtype, shape)))
                    table = checksum_table_bytes(shape, dtype)
                    if table:  # room for the checksum table its put writes
                        tables.append(self._host.alloc(table, wait=0))
            except OutOfBudget:
                for buf in [p[0] for p in parts] + tables:
                    buf.release()
                self.counters["host_blocks_refused"] += 1
                return
            self._host_blocks[index] = parts
            self._table_room[index] = tables

    def _drop_host_blocks(self) -> None:
        for parts in self._host_blocks.values():
            for buf, _t in parts:
                buf.release()
        for tables in self._table_room.values():
            for buf in tables:
                buf.release()
        self._host_blocks.clear()
        self._table_room.clear()

    def _commit_host_blocks(self, count: int) -> None:
        """The blocks a prefill staged on the host become stored blocks (never resident)."""
        for _ in range(count):
            index = len(self._blocks)
            parts = self._host_blocks.pop(index)
            for buf in self._table_room.pop(index, ()):  # the tables' room, for the puts next
                buf.release()
            blk = Block(index, host=parts, host_nbytes=sum(buf.nbytes for buf, _t in parts))
            try:
                self._save_prefix(blk)  # the parts' buffers are handed to the store's puts
                self._spill(blk)  # readable from the store by the next step's gathers (puts done)
                self._blocks.append(blk)
            finally:
                blk.release_host()
        for layer in self._tlayers:
            layer.staged = 0
        self._committed += count * self.block_size
