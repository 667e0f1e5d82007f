"""A prefix shared across processes: process B loads what process A computed, vs B recomputing it.

    python bench/kv_shared_prefix.py [--prefix 8192] [--reps 3] [--url redis://HOST:PORT/DB] [--dir DIR]
                                     [--small] [--out FILE]

One seeded Llama-architecture model built from its config (fp32, 16 layers, hidden 256, 4 heads,
2 KV heads of 64 dims: 16 KiB of KV per token; ``--small``: 8 layers, hidden 128), a prompt of
``--prefix`` + 8 tokens, blocks of 512 tokens, torch on one intra-op thread (2-core machine).

1. A ``redis-server`` is started on loopback (a free port, a temp dir) unless ``--url`` names one.
2. Process A (its own local store) computes the prompt with a TieredCache: its full blocks are
   saved locally and published to the shared tier.
3. Process B (another process, its own local stores) runs, interleaved ``--reps`` times:
   - *recompute*: prefill of the whole prompt with ``DynamicCache`` (time to first token);
   - *shared*: a TieredCache on a **fresh, empty** local store: ``load_prefix`` pulls the blocks
     from the shared tier (checked, put durably into the local store), then prefill of the 8
     suffix tokens only: time to first token, and the load alone.
   Both then decode 8 tokens greedily; the tokens must be equal.

Goal: shared >= 5x faster than recompute (time to first token). Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = 512
SUFFIX = 8
NEW = 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(small: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=128 if small else 256, intermediate_size=256 if small else 512,
                      num_hidden_layers=8 if small else 16, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32768)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def prompt(n: int):
    import torch

    return torch.randint(3, 1024, (1, n), generator=torch.Generator().manual_seed(7))


def store_config(directory: Path, url: str, capacity: str) -> dict:
    return {"tiers": {"host": {"capacity": "512MiB"}, "nvme": {"path": str(directory), "capacity": "2GiB"},
                      "shared": {"url": url, "capacity": capacity}},
            "engine": {"workers": 4, "chunk": "8MiB"}}


def cache_arg(model) -> str:
    """Recent transformers name the forward's cache argument ``cache``, earlier ones ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def greedy(model, cache, ids, skip: int) -> dict:
    """Prefill ``ids[:, skip:]`` on ``cache`` (time to first token), then NEW - 1 greedy steps."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids[:, skip:], **{cache_arg(model): cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        tokens = [int(tok)]
        ttft = time.perf_counter() - t0
        for _ in range(NEW - 1):
            tok = model(tok, **{cache_arg(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
    if cache.get_seq_length() != ids.shape[1] + NEW - 1:
        raise RuntimeError(f"the model did not fill the {type(cache).__name__}")
    return {"prefill_s": ttft, "tokens": tokens}


# --------------------------------------------------------------------------- the two processes


def process_a(args) -> dict:
    """Compute the prompt once, publishing its full blocks to the shared tier."""
    import tiered
    from tiered.kv import KVStore, TieredCache, model_identity

    model = build_model(args.small)
    ids = prompt(args.prefix + SUFFIX)
    with tempfile.TemporaryDirectory(dir=args.dir) as d, \
            tiered.TieredStore(store_config(Path(d), args.url, args.capacity)) as store:
        kv = KVStore(store, model_identity(model), block_size=BLOCK)
        try:
            with TieredCache(model.config, kv, model=model) as cache:
                assert cache.load_prefix(ids) == 0  # declares the prompt: its blocks are saved under its hashes
                run = greedy(model, cache, ids, 0)
            return {"compute_s": run["prefill_s"], "tokens": run["tokens"], "kv": dict(kv.stats),
                    "shared": dict(kv.shared.stats), "shared_used_bytes": kv.shared.used_bytes()}
        finally:
            kv.close()


def process_b(args) -> dict:
    """Interleaved: recompute with DynamicCache, load from the shared tier into an empty local store."""
    import tiered
    from transformers import DynamicCache

    from tiered.kv import KVStore, TieredCache, model_identity

    model = build_model(args.small)
    identity = model_identity(model)
    ids = prompt(args.prefix + SUFFIX)
    recompute, shared = [], []
    for rep in range(args.reps):
        r = greedy(model, DynamicCache(config=model.config), ids, 0)
        recompute.append({"ttft_s": r["prefill_s"], "tokens": r["tokens"]})
        log(f"B rep {rep}: recompute {r['prefill_s']:.2f} s")
        with tempfile.TemporaryDirectory(dir=args.dir) as d, \
                tiered.TieredStore(store_config(Path(d), args.url, args.capacity)) as store:
            kv = KVStore(store, identity, block_size=BLOCK)
            try:
                with TieredCache(model.config, kv, model=model) as cache:
                    t0 = time.perf_counter()
                    n = cache.load_prefix(ids)
                    load = time.perf_counter() - t0
                    s = greedy(model, cache, ids, n)
                shared.append({"ttft_s": load + s["prefill_s"], "prefix_load_s": load, "prefix_tokens": n,
                               "suffix_prefill_s": s["prefill_s"], "tokens": s["tokens"],
                               "shared_hit_blocks": kv.stats["shared_hit_blocks"],
                               "loaded_bytes": kv.stats["loaded_bytes"]})
                log(f"B rep {rep}: shared {load + s['prefill_s']:.2f} s ({n} tokens loaded in {load:.2f} s)")
            finally:
                kv.close()
    return {"recompute": recompute, "shared": shared}


def child(role: str, args) -> None:
    import torch

    torch.set_num_threads(1)
    out = process_a(args) if role == "a" else process_b(args)
    print(json.dumps(out))


# --------------------------------------------------------------------------- the parent


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: apt-get install -y redis-server, or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                sys.exit(f"redis-server on port {port} did not start")
            time.sleep(0.05)


def server_version() -> str:
    out = subprocess.run([shutil.which("redis-server") or "redis-server", "--version"], capture_output=True,
                         text=True, timeout=30).stdout
    return " ".join(out.split()[:3])


def run_child(role: str, args) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--url", args.url, "--prefix", str(args.prefix),
           "--reps", str(args.reps), "--capacity", args.capacity] + (["--small"] if args.small else []) + \
          (["--dir", args.dir] if args.dir else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)
    if r.returncode:
        sys.exit(f"process {role.upper()} failed ({r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(a: dict, b: dict) -> dict:
    rec = statistics.median(x["ttft_s"] for x in b["recompute"])
    sh = statistics.median(x["ttft_s"] for x in b["shared"])
    same = all(x["tokens"] == a["tokens"] for x in b["recompute"] + b["shared"])
    return {"recompute_ttft_s_median": rec, "shared_ttft_s_median": sh,
            "shared_prefix_load_s_median": statistics.median(x["prefix_load_s"] for x in b["shared"]),
            "speedup": rec / sh, "goal": 5.0, "goal_met": rec / sh >= 5.0, "tokens_equal": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prefix", type=int, default=8192)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--url", default=None, help="an existing server (default: start one on loopback)")
    p.add_argument("--capacity", default="1GiB", help="the shared tier's capacity")
    p.add_argument("--dir", default=None, help="where the local stores live (default: the temp dir)")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--role", choices=("a", "b"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        return child(args.role, args)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url is None:
            proc, args.url = start_redis(Path(tmp))
        try:
            load_start = os.getloadavg()
            log(f"process A computes the {args.prefix}-token prefix, publishing it to {args.url}")
            a = run_child("a", args)
            log(f"A: {a['compute_s']:.2f} s, {a['shared']['published']} entries published")
            b = run_child("b", args)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)
    import torch

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "threads": 1, "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
              "model": "llama " + ("8 layers hidden 128" if args.small else "16 layers hidden 256") +
                       ", 4 heads, 2 KV heads of 64, fp32",
              "prefix_tokens": args.prefix, "suffix_tokens": SUFFIX, "block_tokens": BLOCK, "reps": args.reps,
              "server": (server_version() + " on loopback") if proc is not None else args.url,
              "process_a": a, "process_b": b, "summary": summarise(a, b)}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
