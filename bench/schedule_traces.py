"""Declared plans against the heuristics and Belady, on traces of the project's own workloads.

    python bench/schedule_traces.py [--quick] [--fraction 0.5] [--loop auto|open|closed|back-to-back] [--keep-traces DIR] [--json]

Records, with a :class:`~tiered.traces.TraceRecorder` on the store, the workloads that declare
their next reads (``TieredStore.plan``):

* ``offload-llama-forward``: ``tiered.offload`` of a small Llama (built from a transformers
  config) whose host tier is smaller than its weights, a few no-grad forwards (each declares its
  unit order);
* ``offload-llama-train``: the same model, forward + backward (forward order, then reverse);
* ``adamw-steps``: :class:`tiered.optim.OffloadedAdamW` steps whose state does not fit the host
  tier (each step declares its chunk reads and the next step's reverse sweep).

* ``gnn-gathers``: :class:`tiered.gnn.TieredFeatureStore` minibatch gathers through
  :func:`tiered.gnn.window` (each batch declares its chunks and those of the batches queued);
* ``kv-queued-prompts``: :class:`tiered.kv.KVStore` serving requests that share system prompts,
  each told the prompts queued behind it (``KVStore.expect`` declares their stored blocks).

Each trace is then replayed in the
simulator (:func:`policies.sim.simulate`, loop chosen as ``tiered bench replay`` does) with a fast
tier of ``--fraction`` (half) of the working set -- the most bytes of distinct objects accessed
between two consecutive declarations, i.e. one forward or one optimizer step -- over an NVMe-like
backing tier, by every heuristic, by ``schedule`` (fallback: the best caching heuristic, and LRU;
with and without fetching ahead) and by Belady's offline optimum. Reported per trace: mean access
latency and fast-tier hit ratio per policy, and the share of the gap from the best heuristic to
Belady that schedule closes (above 100 %: better than Belady, whose demand fetching cannot load
an object before its access, which declared plans let schedule do). Results:
``bench/results/schedule_traces.json`` and, with matplotlib, one PNG per trace.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tiered.policies import HEURISTICS, create_policy, eviction_policy_names  # noqa: E402
from tiered.policies.sim import prepare, simulate  # noqa: E402
from tiered.tools.replay import choose_loop, format_table, rows_for, tier_models  # noqa: E402
from tiered.traces import TraceRecorder, read_trace  # noqa: E402


def _cfg(work: Path, sub: str, host: str) -> dict:
    return {"tiers": {"host": {"capacity": host}, "nvme": {"path": str(work / sub), "capacity": "1GiB"}},
            "engine": {"workers": 2, "chunk": "1MiB"}, "offload": {"lookahead": 1, "resident": False}}


def _llama(quick: bool):
    import transformers

    layers = 4 if quick else 12
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def record_offload(out: Path, work: Path, quick: bool, train: bool) -> Path:
    """Offloaded forwards (or training steps) of a Llama whose host tier holds about 40 % of it."""
    import torch

    from tiered import TieredStore, detach, offload

    torch.manual_seed(0)
    model = _llama(quick)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    host = f"{max(2, int(weights * 0.4) >> 20)}MiB"
    name = "offload-llama-train" if train else "offload-llama-forward"
    passes = (4 if quick else 8) if train else (6 if quick else 16)
    p = out / f"{name}.trace"
    meta = {"workload": f"tiered.offload Llama ({weights >> 20} MiB of weights, host tier {host}), "
                        f"{passes} {'training steps' if train else 'no-grad forwards'}"}
    with TieredStore(_cfg(work, name, host)) as store, TraceRecorder(p, overwrite=True, meta=meta) as rec:
        store.add_listener(rec)
        offload(model, store=store)
        ids = torch.randint(3, 512, (2, 24))
        for _ in range(passes):
            if train:
                model.train()
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(input_ids=ids)
        detach(model)
    return p


def record_adamw(out: Path, work: Path, quick: bool) -> Path:
    """OffloadedAdamW steps of an MLP whose optimizer state is about 3x the host tier."""
    import torch
    from torch import nn

    from tiered import TieredStore
    from tiered.optim import OffloadedAdamW

    torch.manual_seed(0)
    width = 384 if quick else 512
    mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
    params = sum(p.numel() for p in mlp.parameters())
    steps = 6 if quick else 12
    p = out / "adamw-steps.trace"
    host = f"{max(2, (params * 4) >> 20)}MiB"
    meta = {"workload": f"OffloadedAdamW, {steps} steps of a {params}-parameter MLP, host tier {host}"}
    with TieredStore(_cfg(work, "adamw", host)) as store, TraceRecorder(p, overwrite=True, meta=meta) as rec:
        store.add_listener(rec)
        opt = OffloadedAdamW(mlp.parameters(), lr=1e-3, store=store, chunk_bytes=128 << 10)
        opt.open()
        for _ in range(steps):
            mlp(torch.randn(8, width)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    return p


def record_gnn(out: Path, work: Path, quick: bool) -> Path:
    """Minibatch gathers from a feature table whose row cache is small, through
    ``tiered.gnn.window`` (which declares the chunks of the batch gathered and of those queued)."""
    import torch

    from tiered import TieredStore
    from tiered.gnn import TieredFeatureStore, window

    rows, dim = (60_000, 32) if quick else (200_000, 32)
    batches, batch = (12, 256) if quick else (40, 256)
    rng = np.random.default_rng(0)
    order = rng.permutation(rows)  # hot nodes spread over the table, as a graph's hubs are
    weights = 1.0 / np.arange(1, rows + 1) ** 0.9  # degree-skewed sampling (Zipf 0.9)
    weights /= weights.sum()
    ids = [torch.from_numpy(order[rng.choice(rows, batch, p=weights)]) for _ in range(batches)]
    p = out / "gnn-gathers.trace"
    meta = {"workload": f"TieredFeatureStore gathers: {batches} minibatches of {batch} Zipf(0.9) node ids "
                        f"from {rows} x {dim} fp32 rows in 64 KiB chunks, window depth 2, 64 KiB row cache"}
    with TieredStore(_cfg(work, "gnn", "16MiB")) as store, TraceRecorder(p, overwrite=True, meta=meta) as rec:
        with TieredFeatureStore(store, chunk_bytes=64 << 10, cache_bytes=64 << 10, policy="lru").open() as fs:
            fs.put_tensor(torch.randn(rows, dim), group_name=None, attr_name="x", index=None)
            store.add_listener(rec)  # the gathers, not the import
            for b in window(ids, fs, depth=2):
                fs.get_tensor(group_name=None, attr_name="x", index=b)
    return p


def record_kv(out: Path, work: Path, quick: bool) -> Path:
    """A queue of prompts sharing system prompts (prefix blocks reused across requests); before
    each request the KV store is told the prompts queued behind it (``KVStore.expect``)."""
    import inspect

    import torch
    import transformers

    from tiered import TieredStore
    from tiered.kv import KVStore, TieredCache, model_identity

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024)).eval()
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(1)
    systems = [torch.randint(1, 300, (1, 96), generator=g) for _ in range(6)]
    requests = 24 if quick else 64
    rng = np.random.default_rng(2)
    pick = rng.choice(len(systems), requests, p=np.array([0.35, 0.25, 0.15, 0.1, 0.1, 0.05]))
    prompts = [torch.cat([systems[i], torch.randint(1, 300, (1, 16), generator=g)], 1) for i in pick]
    p = out / "kv-queued-prompts.trace"
    meta = {"workload": f"KVStore with {requests} requests over 6 shared 96-token system prompts (16-token "
                        "blocks, 4-layer Llama), each told the 4 prompts queued behind it"}
    with TieredStore(_cfg(work, "kv", "4MiB")) as store, TraceRecorder(p, overwrite=True, meta=meta) as rec:
        store.add_listener(rec)
        kv = KVStore(store, model_identity(model), block_size=16)
        for i, ids in enumerate(prompts):
            kv.expect([q[0] for q in prompts[i:i + 5]], layers=4)
            with TieredCache(model.config, kv, model=model) as cache, torch.no_grad():
                cache.load_prefix(ids)
                model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, **{arg: cache})
        kv.close()
    return p


def working_set(trace) -> int:
    """Most bytes of distinct objects accessed between two consecutive plan declarations."""
    cuts = sorted({0, len(trace), *(q.at for q in trace.plans)})
    size = {}
    for k, s in zip(trace.key.tolist(), trace.size.tolist()):
        size[k] = max(size.get(k, 0), s)
    best = 0
    for a, b in zip(cuts, cuts[1:]):
        best = max(best, sum(size[k] for k in set(trace.key[a:b].tolist())))
    return best or trace.footprint


def gap_closed(best: float, opt: float, value: float) -> float | None:
    """Share of the best-heuristic-to-optimum gap that ``value`` closes (lower is better); None when
    there is no gap worth the name (under 1 % of the best heuristic's value, or Belady is worse)."""
    if not math.isfinite(best - opt) or best - opt <= 0.01 * abs(best):
        return None
    return (best - value) / (best - opt)


def replay(trace, fraction: float, loop_choice: str = "auto") -> dict:
    ws = working_set(trace)
    tiers = tier_models(None, ws, fraction)
    closed, loop = choose_loop(trace, tiers)
    times = trace.time
    if loop_choice == "back-to-back":  # no compute between accesses: nothing for a fetch ahead to hide behind
        closed, loop, times = True, "closed loop, back to back (--loop back-to-back)", np.zeros(len(trace))
    elif loop_choice != "auto":
        closed, loop = loop_choice == "closed", f"{loop_choice} loop (--loop)"
    prep = prepare(times, trace.key, trace.size, trace.op, trace.kind, trace.plans)
    fast = tiers[0].name

    reads = np.asarray(trace.op) == 0

    def run(label: str, name: str, **options) -> dict:
        res = simulate(prep, tiers, create_policy(name, **options), closed_loop=closed)
        row = rows_for(res, learns=False, window=0)[0]
        row["policy"] = label
        # reads are what a workload waits for (its writes are write-backs): reported on their own
        row["read_mean_latency_us"] = float(res.latency_s[reads].mean() * 1e6) if reads.any() else None
        row["read_hit_ratio"] = float((res.served[reads] == 0).mean()) if reads.any() else None
        return row

    rows = [run(h, h) for h in HEURISTICS]
    caching = [r for r in rows if r["policy"] in eviction_policy_names()]
    best = min(rows, key=lambda r: r["mean_latency_us"])
    best_caching = min(caching, key=lambda r: r["mean_latency_us"])["policy"]
    fallbacks = list(dict.fromkeys([best_caching, "lru"]))
    for fb in fallbacks:
        rows.append(run(f"schedule[{fb}]", "schedule", fallback=fb))
        rows.append(run(f"schedule[{fb},no prefetch]", "schedule", fallback=fb, prefetch=0))
    rows.append(run("belady", "belady"))
    by = {r["policy"]: r for r in rows}
    opt = by["belady"]
    best_hit = max(rows[:len(HEURISTICS)], key=lambda r: r["hit_ratio"][fast])
    closes = {}
    for r in rows:
        if r["policy"].startswith("schedule"):
            best_read = min(rows[:len(HEURISTICS)], key=lambda x: x["read_mean_latency_us"])
            closes[r["policy"]] = {
                "latency_vs_best_heuristic": r["mean_latency_us"] / best["mean_latency_us"],
                "read_latency_vs_best_heuristic": r["read_mean_latency_us"] / best_read["read_mean_latency_us"],
                "read_latency_gap_closed": gap_closed(best_read["read_mean_latency_us"], opt["read_mean_latency_us"],
                                                      r["read_mean_latency_us"]),
                "latency_gap_closed": gap_closed(best["mean_latency_us"], opt["mean_latency_us"], r["mean_latency_us"]),
                "hit_gap_closed": gap_closed(-best_hit["hit_ratio"][fast], -opt["hit_ratio"][fast], -r["hit_ratio"][fast]),
            }
    return {"accesses": len(trace), "plans": len(trace.plans), "footprint": trace.footprint, "working_set": ws,
            "fast_capacity": int(tiers[0].capacity), "loop": loop, "best_heuristic": best["policy"],
            "best_heuristic_by_hit_ratio": best_hit["policy"], "best_caching_heuristic": best_caching,
            "rows": rows, "schedule_vs_gap": closes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer passes")
    ap.add_argument("--fraction", type=float, default=0.5, help="fast tier as a share of the working set")
    ap.add_argument("--keep-traces", default=None, help="keep the recorded traces in this directory")
    ap.add_argument("--only", default=None, help="comma-separated subset: forward,train,adamw,gnn,kv")
    ap.add_argument("--loop", default="auto", choices=["auto", "open", "closed", "back-to-back"],
                    help="arrivals at trace times (open), each after the previous completes but not before its "
                         "trace time (closed), or each right after the previous (back-to-back: no compute gaps)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: the engine's threads need the other core
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set((args.only or "forward,train,adamw,gnn,kv").split(","))
    recorders = [("forward", lambda o, w: record_offload(o, w, args.quick, False)),
                 ("train", lambda o, w: record_offload(o, w, args.quick, True)),
                 ("adamw", lambda o, w: record_adamw(o, w, args.quick)),
                 ("gnn", lambda o, w: record_gnn(o, w, args.quick)),
                 ("kv", lambda o, w: record_kv(o, w, args.quick))]
    result = {"fraction_of_working_set": args.fraction, "quick": args.quick, "loop": args.loop, "host": platform.node(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "note": "simulated tiers (policies.sim) over traces recorded from live workloads; host RAM cache "
                      "over NVMe-like backing tier with typical speeds (tiered bench replay's defaults)",
              "traces": []}
    with tempfile.TemporaryDirectory(prefix="schedule-bench-") as tmp:
        tmp = Path(tmp)
        trace_dir = Path(args.keep_traces) if args.keep_traces else tmp / "traces"
        trace_dir.mkdir(parents=True, exist_ok=True)
        for label, record in recorders:
            if label not in wanted:
                continue
            t0 = time.perf_counter()
            path = record(trace_dir, tmp / "work")
            rec_s = time.perf_counter() - t0
            trace = read_trace(path)
            entry = {"trace": path.name, "workload": trace.meta.get("workload"), "record_s": rec_s}
            entry.update(replay(trace, args.fraction, args.loop))
            entry["seconds"] = time.perf_counter() - t0
            result["traces"].append(entry)
            _print(entry)
            _plot(entry, out_dir, "" if args.loop == "auto" else f"_{args.loop}")
    path = out_dir / ("schedule_traces.json" if args.loop == "auto" else f"schedule_traces_{args.loop}.json")
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


def _print(e: dict) -> None:
    print(f"\n{e['trace']}: {e['accesses']} accesses, {e['plans']} plans, working set {e['working_set']} B, "
          f"fast tier {e['fast_capacity']} B, {e['loop']} ({e['record_s']:.0f} s to record)", file=sys.stderr)
    table = format_table(e["rows"]).split("\n")
    print(table[0] + "  read mean us  read hit", file=sys.stderr)
    for line, r in zip(table[1:], e["rows"]):
        print(f"{line}  {r['read_mean_latency_us']:12.2f}  {r['read_hit_ratio']:8.4f}", file=sys.stderr)
    print(f"best heuristic (mean latency): {e['best_heuristic']}; share of its gap to Belady closed:", file=sys.stderr)
    for k, v in e["schedule_vs_gap"].items():
        print(f"  {k}: latency {_pct(v['latency_gap_closed'])} (x{v['latency_vs_best_heuristic']:.2f} of the best "
              f"heuristic's), hit ratio {_pct(v['hit_gap_closed'])}, read latency {_pct(v['read_latency_gap_closed'])} "
              f"(x{v['read_latency_vs_best_heuristic']:.2f})", file=sys.stderr)


def _pct(x) -> str:
    return "n/a (no gap)" if x is None else f"{x:.0%}"


def _plot(e: dict, out_dir: Path, suffix: str = "") -> None:
    try:
        from tiered.tools.replay import plot_rows

        png = out_dir / f"schedule_{e['trace'].split('.')[0]}{suffix}.png"
        plot_rows(e["rows"], png, f"{e['trace']} (fast tier {e['fast_capacity']} B)")
        e["plot"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    except Exception as err:  # noqa: BLE001 - no matplotlib: the JSON and the table are the results
        e["plot"] = f"not written: {type(err).__name__}: {err}"


if __name__ == "__main__":
    sys.exit(main())
