"""The text report and the bar chart of ``bench/offload_inference.py``'s result."""

from __future__ import annotations

import os
import sys

from bench._offload_bounds import TARGET_BOUND, TARGET_VS_ACCEL
from bench._offload_common import GB, GiB, MiB, fmt, fmt_bytes


def print_report(r: dict, file=None) -> None:
    out = file or sys.stdout

    def p(s=""):
        print(s, file=out)

    _conditions(r, p)
    _table(r, p)
    _details(r, p)
    p()
    _verdicts(r, p)


def _conditions(r: dict, p) -> None:
    """The model, the memory limit and budget, the fio and bench io references."""
    m = r["model"]
    c = m["config"]
    p(f"offload inference: Llama L={c['num_hidden_layers']} hidden={c['hidden_size']} "
      f"intermediate={c['intermediate_size']} vocab={c['vocab_size']}: {m['param_bytes']:,} bytes fp32 "
      f"({m['param_bytes'] / GiB:.2f} GiB); prompt 1x{r['prompt_tokens']}, {r['new_tokens']} greedy tokens")
    lim = r.get("memory_limit_bytes")
    p(f"memory limit: {('cgroup v1 memory.limit_in_bytes = ' + fmt_bytes(lim)) if lim else 'NONE'}"
      f" (model {fmt_bytes(m['param_bytes'])}); tiered host budget {fmt_bytes(r['tiered_budget_bytes'])}; "
      f"page cache {'dropped' if r.get('caches_dropped') else 'NOT dropped'} before each contender")
    fio = r.get("fio", {})
    rows = [x for k in ("before", "after") for x in ((fio.get(k) or {}).get("rows") or [])]
    if rows:
        p("fio sequential read of " + os.path.basename(fio.get("file", "")) + " (O_DIRECT): " + ", ".join(
            f"bs={x['bs'] // MiB}M {x['ioengine']} nj={x['numjobs']} qd={x['iodepth']}: "
            + (f"{x['gbps']:.2f}" if "gbps" in x else "err") for x in rows) + " GB/s")
    bio = r.get("bench_io") or {}
    if bio.get("posix_contig_read_gbps"):
        p(f"bench io reference (1 GiB file): posix-contig {bio['posix_contig_read_gbps']:.2f} GB/s, "
          f"engine {fmt(bio.get('engine_read_gbps'), '{:.2f}')} GB/s "
          f"(4 KiB-page arena {fmt(bio.get('engine_read_gbps_no_hugepages'), '{:.2f}')})")


def _table(r: dict, p) -> None:
    """One row per contender, the I/O bound and max(compute, I/O)."""
    w = max([22] + [len(n) + 2 for n in r["contenders"]])
    p()
    p(f"{'contender':{w}}{'limit':>9}{'load s':>8}  {'forwards s':<22}{'s/forward':>10}{'s/token':>9}"
      f"{'read/fwd':>10}{'read/tok':>10}{'peak':>9}{'fio GB/s':>11}{'cpu GFLOPS':>12}")
    for name, x in r["contenders"].items():
        if not x.get("ok"):
            why = x.get("skipped") or x.get("error") or "failed"
            p(f"{name:{w}}  -- {why}")
            continue
        lim = x.get("memory_limit_bytes")
        cg = x.get("cgroup") or {}
        peak = cg.get("max_usage_bytes") or x.get("peak_rss_bytes")
        fw = "/".join(f"{v:.2f}" for v in x["forwards"])
        p(f"{name:{w}}{(fmt_bytes(lim) if lim else 'none'):>9}{x['load_s']:>8.2f}  {fw:<22}"
          f"{x['forward_s']:>10.3f}{fmt(x.get('token_s')):>9}{fmt_bytes(x.get('forward_read_bytes_steady')):>10}"
          f"{fmt_bytes(x.get('token_read_bytes_mean')):>10}{fmt_bytes(peak):>9}"
          + "{:>11}".format("/".join(fmt(v, "{:.2f}") for v in (x.get("fio_adjacent_gbps") or {}).values()))
          + "{:>12}".format("/".join(f"{v:.0f}" for v in x.get("cpu_probe_gflops") or [])))
    b, io = r.get("bound", {}), r.get("io_bound", {})
    p(f"{'I/O bound':{w}}{'':>9}{'':>8}  {'(bytes/fio)':<22}{fmt(io.get('forward_s')):>10}{fmt(io.get('token_s')):>9}"
      f"{fmt_bytes(io.get('bytes_per_forward')):>10}{fmt_bytes(io.get('bytes_per_token')):>10}")
    p(f"{'max(compute, I/O)':{w}}{'':>9}{'':>8}  {'':<22}{fmt(b.get('forward_s')):>10}{fmt(b.get('token_s')):>9}"
      f"   ({b.get('forward_limited_by')}-bound prompt, {b.get('token_limited_by')}-bound decode)")
    prep = r.get("accelerate_prep")
    if prep and prep.get("ok"):
        p(f"accelerate disk_offload one-time offload_dir preparation: {prep['prep_s']:.1f} s "
          f"(under the limit, not in the rows above)")


def _details(r: dict, p) -> None:
    """tiered's stalls, prefetch hits and CPU per thread; the peers' CPU per thread; the variants."""
    t = r["contenders"].get("tiered", {})
    if t.get("ok"):
        fw, dec, info = t.get("offload_forward") or {}, t.get("offload_decode") or {}, t.get("info", {})
        p(f"tiered: lookahead {t['offload_stats']['lookahead']}, resident {fmt_bytes(t['offload_stats']['resident_bytes'])}"
          f", peak host {fmt_bytes(t['offload_stats']['peak_host_bytes'])}, arena huge pages "
          f"{info.get('arena_hugepages')}, engine {info.get('engine')}")
        p(f"        steady forward: stall {fmt(t.get('stall_per_forward_s'))} s/forward, prefetch hit rate "
          f"{fmt(fw.get('prefetch_hit_rate'), '{:.2f}')}, {fmt_bytes(t.get('bytes_per_forward'))} read/forward "
          f"({fmt(t.get('bytes_per_forward') / t['forward_s'] / GB if t.get('bytes_per_forward') else None, '{:.2f}')}"
          f" GB/s effective); cpu s/forward by thread {t.get('thread_cpu_per_forward_s')}")
        p(f"        decode: stall {fmt(t.get('stall_per_token_s'))} s/token, prefetch hit rate "
          f"{fmt(dec.get('prefetch_hit_rate'), '{:.2f}')}, {fmt_bytes(t.get('bytes_per_token'))} read/token "
          f"({fmt(t.get('bytes_per_token') / t['token_s'] / GB if t.get('bytes_per_token') else None, '{:.2f}')} GB/s "
          f"effective), prefetches skipped {dec.get('prefetch_skipped')}; cpu s/token by thread "
          f"{t.get('thread_cpu_per_token_s')}")
    for name in ("memory", "accelerate_disk", "accelerate_disk_st"):
        x = r["contenders"].get(name, {})
        if x.get("ok") and x.get("thread_cpu_per_forward_s"):
            p(f"{name}: cpu s/forward by thread {x['thread_cpu_per_forward_s']}, "
              f"s/token {x.get('thread_cpu_per_token_s')}")
    for vname, v in (r["ratios"].get("variants") or {}).items():
        x = r["contenders"][vname]
        p(f"{vname}: lookahead {x['offload_stats']['lookahead']}, resident "
          f"{fmt_bytes(x['offload_stats']['resident_bytes'])}; stall {fmt(x.get('stall_per_forward_s'))} s/forward, "
          f"{fmt(x.get('stall_per_token_s'))} s/token; prefetch hit rate forward "
          f"{fmt((x.get('offload_forward') or {}).get('prefetch_hit_rate'), '{:.2f}')}, decode "
          f"{fmt((x.get('offload_decode') or {}).get('prefetch_hit_rate'), '{:.2f}')}; vs its own max(compute, I/O): "
          f"prompt {fmt(v['forward_vs_own_bound'], '{:.2f}')}x, decode {fmt(v['token_vs_own_bound'], '{:.2f}')}x"
          + (f"  ({x['note']})" if x.get("note") else ""))


def _verdicts(r: dict, p) -> None:
    """The ratios against the targets, the logits check and the notes."""
    ra, tg = r["ratios"], r["targets"]

    def mark(v):
        return "" if v is None else ("ok" if v else "MISSED")

    p(f"tiered / max(in-memory compute, I/O bound): prompt {fmt(ra['tiered_forward_vs_bound'], '{:.2f}')}x, "
      f"decode {fmt(ra['tiered_token_vs_bound'], '{:.2f}')}x   (target <= {TARGET_BOUND}: "
      f"{mark(tg['forward_within_1.1x_bound'])}/{mark(tg['token_within_1.1x_bound'])}; I/O bound at the best "
      f"fio of the run, {fmt(r.get('fio_read_gbps'), '{:.2f}')} GB/s)")
    if ra.get("tiered_adjacent_fio_gbps"):
        p(f"  the same with the fio measured around the tiered run ({ra['tiered_adjacent_fio_gbps']:.2f} GB/s): "
          f"prompt {fmt(ra['tiered_forward_vs_bound_adjacent_fio'], '{:.2f}')}x, "
          f"decode {fmt(ra['tiered_token_vs_bound_adjacent_fio'], '{:.2f}')}x")
    p(f"accelerate disk_offload / tiered: prompt {fmt(ra['accelerate_disk_vs_tiered_forward'], '{:.2f}')}x, "
      f"per token {fmt(ra['accelerate_disk_vs_tiered_token'], '{:.2f}')}x   (target >= {TARGET_VS_ACCEL} per token: "
      f"{mark(tg['token_2x_faster_than_accelerate_disk'])})")
    p(f"accelerate disk (safetensors in place) / tiered: prompt "
      f"{fmt(ra['accelerate_disk_st_vs_tiered_forward'], '{:.2f}')}x, per token "
      f"{fmt(ra['accelerate_disk_st_vs_tiered_token'], '{:.2f}')}x")
    ds = r["contenders"].get("deepspeed", {})
    p("deepspeed / tiered: " + (f"prompt {fmt(ra['deepspeed_vs_tiered_forward'], '{:.2f}')}x, per token "
                                f"{fmt(ra['deepspeed_vs_tiered_token'], '{:.2f}')}x" if ds.get("ok")
                                else (ds.get("skipped") or ds.get("error") or "n/a")))
    d = r.get("logits_max_abs_diff_vs_memory") or {}
    if d:
        p("first-forward logits max |diff| vs in-memory: " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))
    for n in r.get("notes", []):
        p(f"note: {n}")
    p(f"({r.get('elapsed_s', 0):.0f} s)")


def plot(r: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: --plot skipped"
    rows = [(n, x["forward_s"], x.get("token_s")) for n, x in r["contenders"].items() if x.get("ok")]
    b = r.get("io_bound", {})
    rows.append(("I/O bound", b.get("forward_s") or 0, b.get("token_s") or 0))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, idx, title in ((axes[0], 1, "seconds per forward (prompt)"), (axes[1], 2, "seconds per token")):
        ax.barh([x[0] for x in rows], [x[idx] or 0 for x in rows])
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path)
    return None
