"""``bench/finetune.py --device cuda`` (or ``--device-cache`` on a CPU): sizes the budgets, measures
the bandwidths, runs the contenders of :mod:`bench._finetune_gpu` interleaved over rounds, and
reports per contender the training step, TFLOPS, I/O bound and peak memory."""

from __future__ import annotations

import json
import os
import re
import statistics
import time

from bench._finetune_common import GB, MiB, _ROOT, build_model, child, deepspeed_unavailable, log
from bench._finetune_io import fio_bandwidth
from bench._finetune_gpu import largest_unit, optimizer_host_bytes
from tiered.io_engine.bench.bare import engine_bandwidth

ORDER = ("gpu_deepspeed", "gpu_tiered", "gpu_torch")
LABEL = {"gpu_tiered": "tiered", "gpu_torch": "torch", "gpu_deepspeed": "deepspeed"}


def weight_bytes(spec: dict, layers: int | None = None) -> tuple[int, int]:
    """(parameters, bytes of the weights in ``spec['dtype']``) of the model with ``layers`` layers."""
    import torch

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(dict(spec, layers=layers or spec["layers"])).parameters())
    return n, n * (2 if spec["dtype"] == "bf16" else 4)


def size_budgets(spec: dict, gpu_mib: int | None, host_mib: int | None) -> None:
    """The GPU tier (default a quarter of the weights) and the host tier (default half of them);
    the model must be at least 4x the first and 2x the second."""
    import torch

    _n, w = weight_bytes(spec)
    spec["gpu_mib"] = gpu_mib or max(1, w // 4 // MiB)
    spec["host_mib"] = host_mib or max(1, w // 2 // MiB)
    if w < 4 * spec["gpu_mib"] * MiB or w < 2 * spec["host_mib"] * MiB:
        raise SystemExit(f"bench/finetune.py: the weights ({w / MiB:.0f} MiB) must be at least 4x --gpu-budget "
                         f"({spec['gpu_mib']} MiB) and 2x --host ({spec['host_mib']} MiB): more --layers or "
                         "smaller budgets")
    with torch.device("meta"):
        model = build_model(spec)
    spec["optim_host_bytes"] = optimizer_host_bytes(model, spec["opt_lookahead"])
    staging = 2 * largest_unit(model) * (2 if spec["dtype"] == "bf16" else 4)  # a unit read, one copied up
    if spec["optim_host_bytes"] + staging > spec["host_mib"] * MiB:
        raise SystemExit(f"bench/finetune.py: the optimizer's pipeline ({spec['opt_lookahead']} + 3 state chunks "
                         f"of the largest unit, {spec['optim_host_bytes'] / MiB:.0f} MiB) and two copies of that "
                         f"unit ({staging / MiB:.0f} MiB) do not fit in the host tier ({spec['host_mib']} MiB): "
                         "more, smaller layers (a unit's chunk is 12 bytes per parameter), a smaller --vocab, "
                         "--lookahead or --dtype fp32")


def ref_layers(spec: dict, dev: str) -> int:
    """Layers of the torch contender: the model's own where weights, gradients and both moments
    (4 copies in the weights' dtype) take at most half of the device's memory, else fewer."""
    if dev != "cuda":
        return spec["layers"]
    import torch

    room = torch.cuda.get_device_properties(0).total_memory // 2
    for layers in range(spec["layers"], 0, -1):
        if 4 * weight_bytes(spec, layers)[1] <= room:
            return layers
    raise SystemExit("bench/finetune.py: not even one layer of the model fits in half of the GPU's memory "
                     "for torch; pass --ref-layers or a smaller --hidden/--vocab")


def copy_bandwidth(dev: str) -> dict:
    """Host->device and device->host GB/s: 256 MiB from/to pinned memory on CUDA; on a CPU (the
    'gpu' tier on device "cpu") a 64 MiB memory copy each way."""
    import torch

    if dev == "cuda":
        from tiered.io_engine.bench.gpu import cuda_time

        n = 256 * MiB
        d, h = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.ones(n, dtype=torch.uint8).pin_memory()
        return {"h2d_gbps": n / cuda_time(lambda: d.copy_(h, non_blocking=True)) / GB,
                "d2h_gbps": n / cuda_time(lambda: h.copy_(d, non_blocking=True)) / GB, "bytes": n}
    n = 64 * MiB
    a, b = torch.ones(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(5))
    return {"h2d_gbps": n / best / GB, "d2h_gbps": n / best / GB, "bytes": n}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gpu_name(dev: str) -> str:
    import torch

    if dev != "cuda":
        return "cpu_device_cache"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")


def main_gpu(args, spec: dict) -> int:
    import torch

    dev = "cuda" if args.device == "cuda" else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench/finetune.py --device cuda: no CUDA device (torch {torch.__version__}); "
                         "--device-cache runs the same tiered path on the CPU")
    spec.update(device=dev, dtype=args.dtype, opt_lookahead=args.lookahead or 1,
                threads=args.threads or (min(16, os.cpu_count() or 1) if dev == "cuda" else 1))
    size_budgets(spec, args.gpu_budget, args.host)
    spec["ref_layers"] = args.ref_layers or ref_layers(spec, dev)
    params, wbytes = weight_bytes(spec)
    log(f"{params / 1e6:.1f}M parameters, {wbytes / MiB:.0f} MiB of {spec['dtype']} weights; GPU tier "
        f"{spec['gpu_mib']} MiB on {dev}, host tier {spec['host_mib']} MiB; torch with {spec['ref_layers']} layers")
    only = [f"gpu_{n}" for n in args.only.split(",")]
    result = {"spec": spec, "device": gpu_name(dev), "weights_bytes": wbytes,
              "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    io_bytes = args.io_mib * MiB
    result["fio"] = fio_bandwidth(args.dir, io_bytes)
    result["engine_io"] = engine_bandwidth(args.dir, io_bytes, spec["workers"])
    result["copy"] = copy_bandwidth(dev)
    log(f"engine {result['engine_io']}, copies {result['copy']}")
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):  # interleaved: load from other jobs hits every contender alike
        log(f"round {rnd + 1}/{args.rounds}")
        for name in (n for n in ORDER if n in only):
            why = deepspeed_unavailable() if name == "gpu_deepspeed" else None
            runs.setdefault(name, []).append({"error": why} if why else child(name, spec, args.timeout))
    result["contenders"] = {LABEL[n]: pool(rs) for n, rs in runs.items()}
    result["fio_end"] = fio_bandwidth(args.dir, io_bytes)
    result["engine_io_end"] = engine_bandwidth(args.dir, io_bytes, spec["workers"])
    result["machine"]["loadavg_end"] = os.getloadavg()
    summarize(result)
    path = args.out or os.path.join(_ROOT, "bench", "results", f"finetune_cuda_{result['device']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"saved {path}")
    print(json.dumps(result) if args.json else table(result))
    return 0


def pool(rs: list[dict]) -> dict:
    """One contender's rounds: step times pooled (median, min), the rest from the last round."""
    bad = [r for r in rs if "error" in r]
    if bad:
        return {"error": bad[0]["error"]}
    out = dict(rs[-1])
    out["train_step_s"] = [x for r in rs for x in r["train_step_s"]]
    out["train_step_median_s"] = statistics.median(out["train_step_s"])
    out["train_step_min_s"] = min(out["train_step_s"])
    out["rounds"] = len(rs)
    return out


def _best(result: dict, part: str, key: str, ekey: str) -> float | None:
    vals = [result.get(f, {}).get(part, {}).get(key) for f in ("fio", "fio_end")]
    vals += [result.get(e, {}).get(ekey) for e in ("engine_io", "engine_io_end")]
    vals = [v for v in vals if v]
    return max(vals) if vals else None


def summarize(result: dict) -> None:
    """Per contender: TFLOPS (6 * params * tokens / median step) and the I/O bound: storage bytes
    over the best storage bandwidths (serial, or reads and writes at once; the smaller), and
    host<->device bytes over the copy bandwidths (each direction its own), the two links at once."""
    bw = {"read": _best(result, "read", "gbps", "read_gbps"), "write": _best(result, "write", "gbps", "write_gbps"),
          "mixed_read": _best(result, "mixed", "read_gbps", "mixed_read_gbps"),
          "mixed_write": _best(result, "mixed", "write_gbps", "mixed_write_gbps"),
          "h2d": result["copy"]["h2d_gbps"], "d2h": result["copy"]["d2h_gbps"]}
    result["bandwidths_gbps"] = bw
    for c in result["contenders"].values():
        if "error" in c:
            continue
        c["tflops"] = 6 * c["params"] * c["tokens_per_step"] / c["train_step_median_s"] / 1e12
        m = c.get("moved_per_step") or {"read": c["proc_read_per_step"], "written": c["proc_written_per_step"]}
        c["io_bound_s"] = io_bound(m, bw)
    t, r = result["contenders"].get("tiered", {}), result["contenders"].get("torch", {})
    if "tflops" in t and "tflops" in r:
        # torch's step scaled to the full model (its FLOPs per token go with the parameters)
        compute = r["train_step_median_s"] * t["params"] / r["params"]
        t["compute_bound_s"] = compute
        t["vs_bound"] = t["train_step_median_s"] / max(compute, t["io_bound_s"]["bound"])


def io_bound(m: dict, bw: dict) -> dict:
    out = {}
    if bw["read"] and bw["write"]:
        out["storage_serial"] = m["read"] / (bw["read"] * GB) + m["written"] / (bw["write"] * GB)
    if bw["mixed_read"] and bw["mixed_write"]:
        out["storage_concurrent"] = max(m["read"] / (bw["mixed_read"] * GB), m["written"] / (bw["mixed_write"] * GB))
    storage = min(out.values()) if out else 0.0
    link = max(m.get("h2d", 0) / (bw["h2d"] * GB), m.get("d2h", 0) / (bw["d2h"] * GB))
    out["host_device"] = link
    out["bound"] = max(storage, link)
    return out


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / MiB:.0f}"


def table(r: dict) -> str:
    s = r["spec"]
    lines = [f"{r['device']}: {r['weights_bytes'] / MiB:.0f} MiB of {s['dtype']} weights, GPU tier {s['gpu_mib']} MiB, "
             f"host tier {s['host_mib']} MiB, {s['batch']}x{s['seq']} tokens/step; load "
             f"{r['machine']['loadavg_start'][0]:.2f} -> {r['machine']['loadavg_end'][0]:.2f}",
             "bandwidths GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in r["bandwidths_gbps"].items() if v),
             f"{'contender':<10} {'params':>8} {'step s med (min)':>17} {'TFLOPS':>7} {'I/O bound s':>11} "
             f"{'GPU alloc MiB':>13} {'GPU tier MiB':>12} {'host tier MiB':>13} {'RSS MiB':>8}"]
    for name, c in r["contenders"].items():
        if "error" in c:
            lines.append(f"{name:<10} error: {c['error'][:400]}")
            continue
        p = c["peaks"]
        lines.append(f"{name:<10} {c['params'] / 1e6:>7.1f}M "
                     f"{c['train_step_median_s']:>8.3f} ({c['train_step_min_s']:.3f}) "
                     f"{c['tflops']:>7.3f} {c['io_bound_s']['bound']:>11.3f} "
                     f"{_mib(p.get('cuda_max_allocated_bytes')):>13} "
                     f"{_mib(c.get('store_gpu_tier', {}).get('peak')):>12} "
                     f"{_mib(c.get('store_host_tier', {}).get('peak')):>13} {_mib(p['rss_peak_bytes']):>8}")
    if s["ref_layers"] != s["layers"]:
        lines.append(f"torch ran {s['ref_layers']} of the {s['layers']} layers; scaled by parameters, "
                     "its step is the compute bound")
    t = r["contenders"].get("tiered", {})
    if "vs_bound" in t:
        lines.append(f"tiered / max(torch compute scaled to the model {t['compute_bound_s']:.3f} s, "
                     f"I/O bound {t['io_bound_s']['bound']:.3f} s): {t['vs_bound']:.2f}")
    return "\n".join(lines)
