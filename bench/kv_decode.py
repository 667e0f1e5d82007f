"""KV cache tiers: decode tokens/s and time-to-first-token, TieredCache vs transformers' caches.

    python bench/kv_decode.py [--json] [--prompt 8192] [--new 32] [--dir DIR] [--small] [--gpu-tier BYTES]

(``--gpu-tier``: the stores get a GPU tier on ``--device`` and each TieredCache's
device budget is its share of that tier; the owners' figures are in each "store" entry.)

One seeded Llama-architecture model built from its config (fp32, 16 layers,
hidden 256, 4 heads, 2 KV heads of 64 dims: 16 KiB of KV per token), one
prompt of ``--prompt`` + 8 tokens (the ``--prompt`` tokens are the prefix that
gets stored: 8192 = 16 blocks of 512), greedy decoding of ``--new`` tokens
with a manual decode loop (the same loop for every contender), all in this
process, in this order:

1. ``DynamicCache`` entirely in memory: the reference (TTFT = full prefill);
2. ``DynamicCache(offloading=True)``: transformers' own offloading (on a
   CPU-only machine it needs CUDA streams; the error is recorded);
3. ``TieredCache`` cold (default ``lookahead="auto"``: 0 on a CPU): device
   budget ``--budget`` (default: 1/4 of the KV of the context), host tier 2x
   the KV, storage tier under ``--dir``; prefill runs in full and the
   prompt's full blocks are saved durably; decode runs alone;
4. ``TieredCache`` warm: the store is closed, caches dropped (``sync; echo 3
   > /proc/sys/vm/drop_caches`` when root; reads are O_DIRECT anyway), the
   store reopened; a cache with ``lookahead=0`` loads the stored prefix (read
   cold from storage, checksummed) and prefill runs on the 8-token suffix
   only: TTFT from store vs recomputed; a second cache (``lookahead=1``, the
   gather thread) loads it from the host tier. Then the in-memory
   ``DynamicCache`` of step 1 and both warm caches decode **interleaved**,
   one step each in turn, so the machine's load drifts hit them alike; the
   decode rate is 1 / median step time;
5. ``TieredCache`` streaming ("host tier KV/3, 1 layer per object"): a
   second store with a host tier of 1/3 of the KV and one layer per stored
   block part, full prefill, then decode **interleaved** step by step with
   the in-memory ``DynamicCache`` of step 1 decoding on: most blocks come
   from storage (O_DIRECT range reads, one call per layer) on every step.

Tokens of every contender are compared with the in-memory ones. torch runs
one intra-op thread (``torch.set_num_threads(1)``): on this 2-core machine
the other core runs the gather thread and the store's I/O workers (with two
compute threads, forwards of offloaded models ran several times slower).

Targets (issue #5): tiered decode >= 0.8x the in-memory tokens/s; a stored
8k-token prefix loads >= 5x faster than recomputing it.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tiered  # noqa: E402
from tiered.kv import KVStore, TieredCache, kv_geometry, model_identity  # noqa: E402

MiB = 1 << 20
try:
    import transformers
    #: recent transformers name the cache argument ``cache``, earlier ones ``past_key_values``
    CACHE = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
             else "past_key_values")
except ImportError:
    CACHE = "cache"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=128 if small else 256, intermediate_size=256 if small else 512,
                      num_hidden_layers=8 if small else 16, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32768)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def decode(model, cache, ids: torch.Tensor, new: int, *, before=None, probe=None) -> dict:
    """:func:`prefill` (after ``before()``, e.g. a prefix load) + ``new - 1`` greedy steps; timings."""
    run = prefill(model, cache, ids, before=before)
    tok = run.pop("_tok")
    peak = 0
    with torch.no_grad():
        t1 = time.perf_counter()
        for _ in range(new - 1):
            out = model(tok, **{CACHE: cache}, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            run["tokens"].append(int(tok))
            if probe is not None:
                peak = max(peak, probe())
        dt = time.perf_counter() - t1
    return {**run, "decode_tokens_per_s": (new - 1) / dt, "decode_s_per_token": dt / (new - 1),
            "decode_device_peak": peak or None}


def prefill(model, cache, ids: torch.Tensor, *, before=None) -> dict:
    """Time to first token: ``before()`` (a prefix load, returning the tokens loaded) + the forward."""
    with torch.no_grad():
        t0 = time.perf_counter()
        skip = before() if before else 0
        t_load = time.perf_counter() - t0
        out = model(ids[:, skip:], **{CACHE: cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        first = int(tok)  # waits for the device
        ttft = time.perf_counter() - t0
    if cache.get_seq_length() != ids.shape[1]:
        raise RuntimeError(f"the model did not fill the {type(cache).__name__} passed as {CACHE}= "
                           f"({cache.get_seq_length()} of {ids.shape[1]} tokens)")
    return {"ttft_s": ttft, "prefix_load_s": t_load, "prefix_tokens": skip, "tokens": [first], "_tok": tok}


def profile_steps(model, caches: dict, runs: dict, path: str, steps: int = 3) -> None:
    """Where a decode step's time goes: torch.profiler over ``steps`` more steps of each cache
    (not part of the timed results), the top operators written to ``path``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    toks = {n: torch.tensor([[r["tokens"][-1]]], device=next(model.parameters()).device) for n, r in runs.items()}
    with torch.no_grad(), profile(activities=acts) as prof:
        for _ in range(steps):
            for n, cache in caches.items():
                with record_function(f"step:{n}"):
                    out = model(toks[n], **{CACHE: cache}, use_cache=True)
                    toks[n] = out.logits[:, -1:].argmax(-1)
                    int(toks[n])
    with open(path, "w") as f:
        avg = prof.key_averages()
        f.write(avg.table(sort_by="cpu_time_total", row_limit=40))
        f.write("\n\n")
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=40))
        if torch.cuda.is_available():
            f.write("\n\n")
            f.write(avg.table(sort_by="self_cuda_time_total", row_limit=25))
    log(f"profile written to {path}")


def interleave(model, caches: dict, runs: dict, new: int) -> None:
    """``new - 1`` decode steps of every cache, one step each in turn (the order rotating), so
    that the machine's load drifts hit every contender alike; median and mean step times."""
    names = list(caches)
    times = {n: [] for n in names}
    with torch.no_grad():
        for r in range(new - 1):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                out = model(runs[n]["_tok"], **{CACHE: caches[n]}, use_cache=True)
                runs[n]["_tok"] = out.logits[:, -1:].argmax(-1)
                runs[n]["tokens"].append(int(runs[n]["_tok"]))  # waits for the device
                times[n].append(time.perf_counter() - t)
                if hasattr(caches[n], "device_bytes"):
                    runs[n]["decode_device_peak"] = max(runs[n].get("decode_device_peak") or 0,
                                                        caches[n].device_bytes()["total"])
    for n in names:
        ts = sorted(times[n])
        med = ts[len(ts) // 2]
        runs[n].update({"interleaved_step_s_median": med, "interleaved_step_s_mean": sum(ts) / len(ts),
                        "decode_tokens_per_s": 1 / med, "decode_s_per_token": med})
        del runs[n]["_tok"]


def store_config(directory: Path, host: int, storage: int, gpu: tuple | None = None) -> dict:
    """``gpu``: (device, capacity) of a GPU tier; the caches' device budgets are then their shares of it."""
    tiers = {"host": {"capacity": host}, "nvme": {"path": str(directory), "capacity": storage}}
    if gpu is not None:
        tiers = {"gpu": {"kind": "device", "device": gpu[0], "capacity": gpu[1]}, **tiers}
    return {"tiers": tiers, "engine": {"workers": 4, "chunk": "4MiB"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--prompt", type=int, default=8192, help="stored prefix tokens (a multiple of --block)")
    p.add_argument("--new", type=int, default=32, help="tokens generated per contender")
    p.add_argument("--block", type=int, default=512, help="tokens per KV block")
    p.add_argument("--budget", type=int, default=None, help="device budget in bytes (default: KV / 4)")
    p.add_argument("--layers-per-object", type=int, default=None,
                   help="layers per stored block part for rows 3-4 (default: all layers in one object)")
    p.add_argument("--dir", default="/tmp/tiered_kv_bench", help="storage tier directory (deleted after)")
    p.add_argument("--small", action="store_true", help="8 layers, hidden 128 (a quick check)")
    p.add_argument("--device", default="cpu", help="compute device (cuda: the device budget is GPU memory)")
    p.add_argument("--gpu-tier", type=int, default=None, metavar="BYTES",
                   help="give the stores a GPU tier of BYTES on --device: the caches' K/V are its buffers and "
                        "each cache's device budget is its share of it (default: no tier, private budgets)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="after the timed steps, profile 3 decode steps of each warm cache (torch.profiler) "
                        "and write the top operators by CPU and device time to FILE")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_decode_cpu.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(a.small).to(a.device)
    layers, heads, dim = kv_geometry(model.config)
    per_token = layers * 2 * heads * dim * 4
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1024, (1, a.prompt + 8), generator=g).to(a.device)
    ctx = ids.shape[1] + a.new
    kv_bytes = ctx * per_token
    budget = a.budget or kv_bytes // (2 if a.small else 4)  # 8 layers: 2 staging slots are 1/4 already
    directory = Path(a.dir)
    shutil.rmtree(directory, ignore_errors=True)
    res: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(), "device": a.device,
                    "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None},
        "model": {"layers": layers, "kv_heads": heads, "head_dim": dim, "dtype": "float32",
                  "params": sum(p.numel() for p in model.parameters())},
        "context_tokens": ctx, "prompt_tokens": ids.shape[1], "stored_prefix_tokens": a.prompt,
        "kv_bytes_per_token": per_token, "kv_bytes": kv_bytes, "device_budget": budget,
        "kv_over_budget": kv_bytes / budget, "block_tokens": a.block, "layers_per_object": a.layers_per_object, "new_tokens": a.new, "contenders": {},
    }
    C = res["contenders"]
    from transformers import DynamicCache

    log(f"model: {layers} layers, KV {kv_bytes / MiB:.0f} MiB for {ctx} tokens, device budget {budget / MiB:.1f} MiB")
    with torch.no_grad():  # warm-up (CUDA context, kernels), so the first contender's TTFT is not charged
        model(ids[:, :64], **{CACHE: DynamicCache()}, use_cache=True)
    log("1/5 DynamicCache in memory (full prefill; its decode runs in step 4, interleaved)")
    dyn_cache = DynamicCache()
    dyn_run = prefill(model, dyn_cache, ids)
    C["dynamic"] = dyn_run

    log("2/5 DynamicCache(offloading=True)")
    off_cache = None
    try:
        off_cache = DynamicCache(offloading=True)
        C["dynamic_offloading"] = prefill(model, off_cache, ids)  # decodes in step 4, interleaved
    except Exception as e:  # noqa: BLE001 - a contender that cannot run here is a result, recorded
        C["dynamic_offloading"] = {"error": f"{type(e).__name__}: {e}"}
        off_cache = None
        log(f"   unavailable: {type(e).__name__}: {e}")
    gc.collect()

    ident = model_identity(model)
    host_big, storage = 2 * kv_bytes + 64 * MiB, 4 * kv_bytes + 256 * MiB
    gpu = None if a.gpu_tier is None else (a.device, a.gpu_tier)
    log("3/5 TieredCache cold (full prefill, prefix saved)")
    with tiered.TieredStore(store_config(directory, host_big, storage, gpu)) as store:
        kv = KVStore(store, ident, block_size=a.block, layers_per_object=a.layers_per_object)
        with TieredCache(model.config, kv, model=model, device_budget=budget) as cache:
            C["tiered_cold"] = decode(model, cache, ids, a.new, before=lambda: cache.load_prefix(ids),
                                      probe=lambda: cache.device_bytes()["total"])
            C["tiered_cold"]["cache"] = cache.stats()
        C["tiered_cold"]["store"] = _store_summary(store)
    gc.collect()

    log("4/5 TieredCache warm: store reopened, prefix loaded cold from storage; decode interleaved with "
        "DynamicCache step by step")
    res["caches_dropped"] = drop_caches()
    with tiered.TieredStore(store_config(directory, host_big, storage, gpu)) as store:
        kv = KVStore(store, ident, block_size=a.block, layers_per_object=a.layers_per_object)
        with TieredCache(model.config, kv, model=model, device_budget=budget, lookahead=0) as sync_cache, \
                TieredCache(model.config, kv, model=model, device_budget=budget, lookahead=1) as thread_cache:
            runs = {"dynamic": dyn_run}
            # the first load reads the prefix cold from storage: that is the stored-prefix TTFT
            runs["tiered_warm_sync"] = prefill(model, sync_cache, ids, before=lambda: sync_cache.load_prefix(ids))
            runs["tiered_warm"] = prefill(model, thread_cache, ids, before=lambda: thread_cache.load_prefix(ids))
            caches = {"dynamic": dyn_cache, "tiered_warm_sync": sync_cache, "tiered_warm": thread_cache}
            if off_cache is not None:
                caches["dynamic_offloading"], runs["dynamic_offloading"] = off_cache, C["dynamic_offloading"]
            interleave(model, caches, runs, a.new)
            if a.profile:
                profile_steps(model, caches, runs, a.profile)
            for name, cache in (("tiered_warm_sync", sync_cache), ("tiered_warm", thread_cache)):
                runs[name]["cache"] = cache.stats()
                runs[name]["lookahead"] = cache.lookahead
        C["tiered_warm_sync"], C["tiered_warm"] = runs["tiered_warm_sync"], runs["tiered_warm"]
        for name in ("tiered_warm_sync", "tiered_warm"):
            if C[name]["prefix_tokens"] != a.prompt:  # the cold run saves the prefix (its model= is watched)
                raise RuntimeError(f"{name} loaded {C[name]['prefix_tokens']} stored prefix tokens, expected "
                                   f"{a.prompt}: the cold run did not save the prompt's blocks")
        C["tiered_warm"]["note"] = "prefix read from the host tier (the other warm cache loaded it first)"
        C["tiered_warm_sync"]["store"] = _store_summary(store)
    del off_cache
    gc.collect()

    log("5/5 TieredCache streaming: host tier 1/3 of the KV, one layer per stored part (full prefill first); "
        "decode interleaved with DynamicCache step by step")
    stream_dir = directory / "streaming"
    with tiered.TieredStore(store_config(stream_dir, kv_bytes // 3, storage, gpu)) as store:
        kv = KVStore(store, ident, block_size=a.block, layers_per_object=1)
        with TieredCache(model.config, kv, model=model, device_budget=budget) as cache:
            runs = {"tiered_streaming": prefill(model, cache, ids),
                    # the in-memory cache of step 1 decodes on (its context a few tokens longer)
                    "dynamic_during_streaming": {"tokens": [], "_tok": torch.tensor([[dyn_run["tokens"][-1]]],
                                                                                    device=ids.device)}}
            interleave(model, {"tiered_streaming": cache, "dynamic_during_streaming": dyn_cache}, runs, a.new)
            C["tiered_streaming"] = runs["tiered_streaming"]
            C["tiered_streaming"]["cache"] = cache.stats()
        C["tiered_streaming"]["store"] = _store_summary(store)
        C["tiered_streaming"]["host_tier"] = kv_bytes // 3
        C["tiered_streaming"]["layers_per_object"] = 1
        dyn_more = runs["dynamic_during_streaming"]
        C["tiered_streaming"]["dynamic_step_s_median"] = dyn_more["interleaved_step_s_median"]
    del dyn_cache
    gc.collect()
    shutil.rmtree(directory, ignore_errors=True)

    ref = C["dynamic"]["tokens"]
    for c in C.values():
        if "tokens" in c:
            c["tokens_equal_in_memory"] = c["tokens"] == ref
    dyn = C["dynamic"]
    res["ratios"] = {
        # interleaved step by step with DynamicCache (median step times): the headline
        "decode_tiered_warm_sync_vs_memory": C["tiered_warm_sync"]["decode_tokens_per_s"] / dyn["decode_tokens_per_s"],
        "decode_tiered_warm_thread_vs_memory": C["tiered_warm"]["decode_tokens_per_s"] / dyn["decode_tokens_per_s"],
        # run alone, before/after: exposed to the machine's load drifting between rows
        "decode_tiered_cold_sequential_vs_memory_interleaved":
            C["tiered_cold"]["decode_tokens_per_s"] / dyn["decode_tokens_per_s"],
        # interleaved step by step with the in-memory DynamicCache decoding on (median step times)
        "decode_tiered_streaming_vs_memory":
            C["tiered_streaming"]["dynamic_step_s_median"] / C["tiered_streaming"]["decode_s_per_token"],
        "ttft_recompute_memory_over_stored": dyn["ttft_s"] / C["tiered_warm_sync"]["ttft_s"],
        "ttft_recompute_tiered_over_stored": C["tiered_cold"]["ttft_s"] / C["tiered_warm_sync"]["ttft_s"],
    }
    if "decode_tokens_per_s" in C["dynamic_offloading"]:
        res["ratios"]["decode_tiered_warm_thread_vs_offloading"] = (
            C["tiered_warm"]["decode_tokens_per_s"] / C["dynamic_offloading"]["decode_tokens_per_s"])
    # the target is judged on the cache's default lookahead ("auto": the gather thread only on CUDA)
    default = "thread" if torch.cuda.is_available() else "sync"
    res["default_lookahead_row"] = f"tiered_warm{'' if default == 'thread' else '_sync'}"
    res["targets"] = {"decode >= 0.8x in-memory": res["ratios"][f"decode_tiered_warm_{default}_vs_memory"] >= 0.8,
                      "stored prefix TTFT >= 5x faster": res["ratios"]["ttft_recompute_memory_over_stored"] >= 5}
    res["machine"]["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        _table(res)
    log(f"saved {a.out}")
    return 0


def _store_summary(store) -> dict:
    s = store.stats()
    return {"bytes_read": {k: v["bytes_read"] for k, v in s["tiers"].items() if v and "bytes_read" in v},
            "bytes_written": {k: v["bytes_written"] for k, v in s["tiers"].items() if v and "bytes_written" in v},
            "host_hits": s["hits"], "host_misses": s["misses"], "evictions": s["evictions"],
            "direct_bytes": (s["engine"] or {}).get("direct_bytes"), "owners": s["owners"],
            "buffered_bytes": (s["engine"] or {}).get("buffered_bytes")}


def _table(res: dict) -> None:
    print(f"context {res['context_tokens']} tokens, KV {res['kv_bytes'] / MiB:.0f} MiB, device budget "
          f"{res['device_budget'] / MiB:.1f} MiB ({res['kv_over_budget']:.1f}x)")
    print(f"{'contender':<20} {'TTFT s':>9} {'decode tok/s':>13} {'tokens ok':>10}")
    for name, c in res["contenders"].items():
        if name == "tiered_streaming":
            name = "streaming KV/3"  # host tier KV/3, 1 layer per object: reads storage every step
        if "error" in c:
            print(f"{name:<20} {'-':>9} {'-':>13} {'-':>10}  {c['error'][:60]}")
        else:
            print(f"{name:<20} {c['ttft_s']:>9.3f} {c['decode_tokens_per_s']:>13.2f} {str(c['tokens_equal_in_memory']):>10}")
    for k, v in res["ratios"].items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
