"""The main job of ``tiered demo``: probe, a store round trip, an offloaded generation.

The round trip writes objects bigger in total than a deliberately small host
budget, so the host tier must evict and the reads come back cold from the
storage tier through the engine (O_DIRECT), verified against their checksums.
The generation builds a small Llama-architecture model from its config,
offloads it with a compute budget smaller than the model, generates tokens
and checks they are the ones the in-memory model generates.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from ..config import Config, TierSpec, load_config
from ..sizes import format_size
from . import TOOLS_OWNER

DEMO_HOST_BUDGET = 64 << 20
DEMO_OBJECTS = 32
DEMO_OBJECT_BYTES = 8 << 20


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def with_host_budget(cfg: Config, budget: int) -> Config:
    """``cfg`` with a host tier of ``budget`` bytes: its own resized, or one added after the device
    tiers when it has none (a storage-only config is valid: the store then sizes host memory itself)."""
    if cfg.host_tier is not None:
        host = dataclasses.replace(cfg.host_tier, capacity=budget)
        return dataclasses.replace(cfg, tiers=tuple(host if t.kind == "host" else t for t in cfg.tiers))
    names = {t.name for t in cfg.tiers}
    name = next(n for n in ("host", "demo-host", "demo-host-tier") if n not in names)
    at = len(cfg.device_tiers)
    return dataclasses.replace(cfg, tiers=(*cfg.tiers[:at], TierSpec(name, "host", budget), *cfg.tiers[at:]))


def run_demo(config_source=None) -> int:
    rc = run_store_demo(config_source)
    return rc or run_generation_demo(config_source)


GEN_BUDGET = 48 << 20
GEN_TOKENS = 32


def run_generation_demo(config_source=None) -> int:
    """Greedy generation with weights streamed from the storage tier through a small budget."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("skipping the offloaded generation demo: transformers is not installed "
              "(pip install 'tiered[hf]')", file=sys.stderr)
        return 0
    from ..offload import detach, offload, offload_stats

    cfg = load_config(config_source)
    demo_cfg = with_host_budget(cfg, GEN_BUDGET)
    threads = torch.get_num_threads()
    # leave a core to the I/O workers on small machines (both runs use the same setting)
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        return _generate(demo_cfg, cfg, offload, detach, offload_stats, LlamaConfig, LlamaForCausalLM)
    finally:
        torch.set_num_threads(threads)


def _generate(demo_cfg, cfg, offload, detach, offload_stats, LlamaConfig, LlamaForCausalLM) -> int:
    torch.manual_seed(0)
    llama = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(llama).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(0, llama.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    print(f"\n== offloaded generation: Llama-architecture model, {format_size(nbytes)} of fp32 weights, "
          f"compute budget {format_size(GEN_BUDGET)}, weights on tier {cfg.storage_tiers[0].name}")
    with torch.no_grad():
        t0 = time.perf_counter()
        want = model.generate(prompt, attention_mask=mask, max_new_tokens=GEN_TOKENS, do_sample=False)
        t_mem = time.perf_counter() - t0
        _progress("in-memory generation done; offloading")
        offload(model, demo_cfg)
        try:  # detached however the run ends (Ctrl-C included): the store keeps nothing of it
            t0 = time.perf_counter()
            got = model.generate(prompt, attention_mask=mask, max_new_tokens=GEN_TOKENS, do_sample=False)
            t_off = time.perf_counter() - t0
            st = offload_stats(model)
        finally:
            detach(model)
    same = torch.equal(got, want)
    print(f"tokens/s: in memory {GEN_TOKENS / t_mem:.1f}, offloaded {GEN_TOKENS / t_off:.1f} "
          f"(lookahead {st['lookahead']}, resident {format_size(st['resident_bytes'])}, "
          f"prefetch hit rate {st['prefetch_hit_rate']:.0%}, stall {st['stall_seconds']:.2f} s, "
          f"peak host {format_size(st['peak_host_bytes'])})")
    for tier, b in st["bytes_read"].items():
        print(f"  read from {tier}: {format_size(b)}")
    if not same:
        print("FAILED: offloaded generation differs from the in-memory model", file=sys.stderr)
        return 1
    print(f"generated tokens identical to the in-memory model: {got[0, -GEN_TOKENS:].tolist()[:12]} ...")
    return 0


def run_store_demo(config_source=None) -> int:
    from .probe import print_probe, probe
    from ..store import TieredStore

    cfg = load_config(config_source)
    print(f"== tiered demo (config: {cfg.source})")
    print_probe(probe(cfg, size=64 << 20))

    demo_cfg = with_host_budget(cfg, DEMO_HOST_BUDGET)
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
            # ephemeral: the store deletes them when it closes, or after a crash on its next open
            futures.append(store.put(k, v, kind="blob", ephemeral=True, owner=TOOLS_OWNER))
            if i % 8 == 7:
                _progress(f"put {i + 1}/{DEMO_OBJECTS}")
        for f in futures:
            f.result(timeout=300)
        t_put = time.perf_counter() - t0
        for k in tensors:
            store.evict(k)
        store.engine.reset_stats()
        t0 = time.perf_counter()
        futures = [store.get(k, owner=TOOLS_OWNER) for k in tensors]
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
    for owner, tiers in st["owners"].items():
        print(f"  owner {owner}: " + ", ".join(f"{tier} peak {format_size(f['peak'])}" for tier, f in tiers.items()))
    if bad:
        print(f"FAILED: {bad} objects read back differ", file=sys.stderr)
        return 1
    print(f"all {DEMO_OBJECTS} objects verified (bitwise equal, checksums checked)")
    return 0
