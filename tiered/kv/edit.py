"""Edits of a filled TieredCache that generation strategies make between steps.

* ``crop`` -- assisted and prompt-lookup decoding drop the rejected draft tokens;
* ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` -- beam search
  and batch expansion pick or repeat rows of the batch;
* ``copy_cache`` -- ``copy.deepcopy`` of a filled cache (a prompt cache reused per request).

Each works block by block: a block is read (from the device, or from the store when
spilled), edited, and put back as it was (resident, or spilled again), so the device
budget holds while it runs. Edited blocks hold other K/V than a stored prefix
block: they become this cache's session blocks, and the prefix blocks are let go.
"""

from __future__ import annotations

import torch

from tiered.policies import Observation


def quiesce(cache) -> None:
    """Wait for gathers and prefix saves in flight: blocks and slots may change next."""
    for _l, _t, _s, fut in cache._pending:
        fut.result(timeout=cache.io_timeout)
    cache._pending.clear()
    if cache._gather_stream is not None:
        cache._gather_stream.synchronize()
    cache._release_step_leases()
    cache._drop_reads(wait=True)
    for blk in cache._blocks:
        for f in blk.saving or ():
            f.result(timeout=cache.io_timeout)
        blk.saving = None
    cache._free_slots()  # sized again for the next step
    cache._free_staging()


def block_data(cache, blk) -> torch.Tensor:
    """A block's [L, 2, B, H, bs, D] on the compute device (its device copy, or read from the store)."""
    if blk.data is not None:
        return blk.data
    device = cache._geometry[2]
    parts = [cache.kv.store.get(key, owner=cache.owner).result(timeout=cache.io_timeout) for key in blk.keys]
    return torch.cat(parts).to(device)


def release(cache, blk) -> None:
    """Let go of a block's stored copy (a prefix is unheld, a session block deleted) and its device copy."""
    for key in blk.keys or ():
        if blk.prefix:
            cache.kv.unhold(key)
        elif key in cache.kv.store:
            cache.kv.store.delete(key)
    blk.keys, blk.prefix, blk.saving = None, False, None
    if blk.data is not None:
        cache._device_policy.remove(f"b{blk.index}")
        cache._set_block_data(blk, None)


def replace(cache, blk, data: torch.Tensor, resident: bool) -> None:
    """Give a block new contents, resident on the device or spilled to the store."""
    release(cache, blk)
    resident = resident or cache.kv is None
    cache._set_block_data(blk, cache._adopt(data) if resident else data)
    if resident:
        cache._device_policy.admit(Observation(f"b{blk.index}", blk.nbytes, "kv", "write", "device"))
    else:
        cache._spill(blk)


def select_rows(cache, index: torch.Tensor, prefer_resident: bool = False) -> None:
    """Keep batch rows ``index`` (in that order, repeats allowed): beam reorder, select, repeat.

    A block stays resident (``prefer_resident``: becomes resident) only while the device
    total, counted block by block, fits the budget; otherwise it is spilled at once, so a
    batch that grows never holds more than the budget (and one block in flight)."""
    quiesce(cache)
    if cache._geometry is None:
        if cache._blocks:  # a loaded prefix (one row each) before the first update: rows to repeat it to
            if index.numel() and int(index.max()) >= cache._prefix_rows:
                raise IndexError(f"TieredCache: row {int(index.max())} of a loaded prefix of "
                                 f"{cache._prefix_rows} rows")
            cache._prefix_rows = index.numel()
        return
    batch, dtype, device = cache._geometry
    keeps_tokens = batch == 1 and index.tolist() == [0]
    used = cache.device_bytes()["total"]
    for blk in cache._blocks:
        data = block_data(cache, blk).index_select(2, index.to(device))
        nbytes = data.numel() * data.element_size()
        budget = cache._budget()
        fits = budget is None or used - blk.nbytes + nbytes <= budget
        resident = (blk.data is not None or prefer_resident) and fits
        used += (nbytes if resident else 0) - blk.nbytes
        replace(cache, blk, data, resident)
    for layer in cache._tlayers:
        if layer.tail_k is not None:
            cache._set_tail(layer, layer.tail_k.index_select(0, index.to(layer.tail_k.device)),
                            layer.tail_v.index_select(0, index.to(layer.tail_v.device)))
    cache._geometry = (index.numel(), dtype, device)
    if not keeps_tokens:
        cache._tokens.forget()
    cache._enforce_budget()


def row_index(batch: int, indices) -> torch.Tensor:
    """``indices`` as transformers' layers apply them (``keys[indices, ...]``): a long index vector."""
    return torch.arange(batch)[torch.as_tensor(indices).cpu()].reshape(-1)


def crop(cache, tokens_to_remove: int) -> None:
    """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
    if tokens_to_remove > 0:
        raise ValueError(f"TieredCache.crop({tokens_to_remove}): pass a negative number of tokens to remove")
    if tokens_to_remove == 0 or cache._geometry is None:
        return
    quiesce(cache)
    bs = cache.block_size
    keep = max(0, cache.get_seq_length() - abs(tokens_to_remove))
    if keep >= cache._committed:
        for layer in cache._tlayers:
            cut = keep - cache._committed
            cache._set_tail(layer, *((layer.tail_k[:, :, :cut].clone(), layer.tail_v[:, :, :cut].clone())
                                     if cut else (None, None)))
    else:
        first, rest = divmod(keep, bs)
        tails = {}
        if rest:  # copied out before the blocks go: a resident block's buffer may be refilled at once
            partial = block_data(cache, cache._blocks[first])
            tails = {layer.index: (partial[layer.index, 0, :, :, :rest].clone(),
                                   partial[layer.index, 1, :, :, :rest].clone()) for layer in cache._tlayers}
            del partial
        for blk in cache._blocks[first:]:
            release(cache, blk)
        del cache._blocks[first:]
        for layer in cache._tlayers:
            cache._set_tail(layer, None, None)
            if rest:
                cache._set_tail(layer, *tails[layer.index])
        cache._committed = first * bs
    cache._tokens.crop(keep, bs)
    cache._enforce_budget()


def copy_cache(src):
    """A new open cache (same settings, same KVStore and model) holding a copy of ``src``'s tokens."""
    quiesce(src)
    dst = src._clone_empty()
    if src._opened:
        dst.open()
    dst._geometry = src._geometry
    if src._compute_stream is not None:  # CUDA: same compute stream, a gather stream of its own
        dst._compute_stream = src._compute_stream
        dst._gather_stream = torch.cuda.Stream(src._geometry[2])
    if dst._geometry is not None:
        dst._open_device(dst._geometry[2])
    for blk in src._blocks:
        new = type(blk)(blk.index)
        if blk.prefix:  # a stored prefix block: shared, held by both
            new.keys, new.prefix = list(blk.keys), True
            for key in new.keys:
                dst.kv.hold(key)
            if blk.data is not None:
                dst._set_block_data(new, dst._own_copy(blk.data))
                dst._device_policy.admit(Observation(f"b{new.index}", new.nbytes, "kv", "write", "device"))
        else:
            replace(dst, new, block_data(src, blk).clone(), resident=blk.data is not None)
        dst._blocks.append(new)
    for a, b in zip(src._tlayers, dst._tlayers):
        if a.tail_k is not None:
            dst._set_tail(b, dst._own_copy(a.tail_k), dst._own_copy(a.tail_v))
        b.is_initialized, b.device = a.is_initialized, getattr(a, "device", None)
    dst._committed = src._committed
    dst._prefix_rows, dst._prefix_dtype = src._prefix_rows, src._prefix_dtype
    dst._hashes = list(src._hashes)
    dst._tokens.copy_from(src._tokens)
    if dst._geometry is not None:
        dst._enforce_budget()
    return dst
