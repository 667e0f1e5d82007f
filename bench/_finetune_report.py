"""The CPU benchmark's summary (I/O bounds, ratios to DeepSpeed and to the bounds, targets) and table."""

from __future__ import annotations

import statistics

from bench._finetune_common import GB, MiB

TARGET_VS_DS = 0.7
TARGET_BOUND = 1.2


def summarize(r: dict) -> None:
    s = {}
    d, m = r.get("deepspeed", {}), r.get("torch", {})
    runs = [x for x in (r.get("fio", {}), r.get("fio_end", {})) if x]
    eng = [x for x in (r.get("engine_io", {}), r.get("engine_io_end", {})) if x]

    def best(part: str, key: str, ekey: str) -> float | None:
        """The best bandwidth any run of fio or of the bare engine saw (the strictest bound)."""
        vals = [x.get(part, {}).get(key) for x in runs] + [x.get(ekey) for x in eng]
        vals = [v for v in vals if v]
        return max(vals) if vals else None

    rbw, wbw = best("read", "gbps", "read_gbps"), best("write", "gbps", "write_gbps")
    mix = {"read_gbps": best("mixed", "read_gbps", "mixed_read_gbps"),
           "write_gbps": best("mixed", "write_gbps", "mixed_write_gbps")}
    s["best read GB/s (fio, engine)"], s["best write GB/s"] = rbw, wbw
    s["best concurrent read GB/s"], s["best concurrent write GB/s"] = mix["read_gbps"], mix["write_gbps"]
    g, t0 = r.get("tiered_governed", {}), r.get("tiered", {})
    if "train_step_median_s" in g and "train_step_median_s" in t0:
        s["governor overhead: train step (median), governed / not"] = g["train_step_median_s"] / t0["train_step_median_s"]
        s["governor overhead: train step (min), governed / not"] = g["train_step_min_s"] / t0["train_step_min_s"]
    for name in ("tiered", "tiered_sync", "tiered_governed"):
        t = r.get(name, {})
        if "step_median_s" not in t:
            continue
        # bytes of a whole train step (writes that land after step() returned included)
        rd, wr = t["bytes_read_per_train_step"], t["bytes_written_per_train_step"]
        bounds = {}
        if rbw and wbw:
            bounds["serial"] = rd / (rbw * GB) + wr / (wbw * GB)
        if mix.get("read_gbps") and mix.get("write_gbps"):
            bounds["concurrent"] = max(rd / (mix["read_gbps"] * GB), wr / (mix["write_gbps"] * GB))
        if bounds:
            bounds["best"] = min(bounds.values())  # fio did no better either way
        for kind, b in bounds.items():
            s[f"{name}: I/O bound ({kind}) s"] = b
        for what, stat in (("step", "median"), ("step", "min"), ("train_step", "median"), ("train_step", "min")):
            # the optimizer step alone; forward + backward + step
            k = f"{what}_{stat}_s"
            label = f"{name}: {what} ({stat})"
            if k in d:
                s[f"{label} / deepspeed"] = t[k] / d[k]
                s[f"{label}: target <= {TARGET_VS_DS} x deepspeed met"] = t[k] / d[k] <= TARGET_VS_DS
            if k not in m:
                continue
            extra = t[f"fwd_bwd_{stat}_s"] if what == "train_step" else 0.0  # compute, not overlapped
            for kind, io in bounds.items():
                bound = max(m[k], io + extra)
                s[f"{label}: bound max(in-memory, I/O {kind}) s"] = bound
                s[f"{label} / bound ({kind})"] = t[k] / bound
                s[f"{label}: target <= {TARGET_BOUND} x bound ({kind}) met"] = t[k] / bound <= TARGET_BOUND
    z = r.get("zo", {})
    if "tiered_step_s" in z:
        s["zo_memory_steps_per_s"] = 1 / statistics.median(z["memory_step_s"])
        s["zo_tiered_steps_per_s"] = 1 / statistics.median(z["tiered_step_s"])
        s["zo_tiered_vs_memory"] = s["zo_tiered_steps_per_s"] / s["zo_memory_steps_per_s"]
    r["summary"] = s


def print_table(r: dict) -> None:
    s = r["summary"]
    print(f"model: {r.get('torch', r.get('tiered', {})).get('params', '?')} params, state "
          f"{r.get('tiered', {}).get('state_bytes', 0) / MiB:.0f} MiB, tiered host tier "
          f"{r['spec']['host_mib']} MiB")
    print("median (min) over all timed steps of all rounds")
    print(f"{'contender':<12} {'opt step (s)':>12} {'fwd+bwd (s)':>12} {'train step (s)':>14} "
          f"{'read/step MB':>12} {'written/step MB':>15}")
    for name in ("torch", "deepspeed", "tiered", "tiered_governed", "tiered_sync"):
        c = r.get(name, {})
        if "error" in c:
            print(f"{name:<12} error: {c['error'][:300]}")
        elif c:
            print(f"{name:<12} {c['step_median_s']:>5.2f} ({c['step_min_s']:.2f}) "
                  f"{c['fwd_bwd_median_s']:>5.2f} ({c['fwd_bwd_min_s']:.2f}) "
                  f"{c['train_step_median_s']:>6.2f} ({c['train_step_min_s']:.2f}) "
                  f"{c['proc_read_per_train_step'] / 1e6:>12.1f} "
                  f"{c['proc_written_per_train_step'] / 1e6:>15.1f}")
    for k, v in s.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
