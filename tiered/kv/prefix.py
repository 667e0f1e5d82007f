"""KV blocks in the TieredStore: model identity, chained block hashes, the prefix store.

A block is the K and V of ``block_size`` consecutive tokens for every layer.
It is stored as one object per *part*, a run of ``layers_per_object``
consecutive layers, shape ``[layers in part, 2, batch, kv_heads, block_size,
head_dim]``: all layers in one object (the default) make loading a prefix a
few large reads; fewer layers per object let a decode step that streams KV
from storage read each layer's bytes once instead of the whole block per layer. A full block of known token ids is keyed,
as in vLLM and LMCache, by a chained hash: ``H(parent block's hash, model
identity, this block's token ids)``, so a key names the whole prefix before it
and the model that computed it. Keys live under ``kv/<identity[:16]>/``: a
store used by another model (other config, dtype or weights) shares no key,
and a recorded identity that disagrees is refused.

Durability is the store's: a block is put with an O_DIRECT write + fdatasync
and named by the manifest only when durable, and every read is checked
against its crc32s; a block that fails its check is deleted here and reported
as missing, so the caller recomputes it instead of using it.

Shared tier: where the store's config has a ``kind = "shared"`` tier (a Redis-protocol
server, :mod:`tiered.kv.shared`), every prefix block saved here is also published there, and a
lookup that misses locally pulls the blocks other processes published into this store (checked,
then put like a computed block), so a prefix computed by one process is reused by every other.

Session blocks (K/V of generated tokens spilled past the device budget) live
under ``kv/<id>/s/<session>/`` and are deleted when their cache closes; ones a
crashed process left behind (another pid: the store admits one process) are
swept when a ``KVStore`` is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from tiered.policies import EvictionPolicy, Observation, create_eviction_policy

from ..sizes import parse_size
from ..store import ChecksumError, StoreError, TieredStore
from .plan import checksum_block
from .shared import SharedTier

log = logging.getLogger("tiered.kv")

KEY_ROOT = "kv"
PULL_WINDOW = 8  # blocks asked of the shared tier per round trip
LOCAL_PUT_TIMEOUT = 120.0  # seconds a block pulled from the shared tier may take to be put here
HASH_VERSION = "tiered-kv-2"  # 2: the attention implementation and compute device type are hashed
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "use_cache",
                         "output_attentions", "output_hidden_states", "return_dict", "torch_dtype", "dtype")


class KVStoreError(StoreError):
    """Misuse of the KV block store (wrong model identity, bad block shape...)."""


def model_identity(model: torch.nn.Module | None = None, *, config: Any = None, dtype: torch.dtype | None = None,
                   weights: str | None = None, device_type: str | None = None) -> str:
    """A hex digest naming what KV a model computes: its config, its dtype, its weights, its
    attention implementation and the kind of device computing it.

    ``model``: hashes its config, the dtype of its parameters and every parameter
    and buffer byte (one pass, ~1 GB/s). Or give ``config`` + ``dtype`` + ``weights``
    (a checkpoint revision or file hash you trust) to skip hashing the weights.
    The attention implementation (``config._attn_implementation``: eager, sdpa,
    flash...) and ``device_type`` (default: where the model's parameters are, else
    "cpu") are part of it because other kernels compute other bits of the same KV,
    and a reused prefix must give exactly what recomputing it would. (Autocast
    needs no entry: it changes the K/V dtype, which a loaded block is checked against.)
    """
    if model is not None:
        config = model.config if config is None else config
        params = list(model.state_dict().items())
        dtype = dtype or (params[0][1].dtype if params else torch.float32)
        if device_type is None and params:
            device_type = params[0][1].device.type
        if weights is None:
            h = hashlib.blake2b(digest_size=32)
            for name, t in params:
                h.update(name.encode())
                h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
                h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            weights = h.hexdigest()
    if config is None or dtype is None or weights is None:
        raise KVStoreError("model_identity: pass a model, or config, dtype and weights")
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    attn = getattr(config, "_attn_implementation", None)
    doc = json.dumps({"v": HASH_VERSION, "config": cfg, "dtype": str(dtype), "weights": weights,
                      "attn_implementation": attn, "device_type": device_type or "cpu"},
                     sort_keys=True, default=str)
    return hashlib.blake2b(doc.encode(), digest_size=32).hexdigest()


def chain_hashes(token_ids: Sequence[int] | torch.Tensor, block_size: int, identity: str) -> list[str]:
    """The chained hash of every full block of ``token_ids`` (a partial last block has none)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise KVStoreError(f"chain_hashes: expected one row of token ids, got shape {tuple(token_ids.shape)}")
        ids = token_ids.to(torch.int64).cpu()
    else:
        ids = torch.tensor(list(token_ids), dtype=torch.int64)
    out, parent = [], identity
    for b in range(ids.numel() // block_size):
        parent = block_hash(parent, identity, ids[b * block_size:(b + 1) * block_size])
        out.append(parent)
    return out


def block_hash(parent: str, identity: str, block_ids: torch.Tensor) -> str:
    """The chained hash of one block: its parent's hash (``identity`` for the first), the model, its ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent.encode())
    h.update(identity.encode())
    h.update(block_ids.to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


class KVStore:
    """The KV side of a :class:`TieredStore`: prefix blocks (durable, shared) and session spills.

    ``identity``: :func:`model_identity` of the model (None: no prefix reuse, spills only).
    ``layers_per_object``: layers per stored part of a block (None: all layers in one).
    ``capacity``: bytes of prefix blocks kept on storage (default: the storage tier's
    capacity); beyond it, blocks are deleted in the order ``policy`` chooses ("lru",
    "prefix-aware", or an :class:`EvictionPolicy`). Create one per store and model.
    ``owner``: the store owner its prefix blocks and records are charged to (default
    ``kv/<identity[:16]>``, the name of its key namespace; ``kv/anon`` without an identity).
    A cache's own spills and reads are charged to the cache (``TieredCache.owner``).
    ``shared``: the shared tier prefix blocks are published to and pulled from: "config" (the
    store config's ``kind = "shared"`` tier, opened here and closed by :meth:`close`; none if it
    has none), a :class:`~tiered.kv.shared.SharedTier` the caller opened (and closes), or None.
    """

    def __init__(self, store: TieredStore, identity: str | None = None, *, block_size: int = 256,
                 capacity: int | str | None = None, policy: str | EvictionPolicy = "lru", sweep: bool = True,
                 layers_per_object: int | None = None, owner: str | None = None,
                 shared: SharedTier | str | None = "config") -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise KVStoreError(f"KVStore: block_size must be a positive int, got {block_size!r}")
        if layers_per_object is not None and (not isinstance(layers_per_object, int) or layers_per_object < 1):
            raise KVStoreError(f"KVStore: layers_per_object must be a positive int or None, got {layers_per_object!r}")
        self.layers_per_object = layers_per_object
        self.store = store
        self.identity = identity
        self.block_size = block_size
        self.ns = f"{KEY_ROOT}/{identity[:16] if identity else 'anon'}"
        self.owner = self.ns if owner is None else owner
        first = store.config.storage_tiers[0]
        self.capacity = first.capacity if capacity is None else parse_size(capacity, where="KVStore capacity")
        self.policy = create_eviction_policy(policy) if isinstance(policy, str) else policy
        self._lock = threading.Lock()
        self._in_use: dict[str, int] = {}  # key -> caches holding it as a block
        self._bytes = 0
        self._sizes: dict[str, int] = {}
        self.stats = {"lookups": 0, "hit_blocks": 0, "miss_blocks": 0, "corrupt_blocks": 0,
                      "saved_blocks": 0, "evicted_blocks": 0, "loaded_bytes": 0, "shared_hit_blocks": 0,
                      "shared_published_blocks": 0}
        if identity is not None:
            self._check_identity()
        self.shared, self._own_shared = self._shared_tier(shared)
        self._planned = False  # a plan of queued prompts' blocks is declared (expect)
        for key in store.keys():
            if not key.startswith(self.ns + "/"):
                continue
            rest = key[len(self.ns) + 1:]
            if rest.startswith("s/"):
                # sessions are named "<pid>-<id>"; the store is locked to one process, so a
                # session of another pid is a crashed or killed one; ours may be live
                if sweep and not rest.startswith(f"s/{os.getpid()}-"):
                    store.delete(key)
            elif rest.startswith("b/"):
                n = store.meta(key)["nbytes"]
                self._sizes[key] = n
                self._bytes += n
                self.policy.admit(Observation(key, n, "kv", "write", None))

    def _shared_tier(self, shared) -> tuple[SharedTier | None, bool]:
        if shared is None or isinstance(shared, SharedTier):
            return shared, False
        if shared != "config":
            raise KVStoreError(f"KVStore: shared must be 'config', a SharedTier or None, got {shared!r}")
        specs = self.store.config.shared_tiers
        if not specs or self.identity is None:
            return None, False
        return SharedTier.from_spec(specs[0]).open(), True

    def close(self) -> None:
        """Withdraw a declared plan and close the shared tier this KVStore opened (the local
        store is the caller's)."""
        if self._planned and self.store.is_open:
            self.store.plan([], owner=self.owner)
            self._planned = False
        if self._own_shared and self.shared is not None:
            self.shared.close()

    def _check_identity(self) -> None:
        key = f"{self.ns}/identity"
        want = torch.frombuffer(bytearray(self.identity.encode()), dtype=torch.uint8)
        if key in self.store:
            try:
                got = self.store.get(key, owner=self.owner).result(timeout=60)
            except ChecksumError as e:
                raise KVStoreError(f"KV store {self.store.root}: identity record {key!r} is corrupt ({e})") from e
            if not torch.equal(got, want):
                raise KVStoreError(
                    f"KV store {self.store.root}: {key!r} records model identity "
                    f"{bytes(got.numpy()).decode(errors='replace')!r}, not this model's {self.identity!r}: "
                    "blocks of another model are never reused")
        else:
            self.store.put(key, want, kind="kv", owner=self.owner).result(timeout=60)

    # -- keys ------------------------------------------------------------------------
    def parts(self, layers: int) -> list[tuple[int, int]]:
        """The layer ranges [lo, hi) stored as one object each."""
        g = self.layers_per_object or layers
        return [(lo, min(lo + g, layers)) for lo in range(0, layers, g)]

    def block_key(self, h: str, part: tuple[int, int]) -> str:
        return f"{self.ns}/b/{h}/L{part[0]}-{part[1]}"

    def session_key(self, session: str, index: int, part: tuple[int, int]) -> str:
        return f"{self.ns}/s/{session}/{index}/L{part[0]}-{part[1]}"

    def hashes(self, token_ids) -> list[str]:
        if self.identity is None:
            return []
        return chain_hashes(token_ids, self.block_size, self.identity)

    def match(self, hashes: Sequence[str], parts: Sequence[tuple[int, int]]) -> int:
        """How many leading blocks of ``hashes`` the store holds (every part of each), after pulling
        those it lacks from the shared tier."""
        n = 0
        for h in hashes:
            if not all(self.block_key(h, p) in self.store for p in parts):
                break
            n += 1
        if n < len(hashes) and self.shared is not None and self.identity is not None:
            n += self._pull(hashes[n:], parts)
        with self._lock:
            self.stats["lookups"] += 1
        return n

    def expect(self, prompts: Sequence, layers: int) -> None:
        """The prompts waiting to run (token id rows, soonest first): a future-aware policy
        (``prefix-aware``) keeps their blocks, and the stored blocks they will load are declared
        to the store as this KVStore's plan (``TieredStore.plan``, owner :attr:`owner`), so its
        host eviction and governor know them. ``expect([], layers)`` withdraws both."""
        parts = self.parts(layers)
        queue = [[self.block_key(h, p) for h in self.hashes(q) for p in parts] for q in prompts]
        if hasattr(self.policy, "set_queue"):
            with self._lock:
                self.policy.set_queue(queue)
        planned = [k for keys in queue for k in keys if k in self.store] if self.store.is_open else []
        if (planned or self._planned) and self.store.is_open:
            self.store.plan(planned, owner=self.owner)
            self._planned = bool(planned)

    def _pull(self, hashes: Sequence[str], parts: Sequence[tuple[int, int]]) -> int:
        """Put the leading blocks of ``hashes`` the shared tier holds (checked) into this store; how many."""
        puts: list[list] = []  # per block pulled: the futures of its parts' puts
        for start in range(0, len(hashes), PULL_WINDOW):
            chunk = hashes[start:start + PULL_WINDOW]
            keys = [self.block_key(h, p) for h in chunk for p in parts]
            got = iter(zip(keys, self.shared.get_many(keys, self.identity)))
            for _h in chunk:
                block = [next(got) for _p in parts]
                if any(t is None for _k, t in block):
                    return self._pulled(puts)
                try:
                    puts.append([self._put_pulled(key, t) for key, t in block])
                except StoreError as e:  # no room here (host or storage tier): the rest is recomputed
                    log.warning("KV blocks of the shared tier not pulled: %s", e)
                    return self._pulled(puts)
        return self._pulled(puts)

    def _put_pulled(self, key: str, tensor: torch.Tensor):
        if key in self.store:  # another cache of this process put it meanwhile
            return None
        nbytes = tensor.numel() * tensor.element_size()
        self._make_room(nbytes)
        fut = self.store.put(key, tensor, kind="kv", owner=self.owner, block=checksum_block(tensor.shape, tensor.dtype))
        self._admit(key, nbytes)
        return fut

    def _pulled(self, puts: list[list]) -> int:
        """Wait for the pulled blocks' puts; how many leading blocks are now stored here."""
        n, ok = 0, True
        for futs in puts:
            for f in futs:
                if f is None:
                    continue
                try:
                    f.result(timeout=LOCAL_PUT_TIMEOUT)
                except (StoreError, OSError, TimeoutError) as e:  # not stored here: the block is recomputed
                    log.warning("KV block pulled from the shared tier could not be stored locally: %s", e)
                    ok = False
            n += ok
        with self._lock:
            self.stats["shared_hit_blocks"] += n
        return n

    # -- blocks ----------------------------------------------------------------------
    def hold(self, key: str) -> None:
        with self._lock:
            self._in_use[key] = self._in_use.get(key, 0) + 1
            if key in self._sizes:
                self.policy.touch(Observation(key, self._sizes[key], "kv", "read", None))

    def unhold(self, key: str) -> None:
        with self._lock:
            n = self._in_use.get(key, 0) - 1
            if n <= 0:
                self._in_use.pop(key, None)
            else:
                self._in_use[key] = n

    def save(self, key: str, block):
        """Put a prefix block part (durable when the returned future is done); None if already stored.

        ``block``: a tensor, or ``(buffer, dtype, shape)``: a host buffer of the store holding it,
        handed over (put without a copy, or released when the key is already stored)."""
        if isinstance(block, tuple):
            buf, dtype, shape = block
            nbytes = buf.nbytes
        else:
            nbytes = block.numel() * block.element_size()
        if key in self.store:
            if isinstance(block, tuple):
                buf.release()
            return None
        self._make_room(nbytes)
        if self.shared is not None and self.identity is not None:
            self._publish(key, block)
        if isinstance(block, tuple):
            fut = self.store.put_buffer(key, buf, dtype, shape, kind="kv", give=True, owner=self.owner,
                                        block=checksum_block(shape, dtype))
        else:
            fut = self.store.put(key, block, kind="kv", owner=self.owner, block=checksum_block(block.shape, block.dtype))
        self._admit(key, nbytes)
        with self._lock:
            self.stats["saved_blocks"] += 1
        return fut

    def _admit(self, key: str, nbytes: int) -> None:
        with self._lock:
            if key not in self._sizes:
                self._sizes[key] = nbytes
                self._bytes += nbytes
                self.policy.admit(Observation(key, nbytes, "kv", "write", None))

    def _publish(self, key: str, block) -> None:
        """Offer a block part to the other processes through the shared tier (before the local put
        takes the block's buffer)."""
        if isinstance(block, tuple):
            buf, dtype, shape = block
            payload = buf.padded[:buf.nbytes]
        else:
            t = block.detach().to("cpu").contiguous()
            dtype, shape, payload = t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()
        if self.shared.put(key, self.identity, payload, dtype, shape):
            with self._lock:
                self.stats["shared_published_blocks"] += 1

    def _make_room(self, nbytes: int) -> None:
        with self._lock:
            over = self._bytes + nbytes - self.capacity
            if over <= 0:
                return
            victims = self.policy.victims(over, lambda k: k not in self._in_use)
        for key in victims:
            self.forget(key)
            with self._lock:
                self.stats["evicted_blocks"] += 1

    def forget(self, key: str) -> None:
        """Delete a prefix block (evicted, or found corrupt)."""
        with self._lock:
            n = self._sizes.pop(key, None)
            if n is not None:
                self._bytes -= n
            self.policy.remove(key)
        try:
            self.store.delete(key)
        except KeyError:
            pass  # already gone: deleting is idempotent here

    def note_corrupt(self, key: str, err: BaseException) -> None:
        log.warning("KV block %s failed its check and will be recomputed: %s", key, err)
        with self._lock:
            self.stats["corrupt_blocks"] += 1
        self.forget(key)

    def record_load(self, hit_blocks: int, miss_blocks: int, loaded_bytes: int) -> None:
        """Count one prefix load of a cache: blocks found, blocks missing, bytes read."""
        with self._lock:
            self.stats["hit_blocks"] += hit_blocks
            self.stats["miss_blocks"] += miss_blocks
            self.stats["loaded_bytes"] += loaded_bytes

    def used_bytes(self) -> int:
        return self._bytes
