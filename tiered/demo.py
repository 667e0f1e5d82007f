"""The main job of ``tiered demo``: probe the machine, then a store round trip.

The round trip writes objects bigger in total than a deliberately small host
budget, so the host tier must evict and the reads come back cold from the
storage tier through the engine (O_DIRECT), verified against their checksums.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from .config import load_config
from .sizes import format_size

DEMO_HOST_BUDGET = 64 << 20
DEMO_OBJECTS = 32
DEMO_OBJECT_BYTES = 8 << 20


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def run_demo(config_source=None) -> int:
    from .probe import print_probe, probe
    from .store import TieredStore

    cfg = load_config(config_source)
    print(f"== tiered demo (config: {cfg.source})")
    print_probe(probe(cfg, size=64 << 20))

    host = dataclasses.replace(cfg.host_tier, capacity=DEMO_HOST_BUDGET) if cfg.host_tier else None
    tiers = tuple(host if t.kind == "host" else t for t in cfg.tiers)
    demo_cfg = dataclasses.replace(cfg, tiers=tiers)
    total = DEMO_OBJECTS * DEMO_OBJECT_BYTES
    print(f"\n== store round trip: {DEMO_OBJECTS} objects, {format_size(total)} in all, "
          f"host budget {format_size(DEMO_HOST_BUDGET)}, home tier {cfg.storage_tiers[0].name} "
          f"({cfg.storage_tiers[0].path})")
    gen = torch.Generator().manual_seed(0)
    tensors = {f"demo/obj{i:03d}": torch.randn(DEMO_OBJECT_BYTES // 4, generator=gen) for i in range(DEMO_OBJECTS)}
    with TieredStore(demo_cfg) as store:
        t0 = time.perf_counter()
        futures = []
        for i, (k, v) in enumerate(tensors.items()):
            futures.append(store.put(k, v, kind="blob"))
            if i % 8 == 7:
                _progress(f"put {i + 1}/{DEMO_OBJECTS}")
        for f in futures:
            f.result(timeout=300)
        t_put = time.perf_counter() - t0
        for k in tensors:
            store.evict(k)
        store.engine.reset_stats()
        t0 = time.perf_counter()
        futures = [store.get(k) for k in tensors]
        bad = 0
        for i, (f, (k, v)) in enumerate(zip(futures, tensors.items())):
            if not torch.equal(f.result(timeout=300), v):
                bad += 1
            if i % 8 == 7:
                _progress(f"get {i + 1}/{DEMO_OBJECTS}")
        t_get = time.perf_counter() - t0
        st = store.stats()
        for k in tensors:
            store.delete(k)
    home = cfg.storage_tiers[0].name
    eng = st["engine"]["read"]
    print(f"put (durable): {total / t_put / 1e9:.2f} GB/s   cold get: {total / t_get / 1e9:.2f} GB/s "
          f"(O_DIRECT bytes {format_size(eng['direct_bytes'])}, buffered {format_size(eng['buffered_bytes'])})")
    print(f"read latency p50 {eng['p50_us'] / 1e3:.1f} ms, p99 {eng['p99_us'] / 1e3:.1f} ms; "
          f"host hits {st['hits']}, misses {st['misses']}, evictions {st['evictions']}")
    for name, t in st["tiers"].items():
        if t is None:
            continue
        extra = (f"read {format_size(t['bytes_read'])}, written {format_size(t['bytes_written'])}"
                 if t["kind"] == "storage" else f"peak {format_size(t['peak'])}")
        print(f"  tier {name:6s} capacity {format_size(t['capacity']):>10s}  {extra}")
    if bad:
        print(f"FAILED: {bad} objects read back differ", file=sys.stderr)
        return 1
    print(f"all {DEMO_OBJECTS} objects verified (bitwise equal, checksums checked)")
    return 0
