"""What ``bench/finetune.py`` and its modules share: units, the log, the model and its batches,
and running one contender in its own process (``bench/finetune.py --contender NAME``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(_ROOT, "bench", "finetune.py")
MiB, GB = 1 << 20, 1e9


def log(msg: str) -> None:
    print(f"[finetune {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(spec: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                                   intermediate_size=spec["inter"], num_hidden_layers=spec["layers"],
                                   num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
                                   max_position_embeddings=max(64, spec["seq"]))
    return transformers.LlamaForCausalLM(cfg)


def batch(spec: dict, step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    return torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)


def deepspeed_unavailable() -> str | None:
    """Why the DeepSpeed contender cannot run here, in one line (None: it can). Its NVMe offload
    builds DeepSpeed's async_io op, which needs the Linux AIO headers."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as e:
        return f"deepspeed is not installed ({e}); pip install 'tiered[finetune]'"
    try:
        ok = AsyncIOBuilder().is_compatible(verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means the op cannot be built
        return f"DeepSpeed's async_io op cannot be checked ({type(e).__name__}: {e})"
    if not ok:
        return ("DeepSpeed's NVMe offload needs its async_io op, which needs the Linux AIO headers: "
                "install them (Debian/Ubuntu: apt-get install libaio-dev) and run again")
    return None


def child(name: str, spec: dict, timeout: float) -> dict:
    if name == "deepspeed" and (why := deepspeed_unavailable()):
        log(f"{name}: skipped: {why}")
        return {"error": why}
    log(f"{name}: starting")
    outp = os.path.join(spec["dir"], f"{name}.json")
    if os.path.exists(outp):
        os.remove(outp)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=_ROOT)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, SCRIPT, "--contender", name,
                               "--spec", json.dumps(spec), "--out", outp], env=env, timeout=timeout,
                              stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-40:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    with open(outp) as f:
        res = json.load(f)
    res["process_wall_s"] = wall
    log(f"{name}: done in {wall:.0f} s")
    return res
