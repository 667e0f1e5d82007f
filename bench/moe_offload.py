"""Decoding a mixture-of-experts model with less RAM than the model: expert units vs whole layers
vs Accelerate.

    python bench/moe_offload.py [--json] [--small] [--dir DIR] [--out FILE] [--tokens N]
    python bench/moe_offload.py --device cuda [--gpu-budget BYTES] ...   # on a GPU: tiered rows only

One Mixtral-architecture model (``MixtralConfig``: 16 experts, top-2, GQA attention; seeded,
fp32, embeddings drawn with std 1 so that routing spreads over the experts, see ``_build``) is built and saved as safetensors with transformers' fused expert tensors under ``--dir``,
so every contender starts from the same file. Each contender runs in its own subprocess, cold
(``sync; echo 3 > /proc/sys/vm/drop_caches`` before it), inside a cgroup v1 memory group whose
limit is below the model size (page cache counts toward it); the in-memory reference runs
without a limit and gives the tokens every row must reproduce:

- ``tiered_experts_on``: ``tiered.offload(model)`` with ``[offload] experts = true``: each
  expert its own object, only routed experts read, the next layer's experts read ahead by its
  router, a frequency-aware expert cache; host budget ``--budget`` (<= 1/3 of the model);
- ``tiered_experts_off``: the same with ``experts = false`` (each decoder layer one unit);
- ``accelerate_disk``: Accelerate's ``disk_offload(model, offload_dir)`` (the offload folder is
  prepared once, under the limit, and not timed in the row);
- ``accelerate_disk_st``: Accelerate's disk offload reading the safetensors in place.

The tiered contenders load the model from the safetensors as page-cache views (no anonymous
copy of the weights, so loading fits under the limit too), then ``offload`` writes the store's
objects. Each contender prefills a ``--prompt``-token prompt with a KV cache, then decodes
``--tokens`` steps, each timed, each fed the next token of a fixed random stream (a seeded model's
own greedy output soon repeats one token, and so its routing: ``--greedy`` feeds it anyway); the
argmax of every step must equal the in-memory model's. Storage bytes per step come from
``/proc/self/io``. Reported: decode tokens/s (mean over the steps but the first), bytes read per
decoded token, and for tiered its own counters (expert hits per tier, read-ahead precision).

``--device cuda`` computes on the GPU through the device cache (``[offload] device_cache``, a
GPU tier of ``--gpu-budget`` bytes, default 1/3 of the model) with the host tier of ``--budget``
staging its copies; only the tiered rows run (experts on: routed experts placed in the GPU tier;
off: whole-layer units), against the in-GPU reference. ``--device-cache`` forces that same path
on a CPU (a GPU tier on device "cpu"), which is how the CUDA rows are checked without a GPU.

Goals: tiered experts-on reads <= 1.3x (routed experts + non-resident non-expert weights) per
decoded token; decodes >= 3x faster than experts-off and >= 5x faster than ``disk_offload``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

MiB = 1 << 20
FULL = dict(hidden_size=512, intermediate_size=768, num_hidden_layers=16, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=8000, num_local_experts=16, num_experts_per_tok=2)
SMALL = dict(FULL, hidden_size=256, intermediate_size=384, num_hidden_layers=6, vocab_size=4000)
CONTENDERS = ("tiered_experts_on", "tiered_experts_off", "accelerate_disk", "accelerate_disk_st")
GOAL_BYTES = 1.3
GOAL_VS_OFF = 3.0
GOAL_VS_DISK = 5.0

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


# =========================================================================== child side


def _mixtral_config(spec: dict):
    from transformers import MixtralConfig

    return MixtralConfig(**spec["arch"], max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _device(spec: dict):
    import torch

    return torch.device(spec.get("device", "cpu"))


def _to_device(model, spec: dict):
    """Buffers (rotary tables) onto the compute device; tiered places the parameters there."""
    dev = _device(spec)
    for m in model.modules():
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(dev)
    return model


def _build(spec: dict) -> dict:
    """Seeded model, saved as config + one safetensors file with the fused expert tensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(_mixtral_config(spec)).eval()
    with torch.no_grad():
        # a randomly initialized residual stream soon drifts along one direction, which then routes
        # almost every token of a layer to the same two experts (a gift to any expert cache);
        # embeddings of std 1 keep each token in charge of its routing, spread over the experts as
        # a trained, load-balanced router spreads them
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    os.makedirs(spec["model_dir"], exist_ok=True)
    model.config.save_pretrained(spec["model_dir"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(spec["model_dir"], "model.safetensors"), metadata={"format": "pt"})
    os.sync()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    return {"param_bytes": nbytes, "expert_bytes": experts, **_decode(model.to(_device(spec)), spec, None)}


def _page_cache_model(spec: dict):
    """The model on the meta device, each parameter then a view of the mmap'ed safetensors (page
    cache, no anonymous copy)."""
    import mmap

    import torch
    from transformers import MixtralForCausalLM

    from tiered.pretrained import checkpoint_index, init_empty_weights

    with init_empty_weights():
        model = MixtralForCausalLM(_mixtral_config(spec))
    model.eval()
    index = checkpoint_index(spec["model_dir"])
    maps = {}
    modules = dict(model.named_modules())
    for name, loc in index.items():
        if loc.path not in maps:
            with open(loc.path, "rb") as f:
                maps[loc.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(maps[loc.path], dtype=torch.uint8, offset=loc.offset, count=loc.nbytes)
        owner, _, attr = name.rpartition(".")
        modules[owner]._parameters[attr] = torch.nn.Parameter(raw.view(loc.dtype).view(loc.shape),
                                                              requires_grad=False)
    return model


def _load_tiered(spec: dict, experts: bool):
    import tiered

    model = _page_cache_model(spec)
    store = os.path.join(spec["work_dir"], f"store-{experts}")
    cfg = {"tiers": {"host": {"capacity": spec["budget"]}, "nvme": {"path": store, "capacity": 4 << 30}},
           "offload": {"experts": experts}}
    if spec.get("gpu_budget"):  # through the device cache: a GPU tier (on "cpu" when forced on a CPU)
        cfg["tiers"]["gpu"] = {"kind": "device", "device": str(_device(spec)), "capacity": spec["gpu_budget"]}
        cfg["offload"]["device_cache"] = True
    tiered.offload(_to_device(model, spec), cfg, device=_device(spec))
    return model


def _accelerate_meta_model(spec: dict):
    from accelerate import init_empty_weights
    from transformers import MixtralForCausalLM

    with init_empty_weights():
        model = MixtralForCausalLM(_mixtral_config(spec))
    return model.eval()


def _load_accelerate_disk(spec: dict):
    from accelerate import disk_offload

    model = _accelerate_meta_model(spec)
    disk_offload(model, os.path.join(spec["work_dir"], "accelerate-offload"), execution_device="cpu")
    return model


def _load_accelerate_disk_st(spec: dict):
    from accelerate import dispatch_model

    from tiered.pretrained import checkpoint_index

    model = _accelerate_meta_model(spec)
    index = {name: {"safetensors_file": loc.path, "weight_name": name, "dtype": str(loc.dtype).split(".")[-1]}
             for name, loc in checkpoint_index(spec["model_dir"]).items()}
    dispatch_model(model, device_map={"": "disk"}, main_device="cpu", offload_index=index)
    return model


def _accelerate_prep(spec: dict) -> dict:
    """Accelerate's offload folder, streamed tensor by tensor from the safetensors."""
    import shutil

    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    out = os.path.join(spec["work_dir"], "accelerate-offload")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    index: dict = {}
    t0 = time.perf_counter()
    with safe_open(os.path.join(spec["model_dir"], "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            offload_weight(f.get_tensor(name), name, out, index=index)
    save_offload_index(index, out)
    os.sync()
    return {"prep_s": time.perf_counter() - t0, "tensors": len(index)}


def _decode(model, spec: dict, snapshot) -> dict:
    """Prefill the prompt with a KV cache, then decode steps, each timed. Each step's input is the
    next token of a fixed random stream (``--greedy``: the previous step's argmax): a seeded model's
    greedy output soon repeats one token, whose routing then repeats too, which would make any
    expert cache look perfect. Every step's argmax is what must match the reference."""
    import torch

    gen = torch.Generator().manual_seed(7)
    vocab = spec["arch"]["vocab_size"]
    ids = torch.randint(3, vocab, (1, spec["prompt"]), generator=gen).to(_device(spec))
    stream = torch.randint(3, vocab, (spec["tokens"], 1, 1), generator=gen).to(_device(spec))
    with torch.inference_mode():
        t0, r0 = time.perf_counter(), _read_bytes()
        out = model(input_ids=ids, use_cache=True)
        prefill_s, prefill_read = time.perf_counter() - t0, _read_bytes() - r0
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        tokens, steps, reads = [int(nxt)], [], []
        before = snapshot() if snapshot else None
        for i in range(spec["tokens"]):
            t0, r0 = time.perf_counter(), _read_bytes()
            step_in = nxt if spec.get("greedy") else stream[i]
            out = model(input_ids=step_in, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            cache = out.past_key_values
            del out
            steps.append(time.perf_counter() - t0)
            reads.append(_read_bytes() - r0)
            tokens.append(int(nxt))
            if snapshot:
                log(f"  token {i + 1}/{spec['tokens']}: {steps[-1]:.3f} s, read {reads[-1] / MiB:.1f} MiB")
        after = snapshot() if snapshot else None
    timed = steps[1:] or steps
    return {"tokens": tokens, "prefill_s": prefill_s, "prefill_read_bytes": prefill_read, "token_steps_s": steps,
            "token_read_bytes": reads, "token_s": statistics.fmean(timed), "tok_per_s": 1.0 / statistics.fmean(timed),
            "read_bytes_per_token": statistics.fmean(reads[1:] or reads),
            "stats_before_decode": before, "stats_after_decode": after}


def _tiered_snapshot(model):
    import tiered

    def snap() -> dict:
        s = tiered.offload_stats(model)
        s["bytes_read_total"] = sum(s["bytes_read"].values())
        return s
    return snap


def _tiered_layout(model) -> dict:
    """What tiered keeps resident and streams (for the bytes-per-token bound)."""
    rt = model._tiered
    streamed = sum(u.nbytes for u in rt.units if not (u.resident or u.host_resident))
    out = {"units": len(rt.units), "streamed_unit_bytes": streamed,
           "resident_unit_bytes": sum(u.nbytes for u in rt.units if u.resident or u.host_resident)}
    if rt.banks:
        b = rt.banks[0]
        out.update(banks=len(rt.banks), expert_object_bytes=b.nbytes, experts_per_bank=b.num,
                   expert_capacity_bytes=rt._expert_capacity, expert_prefetch_room_bytes=rt._expert_prefetch_room)
    return out


def run_contender(name: str, spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(spec["threads"])
    res: dict = {"contender": name, "torch_threads": torch.get_num_threads()}
    try:
        if name == "build":
            res.update(_build(spec))
        elif name == "accelerate_prep":
            res.update(_accelerate_prep(spec))
        else:
            t0, r0 = time.perf_counter(), _read_bytes()
            if name.startswith("tiered"):
                model = _load_tiered(spec, name == "tiered_experts_on")
            else:
                model = {"accelerate_disk": _load_accelerate_disk,
                         "accelerate_disk_st": _load_accelerate_disk_st}[name](spec)
            res.update(load_s=time.perf_counter() - t0, load_read_bytes=_read_bytes() - r0)
            log(f"{name}: loaded in {res['load_s']:.1f} s")
            snapshot = _tiered_snapshot(model) if name.startswith("tiered") else None
            if snapshot:
                res["layout"] = _tiered_layout(model)
            res.update(_decode(model, spec, snapshot or (lambda: None)))
            if snapshot:  # not detach(): it would materialize the whole model, which does not fit
                rt = model._tiered
                rt.remove_hooks()
                rt.release_all()
                rt.store.close()
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the result
        import traceback

        traceback.print_exc()
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0 if res["ok"] else 1


# =========================================================================== parent side


def _run_child(name: str, spec: dict, limit: int | None, timeout: float) -> dict:
    from bench._cgroup import MemoryCgroup, drop_caches

    out = os.path.join(spec["work_dir"], f"result-{name}.json")
    if os.path.exists(out):
        os.unlink(out)
    spec_path = os.path.join(spec["work_dir"], f"spec-{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--spec", spec_path, "--out", out]
    dropped = drop_caches()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    usage = None
    log(f"{name}: " + (f"memory limit {limit / MiB:.0f} MiB" if limit else "no memory limit")
        + (", caches dropped" if dropped is None else f", caches NOT dropped ({dropped})"))
    if limit:
        with MemoryCgroup(f"tiered-moe-{name}", limit) as cg:
            proc = cg.run(cmd, env=env, stdout=sys.stderr, timeout=timeout)
            usage = cg.usage()
    else:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, timeout=timeout)
    try:
        with open(out) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"contender": name, "ok": False, "error": f"exited with {proc.returncode} and no result"
               + (" (killed: out of memory under the limit?)" if proc.returncode in (-9, 137) else "")}
    res.update(wall_s=time.perf_counter() - t0, returncode=proc.returncode, memory_limit_bytes=limit,
               caches_dropped=dropped is None, cgroup=usage)
    if not res.get("ok"):
        log(f"{name}: FAILED: {res.get('error')}")
    return res


def _uptime() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def _expert_summary(row: dict) -> dict | None:
    """Expert counters of the decode steps (after minus before)."""
    a, b = row.get("stats_before_decode"), row.get("stats_after_decode")
    if not a or not b or "experts" not in b:
        return None
    ea, eb = a["experts"], b["experts"]
    hits = {k: eb["hits"][k] - ea["hits"][k] for k in eb["hits"]}
    routed = eb["routed"] - ea["routed"]
    pred = eb["prediction"]["predicted"] - ea["prediction"]["predicted"]
    correct = eb["prediction"]["correct"] - ea["prediction"]["correct"]
    missing = routed - hits.get("compute", hits.get("gpu", 0))
    return {"routed": routed, "hits": hits, "evictions": eb["evictions"] - ea["evictions"],
            "hit_rate_compute_or_prefetched": round((routed - missing + hits["prefetched"]) / routed, 4),
            "prefetch_hit_rate_of_loads": round(hits["prefetched"] / missing, 4) if missing else None,
            "prediction_precision": round(correct / pred, 4) if pred else None,
            "prediction_recall": round(correct / routed, 4) if routed else None}


def _summarize(rows: dict, ref: dict, spec: dict) -> dict:
    on, off = rows.get("tiered_experts_on", {}), rows.get("tiered_experts_off", {})
    disk = rows.get("accelerate_disk", {})
    out: dict = {"identical_tokens": {n: r.get("tokens") == ref["tokens"] for n, r in rows.items()}}
    if on.get("ok"):
        lay = on["layout"]
        k, layers = spec["arch"]["num_experts_per_tok"], spec["arch"]["num_hidden_layers"]
        bound = k * layers * lay["expert_object_bytes"] + lay["streamed_unit_bytes"]
        out["bytes_bound_per_token"] = bound
        out["bytes_ratio_to_bound"] = round(on["read_bytes_per_token"] / bound, 3)
        out["experts"] = _expert_summary(on)
    if on.get("ok") and off.get("ok"):
        out["speedup_vs_experts_off"] = round(on["tok_per_s"] / off["tok_per_s"], 2)
    if on.get("ok") and disk.get("ok"):
        out["speedup_vs_accelerate_disk"] = round(on["tok_per_s"] / disk["tok_per_s"], 2)
    if on.get("ok") and rows.get("accelerate_disk_st", {}).get("ok"):
        out["speedup_vs_accelerate_disk_st"] = round(on["tok_per_s"] / rows["accelerate_disk_st"]["tok_per_s"], 2)
    out["goals"] = {
        "bytes_per_token_le_1.3x_bound": out.get("bytes_ratio_to_bound", 99) <= GOAL_BYTES,
        "tok_s_ge_3x_experts_off": out.get("speedup_vs_experts_off", 0) >= GOAL_VS_OFF,
        "tok_s_ge_5x_accelerate_disk": out.get("speedup_vs_accelerate_disk", 0) >= GOAL_VS_DISK,
        "identical_tokens": all(out["identical_tokens"].values()),
    }
    return out


def _table(result: dict) -> str:
    lines = ["| contender | decode tok/s | bytes read / token | load s | peak group charge | tokens = reference |",
             "|---|---|---|---|---|---|"]
    for name, r in result["contenders"].items():
        if not r.get("ok"):
            lines.append(f"| {name} | failed: {r.get('error')} | | | | |")
            continue
        cg = (r.get("cgroup") or {}).get("max_usage_bytes")
        charge = f"{cg / MiB:.0f} MiB" if cg else "n/a"
        lines.append(f"| {name} | {r['tok_per_s']:.2f} | {r['read_bytes_per_token'] / MiB:.1f} MiB | "
                     f"{r['load_s']:.1f} | {charge} | {result['summary']['identical_tokens'][name]} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(_ROOT, ".benchdir", "moe"))
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "moe_offload_2026-12-07.json"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--budget", type=int, default=None,
                    help="tiered host budget, bytes (default model/3.2; model/2.5 through the device cache)")
    ap.add_argument("--limit", type=int, default=None,
                    help="memory limit, bytes (default budget + 620 MiB: the interpreter, torch and transformers; "
                         "+ 2.5 GiB on cuda)")
    ap.add_argument("--only", default=None, help="comma-separated contenders")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of every contender (on a shared 2-core machine OpenMP "
                         "workers spinning against other processes make small matmuls 100x slower)")
    ap.add_argument("--greedy", action="store_true", help="feed each step its own argmax (see _decode)")
    ap.add_argument("--device", default="cpu", help="compute device: cpu, or cuda (tiered rows, device cache)")
    ap.add_argument("--gpu-budget", type=int, default=None, help="GPU tier bytes (default model/3 on cuda)")
    ap.add_argument("--device-cache", action="store_true",
                    help="on a CPU: the device-cache path CUDA takes (a GPU tier on device \"cpu\")")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--contender")
    ap.add_argument("--spec")
    args = ap.parse_args()
    if args.contender:
        return run_contender(args.contender, args.spec, args.out)

    from bench._cgroup import cgroup_v1_unavailable

    arch = SMALL if args.small else FULL
    work = os.path.abspath(args.dir)
    os.makedirs(work, exist_ok=True)
    spec = {"arch": arch, "work_dir": work, "model_dir": os.path.join(work, "model"), "tokens": args.tokens,
            "prompt": args.prompt, "threads": args.threads, "greedy": args.greedy, "device": args.device}
    load = {"start": _uptime()}
    build = _run_child("build", dict(spec, budget=0), None, args.timeout)
    if not build.get("ok"):
        raise SystemExit(f"build failed: {build.get('error')}")
    model_bytes = build["param_bytes"]
    through_cache = args.device != "cpu" or args.device_cache
    # through the device cache the host tier stages copies: whole-layer units need two of them
    budget = args.budget or int(model_bytes / (2.5 if through_cache else 3.2)) // MiB * MiB
    limit = args.limit or budget + (620 if args.device == "cpu" else 2560) * MiB  # + the CUDA runtime
    why = cgroup_v1_unavailable()
    gpu_budget = (args.gpu_budget or int(model_bytes / 3) // MiB * MiB) if through_cache else None
    spec.update(budget=budget, gpu_budget=gpu_budget)
    log(f"model {model_bytes / MiB:.0f} MiB ({build['expert_bytes'] / MiB:.0f} MiB experts), budget "
        f"{budget / MiB:.0f} MiB, limit {limit / MiB:.0f} MiB" + (f"; NO LIMIT: {why}" if why else ""))
    limit = None if why else limit
    names = args.only.split(",") if args.only else list(CONTENDERS)
    if through_cache:  # Accelerate's disk offload computes on the CPU here: tiered rows only
        names = [n for n in names if n.startswith("tiered")]
    prep = _run_child("accelerate_prep", spec, limit, args.timeout) if any(
        n.startswith("accelerate") for n in names) else None
    rows = {}
    for name in names:
        load[name] = _uptime()
        rows[name] = _run_child(name, spec, limit, args.timeout)
        if rows[name].get("returncode") == -9:  # the OOM killer, near the limit on a busy machine: once more
            first = rows[name]
            rows[name] = _run_child(name, spec, limit, args.timeout)
            rows[name]["first_attempt"] = {k: first.get(k) for k in ("error", "returncode", "cgroup", "wall_s")}
        if rows[name].get("ok"):
            r = rows[name]
            log(f"{name}: {r['tok_per_s']:.2f} tok/s, {r['read_bytes_per_token'] / MiB:.1f} MiB/token")
    load["end"] = _uptime()
    result = {
        "benchmark": "moe_offload", "date": "2026-12-07",
        "model": {"architecture": "MixtralForCausalLM", "config": arch, "dtype": "float32",
                  "param_bytes": model_bytes, "expert_bytes": build["expert_bytes"]},
        "conditions": {"tiered_budget_bytes": budget, "memory_limit_bytes": limit, "device": args.device,
                       "device_cache": through_cache, "gpu_tier_bytes": gpu_budget,
                       "memory_limit_mechanism": "cgroup v1 memory.limit_in_bytes (page cache counts)" if limit else why,
                       "model_over_budget": round(model_bytes / budget, 2), "caches_dropped_before_each": True,
                       "prompt_tokens": args.prompt, "decoded_tokens": args.tokens, "batch": 1,
                       "step_inputs": "own argmax (greedy)" if args.greedy else "fixed random token stream",
                       "torch_threads": build.get("torch_threads"), "loadavg": load, "cpus": os.cpu_count()},
        "reference_tokens": build["tokens"], "reference_tok_per_s_in_memory": build["tok_per_s"],
        "accelerate_prep": prep, "contenders": rows,
    }
    result["summary"] = _summarize(rows, build, spec)
    result["table"] = _table(result)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {args.out}")
    print(json.dumps(result["summary"], indent=1) if args.json else result["table"] + "\n"
          + json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
