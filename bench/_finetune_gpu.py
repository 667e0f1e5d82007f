"""The contenders of ``bench/finetune.py --device cuda`` (and ``--device-cache`` on a CPU), each run
in its own process: a whole training step (forward, backward, AdamW) of a Llama computing on the
device, timed with the device synchronized, with the bytes it moves and its peak memory.

- ``gpu_tiered``: ``tiered.offload`` through the device cache (the store's GPU tier smaller than
  the weights, the host tier smaller than them too) and ``OffloadedAdamW(model=...)``: fp32 master
  and moments in the store, the update on the CPU with each chunk's gradients copied from the GPU;
- ``gpu_torch``: the model and ``torch.optim.AdamW`` (fused) in device memory (``ref_layers``
  layers when the full model does not fit there);
- ``gpu_deepspeed``: DeepSpeed ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time

from bench._finetune_common import MiB, batch, build_model, log


def _dtype(spec: dict):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _build(spec: dict, dev, layers: int | None = None):
    """The model in ``spec['dtype']``, built (seeded) on ``dev`` when its weights fit in half of the
    device's free memory, else on the CPU with only its buffers (rotary tables) moved to ``dev``:
    the parameters go to the store, and the device holds what the store's GPU tier places."""
    import torch

    spec = dict(spec, layers=layers or spec["layers"])
    with torch.device("meta"):
        nbytes = sum(p.numel() for p in build_model(spec).parameters()) * _dtype(spec).itemsize
    on_dev = dev.type != "cuda" or nbytes < torch.cuda.mem_get_info(dev)[0] // 2
    with torch.device(dev if on_dev else "cpu"):
        model = build_model(spec).to(_dtype(spec)).train()
    if not on_dev:
        for mod in model.modules():
            for name, buf in list(mod.named_buffers(recurse=False)):
                setattr(mod, name, buf.to(dev))
    return model


def tiered_config(spec: dict) -> dict:
    """The store: a GPU tier of ``gpu_mib`` on the compute device, a host tier of ``host_mib``, NVMe."""
    path = os.path.join(spec["dir"], f"tiered_gpu_{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    return {"tiers": {"gpu": {"kind": "device", "device": spec["device"], "capacity": f"{spec['gpu_mib']}MiB"},
                      "host": {"capacity": f"{spec['host_mib']}MiB"},
                      "nvme": {"path": path, "capacity": "60GiB"}},
            "engine": {"workers": spec["workers"], "chunk": "8MiB"},
            "offload": {"device_cache": True, "resident": True, "lookahead": "auto"}}


def largest_unit(model) -> int:
    """Parameters of ``model``'s largest offload unit: each block of the outermost ModuleLists,
    and each other module owning parameters (embeddings, norms, head)."""
    from torch import nn

    sizes, in_list = [], set()
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and id(mod) not in in_list:
            for block in mod:
                sizes.append(sum(p.numel() for p in block.parameters()))
                in_list.update(id(m) for m in block.modules())
    for mod in model.modules():
        if id(mod) not in in_list and not isinstance(mod, nn.ModuleList):
            sizes.append(sum(p.numel() for p in mod.parameters(recurse=False)))
    return max(sizes)


def optimizer_host_bytes(model, lookahead: int) -> int:
    """Host memory ``OffloadedAdamW(model=...)`` needs: ``lookahead`` + 3 state chunks of the largest
    unit (12 bytes per parameter, page-rounded)."""
    return (lookahead + 3) * (12 * largest_unit(model) + 3 * 4096)


def run_gpu_tiered(spec: dict) -> dict:
    import torch

    import tiered
    from tiered.optim import OffloadedAdamW

    dev = torch.device(spec["device"])
    cfg = tiered_config(spec)
    store = tiered.TieredStore(cfg).open()
    # host memory kept free while the model is offloaded: its resident units take the rest, and
    # the optimizer (opened after) its pipeline from this room
    room = store.reserve("host", spec["optim_host_bytes"], owner="bench/optimizer-room")
    try:
        model = tiered.offload(_build(spec, dev), store=store, device=dev)
    except BaseException:
        store.close()
        raise
    finally:
        room.close()
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the weights the model was built with, now in the store
    rt = model._tiered
    out = {}
    try:
        with OffloadedAdamW(list(model.parameters()), lr=1e-4, model=model, lookahead=spec["opt_lookahead"],
                            fused=True) as opt:
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            out = _loop(spec, dev, model, lambda loss: loss.backward(), opt.step, opt.zero_grad,
                        counters=lambda: _tiered_counters(rt), grad_bytes=grad_bytes)
            st = rt.store.stats()
            out["store_gpu_tier"] = {k: st["tiers"]["gpu"][k] for k in ("capacity", "peak", "reserved_region")}
            out["store_host_tier"] = {k: st["tiers"]["host"][k] for k in ("capacity", "peak", "pinned")}
            out["device_cache_peak"] = rt.dcache.peak
            out["device_cache_limit"] = rt.dcache.limit
            out["optimizer_chunks"] = opt.chunks
            out["offload_stats"] = {k: v for k, v in tiered.offload_stats(model).items()
                                    if isinstance(v, (int, float, str, bool))}
            out["state_bytes"] = 12 * out["params"]
            # resident units' device copies take the new weights in place every step
            out["moved_per_step"]["h2d"] += out["offload_stats"]["resident_bytes"]
    finally:
        tiered.detach(model)
        store.close()
        shutil.rmtree(cfg["tiers"]["nvme"]["path"], ignore_errors=True)
    return out


def _tiered_counters(rt) -> dict:
    """Bytes the store has moved so far: storage reads and writes, and host->device placements."""
    st = rt.store.stats()["tiers"]["nvme"]
    return {"read": st["bytes_read"], "written": st["bytes_written"], "h2d": rt.dcache.stats.bytes_loaded}


def run_gpu_torch(spec: dict) -> dict:
    import torch

    dev = torch.device(spec["device"])
    model = _build(spec, dev, layers=spec["ref_layers"]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    out = _loop(spec, dev, model, lambda loss: loss.backward(), opt.step, lambda: opt.zero_grad(set_to_none=True))
    out["layers"] = spec["ref_layers"]
    return out


def run_gpu_deepspeed(spec: dict) -> dict:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 400))
    import torch
    import torch._dynamo  # noqa: F401 - loaded before zero.Init patches torch.Tensor.__new__
    import transformers  # noqa: F401
    import deepspeed

    dev = torch.device(spec["device"])
    deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
    swap = os.path.join(spec["dir"], "ds_swap_gpu")
    shutil.rmtree(swap, ignore_errors=True)
    os.makedirs(swap)
    with torch.device("meta"):
        biggest = max(p.numel() for p in build_model(spec).parameters())
    ds_config = deepspeed_config(spec, swap, biggest)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(spec)
    engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    try:
        out = _loop(spec, dev, engine, engine.backward, engine.step, lambda: None)
    finally:
        shutil.rmtree(swap, ignore_errors=True)
    out["param_dtypes"] = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
    out["ds_config"] = ds_config
    return out


def deepspeed_config(spec: dict, swap: str, biggest: int) -> dict:
    """ZeRO-3, parameters and optimizer state on NVMe (``swap``), async_io 8 MiB blocks at depth 32;
    ``bf16`` on for ``--dtype bf16`` (fp32 masters in the optimizer, as tiered keeps)."""
    return {
        "train_micro_batch_size_per_gpu": spec["batch"], "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01}},
        "bf16": {"enabled": spec["dtype"] == "bf16"},
        "zero_optimization": {
            "stage": 3, "sub_group_size": spec["ds_sub_group"],
            "offload_param": {"device": "nvme", "nvme_path": swap, "pin_memory": True, "buffer_count": 5,
                              "buffer_size": max(100_000_000, biggest), "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": swap, "pin_memory": True,
                                  "buffer_count": 4, "fast_init": False},
            "stage3_param_persistence_threshold": 0,
        },
        "aio": {"block_size": 8 * MiB, "queue_depth": 32, "thread_count": 2, "single_submit": False,
                "overlap_events": True},
        "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
    }


def _loop(spec, dev, model, backward, step, zero_grad, counters=None, grad_bytes: int = 0) -> dict:
    """Warm-up steps, then timed whole training steps (device synchronized); the peaks (device
    memory, process RSS) are reset when the timed steps begin."""
    import torch

    torch.set_num_threads(spec["threads"])
    times, losses, moved, proc, rss_reset = [], [], [], [], False
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            rss_reset = _reset_peaks(dev)
        x = batch(spec, i).to(dev)
        c0, p0 = counters() if counters else {}, _proc_io()
        _sync(dev)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        backward(loss)
        step()
        zero_grad()
        _sync(dev)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        log(f"  step {i}: {dt:.3f} s, loss {losses[-1]:.4f}")
        if i >= spec["warmup"]:
            times.append(dt)
            c1, p1 = counters() if counters else {}, _proc_io()
            moved.append({k: c1[k] - c0[k] for k in c1})
            proc.append((p1[0] - p0[0], p1[1] - p0[1]))
    inner = getattr(model, "module", model)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in inner.parameters())
    out = {"train_step_s": times, "train_step_median_s": statistics.median(times),
           "train_step_min_s": min(times), "losses": losses, "params": params,
           "tokens_per_step": spec["batch"] * spec["seq"],
           "peaks": dict(_peaks(dev), rss_peak_since="timed steps" if rss_reset else "process start"),
           "proc_read_per_step": statistics.median(r for r, _ in proc),
           "proc_written_per_step": statistics.median(w for _, w in proc)}
    if moved and moved[0]:
        out["moved_per_step"] = {k: statistics.median(m[k] for m in moved) for k in moved[0]}
        out["moved_per_step"]["d2h"] = grad_bytes  # each chunk's gradients, copied to the CPU for the update
    return out


def _reset_peaks(dev) -> bool:
    """Reset the device's peak allocation and the process's peak RSS (Linux: "5" to clear_refs
    resets VmHWM); False when the kernel refused the latter (the RSS peak then covers setup)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        log(f"  peak RSS not reset ({e}): it includes building and offloading the model")
        return False
    return True


def _peaks(dev) -> dict:
    import torch

    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    out = {"rss_peak_bytes": int(status["VmHWM"].split()[0]) * 1024}
    if dev.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    return out


def _proc_io() -> tuple[int, int]:
    with open("/proc/self/io") as f:
        kv = dict(line.split(": ") for line in f.read().splitlines())
    return int(kv["read_bytes"]), int(kv["write_bytes"])


CONTENDERS = {"gpu_tiered": run_gpu_tiered, "gpu_torch": run_gpu_torch, "gpu_deepspeed": run_gpu_deepspeed}
