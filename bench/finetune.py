"""Fine-tuning benchmark: AdamW with optimizer state on storage, and zeroth-order steps.

A Llama-style transformer (built from config, fp32) whose optimizer state (fp32
master + 2 moments, 12 bytes per parameter) is larger than the host budget
given to tiered. In one run, each contender in its own process, on the same
model, batch and gradients:

- ``torch``: in-memory ``torch.optim.AdamW`` (``--impl fused`` by default: torch's fused CPU
  kernel, as DeepSpeed uses its fused cpu_adam; ``--impl single`` for torch's CPU default);
- ``deepspeed``: DeepSpeed ZeRO-3 with ``offload_optimizer: {device: nvme}``
  (single process, gloo, CPU accelerator, its async_io and cpu_adam ops);
- ``tiered``: ``tiered.optim.OffloadedAdamW`` with the state in the store and a
  host tier smaller than the state.

- ``tiered_sync``: the same with ``sync=True`` (``step()`` returns only once its step is
  durable; by default the last writes and the commit of a step overlap the next
  forward/backward and are waited for when the next step begins).

The optimizer step is timed (``opt.step()`` / ``engine.step()``), and the whole
train step (forward + backward + step) too; ``--warmup`` steps (3: tiered's data file
reaches its steady layout, step s reusing the extents of step s-3) are not timed. Two
I/O bounds from the bytes tiered moves per train step (its store counters, including
writes that land after ``step()`` returned): *serial*, read bytes over the read
bandwidth plus written bytes over the write bandwidth, and *concurrent*, from runs
that read and write at once (max of bytes over each direction's bandwidth there);
*best* is the smaller. Bandwidths are the best of fio (sequential O_DIRECT, bs=8M
libaio qd=32, writes with fsync; a read job and a write job together for the
concurrent one) and of tiered's bare I/O engine (8 MiB requests into huge-page
buffers, which this virtio disk reads faster than fio's), each measured before and
after the contenders. All storage reads are cold: the store and
DeepSpeed's aio both use O_DIRECT.

Then ZO (MeZO with ZO2's dual forward, ``tiered.optim.ZOSGD``) steps/s with the
weights streamed from storage (host tier smaller than the weights) against
in-memory MeZO (``tiered.optim.zo.mezo_step``) on the same model.

Usage: ``python bench/finetune.py [--json] [--layers N] [--host MiB] ...``;
results go to ``bench/results/finetune_cpu.json``.

On a GPU (``--device cuda``, :mod:`bench._finetune_gpu_run`): a whole training step of a model
computing on the GPU whose weights are at least 4x the store's GPU tier (``--gpu-budget`` MiB,
default a quarter of them) and 2x its host tier (``--host``, default half), in ``--dtype fp32``
or ``bf16`` (fp32 masters in the optimizer either way). Contenders, interleaved: ``tiered``
(``tiered.offload`` through the device cache + ``OffloadedAdamW(model=...)``), ``deepspeed``
(ZeRO-3, ``offload_param`` and ``offload_optimizer`` on NVMe; when it imports) and ``torch``
(model and fused AdamW in GPU memory, with ``--ref-layers`` layers, by default as many as fit).
Per contender: step time, TFLOPS (6 * params * tokens / step), the I/O bound (storage bytes
over fio's/the engine's bandwidths, host<->device bytes over the copy bandwidths), peak GPU
memory (``max_memory_allocated``, the GPU tier's peak) and peak host memory (the host tier's
peak, the process's RSS over the timed steps). Results: ``bench/results/finetune_cuda_<gpu>.json``.
On a GPU machine (16 cores, NVMe under ``--dir``; 633M parameters, fp32; for ``--dtype bf16``
give it 96 layers: the host tier, half of the weights, must still hold 4 state chunks of a
layer at 12 bytes per parameter)::

    python bench/finetune.py --device cuda --layers 48 --hidden 1024 --inter 2816 --batch 4 --seq 512 --warmup 2 --steps 3 --rounds 2 --dir /nvme/ft

``--device-cache`` runs the same tiered path on a CPU (the "gpu" tier on device "cpu"): how the
script is checked without a GPU, e.g. ``--device-cache --layers 32 --hidden 128 --inter 256
--vocab 512 --seq 32 --batch 2 --warmup 1 --steps 2 --rounds 1 --io-mib 64 --out /tmp/ft.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from bench._finetune_common import MiB, batch, build_model, child, log  # noqa: E402
from bench._finetune_io import fio_bandwidth  # noqa: E402
from bench._finetune_report import print_table, summarize  # noqa: E402
from tiered.io_engine.bench.bare import engine_bandwidth  # noqa: E402  (the engine's own bound, no store)

# --------------------------------------------------------------------------- contenders (child processes)


def run_torch(spec: dict) -> dict:
    import torch

    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **_impl(spec))
    return _train_loop(spec, model, lambda loss: loss.backward(), opt.step, opt.zero_grad)


def run_tiered(spec: dict, sync: bool = False, migration: str | None = None) -> dict:
    import torch  # noqa: F401

    from tiered.optim import OffloadedAdamW

    model = build_model(spec)
    cfg = _tiered_cfg(spec, spec["host_mib"], migration=migration)
    with OffloadedAdamW(model.parameters(), lr=1e-4, config=cfg, lookahead=spec["lookahead"],
                        chunk_bytes=spec["chunk_mib"] * MiB, sync=sync, **_impl(spec)) as opt:
        st0 = opt.store.stats()["tiers"]["nvme"]
        out = _train_loop(spec, model, lambda loss: loss.backward(), opt.step, opt.zero_grad, store=opt.store)
        st = opt.store.stats()
        out["host_capacity"] = st["tiers"]["host"]["capacity"]
        out["host_peak"] = st["tiers"]["host"]["peak"]
        out["chunks"] = opt.chunks
        out["resident_chunks"] = opt.resident_chunks
        out["owner_host"] = st["owners"][opt.owner]["host"]  # held, peak, reserved by the optimizer
        out["sync"] = sync
        out["state_bytes"] = 12 * sum(p.numel() for p in model.parameters())
        out["total_read"] = st["tiers"]["nvme"]["bytes_read"] - st0["bytes_read"]
        out["governor"] = st["governor"]
    for tier in cfg["tiers"].values():
        if "path" in tier:
            shutil.rmtree(tier["path"], ignore_errors=True)
    return out


def _impl(spec: dict) -> dict:
    """torch's AdamW implementation: fused (one vectorized pass, the fastest on CPU; DeepSpeed
    uses its own fused cpu_adam) or single (foreach=False, torch's CPU default)."""
    return {"fused": True} if spec["impl"] == "fused" else {"foreach": False}


def run_deepspeed(spec: dict) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 400))
    import torch
    import torch._dynamo  # noqa: F401 - loaded before zero.Init patches torch.Tensor.__new__, which
    import transformers  # noqa: F401   breaks dynamo's polyfill import if it happens inside the context
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    swap = os.path.join(spec["dir"], "ds_swap")
    shutil.rmtree(swap, ignore_errors=True)
    os.makedirs(swap)
    ds_config = {
        "train_micro_batch_size_per_gpu": spec["batch"], "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": spec["ds_sub_group"],
            "offload_optimizer": {"device": "nvme", "nvme_path": swap, "pin_memory": False,
                                  "buffer_count": 4, "fast_init": False},
            "stage3_param_persistence_threshold": 0,
        },
        "aio": {"block_size": 8 * MiB, "queue_depth": 32, "thread_count": 2, "single_submit": False,
                "overlap_events": True},
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }
    # on the CPU accelerator zero.Init(dtype=torch.float32) silently keeps bf16: pass no dtype
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(spec)
    engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    dtypes = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
    out = _train_loop(spec, engine, engine.backward, engine.step, lambda: None)
    out["param_dtypes"] = dtypes
    out["ds_config"] = ds_config
    shutil.rmtree(swap, ignore_errors=True)
    return out


def _train_loop(spec, model, backward, step, zero_grad, store=None) -> dict:
    """Warm-up steps, then timed ones: forward+backward, then the optimizer step alone."""
    import torch

    torch.set_num_threads(spec["threads"])
    steps, fb, losses, rw, proc_rw, train, proc_all, rw_all = [], [], [], [], [], [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        x = batch(spec, i)
        p0, s0 = _proc_io(), _io(store)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        backward(loss)
        t1 = time.perf_counter()
        before, pbefore = _io(store), _proc_io()
        step()
        t2 = time.perf_counter()
        after, pafter = _io(store), _proc_io()
        zero_grad()
        losses.append(loss.item())
        log(f"  step {i}: fwd+bwd {t1 - t0:.2f} s, optimizer step {t2 - t1:.2f} s, loss {losses[-1]:.4f}")
        if i >= spec["warmup"]:
            fb.append(t1 - t0)
            steps.append(t2 - t1)
            if store is not None:
                rw.append((after[0] - before[0], after[1] - before[1]))
                # the whole iteration: also writes of the previous step that landed in this one's
                # forward/backward (in steady state, what one step moves)
                rw_all.append((after[0] - s0[0], after[1] - s0[1]))
            proc_rw.append((pafter[0] - pbefore[0], pafter[1] - pbefore[1]))
            train.append(t2 - t0)
            proc_all.append((pafter[0] - p0[0], pafter[1] - p0[1]))
    out = {"step_s": steps, "fwd_bwd_s": fb, "losses": losses,
           "step_median_s": statistics.median(steps), "fwd_bwd_median_s": statistics.median(fb),
           "params": sum(p.numel() for p in _params(model))}
    # block-layer bytes of the whole process during the optimizer step (/proc/self/io)
    out["train_step_s"] = train
    out["train_step_median_s"] = statistics.median(train)
    out["proc_read_per_train_step"] = statistics.median(r for r, _w in proc_all)
    out["proc_written_per_train_step"] = statistics.median(w for _r, w in proc_all)
    out["proc_read_per_step"] = statistics.median(r for r, _w in proc_rw)
    out["proc_written_per_step"] = statistics.median(w for _r, w in proc_rw)
    if rw:
        out["bytes_read_per_step"] = statistics.median(r for r, _w in rw)  # within opt.step()
        out["bytes_written_per_step"] = statistics.median(w for _r, w in rw)
        out["bytes_read_per_train_step"] = statistics.median(r for r, _w in rw_all)
        out["bytes_written_per_train_step"] = statistics.median(w for _r, w in rw_all)
    return out


def _params(model):
    inner = getattr(model, "module", model)
    for p in inner.parameters():
        yield getattr(p, "ds_tensor", p) if hasattr(p, "ds_numel") else p


def _proc_io() -> tuple[int, int]:
    with open("/proc/self/io") as f:
        kv = dict(line.split(": ") for line in f.read().splitlines())
    return int(kv["read_bytes"]), int(kv["write_bytes"])


def _io(store) -> tuple[int, int]:
    if store is None:
        return 0, 0
    t = store.stats()["tiers"]["nvme"]
    return t["bytes_read"], t["bytes_written"]


def _tiered_cfg(spec: dict, host_mib: int, lookahead: int = 1, migration: str | None = None) -> dict:
    """The tiered contenders' store; with ``two_tiers``, a second storage tier (``flash``, empty:
    the first has room for everything) and ``[policy] migration`` (default "none"), so that the
    governor's own cost is what differs between ``tiered`` and ``tiered_governed``."""
    path = os.path.join(spec["dir"], f"tiered_{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    cfg = {"tiers": {"host": {"capacity": f"{host_mib}MiB"}, "nvme": {"path": path, "capacity": "32GiB"}},
           "engine": {"workers": spec["workers"], "chunk": "8MiB"},
           "offload": {"lookahead": lookahead, "resident": False}}
    if spec.get("two_tiers"):
        shutil.rmtree(path + "_flash", ignore_errors=True)
        cfg["tiers"]["flash"] = {"path": path + "_flash", "capacity": "32GiB"}
        cfg["policy"] = {"migration": migration or "none"}
    return cfg


def run_zo(spec: dict) -> dict:
    import torch

    import tiered
    from tiered.offload import offload_units
    from tiered.optim import ZOSGD
    from tiered.optim.zo import mezo_step

    torch.set_num_threads(spec["threads"])
    n = spec["zo_steps"]
    out = {}
    model = build_model(spec).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        r = mezo_step(model, {"input_ids": batch(spec, i)}, seed=i, lr=1e-6, eps=1e-3)
        times.append(time.perf_counter() - t0)
        log(f"  ZO in memory step {i}: {times[-1]:.2f} s, g={r.projected_grad:.4f}")
    out["memory_step_s"] = times[1:]
    del model
    model = tiered.offload(build_model(spec).eval(), _tiered_cfg(spec, spec["zo_host_mib"]))
    store = offload_units(model).store
    times, reads = [], []
    with ZOSGD(model, lr=1e-6, eps=1e-3, seed=0) as zo:
        for i in range(n + 1):
            r0 = store.stats()["tiers"]["nvme"]["bytes_read"]
            t0 = time.perf_counter()
            r = zo.step({"input_ids": batch(spec, i)})
            times.append(time.perf_counter() - t0)
            reads.append(store.stats()["tiers"]["nvme"]["bytes_read"] - r0)
            log(f"  ZO tiered step {i}: {times[-1]:.2f} s, read {reads[-1] / MiB:.0f} MiB, g={r.projected_grad:.4f}")
    out["tiered_step_s"] = times[1:]
    out["tiered_read_per_step"] = statistics.median(reads[1:])
    out["weights_bytes"] = weights
    out["host_capacity"] = store.stats()["tiers"]["host"]["capacity"]
    path = store.root
    tiered.detach(model)
    shutil.rmtree(path, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- orchestration


def pool(rs: list[dict]) -> dict:
    """One contender's rounds: samples pooled, medians and minima over all of them."""
    bad = [r for r in rs if "error" in r]
    if bad:
        return {"error": bad[0]["error"], "rounds": rs}
    out = dict(rs[-1])
    for k in ("step_s", "fwd_bwd_s", "train_step_s"):
        out[k] = [x for r in rs for x in r[k]]
        base = k[:-2]
        out[f"{base}_median_s"] = statistics.median(out[k])
        out[f"{base}_min_s"] = min(out[k])
    out["rounds"] = len(rs)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/finetune.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--dir", default=os.path.join(_ROOT, ".benchdir", "finetune"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--host", type=int, default=None,
                    help="tiered host tier, MiB (default 256; on a GPU, half of the weights)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: a training step computing on the GPU (see the docstring)")
    ap.add_argument("--device-cache", action="store_true",
                    help="the --device cuda benchmark with the store's 'gpu' tier on the CPU (a check)")
    ap.add_argument("--gpu-budget", type=int, default=None, help="GPU tier, MiB (default: a quarter of the weights)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype on a GPU")
    ap.add_argument("--ref-layers", type=int, default=None,
                    help="layers of the torch contender on a GPU (default: the model's, or as many as fit)")
    ap.add_argument("--io-mib", type=int, default=1024, help="bytes of each fio and engine bandwidth run, MiB")
    ap.add_argument("--zo-host", type=int, default=128, help="tiered host tier for ZO, MiB (default 128)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per contender process")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps per process (default 3: tiered's data file reaches its steady layout)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each contender (default 2)")
    ap.add_argument("--zo-steps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8, help="tiered's I/O engine threads")
    ap.add_argument("--lookahead", type=int, default=None,
                    help="tiered: state chunks read ahead (default 4; on a GPU 1)")
    ap.add_argument("--chunk-mib", type=int, default=16, help="tiered: state chunk size, MiB (12 bytes per parameter)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads in every contender (default 1: on 2 shared cores, 2 OpenMP "
                    "threads stall on each other and on the I/O workers; on a GPU, up to 16)")
    ap.add_argument("--impl", choices=("fused", "single"), default="fused",
                    help="torch AdamW kernel for torch and tiered (default fused)")
    ap.add_argument("--only", default="torch,tiered,tiered_sync,deepspeed,zo",
                    help="contenders; tiered_governed (with --two-tiers) is tiered with the governor on")
    ap.add_argument("--two-tiers", action="store_true",
                    help="tiered contenders get a second (empty) storage tier and [policy] migration = "
                    "\"none\"; tiered_governed the same with \"auto\": the governor's overhead")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        spec = json.loads(args.spec)
        from bench._finetune_gpu import CONTENDERS as GPU_CONTENDERS

        fn = {"torch": run_torch, "tiered": run_tiered, "tiered_sync": lambda sp: run_tiered(sp, sync=True),
              "tiered_governed": lambda sp: run_tiered(sp, migration="auto"),
              "deepspeed": run_deepspeed, "zo": run_zo, **GPU_CONTENDERS}[args.contender]
        res = fn(spec)
        with open(args.out, "w") as f:
            json.dump(res, f)
        return 0

    os.makedirs(args.dir, exist_ok=True)
    if args.device == "cuda" or args.device_cache:
        from bench._finetune_gpu_run import main_gpu

        return main_gpu(args, _spec(args))
    args.host, args.lookahead, args.threads = args.host or 256, args.lookahead or 4, args.threads or 1
    spec = _spec(args)
    only = args.only.split(",")
    result = {"spec": spec, "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()},
              "note": "2-core VM shared with other jobs (loaded); storage reads are O_DIRECT (cold)"}
    log(f"fio on {args.dir}")
    result["fio"] = fio_bandwidth(args.dir, args.io_mib * MiB)
    result["engine_io"] = engine_bandwidth(args.dir, args.io_mib * MiB, args.workers)
    log(f"engine on {args.dir}: {result['engine_io']}")
    # contenders interleaved over rounds, so that load from other jobs on the machine hits all
    # of them alike; samples of all rounds are pooled (median and min reported)
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for name in ("deepspeed", "tiered", "tiered_governed", "tiered_sync", "torch"):
            if name in only:
                log(f"round {rnd + 1}/{args.rounds}")
                runs.setdefault(name, []).append(child(name, spec, args.timeout))
    for name, rs in runs.items():
        result[name] = pool(rs)
    # the device's bandwidth drifts (a shared VM): measured again after the contenders; the
    # bounds use the better of the two runs (the smaller, stricter bound)
    log(f"fio on {args.dir} again")
    result["fio_end"] = fio_bandwidth(args.dir, args.io_mib * MiB)
    result["engine_io_end"] = engine_bandwidth(args.dir, args.io_mib * MiB, args.workers)
    log(f"engine on {args.dir}: {result['engine_io_end']}")
    if "zo" in only:
        result["zo"] = child("zo", spec, args.timeout)
    result["machine"]["loadavg_end"] = os.getloadavg()
    summarize(result)
    os.makedirs(os.path.join(_ROOT, "bench", "results"), exist_ok=True)
    path = args.out or os.path.join(_ROOT, "bench", "results", "finetune_cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"saved {path}")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def _spec(args) -> dict:
    return {"layers": args.layers, "hidden": args.hidden, "inter": args.inter, "vocab": args.vocab,
            "heads": max(1, args.hidden // 64), "seq": args.seq, "batch": args.batch, "host_mib": args.host,
            "zo_host_mib": args.zo_host, "steps": args.steps, "warmup": args.warmup, "zo_steps": args.zo_steps,
            "workers": args.workers, "lookahead": args.lookahead, "chunk_mib": args.chunk_mib, "impl": args.impl,
            "threads": args.threads, "dir": args.dir, "two_tiers": args.two_tiers,
            "ds_sub_group": 100_000_000}


if __name__ == "__main__":
    sys.exit(main())
