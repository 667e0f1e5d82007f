"""GPU measurements for the CUDA paths (run by bench/gpu_check.sh on a CUDA machine).

1. Host->device bandwidth from the pinned arena vs torch ``pin_memory()`` vs pageable memory.
2. Pinned bytes for 1,000 mixed-size buffers: the arena (exact sizes) vs torch's caching host allocator.
3. Storage->device read bandwidth: kvikio into device memory vs the threads backend
   (O_DIRECT into the pinned arena) + host->device copy. Cold: caches dropped, O_DIRECT.
4. Offloaded inference: a Llama model larger than the GPU budget, tokens/s vs the in-GPU
   model, Accelerate ``cpu_offload``, and the I/O bound.
5. The device cache: objects cycled through a device budget smaller than their total, via
   DeviceCache (one pre-reserved region) vs ``store.get(tier="gpu")`` (torch's allocator):
   GB/s host->device and how many cudaMalloc calls each makes.

Prints a table and writes one JSON object (``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from io_engine import available_backends  # noqa: E402
from io_engine.bench.gpu import drop_caches, h2d_bandwidth, pinned_peak, storage_to_device  # noqa: E402

GB = 1e9


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def offload_inference(workdir: str, layers: int, budget: int, tokens: int) -> dict:
    import transformers

    import tiered

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                   max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 32000, (1, 128), device="cuda")
    mask = torch.ones_like(ids)
    out = {"model_bytes": nbytes, "gpu_budget": budget, "prompt_tokens": 128, "new_tokens": tokens}

    def run(m) -> tuple[float, float, torch.Tensor]:
        with torch.no_grad():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(ids, attention_mask=mask)
            torch.cuda.synchronize()
            t_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen = m.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False)
            torch.cuda.synchronize()
            t_gen = time.perf_counter() - t0
        return t_fwd, (t_gen - t_fwd) / max(tokens - 1, 1), gen

    run(model)  # warm-up (kernels, allocator)
    out["in_gpu_forward_s"], out["in_gpu_token_s"], want = run(model)
    log(f"in-GPU: forward {out['in_gpu_forward_s']:.3f} s, {out['in_gpu_token_s'] * 1e3:.1f} ms/token")
    cpu_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    roomy = budget + (64 << 20)  # room on the GPU for the running layer and the next beside the residents
    rows = (("tiered", budget, 3 * budget, True), ("tiered_hostram", budget, nbytes + 4 * budget, True),
            ("tiered_nodc", budget, 3 * budget, False), ("tiered_hostram_nodc", budget, nbytes + 4 * budget, False),
            ("tiered_hostram_roomy", roomy, nbytes + 4 * roomy, True),
            ("tiered_hostram_roomy_nodc", roomy, nbytes + 4 * roomy, False))
    out["roomy_gpu_budget"] = roomy
    for label, gpu, host, dcache in rows:
        # "tiered": weights stream from the storage tier (host budget 3x the GPU's);
        # "tiered_hostram": the host tier holds the whole model, as Accelerate cpu_offload's RAM does;
        # "_nodc": the same without the device cache (per-tensor allocations filled when a unit starts)
        conf = {"tiers": {"gpu": {"capacity": gpu}, "host": {"capacity": host},
                          "nvme": {"path": os.path.join(workdir, "nvme"), "capacity": "64GiB"}},
                "engine": {"workers": 8, "chunk": "8MiB"}, "offload": {"resident": True, "device_cache": dcache}}
        t0 = time.perf_counter()
        tiered.offload(model, conf)
        out[f"{label}_setup_s"] = time.perf_counter() - t0
        drop_caches()
        fwd, tok, got = run(model)
        fwd, tok, got = run(model)
        st = tiered.offload_stats(model)
        out.update({f"{label}_forward_s": fwd, f"{label}_token_s": tok, f"{label}_stats": st,
                    f"{label}_tokens_identical": bool(torch.equal(got, want))})
        if label == "tiered":
            out["bytes_read_per_forward"] = nbytes - st["resident_bytes"] - st["host_resident_bytes"]
        log(f"{label}: forward {fwd:.3f} s, {tok * 1e3:.1f} ms/token, stats {st}")
        tiered.detach(model)
    del model
    torch.cuda.empty_cache()
    out.update(accelerate_rows(cfg, cpu_state, workdir, run, want))
    return out


def accelerate_rows(cfg, cpu_state: dict, workdir: str, run, want, device: str = "cuda") -> dict:
    """Accelerate ``cpu_offload`` (weights in RAM) and ``disk_offload`` (weights memory-mapped from
    ``offload_dir``), each on a fresh copy of the same weights, executing on the GPU. disk_offload
    runs cold (page cache dropped before every forward; the drop's own time is subtracted) and warm."""
    out: dict = {}
    try:
        import accelerate
        import transformers

        def fresh():
            with accelerate.init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
                m = transformers.LlamaForCausalLM(cfg).eval()
            m.load_state_dict(cpu_state, assign=True)
            return m

        m = fresh()
        accelerate.cpu_offload(m, execution_device=torch.device(device))
        fwd, tok, got = run(m)
        out.update({"accelerate_cpu_offload_forward_s": fwd, "accelerate_cpu_offload_token_s": tok,
                    "accelerate_cpu_offload_tokens_identical": bool(torch.equal(got, want))})
        log(f"accelerate cpu_offload: forward {fwd:.3f} s, {tok * 1e3:.1f} ms/token")
        del m
        offload_dir = os.path.join(workdir, "accelerate-offload")
        m = fresh()
        t0 = time.perf_counter()
        accelerate.disk_offload(m, offload_dir, execution_device=torch.device(device))
        out["accelerate_disk_offload_setup_s"] = time.perf_counter() - t0
        dropped = {"s": 0.0, "n": 0, "ok": True}

        def drop(_m, _a):
            t = time.perf_counter()
            dropped["ok"] &= drop_caches()
            dropped["s"] += time.perf_counter() - t
            dropped["n"] += 1

        hook = m.register_forward_pre_hook(drop)
        drop_caches()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.no_grad():  # forward alone, then generate: the drop time of each is known
            sync()
            t0 = time.perf_counter()
            m(want[:, :128])
            sync()
            fwd = time.perf_counter() - t0 - dropped["s"]
            n0, s0 = dropped["n"], dropped["s"]
            t0 = time.perf_counter()
            gen = m.generate(want[:, :128], attention_mask=torch.ones_like(want[:, :128]),
                             max_new_tokens=want.shape[1] - 128, do_sample=False)
            sync()
            t_gen = time.perf_counter() - t0 - (dropped["s"] - s0)
        hook.remove()
        tokens = want.shape[1] - 128
        out.update({"accelerate_disk_offload_cold_forward_s": fwd,
                    "accelerate_disk_offload_cold_token_s": (t_gen - fwd) / max(tokens - 1, 1),
                    "accelerate_disk_offload_cold_drops": dropped["n"],
                    "accelerate_disk_offload_cold_drop_ok": dropped["ok"],
                    "accelerate_disk_offload_cold_tokens_identical": bool(torch.equal(gen, want))})
        log(f"accelerate disk_offload cold: forward {fwd:.3f} s, "
            f"{out['accelerate_disk_offload_cold_token_s'] * 1e3:.1f} ms/token (drops {dropped})")
        fwd, tok, got = run(m)  # warm: whatever the page cache holds after the cold run
        out.update({"accelerate_disk_offload_warm_forward_s": fwd, "accelerate_disk_offload_warm_token_s": tok,
                    "accelerate_disk_offload_warm_tokens_identical": bool(torch.equal(got, want))})
        log(f"accelerate disk_offload warm: forward {fwd:.3f} s, {tok * 1e3:.1f} ms/token")
        del m
        shutil.rmtree(offload_dir, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - reported in the output, the other rows still count
        import traceback

        traceback.print_exc()
        out["accelerate_error"] = repr(e)
    return out


def device_cache(work: str, objects: int = 48, mib: int = 16, budget_mib: int = 256, rounds: int = 3) -> dict:
    """Cycle ``objects`` host-resident objects through a smaller device budget, twice over."""
    from tiered import TieredStore
    from tiered.device_cache import DeviceCache

    cfg = {"tiers": {"gpu": {"kind": "device", "device": "cuda:0", "capacity": f"{budget_mib}MiB"},
                     "host": {"capacity": f"{objects * mib + 256}MiB"},
                     "nvme": {"path": os.path.join(work, "dc"), "capacity": f"{objects * mib + 256}MiB"}}}
    keys = [f"o{i}" for i in range(objects)]
    out: dict = {"objects": objects, "object_mib": mib, "device_budget_mib": budget_mib, "rounds": rounds}
    with TieredStore(cfg) as store:
        for i, k in enumerate(keys):
            store.put(k, torch.full((mib << 18,), float(i))).result(60)
        total = rounds * objects * (mib << 20)

        def cycle_cache(cache) -> None:
            for _ in range(rounds):
                for k in keys:
                    with cache.acquire(k).result(60) as lease:
                        lease.tensor.add_(0)  # a kernel reads it on the compute stream

        def cycle_get() -> None:
            held = []
            for _ in range(rounds):
                for k in keys:
                    held.append(store.get(k, tier="gpu").result(60))
                    held[-1].add_(0)  # the same kernel as the cache loop runs
                    if len(held) * mib > budget_mib:
                        held.pop(0)
        for name, run in (("device_cache", None), ("store_get_gpu", cycle_get)):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_stats().get("num_device_alloc", 0)
            t0 = time.perf_counter()
            if run is None:
                with DeviceCache(store, owner="tools") as cache:  # the store's GPU tier, budget_mib
                    t0 = time.perf_counter()
                    cycle_cache(cache)
                    torch.cuda.synchronize()
                    out["device_cache_hits"] = cache.stats.hits
                    out["device_cache_evictions"] = cache.stats.evictions
            else:
                run()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            out[f"{name}_gbps"] = total / dt / GB
            out[f"{name}_cuda_mallocs"] = torch.cuda.memory_stats().get("num_device_alloc", 0) - before
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--dir", default=None, help="scratch directory on the local disk")
    ap.add_argument("--file-gib", type=float, default=4.0)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--budget-mib", type=int, default=640)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma list of: h2d,pinned,storage,offload,device_cache")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = args.dir or tempfile.mkdtemp(prefix="tiered-gpu-check-")
    os.makedirs(work, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "backends": available_backends()}
    steps = [("h2d", lambda: h2d_bandwidth(256 << 20)), ("pinned", pinned_peak),
             ("storage", lambda: storage_to_device(os.path.join(work, "s2d.bin"), int(args.file_gib * (1 << 30)))),
             ("offload", lambda: offload_inference(work, args.layers, args.budget_mib << 20, args.tokens)),
             ("device_cache", lambda: device_cache(work))]
    for name, fn in steps:
        if name in skip:
            continue
        log(f"{name} ...")
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others' numbers
            import traceback

            traceback.print_exc()
            res[name] = {"error": repr(e)}
        log(f"{name}: {json.dumps(res[name], default=str)}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    s2d, off = res.get("storage", {}), res.get("offload", {})
    bw = s2d.get("threads_pinned_bounce_gbps")
    if bw and "bytes_read_per_forward" in off:
        bound = off["bytes_read_per_forward"] / (bw * GB)
        off["io_bound_s"] = bound
        off["tiered_token_vs_bound"] = off["tiered_token_s"] / max(bound, off["in_gpu_token_s"])
        off["tiered_forward_vs_bound"] = off["tiered_forward_s"] / max(bound, off["in_gpu_forward_s"])
        if "accelerate_cpu_offload_token_s" in off and "tiered_hostram_token_s" in off:
            off["accelerate_cpu_over_tiered_hostram_token"] = (
                off["accelerate_cpu_offload_token_s"] / off["tiered_hostram_token_s"])
        if "accelerate_disk_offload_cold_token_s" in off and "tiered_token_s" in off:
            off["accelerate_disk_cold_over_tiered_token"] = (
                off["accelerate_disk_offload_cold_token_s"] / off["tiered_token_s"])
        if "tiered_nodc_token_s" in off:
            off["tiered_nodc_token_vs_bound"] = off["tiered_nodc_token_s"] / max(bound, off["in_gpu_token_s"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
