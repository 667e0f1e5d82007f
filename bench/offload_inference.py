"""Offloaded inference with less RAM than the model: tiered vs Accelerate vs DeepSpeed vs the limits.

    python bench/offload_inference.py [--json] [--small] [--dir DIR] [--plot out.png]

One Llama-architecture model is built from a config (seeded, fp32, at least
2 GB unless ``--small``) and saved as safetensors under ``--dir``, so every
contender starts from the same files. Each contender then runs in its own
subprocess, cold (``sync; echo 3 > /proc/sys/vm/drop_caches`` before it),
and, except the in-memory reference, inside a cgroup v1 memory group whose
``memory.limit_in_bytes`` is below the model size (page cache counts toward
it, so "disk offload" cannot quietly become RAM offload):

- ``memory``: the plain model in RAM (no limit): the compute time reference;
- ``tiered``: ``tiered.from_pretrained`` (the safetensors read in place with
  O_DIRECT) with a host budget of at most 1/4 of the model;
- ``accelerate_disk``: Accelerate's ``disk_offload(model, offload_dir)``; the
  one-time preparation of ``offload_dir`` (``offload_weight`` per tensor,
  streamed from the safetensors, also under the limit) is timed separately;
- ``accelerate_disk_st``: Accelerate's disk offload reading the safetensors in
  place (an offload index naming the checkpoint file, what transformers'
  ``device_map="disk"`` builds) -- same files as tiered, no preparation;
- ``accelerate_cpu``: ``cpu_offload`` needs the whole model in RAM, so it is
  skipped under the limit; measured without the limit for information;
- ``deepspeed``: ZeRO-Inference (ZeRO-3, ``offload_param: {device: nvme}``)
  when ``import deepspeed`` works, else reported as not installed;
- the **I/O bound**: bytes read per forward (tiered's own counters) divided
  by fio's sequential O_DIRECT read bandwidth of the checkpoint file: the best
  of every fio read of it in the run (a sweep of settings before and after the
  contenders, and bs=8M libaio qd=32 right before and after each disk-bound
  contender, since this disk drifts by tens of percent within minutes). The
  ratio with the fio measured around the tiered run is printed too.

Each contender reports its load time, seconds per forward of a 1 x ``prompt``
token prompt (``forwards`` forwards; the headline is the median of all but the
first), and seconds per generated token (a greedy decode loop with a KV cache
after a prefill of the prompt; the headline is the mean over the steps), plus
bytes read from storage (``/proc/self/io``), CPU seconds, peak memory and the
group's peak charge. The first forward's last-position logits are compared
with the in-memory model's, so a contender computing with wrong weights shows.

Each contender also runs a short fixed matmul (``cpu GFLOPS``) before and after
its forwards: the CPUs are shared and their speed drifts as well, which makes
the compute-bound prompt ratio unreliable when the probes differ (a note says so).

Diagnostics (not contenders): ``--tiered-variant K=V,...`` reruns tiered with
overrides -- ``budget=``, ``workers=``, ``chunk=``, ``lookahead=``, and two
monkeypatches applied in the child only: ``nocrc`` (no per-read crc32) and
``force_lookahead=N`` (overrides ``plan_budget``'s choice, no resident units);
``two_tiers`` adds an empty second storage tier and ``migration=none|auto`` sets the governor
(``--only tiered --tiered-variant two_tiers,migration=none --tiered-variant
two_tiers,migration=auto``: the governor's overhead).

Targets (from the issue): tiered within 1.1x of max(in-memory compute, I/O
bound) for the prompt forward and per generated token; tiered at least 2x
faster than ``accelerate_disk`` per generated token; faster than DeepSpeed.

``--json`` prints one JSON object on stdout (progress goes to stderr).
Internal: ``--contender NAME --spec FILE --out FILE`` runs one contender.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8000)
TARGET_BOUND = 1.1  # tiered <= 1.1 x max(in-memory compute, I/O bound)
TARGET_VS_ACCEL = 2.0  # tiered >= 2 x faster than accelerate disk_offload per generated token

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / MiB:.1f} MiB"


def _f(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


# =========================================================================== child side


def _proc_io() -> dict:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Phase:
    """Wall time, storage bytes read (/proc/self/io read_bytes) and CPU seconds of a code span."""

    def __enter__(self) -> "_Phase":
        self.io0 = _proc_io().get("read_bytes", 0)
        self.cpu0 = _cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = _cpu_seconds() - self.cpu0
        self.read_bytes = _proc_io().get("read_bytes", 0) - self.io0


def _thread_cpu() -> dict:
    """CPU seconds (user+sys) so far by thread group: main (Python + torch's calling thread),
    io (the tiered engine's workers, which also verify checksums), other (torch's OpenMP pool, ...)."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {"main": 0.0, "io": 0.0, "other": 0.0}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        name = names.get(int(tid), "")
        group = "main" if name == "MainThread" else "io" if name.startswith("tiered-io") else "other"
        out[group] += cpu
    return out


def _cpu_delta(a: dict, b: dict, n: int) -> dict:
    return {k: round((b[k] - a[k]) / max(1, n), 3) for k in a}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_memory(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    # transformers may leave the weights as views of the mmap'ed checkpoint (page cache, evictable):
    # give every tensor its own anonymous memory, so that this is the model truly in RAM
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    return model.eval(), None, {}


def _tiered_config(spec: dict) -> dict:
    store = os.path.join(spec["work_dir"], "tiered-store")
    os.makedirs(store, exist_ok=True)
    cfg = {"tiers": {"host": {"capacity": spec["budget"]},
                     "nvme": {"path": store, "capacity": 1 << 30}}}
    engine = {k: spec[k] for k in ("workers", "chunk") if spec.get(k)}
    if engine:
        cfg["engine"] = engine
    if spec.get("lookahead") is not None:
        cfg["offload"] = {"lookahead": spec["lookahead"]}
    if spec.get("two_tiers"):  # a second, empty storage tier: the governor has a choice to make
        flash = os.path.join(spec["work_dir"], "tiered-store-flash")
        os.makedirs(flash, exist_ok=True)
        cfg["tiers"]["flash"] = {"path": flash, "capacity": 1 << 30}
        cfg["policy"] = {"migration": spec.get("migration", "none")}
    return cfg


def _load_tiered(spec: dict):
    import tiered

    if spec.get("diag_no_crc") or spec.get("nocrc"):  # diagnostic only: what the crc32 of every read costs
        import tiered.store as _store

        class _NoCrc:
            def __getattr__(self, name):
                import zlib

                return getattr(zlib, name)

            @staticmethod
            def crc32(*_a, **_k):
                return 0

        _store.zlib = _NoCrc()
    if spec.get("force_lookahead") is not None:  # diagnostic only: overlap at a budget the planner refuses
        from tiered.offload import OffloadedModule

        plan = OffloadedModule.plan_budget
        want = int(spec["force_lookahead"])

        def forced(self) -> None:
            plan(self)
            self.lookahead = self.stats.lookahead = want
            self._resident_budget = 0  # a prefetch that does not fit is skipped (read on demand)

        OffloadedModule.plan_budget = forced

    model = tiered.from_pretrained(spec["model_dir"], _tiered_config(spec))
    model.eval()
    rt = model._tiered
    info = {
        "budget": spec["budget"],
        "units": [{"name": u.name, "nbytes": u.nbytes, "resident": u.resident, "objects": len(u.keys)}
                  for u in rt.units],
        "engine": {"workers": rt.store.engine.workers, "chunk": rt.store.engine.chunk,
                   "backend": rt.store.engine.backend.name},
        "arena_hugepages": rt.store.arena.stats().hugepages,
    }

    def snapshot() -> dict:
        s = tiered.offload_stats(model)
        s["bytes_read_total"] = sum(s["bytes_read"].values())
        s["prefetch_hits"] = rt.stats.prefetch_hits  # as_dict() only has the rate
        s["stall_seconds"] = rt.stats.stall_seconds  # unrounded
        s["governor"] = rt.store.stats()["governor"]
        return s

    return model, snapshot, info


def _accelerate_meta_model(spec: dict):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(spec["model_dir"])
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def _load_accelerate_disk(spec: dict):
    from accelerate import disk_offload

    offload_dir = os.path.join(spec["work_dir"], "accelerate-offload")
    if not os.path.isfile(os.path.join(offload_dir, "index.json")):
        raise RuntimeError(f"{offload_dir} was not prepared (run the accelerate_prep step)")
    model = _accelerate_meta_model(spec)
    disk_offload(model, offload_dir, execution_device="cpu")
    return model, None, {"offload_dir": offload_dir}


def _load_accelerate_disk_st(spec: dict):
    from accelerate import dispatch_model

    from tiered.pretrained import checkpoint_index

    model = _accelerate_meta_model(spec)
    index = {name: {"safetensors_file": loc.path, "weight_name": name, "dtype": str(loc.dtype).split(".")[-1]}
             for name, loc in checkpoint_index(spec["model_dir"]).items()}
    dispatch_model(model, device_map={"": "disk"}, main_device="cpu", offload_index=index)
    return model, None, {"offload_index": "safetensors files in place"}


def _load_accelerate_cpu(spec: dict):
    from accelerate import cpu_offload

    model, _, _ = _load_memory(spec)
    cpu_offload(model, execution_device="cpu")
    return model, None, {}


def _load_deepspeed(spec: dict):
    """ZeRO-Inference: ZeRO-3 with parameters offloaded to NVMe (best effort; CPU accelerator here)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.integrations import HfDeepSpeedConfig
    except ImportError:  # older transformers
        from transformers.deepspeed import HfDeepSpeedConfig
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    nvme = os.path.join(spec["work_dir"], "deepspeed-nvme")
    os.makedirs(nvme, exist_ok=True)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": True,
                              "buffer_count": 5, "buffer_size": max(spec["largest_tensor_elems"] + 1, int(1e8))},
            "stage3_param_persistence_threshold": 0,
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 32, "thread_count": 4, "single_submit": False,
                "overlap_events": True},
    }
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive while from_pretrained runs
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    engine = deepspeed.initialize(model=model, config_params=ds_config)[0]
    engine.module.eval()
    return engine.module, None, {"ds_config": ds_config, "deepspeed_version": deepspeed.__version__,
                                 "_keep": hf_ds}


LOADERS = {
    "memory": _load_memory, "tiered": _load_tiered, "accelerate_disk": _load_accelerate_disk,
    "accelerate_disk_st": _load_accelerate_disk_st, "accelerate_cpu": _load_accelerate_cpu,
    "deepspeed": _load_deepspeed,
}


def _delta(a: dict | None, b: dict | None) -> dict | None:
    """b - a of the numeric offload counters."""
    if a is None or b is None:
        return None
    out = {}
    for k in ("forwards", "unit_loads", "prefetch_hits", "stall_seconds", "bytes_read_total", "prefetch_skipped"):
        out[k] = round(b[k] - a[k], 4) if isinstance(b[k], float) else b[k] - a[k]
    out["prefetch_hit_rate"] = round(out["prefetch_hits"] / out["unit_loads"], 4) if out["unit_loads"] else None
    return out


def _cpu_probe() -> float:
    """GFLOPS of a fixed fp32 matmul (best of 5): the CPU speed of this moment. The host's CPUs are
    shared, and their speed drifts between contenders run minutes apart."""
    import torch

    a, b = torch.randn(128, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = max(best, 10 * 2 * 128 * 2048 * 2048 / (time.perf_counter() - t0) / 1e9)
    return best


def _measure(model, snapshot, spec: dict, name: str) -> dict:
    import torch

    import inspect

    # transformers 5.x renamed past_key_values to cache (the old name warns)
    new_api = "cache" in inspect.signature(type(model).forward).parameters
    cache_kw = "cache" if new_api else "past_key_values"
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, spec["vocab_size"], (1, spec["prompt"]), generator=gen)
    res: dict = {"forwards": [], "forward_read_bytes": [], "forward_cpu_s": [], "cpu_probe_gflops": [_cpu_probe()]}
    snaps = {"start": snapshot() if snapshot else None}
    cpu_marks = {}
    with torch.inference_mode():
        for i in range(spec["forwards"]):
            if i == 1:
                cpu_marks["forwards"] = _thread_cpu()
            with _Phase() as ph:
                out = model(input_ids=ids, use_cache=False)
                last = out.logits[0, -1].float().clone()
            if i == 0:
                from safetensors.torch import save_file

                save_file({"logits": last}, os.path.join(spec["work_dir"], f"logits-{spec.get('label', name)}.safetensors"))
                res["first_logits_finite"] = bool(torch.isfinite(last).all())
                snaps["after_first_forward"] = snapshot() if snapshot else None
            del out
            res["forwards"].append(ph.seconds)
            res["forward_read_bytes"].append(ph.read_bytes)
            res["forward_cpu_s"].append(ph.cpu)
            log(f"  {spec.get('label', name)}: forward {i + 1}/{spec['forwards']}: {ph.seconds:.3f} s, "
                f"read {fmt_bytes(ph.read_bytes)}, cpu {ph.cpu:.2f} s")
        snaps["after_forwards"] = snapshot() if snapshot else None
        if "forwards" in cpu_marks:
            res["thread_cpu_per_forward_s"] = _cpu_delta(cpu_marks["forwards"], _thread_cpu(), spec["forwards"] - 1)
        # decode: prefill the prompt with a KV cache, then greedy steps, each timed
        with _Phase() as ph:
            out = model(input_ids=ids, use_cache=True)
        res["prefill_s"] = ph.seconds
        past = getattr(out, cache_kw)
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        tokens, steps, step_read, step_cpu = [int(nxt)], [], [], []
        snaps["before_decode"] = snapshot() if snapshot else None
        cpu_marks["decode"] = _thread_cpu()
        for i in range(spec["new_tokens"]):
            with _Phase() as ph:
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
                nxt = out.logits[:, -1:].argmax(-1)
            past = getattr(out, cache_kw)
            del out
            tokens.append(int(nxt))
            steps.append(ph.seconds)
            step_read.append(ph.read_bytes)
            step_cpu.append(ph.cpu)
            log(f"  {spec.get('label', name)}: token {i + 1}/{spec['new_tokens']}: {ph.seconds:.3f} s, "
                f"read {fmt_bytes(ph.read_bytes)}, cpu {ph.cpu:.2f} s")
        snaps["after_decode"] = snapshot() if snapshot else None
        res["thread_cpu_per_token_s"] = _cpu_delta(cpu_marks["decode"], _thread_cpu(), spec["new_tokens"])
    res["cpu_probe_gflops"].append(_cpu_probe())
    later = res["forwards"][1:] or res["forwards"]
    res.update(
        forward_s=statistics.median(later),
        forward_read_bytes_steady=statistics.median(res["forward_read_bytes"][1:] or res["forward_read_bytes"]),
        token_s=statistics.fmean(steps) if steps else None,
        token_s_median=statistics.median(steps) if steps else None,
        token_steps=steps, token_read_bytes=step_read, token_cpu_s=step_cpu,
        token_read_bytes_mean=statistics.fmean(step_read) if step_read else None,
        tokens=tokens,
    )
    if snapshot:
        n_later = max(1, spec["forwards"] - 1)
        fw = _delta(snaps["after_first_forward"], snaps["after_forwards"])
        dec = _delta(snaps["before_decode"], snaps["after_decode"])
        res["offload_stats"] = snaps["after_decode"]
        res["offload_forward"] = fw
        res["offload_decode"] = dec
        res["bytes_per_forward"] = fw["bytes_read_total"] / n_later if fw and spec["forwards"] > 1 else (
            snaps["after_first_forward"]["bytes_read_total"] - snaps["start"]["bytes_read_total"])
        res["bytes_per_token"] = dec["bytes_read_total"] / max(1, spec["new_tokens"]) if dec else None
        res["stall_per_forward_s"] = fw["stall_seconds"] / n_later if fw else None
        res["stall_per_token_s"] = dec["stall_seconds"] / max(1, spec["new_tokens"]) if dec else None
    return res


def run_contender(name: str, spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.manual_seed(0)
    res: dict = {"contender": name, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}
    try:
        if name == "build":
            res.update(_build(spec))
        elif name == "accelerate_prep":
            res.update(_accelerate_prep(spec))
        else:
            log(f"{spec.get('label', name)}: loading")
            with _Phase() as ph:
                model, snapshot, info = LOADERS[name](spec)
            info.pop("_keep", None)
            res.update(load_s=ph.seconds, load_read_bytes=ph.read_bytes, load_cpu_s=ph.cpu, info=info)
            log(f"{spec.get('label', name)}: loaded in {ph.seconds:.2f} s (read {fmt_bytes(ph.read_bytes)})")
            res.update(_measure(model, snapshot, spec, name))
            if name == "tiered":
                res["store_engine"] = model._tiered.store.stats().get("engine")
                # not tiered.detach(): it would materialize the whole model, which does not fit
                model._tiered.remove_hooks()
                model._tiered.release_all()
                model._tiered.store.close()
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the result
        import traceback

        traceback.print_exc()
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["peak_rss_bytes"] = _peak_rss()
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0 if res["ok"] else 1


def _build(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**spec["llama"], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    log(f"build: initializing the model ({fmt_bytes(spec['model_bytes'])} fp32)")
    with _Phase() as ph:
        model = LlamaForCausalLM(cfg).eval()
    init_s = ph.seconds
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"build: saving safetensors to {spec['model_dir']}")
    with _Phase() as ph:
        model.save_pretrained(spec["model_dir"], safe_serialization=True, max_shard_size="100GB")
        os.sync()
    return {"init_s": init_s, "save_s": ph.seconds, "param_bytes": n}


def _accelerate_prep(spec: dict) -> dict:
    """Accelerate's offload folder (``offload_weight`` per tensor + ``index.json``), streamed
    tensor by tensor from the safetensors so that it runs under the memory limit."""
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    from tiered.pretrained import checkpoint_index

    out = os.path.join(spec["work_dir"], "accelerate-offload")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    index: dict = {}
    locs = checkpoint_index(spec["model_dir"])
    by_file: dict[str, list[str]] = {}
    for name, loc in locs.items():
        by_file.setdefault(loc.path, []).append(name)
    with _Phase() as ph:
        done = 0
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    offload_weight(t, name, out, index=index)
                    del t
                    done += 1
                    if done % 20 == 0:
                        log(f"accelerate_prep: {done}/{len(locs)} tensors")
        save_offload_index(index, out)
        os.sync()
    return {"prep_s": ph.seconds, "prep_read_bytes": ph.read_bytes, "tensors": len(index)}


# =========================================================================== parent side


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
    cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--spec", spec_path, "--out", out]
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


def _fio_refs(path: str, size: int) -> dict:
    """fio's sequential O_DIRECT read bandwidth of ``path`` (read-only), best of a few settings."""
    from tiered.bench_io import _fio_label, _run_fio

    fio = shutil.which("fio")
    if fio is None:
        return {"error": "fio not installed (apt-get install fio)", "rows": []}
    size = size // (8 * MiB) * (8 * MiB)
    rows = []
    for bs, eng, nj, qd in ((8 * MiB, "libaio", 1, 32), (1 * MiB, "libaio", 1, 32), (8 * MiB, "psync", 4, 1)):
        log(f"fio read {os.path.basename(path)} bs={bs // MiB}M {eng} numjobs={nj} iodepth={qd}")
        row = _run_fio(fio, path, rw="read", bs=bs, ioengine=eng, numjobs=nj, iodepth=qd, size=size,
                       runtime=max(30.0, size / 100e6), time_based=False)
        log(f"  {row['gbps']:.2f} GB/s" if "gbps" in row else f"  {row.get('error')}")
        row.pop("command", None)
        rows.append(row)
    ok = [r for r in rows if "gbps" in r]
    best = max(ok, key=lambda r: r["gbps"]) if ok else None
    return {"rows": rows, "best_gbps": best["gbps"] if best else None, "best_setting": _fio_label(best)}


def _fio_quick(path: str) -> float | None:
    from tiered.bench_io import _run_fio

    fio = shutil.which("fio")
    if fio is None:
        return None
    size = os.path.getsize(path) // (8 * MiB) * (8 * MiB)
    row = _run_fio(fio, path, rw="read", bs=8 * MiB, ioengine="libaio", numjobs=1, iodepth=32, size=size,
                   runtime=max(30.0, size / 100e6), time_based=False)
    log(f"fio (adjacent) bs=8M libaio qd=32: {row['gbps']:.2f} GB/s" if "gbps" in row else f"fio: {row.get('error')}")
    return row.get("gbps")


def _posix_contig(directory: str) -> dict:
    """tiered bench io's reference reads (posix-contig: O_DIRECT preadv into a huge-page arena; and
    the engine) on a 1 GiB file in the same directory, no sweep, no random reads to speak of."""
    from tiered.bench_io import run_bench_io

    log("bench io (posix-contig and engine reference reads, 1 GiB file)")
    r = run_bench_io(directory, "1GiB", rand_seconds=1.0, rand_rounds=1, backends_compare=(), fio=False,
                     deepnvme=False, sweep=False, progress=False)
    out = {"posix_contig_read_gbps": r.get("posix_read_gbps"), "engine_read_gbps": r.get("read_gbps"),
           "engine_read_gbps_no_hugepages": r.get("read_gbps_no_hugepages"),
           "setting": r.get("read_setting")}
    log(f"  posix-contig {_f(out['posix_contig_read_gbps'], '{:.2f}')} GB/s, engine "
        f"{_f(out['engine_read_gbps'], '{:.2f}')} GB/s (4 KiB pages: "
        f"{_f(out['engine_read_gbps_no_hugepages'], '{:.2f}')})")
    return out


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


def _ratio(a, b):
    return a / b if a is not None and b else None


def orchestrate(args) -> dict:
    from bench._cgroup import cgroup_v1_unavailable, drop_caches

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
    notes: list[str] = []
    if args.diag_no_crc:
        notes.append("DIAGNOSTIC RUN: tiered's per-read crc32 verification was disabled (--diag-no-crc)")
    if budget > model_bytes // 4:
        notes.append(f"budget {fmt_bytes(budget)} is above 1/4 of the model ({fmt_bytes(model_bytes // 4)}): "
                     "outside the issue's spec")
    if limit >= model_bytes:
        notes.append(f"memory limit {fmt_bytes(limit)} is not below the model size {fmt_bytes(model_bytes)}")

    cg_why = cgroup_v1_unavailable()
    cgroup_ok = cg_why is None and not args.no_limit
    if cg_why:
        notes.append(f"NO MEMORY LIMIT: {cg_why}; contenders ran without a limit (cold starts only)")
    elif args.no_limit:
        notes.append("NO MEMORY LIMIT (--no-limit): the page cache may serve re-reads")
    drop_why = drop_caches()
    if drop_why:
        notes.append(f"page cache NOT dropped between contenders: {drop_why}")

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
                    "caches_dropped": drop_why is None, "notes": notes, "contenders": {}}

    # 1. the model files
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
        if b.get("param_bytes") != model_bytes:
            notes.append(f"computed {model_bytes} bytes but the model has {b.get('param_bytes')}")
    else:
        log(f"model: reusing {model_dir}")
    files = sorted(Path(model_dir).glob("*.safetensors"))
    result["model"]["files"] = {p.name: p.stat().st_size for p in files}
    biggest = max(files, key=lambda p: p.stat().st_size)

    # 2. I/O references: fio on the checkpoint file itself (before the contenders)
    fio_before = _fio_refs(str(biggest), biggest.stat().st_size) if not args.no_fio else None
    bench_io = None
    if not args.no_bench_io:
        try:
            bench_io = _posix_contig(work_dir)
        except Exception as e:  # noqa: BLE001 - a reference, not a contender
            bench_io = {"error": f"{type(e).__name__}: {e}"}

    # 3. contenders
    names = ["memory", "tiered", "accelerate_disk", "accelerate_disk_st", "accelerate_cpu", "deepspeed"]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    C = result["contenders"]

    def adjacent(run, io: bool) -> dict:
        """Run a contender with a quick fio (bs=8M libaio qd32) right before and after it: the disk
        drifts by tens of percent within minutes, so each contender gets the bandwidth of its moment."""
        if not io or args.no_fio:
            return run()
        pre = _fio_quick(str(biggest))
        r = run()
        post = _fio_quick(str(biggest))
        r["fio_adjacent_gbps"] = {"before": pre, "after": post}
        return r

    for name in names:
        if name == "deepspeed":
            try:
                import importlib.util

                have_ds = importlib.util.find_spec("deepspeed") is not None
            except Exception:  # noqa: BLE001
                have_ds = False
            if not have_ds:
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
        C[name] = adjacent(lambda: _run_child(name, spec, args, None if name == "memory" else limit, cgroup_ok),
                           name != "memory")
        if name == "accelerate_disk":
            C[name]["prep_s"] = prep.get("prep_s")
            if not args.keep_offload_dir:
                shutil.rmtree(os.path.join(work_dir, "accelerate-offload"), ignore_errors=True)

    # 3b. diagnostic tiered variants (outside the spec where the budget is above model/4)
    variants = {}
    for i, text in enumerate(args.tiered_variant or []):
        over = _parse_variant(text)
        vlabel = f"tiered_v{i + 1}"
        vlimit = max(limit, over.get("budget", budget) + 640 * MiB)
        vspec = dict(spec, **over)
        r = adjacent(lambda: _run_child("tiered", vspec, args, vlimit, cgroup_ok, label=vlabel), True)
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
        variants[vlabel] = r

    # 4. fio again (the device drifts): the best of every fio read of the file in this run is the
    # reference (the strictest I/O bound); each contender also gets the fio of its moment
    fio_after = _fio_refs(str(biggest), biggest.stat().st_size) if not args.no_fio else None
    adj = [v for r in C.values() for v in (r.get("fio_adjacent_gbps") or {}).values() if v]
    result["fio"] = {"file": str(biggest), "before": fio_before, "after": fio_after, "adjacent_gbps": adj}
    fio_best = max([x["best_gbps"] for x in (fio_before, fio_after) if x and x.get("best_gbps")] + adj, default=None)
    result["fio_read_gbps"] = fio_best
    result["bench_io"] = bench_io

    # 5. bounds and ratios
    mem, tie, acc = C.get("memory", {}), C.get("tiered", {}), C.get("accelerate_disk", {})
    ok = lambda r: bool(r.get("ok"))  # noqa: E731
    bpf = tie.get("bytes_per_forward") if ok(tie) else None
    bpt = tie.get("bytes_per_token") if ok(tie) else None
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
    comp_fwd = mem.get("forward_s") if ok(mem) else None
    comp_tok = mem.get("token_s") if ok(mem) else None
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
    t_f = tie.get("forward_s") if ok(tie) else None
    t_t = tie.get("token_s") if ok(tie) else None
    ratios = {
        "tiered_forward_vs_bound": _ratio(t_f, bound_fwd),
        "tiered_token_vs_bound": _ratio(t_t, bound_tok),
        "accelerate_disk_vs_tiered_forward": _ratio(acc.get("forward_s") if ok(acc) else None, t_f),
        "accelerate_disk_vs_tiered_token": _ratio(acc.get("token_s") if ok(acc) else None, t_t),
    }
    st = C.get("accelerate_disk_st", {})
    ratios["accelerate_disk_st_vs_tiered_forward"] = _ratio(st.get("forward_s") if ok(st) else None, t_f)
    ratios["accelerate_disk_st_vs_tiered_token"] = _ratio(st.get("token_s") if ok(st) else None, t_t)
    ds = C.get("deepspeed", {})
    ratios["deepspeed_vs_tiered_forward"] = _ratio(ds.get("forward_s") if ok(ds) else None, t_f)
    ratios["deepspeed_vs_tiered_token"] = _ratio(ds.get("token_s") if ok(ds) else None, t_t)
    for vname, v in C.items():
        if "variant" in v and ok(v) and fio_best:
            vb_f = max(comp_fwd or 0, v["bytes_per_forward"] / (fio_best * GB))
            vb_t = max(comp_tok or 0, (v.get("bytes_per_token") or 0) / (fio_best * GB))
            ratios.setdefault("variants", {})[vname] = {
                "forward_vs_own_bound": _ratio(v["forward_s"], vb_f), "token_vs_own_bound": _ratio(v["token_s"], vb_t),
                "own_bound_forward_s": vb_f, "own_bound_token_s": vb_t}
    # the same ratios with the fio measured right before/after the tiered run (best of the two)
    tadj = max([v for v in (tie.get("fio_adjacent_gbps") or {}).values() if v], default=None)
    if tadj and t_f:
        b_f = max(comp_fwd or 0, bpf / (tadj * GB))
        b_t = max(comp_tok or 0, (bpt or 0) / (tadj * GB))
        ratios.update(tiered_adjacent_fio_gbps=tadj, tiered_forward_vs_bound_adjacent_fio=_ratio(t_f, b_f),
                      tiered_token_vs_bound_adjacent_fio=_ratio(t_t, b_t))
    result["ratios"] = ratios

    def meets(v, cond):
        return None if v is None else bool(cond(v))

    result["targets"] = {
        "forward_within_1.1x_bound": meets(ratios["tiered_forward_vs_bound"], lambda v: v <= TARGET_BOUND),
        "token_within_1.1x_bound": meets(ratios["tiered_token_vs_bound"], lambda v: v <= TARGET_BOUND),
        "token_2x_faster_than_accelerate_disk": meets(ratios["accelerate_disk_vs_tiered_token"],
                                                      lambda v: v >= TARGET_VS_ACCEL),
        "faster_than_deepspeed": None if not ok(ds) else bool(
            (ratios["deepspeed_vs_tiered_forward"] or 0) > 1 and (ratios["deepspeed_vs_tiered_token"] or 0) > 1),
    }
    result["logits_max_abs_diff_vs_memory"] = _logit_diffs(
        work_dir, [n.split(" ")[0] for n, r in C.items() if r.get("ok")])
    for n, d in result["logits_max_abs_diff_vs_memory"].items():
        if d > 1e-3:
            notes.append(f"{n}: first-forward logits differ from the in-memory model's by {d:.3g}")
    pm, pt = mem.get("cpu_probe_gflops"), tie.get("cpu_probe_gflops")
    if pm and pt and (max(pm) / max(pt) > 1.25 or max(pt) / max(pm) > 1.25):
        notes.append(f"the CPU ran at different speeds for the in-memory and tiered runs (matmul probe "
                     f"{max(pm):.0f} vs {max(pt):.0f} GFLOPS): the prompt ratio (compute-bound) is unreliable")
    ref_tokens = mem.get("tokens") if ok(mem) else None
    for n, r in C.items():
        if ok(r) and ref_tokens and r.get("tokens") != ref_tokens:
            notes.append(f"{n}: greedy tokens differ from the in-memory model's")
    return result


# =========================================================================== report


def print_report(r: dict, file=None) -> None:
    out = file or sys.stdout

    def p(s=""):
        print(s, file=out)

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
          f"engine {_f(bio.get('engine_read_gbps'), '{:.2f}')} GB/s "
          f"(4 KiB-page arena {_f(bio.get('engine_read_gbps_no_hugepages'), '{:.2f}')})")
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
          f"{x['forward_s']:>10.3f}{_f(x.get('token_s')):>9}{fmt_bytes(x.get('forward_read_bytes_steady')):>10}"
          f"{fmt_bytes(x.get('token_read_bytes_mean')):>10}{fmt_bytes(peak):>9}"
          + "{:>11}".format("/".join(_f(v, "{:.2f}") for v in (x.get("fio_adjacent_gbps") or {}).values()))
          + "{:>12}".format("/".join(f"{v:.0f}" for v in x.get("cpu_probe_gflops") or [])))
    b, io = r.get("bound", {}), r.get("io_bound", {})
    p(f"{'I/O bound':{w}}{'':>9}{'':>8}  {'(bytes/fio)':<22}{_f(io.get('forward_s')):>10}{_f(io.get('token_s')):>9}"
      f"{fmt_bytes(io.get('bytes_per_forward')):>10}{fmt_bytes(io.get('bytes_per_token')):>10}")
    p(f"{'max(compute, I/O)':{w}}{'':>9}{'':>8}  {'':<22}{_f(b.get('forward_s')):>10}{_f(b.get('token_s')):>9}"
      f"   ({b.get('forward_limited_by')}-bound prompt, {b.get('token_limited_by')}-bound decode)")
    prep = r.get("accelerate_prep")
    if prep and prep.get("ok"):
        p(f"accelerate disk_offload one-time offload_dir preparation: {prep['prep_s']:.1f} s "
          f"(under the limit, not in the rows above)")
    t = r["contenders"].get("tiered", {})
    if t.get("ok"):
        fw, dec, info = t.get("offload_forward") or {}, t.get("offload_decode") or {}, t.get("info", {})
        p(f"tiered: lookahead {t['offload_stats']['lookahead']}, resident {fmt_bytes(t['offload_stats']['resident_bytes'])}"
          f", peak host {fmt_bytes(t['offload_stats']['peak_host_bytes'])}, arena huge pages "
          f"{info.get('arena_hugepages')}, engine {info.get('engine')}")
        p(f"        steady forward: stall {_f(t.get('stall_per_forward_s'))} s/forward, prefetch hit rate "
          f"{_f(fw.get('prefetch_hit_rate'), '{:.2f}')}, {fmt_bytes(t.get('bytes_per_forward'))} read/forward "
          f"({_f(t.get('bytes_per_forward') / t['forward_s'] / GB if t.get('bytes_per_forward') else None, '{:.2f}')}"
          f" GB/s effective); cpu s/forward by thread {t.get('thread_cpu_per_forward_s')}")
        p(f"        decode: stall {_f(t.get('stall_per_token_s'))} s/token, prefetch hit rate "
          f"{_f(dec.get('prefetch_hit_rate'), '{:.2f}')}, {fmt_bytes(t.get('bytes_per_token'))} read/token "
          f"({_f(t.get('bytes_per_token') / t['token_s'] / GB if t.get('bytes_per_token') else None, '{:.2f}')} GB/s "
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
          f"{fmt_bytes(x['offload_stats']['resident_bytes'])}; stall {_f(x.get('stall_per_forward_s'))} s/forward, "
          f"{_f(x.get('stall_per_token_s'))} s/token; prefetch hit rate forward "
          f"{_f((x.get('offload_forward') or {}).get('prefetch_hit_rate'), '{:.2f}')}, decode "
          f"{_f((x.get('offload_decode') or {}).get('prefetch_hit_rate'), '{:.2f}')}; vs its own max(compute, I/O): "
          f"prompt {_f(v['forward_vs_own_bound'], '{:.2f}')}x, decode {_f(v['token_vs_own_bound'], '{:.2f}')}x"
          + (f"  ({x['note']})" if x.get("note") else ""))
    p()
    ra, tg = r["ratios"], r["targets"]

    def mark(v):
        return "" if v is None else ("ok" if v else "MISSED")

    p(f"tiered / max(in-memory compute, I/O bound): prompt {_f(ra['tiered_forward_vs_bound'], '{:.2f}')}x, "
      f"decode {_f(ra['tiered_token_vs_bound'], '{:.2f}')}x   (target <= {TARGET_BOUND}: "
      f"{mark(tg['forward_within_1.1x_bound'])}/{mark(tg['token_within_1.1x_bound'])}; I/O bound at the best "
      f"fio of the run, {_f(r.get('fio_read_gbps'), '{:.2f}')} GB/s)")
    if ra.get("tiered_adjacent_fio_gbps"):
        p(f"  the same with the fio measured around the tiered run ({ra['tiered_adjacent_fio_gbps']:.2f} GB/s): "
          f"prompt {_f(ra['tiered_forward_vs_bound_adjacent_fio'], '{:.2f}')}x, "
          f"decode {_f(ra['tiered_token_vs_bound_adjacent_fio'], '{:.2f}')}x")
    p(f"accelerate disk_offload / tiered: prompt {_f(ra['accelerate_disk_vs_tiered_forward'], '{:.2f}')}x, "
      f"per token {_f(ra['accelerate_disk_vs_tiered_token'], '{:.2f}')}x   (target >= {TARGET_VS_ACCEL} per token: "
      f"{mark(tg['token_2x_faster_than_accelerate_disk'])})")
    p(f"accelerate disk (safetensors in place) / tiered: prompt "
      f"{_f(ra['accelerate_disk_st_vs_tiered_forward'], '{:.2f}')}x, per token "
      f"{_f(ra['accelerate_disk_st_vs_tiered_token'], '{:.2f}')}x")
    ds = r["contenders"].get("deepspeed", {})
    p("deepspeed / tiered: " + (f"prompt {_f(ra['deepspeed_vs_tiered_forward'], '{:.2f}')}x, per token "
                                f"{_f(ra['deepspeed_vs_tiered_token'], '{:.2f}')}x" if ds.get("ok")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/offload_inference.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--small", action="store_true", help="a ~100 MB model for a quick smoke run")
    ap.add_argument("--dir", default=os.path.join(_ROOT, ".benchdir", "offload"),
                    help="bench directory on the disk to measure (default ./.benchdir/offload)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8: 2.17 GB fp32)")
    ap.add_argument("--budget", type=int, default=None,
                    help="tiered host budget in bytes (default: 1/4 of the model, rounded down to MiB)")
    ap.add_argument("--mem-limit", type=int, default=None,
                    help="cgroup memory limit in bytes (default max(0.6 x model, budget + 640 MiB))")
    ap.add_argument("--no-limit", action="store_true", help="run without the memory cgroup")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy decode steps timed (default 8)")
    ap.add_argument("--forwards", type=int, default=4, help="prompt forwards (default 4; headline: median of 2..)")
    ap.add_argument("--workers", type=int, default=None, help="tiered engine workers (default: config's)")
    ap.add_argument("--chunk", type=int, default=None, help="tiered engine chunk bytes (default: config's)")
    ap.add_argument("--lookahead", type=int, default=None, help="tiered offload lookahead (default: auto)")
    ap.add_argument("--diag-no-crc", action="store_true",
                    help="diagnostic: tiered without its per-read crc32 (monkeypatched; not a contender)")
    ap.add_argument("--tiered-variant", action="append", default=None, metavar="K=V,...",
                    help="diagnostic: also run tiered with overrides, e.g. 'budget=1200MiB' or "
                         "'nocrc' or 'force_lookahead=1' (keys budget, lookahead, workers, chunk, nocrc, force_lookahead); repeatable")
    ap.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    ap.add_argument("--no-fio", action="store_true", help="skip fio (then there is no I/O bound)")
    ap.add_argument("--no-bench-io", action="store_true", help="skip the posix-contig/engine reference")
    ap.add_argument("--no-cpu-offload", action="store_true", help="skip the unlimited cpu_offload run")
    ap.add_argument("--keep-offload-dir", action="store_true", help="keep accelerate's offload_dir")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the model files")
    ap.add_argument("--clean", action="store_true", help="remove --dir (model files included) at the end")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per contender (default 3600)")
    ap.add_argument("--plot", default=None, help="write a bar chart PNG here (needs matplotlib)")
    ap.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.contender:
        return run_contender(args.contender, args.spec, args.out)
    t0 = time.perf_counter()
    try:
        result = orchestrate(args)
    finally:
        if args.clean:
            shutil.rmtree(os.path.abspath(args.dir), ignore_errors=True)
    result["elapsed_s"] = time.perf_counter() - t0
    if args.plot:
        why = plot(result, args.plot)
        if why:
            log(why)
            result["notes"].append(why)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
