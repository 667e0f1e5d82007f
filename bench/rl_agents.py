"""RL agents vs the heuristics and Belady, learning online from cold, on public and synthetic traces.

For each trace: every heuristic (``tiered.policies.HEURISTICS``: lru, lfu, arc, s3fifo, sieve,
static), Belady's optimum and the ``rl`` agents replay in the simulator (policies.sim) on the
same tier models (host RAM cache = ``--fast-fraction`` of the footprint over NVMe, typical
speeds, as ``tiered bench replay`` does). Reports mean/p99 latency, hit ratio, the fraction of
the best-heuristic -> Belady gap in mean latency the agents close, and the agents' decision cost
per access split into bookkeeping / features / labels / network / decision logic / training
(this thread's CPU time, so other jobs on a shared machine inflate it less than wall time).

Splits (``--splits``):

* ``public`` -- the three public traces in ../shared/traces/public (the agents' defaults were
  chosen looking at them: not held out);
* ``tuning`` -- synthetic instances options may be chosen on (bench/synthetic_traces.TUNING);
* ``heldout`` -- synthetic instances not used to choose options (new seeds, and one family,
  ``bursty``, absent from tuning); seen once before the last option change (see
  synthetic_traces.HELD_OUT_FRESH);
* ``fresh`` -- a second held-out set, first replayed after the last option change: the split
  the quality claims are made on.

One set of agent options for every trace (the defaults of policies.rl.AgentOptions, or
``--rl-options`` JSON for experiments on the tuning split): nothing is tuned per trace.

    python bench/rl_agents.py [--splits public,tuning,heldout] [--limit N] [--out FILE] [--plot]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import synthetic_traces as synth  # noqa: E402
from tiered import traces  # noqa: E402
from tiered.policies import HEURISTICS, create_policy  # noqa: E402
from tiered.policies.sim import prepare, simulate  # noqa: E402
from tiered.tools.replay.models import choose_loop, tier_models  # noqa: E402

PUBLIC = ROOT.parent / "shared" / "traces" / "public"
if not PUBLIC.exists():
    PUBLIC = Path("/work/shared/traces/public")
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


def _load(split: str, name: str, limit: int | None):
    """(prepared trace, closed loop?, why) for a public trace name or a synthetic 'family@seed'."""
    if split == "public":
        tr = _head(traces.load(PUBLIC / TRACES[name]), limit)
        prep = prepare(tr.time, tr.key, tr.size, tr.op, tr.kind)
        return prep, tr
    fam, seed = name.split("@")
    s = synth.make(fam, int(seed), limit or synth.N)
    prep = prepare(s.time, s.key, s.size, s.op, s.kind)
    return prep, None


def run_trace(split: str, name: str, limit: int | None, frac: float, rl_options: dict,
              save_dir: str | None, verbose: bool) -> dict:
    prep, tr = _load(split, name, limit)
    tiers = tier_models(None, prep.footprint, frac)
    closed, why = choose_loop(tr, tiers) if tr is not None else (True, "closed loop (synthetic, untimed)")
    rows = {}
    cost = None
    for pol_name in (*HEURISTICS, "belady", "rl"):
        pol = create_policy(pol_name, **(rl_options if pol_name == "rl" else {}))
        t0 = time.perf_counter()
        try:
            res = simulate(prep, tiers, pol, closed_loop=closed)
        finally:
            pol.close()
        s = res.summary()
        rows[pol_name] = {
            "mean_latency_us": s["mean_latency_us"], "p99_latency_us": s["p99_latency_us"],
            "hit_ratio": s["hit_ratio"][tiers[0].name], "bytes_migrated": res.bytes_migrated,
            "wall_s": time.perf_counter() - t0,
        }
        if pol_name == "rl":
            cost = pol.cost_report()
            if save_dir:
                pol.save(Path(save_dir) / f"rl_{name.replace('@', '_')}")
        if verbose:
            r = rows[pol_name]
            print(f"  {name:16s} {pol_name:7s} mean {r['mean_latency_us']:9.2f} us  hit {r['hit_ratio']:.4f}  "
                  f"({r['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    heur = {k: v for k, v in rows.items() if k in HEURISTICS}
    best = min(heur, key=lambda k: heur[k]["mean_latency_us"])
    gap = rows[best]["mean_latency_us"] - rows["belady"]["mean_latency_us"]
    closed_gap = (rows[best]["mean_latency_us"] - rows["rl"]["mean_latency_us"]) / gap if gap > 0 else float("nan")
    return {
        "split": split, "trace": name, "accesses": prep.n, "keys": prep.n_keys, "footprint": prep.footprint,
        "fast_bytes": tiers[0].capacity, "fast_fraction": frac, "loop": why,
        "rows": rows, "best_heuristic": best, "gap_closed": closed_gap,
        "rl_beats_best": rows["rl"]["mean_latency_us"] < rows[best]["mean_latency_us"],
        "rl_cost": cost,
    }


def microbench(reps: int = 2000) -> dict:
    """The network alone: one batched value call (a 32-access batch's candidates, or one ranking of
    ``candidates`` residents) and one training step, median CPU time over ``reps``."""
    from tiered.policies.rl import make_policy
    from tiered.policies.rl.features import N_FEATURES
    from tiered.policies.rl.predictor import HORIZONS

    pol = make_policy()
    ag = pol.agents[1]
    out = {}
    for rows in (32, pol.opt.candidates):
        x = np.random.default_rng(0).random((rows, N_FEATURES), dtype=np.float32)
        t = []
        for _ in range(reps):
            t0 = time.thread_time()
            ag.value_and_rank(x)
            t.append(time.thread_time() - t0)
        out[f"value_call_{rows}_rows_us"] = float(np.median(t)) * 1e6
    y = (np.random.default_rng(1).random((256, len(HORIZONS))) < 0.5).astype(np.float32)
    for _ in range(4):
        ag.add(np.random.default_rng(2).random((256, N_FEATURES), dtype=np.float32), y, np.ones_like(y))
    t = []
    for _ in range(max(1, reps // 10)):
        t0 = time.thread_time()
        ag.train_step()
        t.append(time.thread_time() - t0)
    out["train_step_us"] = float(np.median(t)) * 1e6
    out["train_batch"] = ag.cfg.batch
    out["train_us_per_access_both_agents"] = out["train_step_us"] * 2 / pol.opt.train_every
    return out


def summarize(results: list[dict]) -> dict:
    """Per split: traces where rl beats the best heuristic, mean gap closed, cost per access."""
    out = {}
    for split in dict.fromkeys(r["split"] for r in results):
        rs = [r for r in results if r["split"] == split]
        gaps = [r["gap_closed"] for r in rs if np.isfinite(r["gap_closed"])]
        out[split] = {
            "traces": len(rs), "rl_beats_best": sum(r["rl_beats_best"] for r in rs),
            "mean_gap_closed": float(np.mean(gaps)) if gaps else float("nan"),
            "max_us_per_access": max(_total_us(r) for r in rs),
        }
    return out


def _total_us(r: dict) -> float:
    c = r["rl_cost"]
    return c["us_per_decision"] + c["train_us_per_event"]


def _env() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError) as e:
        commit, dirty = f"unknown ({e})", None
    return {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()), "commit": commit,
            "uncommitted_changes": dirty}


def _table(results: list[dict]) -> str:
    head = f"{'split':8s} {'trace':16s} " + " ".join(f"{h:>8s}" for h in (*HEURISTICS, "belady", "rl")) + \
        f" {'best':>7s} {'gap':>7s} {'us/acc':>7s}  split of us/access"
    lines = [head]
    for r in results:
        rw = r["rows"]
        c = r["rl_cost"].get("split_us_per_access", {})
        lines.append(f"{r['split']:8s} {r['trace']:16s} " + " ".join(
            f"{rw[p]['mean_latency_us']:8.1f}" for p in (*HEURISTICS, "belady", "rl"))
            + f" {r['best_heuristic']:>7s} {r['gap_closed']:7.3f} {_total_us(r):7.1f}  "
            + " ".join(f"{k[:5]} {v:.1f}" for k, v in c.items()))
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['split'][:4]}:{r['trace']}" for r in results]
    gaps = [max(-1.0, min(1.0, r["gap_closed"])) for r in results]
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.6), 4))
    ax.bar(range(len(names)), gaps, color=["tab:green" if g > 0 else "tab:red" for g in gaps])
    ax.axhline(0.2, ls="--", c="k", lw=0.8, label="target: 20 % of the gap")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("gap closed (clipped to [-1, 1])", fontsize=8)
    ax.set_title("rl: fraction of the best-heuristic -> Belady gap in mean latency closed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", default="public,tuning,heldout,fresh")
    p.add_argument("--traces", default=None, help="comma-separated subset (public names or family@seed)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N accesses of each trace")
    p.add_argument("--fast-fraction", type=float, default=0.08)
    p.add_argument("--rl-options", default="{}", help="JSON of AgentOptions fields (experiments)")
    p.add_argument("--save-agents", default=None, help="directory to save the trained agents to")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rl_agents.json"))
    p.add_argument("--plot", action="store_true", help="also write OUT with .png: gap closed per trace")
    a = p.parse_args(argv)
    rl_options = json.loads(a.rl_options)
    wanted = set(a.traces.split(",")) if a.traces else None
    plan = []
    for split in a.splits.split(","):
        names = {"public": list(TRACES), "tuning": [f"{f}@{s}" for f, s in synth.TUNING],
                 "heldout": [f"{f}@{s}" for f, s in synth.HELD_OUT],
                 "fresh": [f"{f}@{s}" for f, s in synth.HELD_OUT_FRESH]}.get(split)
        if names is None:
            p.error(f"unknown split {split!r}; known: public, tuning, heldout, fresh")
        plan += [(split, n) for n in names if wanted is None or n in wanted]
    env = _env()
    results = []
    for split, name in plan:
        print(f"{split}: {name}", file=sys.stderr, flush=True)
        results.append(run_trace(split, name, a.limit, a.fast_fraction, rl_options, a.save_agents, verbose=True))
    out = {"machine": env, "load_average_after": list(os.getloadavg()), "limit": a.limit,
           "rl_options": rl_options, "results": results, "summary": summarize(results),
           "microbench": microbench()}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        if a.plot:
            _plot(results, Path(a.out).with_suffix(".png"))
    print(_table(results))
    print(json.dumps(out["summary"], indent=1))
    m = out["microbench"]
    print("network alone: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
