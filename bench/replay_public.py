"""Per-trace policy table for every public trace: heuristics, Belady's optimum and (if present) RL.

    python bench/replay_public.py [--traces ../shared/traces/public] [--policies ...] [--json]

Each trace is replayed in the simulator (``tiered bench replay --mode sim``)
with a fast tier of ``--fast-fraction`` (8%) of the trace's footprint over an
NVMe-like backing tier. The peers are the heuristics (LRU, LFU, ARC,
S3-FIFO, static split) and the physical limit is Belady's offline optimum;
for ``rl`` the script prints the issue's goal figures: its mean latency
against the best heuristic's, and the share of the heuristic-to-Belady gap it
closes (overall and over the final window, since it learns from cold).
Results: ``bench/results/replay_public.json`` and one PNG per trace.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiered.policies import HEURISTICS  # noqa: E402
from tiered.tools.replay import choose_loop, format_table, plot_rows, run_replay, tier_models  # noqa: E402
from tiered.traces import detect_format, load  # noqa: E402


def _rl_available() -> str | None:
    try:
        from tiered.policies import create_policy

        create_policy("rl").close()
        return None
    except Exception as e:  # noqa: BLE001 - reported in the results, not hidden
        return f"{type(e).__name__}: {e}"


def gap_closed(best: float, opt: float, value: float) -> float | None:
    """Share of the best-heuristic-to-optimum gap that ``value`` closes (lower is better)."""
    if not math.isfinite(best - opt) or best == opt:
        return None
    return (best - value) / (best - opt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default=str(ROOT.parent / "shared" / "traces" / "public"))
    ap.add_argument("--policies", default=",".join((*HEURISTICS, "belady", "rl")))
    ap.add_argument("--fast-fraction", type=float, default=0.08)
    ap.add_argument("--window", type=float, default=0.2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    args = ap.parse_args()

    names = [p for p in args.policies.split(",") if p]
    rl_missing = _rl_available() if "rl" in names else None
    if rl_missing:
        print(f"rl skipped: {rl_missing}", file=sys.stderr)
        names.remove("rl")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(args.traces).iterdir() if p.is_file() and not p.name.lower().startswith("readme"))
    result = {"fast_fraction": args.fast_fraction, "window": args.window, "policies": names,
              "rl_skipped": rl_missing, "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "note": "simulated tiers (policies.sim); run on a shared, loaded 2-core machine: wall_s is not a benchmark of the policies' speed",
              "traces": []}
    for f in files:
        t0 = time.perf_counter()
        trace = load(f)
        tiers = tier_models(None, trace.footprint, args.fast_fraction)
        loop = choose_loop(trace, tiers)[1]
        print(f"\n{f.name}: {len(trace)} accesses, footprint {trace.footprint} B, fast tier {int(tiers[0].capacity)} B, "
              f"{loop}", file=sys.stderr)
        rows = run_replay(trace, names, tiers, window=args.window, progress=True)
        by = {r["policy"]: r for r in rows}
        heur = [by[h] for h in HEURISTICS if h in by]
        entry = {"trace": f.name, "format": detect_format(f), "accesses": len(trace), "footprint": trace.footprint,
                 "fast_capacity": int(tiers[0].capacity), "timed": trace.timed, "loop": loop, "rows": rows,
                 "seconds": time.perf_counter() - t0}
        if heur and "belady" in by:
            best = min(heur, key=lambda r: r["mean_latency_us"])
            fast = tiers[0].name
            entry["best_heuristic"] = best["policy"]
            goal = {}
            if "rl" in by:
                # whole run, and the final window against every policy's same final window
                for label, pick in (("whole run", lambda r: r), ("final window", lambda r: r["final_window"])):
                    h = [pick(x) for x in heur]
                    bh = min(h, key=lambda r: r["mean_latency_us"])
                    rl, opt = pick(by["rl"]), pick(by["belady"])
                    goal[label] = {
                        "rl_mean_latency_us": rl["mean_latency_us"],
                        "best_heuristic_mean_latency_us": bh["mean_latency_us"],
                        "belady_mean_latency_us": opt["mean_latency_us"],
                        "beats_best_heuristic": rl["mean_latency_us"] < bh["mean_latency_us"],
                        "latency_gap_closed": gap_closed(bh["mean_latency_us"], opt["mean_latency_us"], rl["mean_latency_us"]),
                        "hit_gap_closed": gap_closed(-max(x["hit_ratio"][fast] for x in h), -opt["hit_ratio"][fast],
                                                     -rl["hit_ratio"][fast]),
                    }
            entry["goal"] = goal
        png = out_dir / f"replay_{f.name.split('.')[0]}.png"
        plot_rows(rows, png, f"{f.name} (fast tier {args.fast_fraction:.0%} of footprint)")
        entry["plot"] = str(png.relative_to(ROOT))
        result["traces"].append(entry)
        print(format_table(rows), file=sys.stderr)
        if entry.get("goal"):
            print(f"best heuristic: {entry['best_heuristic']}; rl goal: {json.dumps(entry['goal'])}", file=sys.stderr)
    path = out_dir / "replay_public.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
