"""Parent side of ``bench/offload_inference.py``: the model files, each contender in its own
subprocess (cold, under the memory cgroup), the diagnostic tiered variants and the fio reads
around them, then the bounds (:mod:`bench._offload_bounds`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench._offload_bounds import analyze
from bench._offload_common import MiB, fmt_bytes, log
from bench._offload_refs import fio_quick, fio_refs, posix_contig

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offload_inference.py")

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8000)


def _model_bytes(llama: dict) -> tuple[int, int]:
    """(fp32 parameter bytes, largest tensor's elements) of the Llama config (no tied weights)."""
    h, i, v, L = llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"], llama["num_hidden_layers"]
    kv = llama["num_key_value_heads"] * (h // llama["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    params = L * per_layer + 2 * v * h + h
    return params * 4, max(v * h, h * i)


def _run_child(name: str, spec: dict, args, limit: int | None, cgroup_ok: bool, label: str | None = None) -> dict:
    from bench._cgroup import MemoryCgroup, drop_caches

    label = label or name
    out = os.path.join(spec["work_dir"], f"result-{label}.json")
    if os.path.exists(out):
        os.unlink(out)
    spec_path = os.path.join(spec["work_dir"], f"spec-{label}.json")
    with open(spec_path, "w") as f:
        json.dump(dict(spec, label=label), f)
    stale = os.path.join(spec["work_dir"], f"logits-{label}.safetensors")
    if os.path.exists(stale):
        os.unlink(stale)
    cmd = [sys.executable, DRIVER, "--contender", name, "--spec", spec_path, "--out", out]
    dropped = drop_caches()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t0 = time.perf_counter()
    cg_usage = None
    if limit is not None and cgroup_ok:
        log(f"{label}: running in a memory cgroup, limit {fmt_bytes(limit)}, caches "
            + ("dropped" if dropped is None else f"NOT dropped ({dropped})"))
        with MemoryCgroup(f"tiered-bench-{label}", limit) as cg:
            proc = cg.run(cmd, env=env, stdout=sys.stderr, timeout=args.timeout)
            cg_usage = cg.usage()
    else:
        log(f"{label}: running without a memory limit, caches "
            + ("dropped" if dropped is None else f"NOT dropped ({dropped})"))
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=args.timeout)
    wall = time.perf_counter() - t0
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"contender": name, "ok": False,
               "error": f"exited with {proc.returncode} and no result"
                        + (" (killed: out of memory under the limit?)" if proc.returncode in (-9, 137) else "")}
    res["returncode"] = proc.returncode
    res["wall_s"] = wall
    res["memory_limit_bytes"] = limit if (limit is not None and cgroup_ok) else None
    res["caches_dropped"] = dropped is None
    res["cgroup"] = cg_usage
    if cg_usage and cg_usage.get("oom_kills"):
        res["error"] = (res.get("error") or "") + f" [cgroup OOM kills: {cg_usage['oom_kills']}]"
    if not res.get("ok"):
        log(f"{label}: FAILED: {res.get('error')}")
    return res


def _parse_variant(text: str) -> dict:
    """'budget=1200MiB,lookahead=2,workers=8,chunk=16MiB,nocrc' -> spec overrides."""
    from tiered.sizes import parse_size

    out: dict = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        k, _, v = part.partition("=")
        if k in ("budget", "chunk"):
            out[k] = parse_size(v, where=k)
        elif k in ("lookahead", "workers", "force_lookahead"):
            out[k] = int(v)
        elif k in ("nocrc", "two_tiers"):
            out[k] = v.lower() not in ("0", "false", "no")
        elif k == "migration":
            out[k] = v
        else:
            raise SystemExit(f"--tiered-variant {text!r}: unknown key {k!r} (budget, lookahead, workers, chunk, "
                             "nocrc, force_lookahead, two_tiers, migration)")
    return out


def orchestrate(args) -> dict:
    llama = dict(SMALL if args.small else FULL)
    if args.layers:
        llama["num_hidden_layers"] = args.layers
    model_bytes, largest = _model_bytes(llama)
    budget = args.budget if args.budget else model_bytes // 4 // MiB * MiB
    limit = args.mem_limit if args.mem_limit else max(int(0.6 * model_bytes), budget + 640 * MiB)
    base = os.path.abspath(args.dir)
    model_dir = os.path.join(base, "model")
    work_dir = os.path.join(base, "work")
    os.makedirs(work_dir, exist_ok=True)
    notes = _spec_notes(args, model_bytes, budget, limit)
    cgroup_ok, caches_dropped = _limit_notes(args, notes)

    spec = {"llama": llama, "model_dir": model_dir, "work_dir": work_dir, "model_bytes": model_bytes,
            "largest_tensor_elems": largest, "budget": budget, "prompt": args.prompt,
            "new_tokens": args.new_tokens, "forwards": args.forwards, "vocab_size": llama["vocab_size"],
            "workers": args.workers, "chunk": args.chunk, "lookahead": args.lookahead,
            "diag_no_crc": args.diag_no_crc}

    log(f"model: Llama {llama}, {model_bytes:,} bytes fp32 ({fmt_bytes(model_bytes)}); tiered budget "
        f"{fmt_bytes(budget)}; memory limit {fmt_bytes(limit) if cgroup_ok else 'none'}")
    result: dict = {"model": {"config": llama, "param_bytes": model_bytes, "dir": model_dir},
                    "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "forwards": args.forwards,
                    "tiered_budget_bytes": budget,
                    "memory_limit_bytes": limit if cgroup_ok else None,
                    "memory_limit_mechanism": "cgroup v1 memory.limit_in_bytes (page cache counts)"
                    if cgroup_ok else None,
                    "caches_dropped": caches_dropped, "notes": notes, "contenders": {}}

    biggest = _model_files(args, spec, result)  # 1. the model files
    # 2. I/O references: fio on the checkpoint file itself (before the contenders)
    fio_before = fio_refs(str(biggest), biggest.stat().st_size) if not args.no_fio else None
    bench_io = None
    if not args.no_bench_io:
        try:
            bench_io = posix_contig(work_dir)
        except Exception as e:  # noqa: BLE001 - a reference, not a contender
            bench_io = {"error": f"{type(e).__name__}: {e}"}

    _run_contenders(args, spec, result, limit, cgroup_ok, biggest)  # 3. contenders
    _run_variants(args, spec, result, limit, cgroup_ok, biggest)  # 3b. diagnostic tiered variants

    fio_best = _fio_after(args, result, biggest, fio_before)  # 4. fio again
    result["bench_io"] = bench_io

    analyze(result, bench_io, fio_best, model_bytes, work_dir)  # 5. bounds and ratios
    return result


def _spec_notes(args, model_bytes: int, budget: int, limit: int) -> list[str]:
    """Notes on a run outside the benchmark's conditions (diagnostics, budget, limit)."""
    notes: list[str] = []
    if args.diag_no_crc:
        notes.append("DIAGNOSTIC RUN: tiered's per-read crc32 verification was disabled (--diag-no-crc)")
    if budget > model_bytes // 4:
        notes.append(f"budget {fmt_bytes(budget)} is above 1/4 of the model ({fmt_bytes(model_bytes // 4)}): "
                     "outside the issue's spec")
    if limit >= model_bytes:
        notes.append(f"memory limit {fmt_bytes(limit)} is not below the model size {fmt_bytes(model_bytes)}")
    return notes


def _limit_notes(args, notes: list[str]) -> tuple[bool, bool]:
    """(whether contenders run under the memory cgroup, whether the page cache could be
    dropped); notes where not."""
    from bench._cgroup import cgroup_v1_unavailable, drop_caches

    cg_why = cgroup_v1_unavailable()
    cgroup_ok = cg_why is None and not args.no_limit
    if cg_why:
        notes.append(f"NO MEMORY LIMIT: {cg_why}; contenders ran without a limit (cold starts only)")
    elif args.no_limit:
        notes.append("NO MEMORY LIMIT (--no-limit): the page cache may serve re-reads")
    drop_why = drop_caches()
    if drop_why:
        notes.append(f"page cache NOT dropped between contenders: {drop_why}")
    return cgroup_ok, drop_why is None


def _fio_after(args, result: dict, biggest: Path, fio_before: dict | None) -> float | None:
    """fio again (the device drifts): the best of every fio read of the file in this run is the
    reference (the strictest I/O bound); each contender also gets the fio of its moment."""
    C = result["contenders"]
    fio_after = fio_refs(str(biggest), biggest.stat().st_size) if not args.no_fio else None
    adj = [v for r in C.values() for v in (r.get("fio_adjacent_gbps") or {}).values() if v]
    result["fio"] = {"file": str(biggest), "before": fio_before, "after": fio_after, "adjacent_gbps": adj}
    fio_best = max([x["best_gbps"] for x in (fio_before, fio_after) if x and x.get("best_gbps")] + adj, default=None)
    result["fio_read_gbps"] = fio_best
    return fio_best


def _model_files(args, spec: dict, result: dict) -> Path:
    """Build the model files unless ``--dir`` holds them for this config; the biggest file."""
    llama, model_dir, work_dir = spec["llama"], spec["model_dir"], spec["work_dir"]
    stamp = os.path.join(model_dir, "bench-spec.json")
    want = json.dumps({"llama": llama, "seed": 0}, sort_keys=True)
    have = open(stamp).read() if os.path.exists(stamp) else None
    if have != want or args.rebuild:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(work_dir, "accelerate-offload"), ignore_errors=True)
        b = _run_child("build", spec, args, None, False)
        if not b.get("ok"):
            raise SystemExit(f"building the model failed: {b.get('error')}")
        with open(stamp, "w") as f:
            f.write(want)
        result["build"] = {k: b.get(k) for k in ("init_s", "save_s", "param_bytes")}
        if b.get("param_bytes") != spec["model_bytes"]:
            result["notes"].append(f"computed {spec['model_bytes']} bytes but the model has {b.get('param_bytes')}")
    else:
        log(f"model: reusing {model_dir}")
    files = sorted(Path(model_dir).glob("*.safetensors"))
    result["model"]["files"] = {p.name: p.stat().st_size for p in files}
    return max(files, key=lambda p: p.stat().st_size)


def _adjacent(run, io: bool, args, biggest: Path) -> dict:
    """Run a contender with a quick fio (bs=8M libaio qd32) right before and after it: the disk
    drifts by tens of percent within minutes, so each contender gets the bandwidth of its moment."""
    if not io or args.no_fio:
        return run()
    pre = fio_quick(str(biggest))
    r = run()
    post = fio_quick(str(biggest))
    r["fio_adjacent_gbps"] = {"before": pre, "after": post}
    return r


def _have_deepspeed() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("deepspeed") is not None
    except Exception:  # noqa: BLE001
        return False


def _run_contenders(args, spec: dict, result: dict, limit: int, cgroup_ok: bool, biggest: Path) -> None:
    """Each contender of ``--only`` (default: all) in its own child, into ``result["contenders"]``."""
    names = ["memory", "tiered", "accelerate_disk", "accelerate_disk_st", "accelerate_cpu", "deepspeed"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    C = result["contenders"]
    for name in names:
        if name == "deepspeed" and not _have_deepspeed():
            log("deepspeed not installed: ZeRO-Inference skipped")
            C[name] = {"ok": False, "skipped": "deepspeed not installed"}
            continue
        if name == "accelerate_cpu":
            C[name] = {"ok": False, "skipped": "cpu_offload needs the whole model in RAM: does not fit under "
                                               "the limit" if cgroup_ok else None}
            if args.no_cpu_offload:
                continue
            r = _run_child(name, spec, args, None, False)
            r["note"] = "measured WITHOUT the memory limit (information only)"
            C[name + "_nolimit"] = r
            C[name]["skipped"] = C[name]["skipped"] or "see accelerate_cpu_nolimit"
            continue
        if name == "accelerate_disk":
            prep = _run_child("accelerate_prep", spec, args, limit, cgroup_ok)
            result["accelerate_prep"] = prep
            if not prep.get("ok"):
                C[name] = {"ok": False, "error": f"offload_dir preparation failed: {prep.get('error')}"}
                continue
        C[name] = _adjacent(lambda: _run_child(name, spec, args, None if name == "memory" else limit, cgroup_ok),
                            name != "memory", args, biggest)
        if name == "accelerate_disk":
            C[name]["prep_s"] = prep.get("prep_s")
            if not args.keep_offload_dir:
                shutil.rmtree(os.path.join(spec["work_dir"], "accelerate-offload"), ignore_errors=True)


def _run_variants(args, spec: dict, result: dict, limit: int, cgroup_ok: bool, biggest: Path) -> None:
    """The diagnostic tiered variants (``--tiered-variant``; outside the issue's spec where the
    budget is above model/4), each noted with what it changes."""
    C, budget, model_bytes = result["contenders"], spec["budget"], spec["model_bytes"]
    for i, text in enumerate(args.tiered_variant or []):
        over = _parse_variant(text)
        vlabel = f"tiered_v{i + 1}"
        vlimit = max(limit, over.get("budget", budget) + 640 * MiB)
        vspec = dict(spec, **over)
        r = _adjacent(lambda: _run_child("tiered", vspec, args, vlimit, cgroup_ok, label=vlabel), True, args, biggest)
        r["variant"] = {"text": text, **over}
        if over.get("budget", budget) > model_bytes // 4:
            r["note"] = "DIAGNOSTIC: budget above 1/4 of the model (outside the issue's spec)"
        if over.get("nocrc"):
            r["note"] = (r.get("note", "DIAGNOSTIC") + "; per-read crc32 disabled (monkeypatched)")
        if over.get("force_lookahead") is not None:
            r["note"] = (r.get("note", "DIAGNOSTIC") + f"; lookahead forced to {over['force_lookahead']} "
                         "(plan_budget monkeypatched, no residents)")
        if vlimit >= model_bytes:
            r["note"] = r.get("note", "") + f"; memory limit {fmt_bytes(vlimit)} NOT below the model"
        C[f"{vlabel} [{text}]"] = r
