"""RL agents vs the heuristics and Belady on public traces, learning online from cold.

For each trace: every heuristic (lru, lfu, arc, s3fifo, static), Belady's
optimum and the ``rl`` agents replay in the simulator (policies.sim) on the
same tier models (host RAM cache = ``--fast-fraction`` of the footprint over
NVMe, typical speeds, as ``tiered bench replay`` does). Reports mean/p99
latency, hit ratio, the fraction of the best-heuristic -> Belady gap the
agents close (whole run and final window), and the agents' decision and
training cost (us per decision / per event, host wall time on this machine).

One set of agent options for every trace (the defaults of
policies.rl.AgentOptions): nothing is tuned per trace.

    python bench/rl_agents.py [--traces a,b] [--limit N] [--fast-fraction F] [--json] [--save-agents DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiered import traces  # noqa: E402
from tiered.policies import HEURISTICS, create_policy  # noqa: E402
from tiered.policies.sim import prepare, simulate  # noqa: E402
from tiered.tools.replay import choose_loop, tier_models  # noqa: E402

PUBLIC = ROOT.parent / "shared" / "traces" / "public"
TRACES = {
    "mqsim": "mqsim-tpcc-small.trace",
    "arc": "arc-OLTP.lis.zst",
    "mooncake": "mooncake-conversation.jsonl",
}


def _head(tr, n):
    if n is None or n >= len(tr):
        return tr
    return traces.Trace(tr.time[:n], tr.key[:n], tr.size[:n], tr.op[:n], tr.kind[:n],
                        timed=tr.timed, meta=dict(tr.meta, head=n))


def run_trace(name: str, path: Path, limit: int | None, frac: float, window: float, save_dir: str | None,
              verbose: bool) -> dict:
    tr = _head(traces.load(path), limit)
    prep = prepare(tr.time, tr.key, tr.size, tr.op, tr.kind)
    tiers = tier_models(None, prep.footprint, frac)
    closed, why = choose_loop(tr, tiers)
    start = int(prep.n * (1 - window))
    rows = {}
    cost = None
    for pol_name in (*HEURISTICS, "belady", "rl"):
        pol = create_policy(pol_name)
        t0 = time.perf_counter()
        try:
            res = simulate(prep, tiers, pol, closed_loop=closed)
        finally:
            pol.close()
        s, fw = res.summary(), res.summary(start)
        rows[pol_name] = {
            "mean_latency_us": s["mean_latency_us"], "p99_latency_us": s["p99_latency_us"],
            "hit_ratio": s["hit_ratio"][tiers[0].name], "bytes_migrated": res.bytes_migrated,
            # reads only: write hits are writes absorbed by the fast tier (write-back caching)
            "read_hit_ratio": float((res.served[prep.op == 0] == 0).mean()) if (prep.op == 0).any() else None,
            "final_mean_latency_us": fw["mean_latency_us"], "final_hit_ratio": fw["hit_ratio"][tiers[0].name],
            "wall_s": time.perf_counter() - t0,
        }
        if pol_name == "rl":
            cost = pol.cost_report()
            if save_dir:
                pol.save(Path(save_dir) / f"rl_{name}")
        if verbose:
            r = rows[pol_name]
            print(f"  {name:9s} {pol_name:7s} mean {r['mean_latency_us']:8.2f} us  hit {r['hit_ratio']:.4f}  "
                  f"final {r['final_mean_latency_us']:8.2f} us  ({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    heur = {k: v for k, v in rows.items() if k in HEURISTICS}
    best = min(heur, key=lambda k: heur[k]["mean_latency_us"])
    best_f = min(heur, key=lambda k: heur[k]["final_mean_latency_us"])

    def closed_gap(key, b):
        gap = rows[b][key] - rows["belady"][key]
        return (rows[b][key] - rows["rl"][key]) / gap if gap > 0 else float("nan")

    return {
        "trace": name, "file": str(path), "accesses": prep.n, "keys": prep.n_keys, "footprint": prep.footprint,
        "fast_bytes": tiers[0].capacity, "fast_fraction": frac, "loop": why, "window": window,
        "rows": rows, "best_heuristic": best, "best_heuristic_final": best_f,
        "gap_closed": closed_gap("mean_latency_us", best),
        "gap_closed_final": closed_gap("final_mean_latency_us", best_f),
        "rl_beats_best": rows["rl"]["mean_latency_us"] < rows[best]["mean_latency_us"],
        "rl_cost": cost,
    }


def microbench(reps: int = 2000) -> dict:
    """Network cost alone: one batched value call (a 16-access batch + 64 sampled residents)
    and one training step, median over ``reps`` (host wall time, this machine, loaded or not)."""
    from tiered.policies.rl import make_policy
    from tiered.policies.rl.features import N_FEATURES
    from tiered.policies.rl.predictor import HORIZONS

    pol = make_policy()
    ag = pol.agents[1]
    rows = 16 + pol.opt.candidates
    x = np.random.default_rng(0).random((rows, N_FEATURES), dtype=np.float32)
    y = (np.random.default_rng(1).random((rows, len(HORIZONS))) < 0.5).astype(np.float32)
    for _ in range(10):
        ag.add(x, y, np.ones_like(y))
    inf, tr = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        ag.value_and_rank(x)
        inf.append(time.perf_counter() - t0)
    for _ in range(max(1, reps // 10)):
        t0 = time.perf_counter()
        ag.train_step()
        tr.append(time.perf_counter() - t0)
    call = float(np.median(inf)) * 1e6
    return {"value_call_rows": rows, "value_call_us": call, "value_us_per_access_batch16": call / 16,
            "train_step_us": float(np.median(tr)) * 1e6, "train_batch": ag.cfg.batch,
            "train_us_per_event": float(np.median(tr)) * 1e6 / pol.opt.train_every * 2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=",".join(TRACES), help=f"comma-separated subset of {','.join(TRACES)}")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N accesses of each trace")
    p.add_argument("--fast-fraction", type=float, default=0.08)
    p.add_argument("--window", type=float, default=0.2, help="final window (fraction of accesses)")
    p.add_argument("--save-agents", default=None, help="directory to save the trained agents to")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rl_agents.json"))
    a = p.parse_args(argv)
    results = []
    for name in a.traces.split(","):
        if name not in TRACES:
            p.error(f"unknown trace {name!r}; known: {', '.join(TRACES)}")
        print(f"{name}: replaying {TRACES[name]}", file=sys.stderr, flush=True)
        results.append(run_trace(name, PUBLIC / TRACES[name], a.limit, a.fast_fraction, a.window,
                                 a.save_agents, verbose=True))
    out = {"machine": f"{os.cpu_count()} CPUs, shared with other jobs (load average {os.getloadavg()[0]:.1f})",
           "limit": a.limit, "results": results, "microbench": microbench()}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'trace':10s} {'best heur':10s} {'heur us':>9s} {'belady us':>9s} {'rl us':>9s} {'gap closed':>10s} "
              f"{'final gap':>9s} {'us/decision':>11s} {'train us/ev':>11s}")
        for r in results:
            b = r["best_heuristic"]
            rw = r["rows"]
            print(f"{r['trace']:10s} {b:10s} {rw[b]['mean_latency_us']:9.2f} {rw['belady']['mean_latency_us']:9.2f} "
                  f"{rw['rl']['mean_latency_us']:9.2f} {r['gap_closed']:10.3f} {r['gap_closed_final']:9.3f} "
                  f"{r['rl_cost']['us_per_decision']:11.1f} {r['rl_cost']['train_us_per_event']:11.1f}")
        m = out["microbench"]
        print(f"network alone: {m['value_call_us']:.1f} us per batched value call ({m['value_call_rows']} rows) = "
              f"{m['value_us_per_access_batch16']:.2f} us per access; train step {m['train_step_us']:.0f} us "
              f"(batch {m['train_batch']}) = {m['train_us_per_event']:.1f} us per event for both agents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
