"""The bounds and verdicts of ``bench/offload_inference.py``: the I/O bound (bytes read per
forward over the best read bandwidth of the run), max(in-memory compute, I/O), each contender's
ratios, the targets, and the checks that the contenders computed the same as the model in RAM."""

from __future__ import annotations

import os

from bench._offload_common import GB

TARGET_BOUND = 1.1  # tiered <= 1.1 x max(in-memory compute, I/O bound)
TARGET_VS_ACCEL = 2.0  # tiered >= 2 x faster than accelerate disk_offload per generated token


def _logit_diffs(work_dir: str, names: list[str]) -> dict:
    """Each contender's first logits against the in-memory model's, when it ran in this run
    (a file left by an earlier run, maybe of another model, is never the reference)."""
    from safetensors.torch import load_file

    ref_path = os.path.join(work_dir, "logits-memory.safetensors")
    if "memory" not in names or not os.path.exists(ref_path):
        return {}
    ref = load_file(ref_path)["logits"]
    out = {}
    for n in names:
        p = os.path.join(work_dir, f"logits-{n}.safetensors")
        if n != "memory" and os.path.exists(p):
            out[n] = float((load_file(p)["logits"] - ref).abs().max())
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def _ok(r: dict) -> bool:
    return bool(r.get("ok"))


def analyze(result: dict, bench_io: dict | None, fio_best: float | None, model_bytes: int, work_dir: str) -> None:
    """Add the I/O bound, max(compute, I/O), the ratios, the targets and the consistency notes
    (logits, CPU speed, greedy tokens) to ``result``."""
    C = result["contenders"]
    b = _bounds(result, bench_io, fio_best, model_bytes)
    result["ratios"] = ratios = _ratios(C, b, fio_best)
    result["targets"] = _targets(C, ratios)
    result["logits_max_abs_diff_vs_memory"] = _logit_diffs(
        work_dir, [n.split(" ")[0] for n, r in C.items() if r.get("ok")])
    _consistency_notes(result)


def _bounds(result: dict, bench_io: dict | None, fio_best: float | None, model_bytes: int) -> dict:
    """``result``'s I/O bound (tiered's bytes read over the best read bandwidth of the run) and
    max(in-memory compute, I/O); returns the numbers the ratios need."""
    C = result["contenders"]
    mem, tie = C.get("memory", {}), C.get("tiered", {})
    bpf = tie.get("bytes_per_forward") if _ok(tie) else None
    bpt = tie.get("bytes_per_token") if _ok(tie) else None
    if bpf is None:  # no tiered counters: everything that is not resident is read
        bpf = bpt = model_bytes
    # without fio the best read the bare engine or plain O_DIRECT reached in this run is the bound
    bare = [(bench_io or {}).get(k) for k in ("posix_contig_read_gbps", "engine_read_gbps",
                                               "engine_read_gbps_no_hugepages")]
    ref_gbps = fio_best or max([x for x in bare if x], default=None)
    result["bound_read_gbps"] = ref_gbps
    result["bound_reference"] = "fio" if fio_best else ("best bare read of the run" if ref_gbps else None)
    io_fwd = bpf / (ref_gbps * GB) if ref_gbps else None
    io_tok = bpt / (ref_gbps * GB) if ref_gbps and bpt is not None else None
    comp_fwd = mem.get("forward_s") if _ok(mem) else None
    comp_tok = mem.get("token_s") if _ok(mem) else None
    bound_fwd = max(x for x in (comp_fwd, io_fwd) if x is not None) if (comp_fwd or io_fwd) else None
    bound_tok = max(x for x in (comp_tok, io_tok) if x is not None) if (comp_tok or io_tok) else None
    result["io_bound"] = {"bytes_per_forward": bpf, "bytes_per_token": bpt, "fio_read_gbps": fio_best,
                          "read_gbps": ref_gbps, "forward_s": io_fwd, "token_s": io_tok}
    pc = (bench_io or {}).get("posix_contig_read_gbps")
    if pc:
        result["io_bound"].update(posix_contig_read_gbps=pc, forward_s_posix_contig=bpf / (pc * GB),
                                  token_s_posix_contig=bpt / (pc * GB) if bpt else None)
    result["bound"] = {"forward_s": bound_fwd, "token_s": bound_tok,
                       "forward_limited_by": None if bound_fwd is None else
                       ("I/O" if io_fwd and io_fwd >= (comp_fwd or 0) else "compute"),
                       "token_limited_by": None if bound_tok is None else
                       ("I/O" if io_tok and io_tok >= (comp_tok or 0) else "compute")}
    return {"bpf": bpf, "bpt": bpt, "comp_fwd": comp_fwd, "comp_tok": comp_tok,
            "bound_fwd": bound_fwd, "bound_tok": bound_tok}


def _ratios(C: dict, b: dict, fio_best: float | None) -> dict:
    """tiered against the bound, the peers against tiered, each variant against its own bound."""
    tie, acc = C.get("tiered", {}), C.get("accelerate_disk", {})
    comp_fwd, comp_tok = b["comp_fwd"], b["comp_tok"]
    t_f = tie.get("forward_s") if _ok(tie) else None
    t_t = tie.get("token_s") if _ok(tie) else None
    ratios = {
        "tiered_forward_vs_bound": _ratio(t_f, b["bound_fwd"]),
        "tiered_token_vs_bound": _ratio(t_t, b["bound_tok"]),
        "accelerate_disk_vs_tiered_forward": _ratio(acc.get("forward_s") if _ok(acc) else None, t_f),
        "accelerate_disk_vs_tiered_token": _ratio(acc.get("token_s") if _ok(acc) else None, t_t),
    }
    st = C.get("accelerate_disk_st", {})
    ratios["accelerate_disk_st_vs_tiered_forward"] = _ratio(st.get("forward_s") if _ok(st) else None, t_f)
    ratios["accelerate_disk_st_vs_tiered_token"] = _ratio(st.get("token_s") if _ok(st) else None, t_t)
    ds = C.get("deepspeed", {})
    ratios["deepspeed_vs_tiered_forward"] = _ratio(ds.get("forward_s") if _ok(ds) else None, t_f)
    ratios["deepspeed_vs_tiered_token"] = _ratio(ds.get("token_s") if _ok(ds) else None, t_t)
    for vname, v in C.items():
        if "variant" in v and _ok(v) and fio_best:
            vb_f = max(comp_fwd or 0, v["bytes_per_forward"] / (fio_best * GB))
            vb_t = max(comp_tok or 0, (v.get("bytes_per_token") or 0) / (fio_best * GB))
            ratios.setdefault("variants", {})[vname] = {
                "forward_vs_own_bound": _ratio(v["forward_s"], vb_f), "token_vs_own_bound": _ratio(v["token_s"], vb_t),
                "own_bound_forward_s": vb_f, "own_bound_token_s": vb_t}
    # the same ratios with the fio measured right before/after the tiered run (best of the two)
    tadj = max([v for v in (tie.get("fio_adjacent_gbps") or {}).values() if v], default=None)
    if tadj and t_f:
        b_f = max(comp_fwd or 0, b["bpf"] / (tadj * GB))
        b_t = max(comp_tok or 0, (b["bpt"] or 0) / (tadj * GB))
        ratios.update(tiered_adjacent_fio_gbps=tadj, tiered_forward_vs_bound_adjacent_fio=_ratio(t_f, b_f),
                      tiered_token_vs_bound_adjacent_fio=_ratio(t_t, b_t))
    return ratios


def _targets(C: dict, ratios: dict) -> dict:
    def meets(v, cond):
        return None if v is None else bool(cond(v))

    ds = C.get("deepspeed", {})
    return {
        "forward_within_1.1x_bound": meets(ratios["tiered_forward_vs_bound"], lambda v: v <= TARGET_BOUND),
        "token_within_1.1x_bound": meets(ratios["tiered_token_vs_bound"], lambda v: v <= TARGET_BOUND),
        "token_2x_faster_than_accelerate_disk": meets(ratios["accelerate_disk_vs_tiered_token"],
                                                      lambda v: v >= TARGET_VS_ACCEL),
        "faster_than_deepspeed": None if not _ok(ds) else bool(
            (ratios["deepspeed_vs_tiered_forward"] or 0) > 1 and (ratios["deepspeed_vs_tiered_token"] or 0) > 1),
    }


def _consistency_notes(result: dict) -> None:
    """Notes where a contender's logits or greedy tokens differ from the in-memory model's, or
    the CPU ran at different speeds for the in-memory and tiered runs."""
    C, notes = result["contenders"], result["notes"]
    mem, tie = C.get("memory", {}), C.get("tiered", {})
    for n, d in result["logits_max_abs_diff_vs_memory"].items():
        if d > 1e-3:
            notes.append(f"{n}: first-forward logits differ from the in-memory model's by {d:.3g}")
    pm, pt = mem.get("cpu_probe_gflops"), tie.get("cpu_probe_gflops")
    if pm and pt and (max(pm) / max(pt) > 1.25 or max(pt) / max(pm) > 1.25):
        notes.append(f"the CPU ran at different speeds for the in-memory and tiered runs (matmul probe "
                     f"{max(pm):.0f} vs {max(pt):.0f} GFLOPS): the prompt ratio (compute-bound) is unreliable")
    ref_tokens = mem.get("tokens") if _ok(mem) else None
    for n, r in C.items():
        if _ok(r) and ref_tokens and r.get("tokens") != ref_tokens:
            notes.append(f"{n}: greedy tokens differ from the in-memory model's")
