"""Summary, table and plot of ``bench/colocated.py``'s rounds (round 0 is the untimed warm-up)."""

from __future__ import annotations

import statistics

MB = 1e6
GOVERNOR_COUNTS = ("events", "offered", "decisions", "migrations", "in_place", "superseded", "refused_gone",
                   "refused_external", "refused_overfull", "refused_host", "failed")


def _sum_dicts(ds: list[dict]) -> dict:
    out: dict = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def summarize(rounds: dict, final: dict, goal: float, flash_bw: int) -> dict:
    """Per contender: median/min of each time, bytes per timed round, the governor's counts; and
    each governed contender's end-to-end speedup over ``fixed`` (median over median).
    ``flash_s_per_round``: the flash tier's bytes at its throttled bandwidth (reads and writes
    have a token bucket each: the larger of the two; migrations included).
    ``*_events_timed``: bytes per op/kind/tier the store's listeners saw in each phase (reads
    with tier ``host`` were served from host memory; ``migrate/KIND/TIER``: moves to TIER)."""
    out = {}
    for name, recs in rounds.items():
        timed = recs[1:]
        n = len(timed)
        s = {f"{k}_{f.__name__}": f(r[k] for r in timed) for k in ("e2e_s", "gen_s", "train_s", "drain_s")
             for f in (statistics.median, min)}
        s["rounds_timed"] = n
        s["bytes_read_per_round"] = {t: b / n for t, b in _sum_dicts([r["bytes_read"] for r in timed]).items()}
        s["bytes_written_per_round"] = {t: b / n for t, b in _sum_dicts([r["bytes_written"] for r in timed]).items()}
        s["flash_s_per_round"] = None if name == "bound" else max(  # bound: flash unthrottled
            s["bytes_read_per_round"].get("flash", 0), s["bytes_written_per_round"].get("flash", 0)) / flash_bw
        for phase in ("gen", "train"):
            s[f"{phase}_events_timed"] = _sum_dicts([r[f"{phase}_events"]["bytes"] for r in timed])
            s[f"{phase}_plans_timed"] = _sum_dicts([r[f"{phase}_events"]["plans"] for r in timed])
        s["bytes_migrated_timed"] = _sum_dicts([r["bytes_migrated"] for r in timed])
        s["all_synced"] = all(r["synced"] for r in recs) if final[name]["governor"] else None
        g = final[name]["governor"]
        s["governor"] = None if g is None else {k: g.get(k) for k in (*GOVERNOR_COUNTS, "bytes_migrated", "stopped",
                                                                       "last_error", "policy")}
        out[name] = s
    if "fixed" in out:
        base = out["fixed"]["e2e_s_median"]
        for name, s in out.items():  # "bound" vs fixed: the most any placement could gain
            s["speedup_vs_fixed"] = base / s["e2e_s_median"]
            s["speedup_vs_fixed_no_drain"] = base / statistics.median(
                r["gen_s"] + r["train_s"] for r in rounds[name][1:])
            s["goal_met"] = s["speedup_vs_fixed"] >= goal if name.startswith("governed") else None
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(out: dict) -> str:
    s0 = out["spec"]
    lines = [f"case: nvme {s0['mib']['nvme']} MiB ({s0['nvme_x']:g}x the weights), flash {s0['flash_bw']}",
             f"load: before {out['uptime_before']}", f"      after  {out['uptime_after']}",
             f"tokens and losses identical across contenders: {out['identical']} {out['mismatches'] or ''}", "",
             f"{'contender':15s} {'e2e med':>8s} {'e2e min':>8s} {'gen':>6s} {'train':>6s} {'drain':>6s} "
             f"{'vs fixed':>8s} {'flash s':>7s}  {'read MB/round (tier)':28s} {'written MB/round':24s} "
             "moved MB (timed)"]
    for name, s in out["summary"].items():
        rd = " ".join(f"{t}:{b / MB:.0f}" for t, b in s["bytes_read_per_round"].items())
        wr = " ".join(f"{t}:{b / MB:.0f}" for t, b in s["bytes_written_per_round"].items())
        mv = " ".join(f"{p}:{b / MB:.0f}" for p, b in s["bytes_migrated_timed"].items()) or "-"
        lines.append(f"{name:15s} {s['e2e_s_median']:8.2f} {s['e2e_s_min']:8.2f} {s['gen_s_median']:6.2f} "
                     f"{s['train_s_median']:6.2f} {s['drain_s_median']:6.2f} {s.get('speedup_vs_fixed', 0):7.2f}x "
                     f"{_num(s['flash_s_per_round']):>7s}  "
                     f"{rd:28s} {wr:24s} {mv}")
    lines.append("")
    for name, s in out["summary"].items():
        g = s["governor"]
        if g:
            counts = ", ".join(f"{k} {g[k]}" for k in GOVERNOR_COUNTS if g.get(k))
            lines.append(f"{name} governor ({g['policy']}): {counts}; stopped: {g['stopped']}; "
                         f"last error: {g['last_error']}")
    for name, f in out["final"].items():
        where = "; ".join(f"{who} " + ", ".join(f"{t} {b / MB:.0f}MB" for t, b in tiers.items())
                          for who, tiers in f["placement"].items())
        lines.append(f"{name} placement at the end: {where}")
    return "\n".join(lines)


def plot(cases: list[dict], path: str) -> None:
    """Per-round times of each contender: one row per case (nvme size), end to end, generation,
    fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 3, figsize=(14, 3.6 * len(cases)), squeeze=False)
    for row, out in zip(axes, cases):
        for name, recs in out["rounds"].items():
            xs = [r["round"] for r in recs]
            for ax, key, title in zip(row, ("e2e_s", "gen_s", "train_s"),
                                      ("end to end (incl. governor drain)", "generation", "fine-tuning step")):
                ax.plot(xs, [r[key] for r in recs], marker="o", label=name)
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("round (0: warm-up)")
        s = out["spec"]
        row[0].set_ylabel(f"s; nvme {s['mib']['nvme']} MiB ({s['nvme_x']:g}x weights), flash {s['flash_bw']}",
                          fontsize=8)
        row[0].legend(fontsize=8)
        row[2].annotate(f"load {out['uptime_before'].split('load average:')[-1].strip()}", (0.02, 0.95),
                        xycoords="axes fraction", fontsize=7, va="top")
    s = cases[0]["spec"]
    fig.suptitle(f"colocated generation + fine-tuning on one store: weights {s['weight_bytes'] / MB:.0f} MB, "
                 f"optimizer state {s['optim_state_bytes'] / MB:.0f} MB", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
