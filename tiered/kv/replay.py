"""Replay a Mooncake request trace against a two-tier prefix store (host over storage).

What it answers: for a model of ``bytes_per_token`` of KV and given tier
capacities, how many of the trace's prompt blocks would be served from host
memory, from storage, or recomputed; the bytes moved; the prefill tokens
saved; and how the eviction policy (LRU vs the future-aware one) changes that.

Model (the same rules as :class:`~tiered.kv.KVStore` over a TieredStore):

* a request's blocks are looked up in order; the first miss ends the reused
  prefix (a block's key names its whole prefix), the rest are computed;
* a computed block is written through to storage (``bytes_written``) and
  cached in host; a storage hit is read into host (``bytes_read``);
* storage holds every cached block (inclusive): evicting one from storage
  drops its host copy too; host victims are just dropped;
* each tier's victims come from its own policy instance; a future-aware
  policy is told, before each request, the blocks of the request being
  served and of the next ``queue - 1`` (the scheduler's waiting queue).

Requests come from :func:`traces.mooncake.read_requests` (timestamp_ms,
input_length, output_length, hash_ids); this module parses nothing itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from tiered.policies import EvictionPolicy, Observation, create_eviction_policy

from ..sizes import parse_size


@dataclass(frozen=True)
class ReplayConfig:
    bytes_per_token: int  # KV bytes per token: layers * 2 * kv_heads * head_dim * dtype size
    host_bytes: int
    storage_bytes: int
    block_tokens: int = 512  # Mooncake's block size
    policy: str = "lru"
    queue: int = 32  # requests a future-aware policy can see (the one served included)

    def __post_init__(self) -> None:
        for name in ("bytes_per_token", "block_tokens", "queue"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ReplayConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("host_bytes", "storage_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"ReplayConfig.{name} must be an int >= 0, got {v!r}")
        if self.storage_bytes < self.host_bytes:
            raise ValueError(f"ReplayConfig: storage_bytes ({self.storage_bytes}) must be >= host_bytes "
                             f"({self.host_bytes}): storage holds every cached block")


class _Tier:
    def __init__(self, name: str, capacity: int, policy: EvictionPolicy) -> None:
        self.name, self.capacity, self.policy = name, capacity, policy
        self.used = 0
        self.keys: set = set()
        self.evictions = 0

    def make_room(self, nbytes: int, keep) -> list:
        over = self.used + nbytes - self.capacity
        if over <= 0:
            return []
        victims = self.policy.victims(over, lambda k: k not in keep)
        for k in victims:
            self.drop(k, nbytes)
            self.evictions += 1
        return victims

    def add(self, key, nbytes: int) -> None:
        self.keys.add(key)
        self.used += nbytes
        self.policy.admit(Observation(key, nbytes, "kv", "write"))

    def drop(self, key, nbytes: int) -> None:
        if key in self.keys:
            self.keys.discard(key)
            self.used -= nbytes
            self.policy.remove(key)


def replay(requests: Iterable, cfg: ReplayConfig, *, progress: bool = False) -> dict:
    """Replay ``requests`` (objects with input_length and hash_ids); returns the summary."""
    reqs: Sequence = requests if isinstance(requests, Sequence) else list(requests)
    block = cfg.block_tokens * cfg.bytes_per_token
    host = _Tier("host", cfg.host_bytes, create_eviction_policy(cfg.policy))
    storage = _Tier("storage", cfg.storage_bytes, create_eviction_policy(cfg.policy))
    future = hasattr(host.policy, "set_queue")
    hits = {"host": 0, "storage": 0}
    misses = blocks = tokens_total = tokens_saved = 0
    bytes_read = bytes_written = 0
    t0 = time.monotonic()
    for i, r in enumerate(reqs):
        ids = list(r.hash_ids)
        if future:
            window = [list(q.hash_ids) for q in reqs[i:i + cfg.queue]]
            host.policy.set_queue(window)
            storage.policy.set_queue(window)
        keep = set(ids)  # this request's blocks are in use while it runs
        tokens_total += r.input_length
        reused = True
        for j, key in enumerate(ids):
            blocks += 1
            span = max(0, min(cfg.block_tokens, r.input_length - j * cfg.block_tokens))
            if reused and key in host.keys:
                hits["host"] += 1
                tokens_saved += span
                host.policy.touch(Observation(key, block, "kv", "read", "host"))
                storage.policy.touch(Observation(key, block, "kv", "read", "host"))
                continue
            if reused and key in storage.keys:
                hits["storage"] += 1
                tokens_saved += span
                bytes_read += block
                storage.policy.touch(Observation(key, block, "kv", "read", "storage"))
                if block <= host.capacity:
                    host.make_room(block, keep)
                    if host.used + block <= host.capacity:
                        host.add(key, block)
                continue
            reused = False
            misses += 1
            if key in storage.keys:  # after the first miss the prefix is recomputed anyway
                continue
            if block > storage.capacity:
                continue
            for k in storage.make_room(block, keep):
                host.drop(k, block)
            if storage.used + block > storage.capacity:
                continue  # everything left is in use by this request
            storage.add(key, block)
            bytes_written += block
            if block <= host.capacity:
                host.make_room(block, keep)
                if host.used + block <= host.capacity:
                    host.add(key, block)
        if progress and (i + 1) % 2000 == 0:
            print(f"  {cfg.policy}: {i + 1}/{len(reqs)} requests, {time.monotonic() - t0:.1f} s", file=sys.stderr)
    total_hits = hits["host"] + hits["storage"]
    return {
        "config": asdict(cfg), "requests": len(reqs), "blocks": blocks, "hits": hits, "misses": misses,
        "hit_rate": {"host": hits["host"] / max(blocks, 1), "storage": hits["storage"] / max(blocks, 1),
                     "total": total_hits / max(blocks, 1)},
        "bytes_read": {"storage": bytes_read}, "bytes_written": bytes_written,
        "evictions": {"host": host.evictions, "storage": storage.evictions},
        "prefill_tokens": tokens_total, "prefill_tokens_saved": tokens_saved,
        "saved_fraction": tokens_saved / max(tokens_total, 1),
        "seconds": time.monotonic() - t0,
    }


def replay_file(path, cfg: ReplayConfig, *, limit: int | None = None, progress: bool = False) -> dict:
    """Replay a Mooncake JSONL trace read by :func:`traces.mooncake.read_requests`."""
    from tiered.traces.mooncake import read_requests  # the trace tooling (policies/traces issue)

    reqs = []
    for r in read_requests(path):
        reqs.append(r)
        if limit is not None and len(reqs) >= limit:
            break
    out = replay(reqs, cfg, progress=progress)
    out["trace"] = str(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="Mooncake JSONL trace")
    p.add_argument("--bytes-per-token", type=int, required=True,
                   help="KV bytes per token (e.g. Llama-3-8B fp16: 32*2*8*128*2 = 131072)")
    p.add_argument("--host", required=True, help="host tier capacity, e.g. 64GiB")
    p.add_argument("--storage", required=True, help="storage tier capacity, e.g. 1TiB")
    p.add_argument("--queue", type=int, default=32, help="requests the future-aware policy sees")
    p.add_argument("--policies", default="lru,prefix-aware")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    results = {}
    for name in a.policies.split(","):
        cfg = ReplayConfig(a.bytes_per_token, parse_size(a.host, where="--host"),
                           parse_size(a.storage, where="--storage"), policy=name, queue=a.queue)
        results[name] = replay_file(a.trace, cfg, limit=a.limit, progress=not a.json)
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{'policy':<14} {'host hit':>9} {'storage hit':>12} {'miss':>7} {'saved tokens':>14} "
              f"{'read GB':>9} {'written GB':>11}")
        for name, r in results.items():
            print(f"{name:<14} {r['hit_rate']['host']:>9.3f} {r['hit_rate']['storage']:>12.3f} "
                  f"{r['misses'] / max(r['blocks'], 1):>7.3f} {r['saved_fraction']:>14.3f} "
                  f"{r['bytes_read']['storage'] / 1e9:>9.2f} {r['bytes_written'] / 1e9:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
