"""Checkpointing a training loop: how long the training thread stalls, end to end.

A Llama-architecture transformer built from its config (no download), trained with
AdamW on random tokens (>= 1 GB of parameters + optimizer state), checkpointed every
``--every`` steps by each contender in turn, in this one process:

- ``none``: no checkpoints (run first and last: the machine is shared, so both are shown);
- ``torch.save``: blocking ``torch.save`` of model + optimizer state dicts, then fsync;
- ``dcp.save``: ``torch.distributed.checkpoint.save`` with its ``FileSystemWriter``;
- ``dcp.async_save``: the same, asynchronous (state staged to CPU memory on the caller's
  thread; the previous save is awaited before the next, as DCP requires);
- ``dcp.async_save+tiered``: ``dcp.async_save`` with ``TieredStorageWriter``;
- ``lazy``: ``tiered.checkpoint.LazyCheckpointer`` (attached to the optimizer), writing through a
  ``TieredStore`` whose host tier holds its ``host_buffer`` and 64 MiB more.

Per contender: stall per checkpoint (time the training thread is blocked by the
checkpoint: the save call, waits for an earlier save, and for ``lazy`` the optimizer
hook's waits), the training loop's wall time vs ``none``, and the time from the save
call until the checkpoint is durable (fsynced and committed). Training runs with
``torch.set_num_threads(1)`` so one core is left to background flushing.

    python bench/checkpoint.py [--json] [--dir DIR] [--steps N] [--every K]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, vocab_size=32000,
                      tie_word_embeddings=False,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=args.device != "cpu")
    model.bench_shape = (args.batch, args.seq)
    return model, opt


def train_step(model, opt, gen) -> None:
    ids = torch.randint(0, model.config.vocab_size, model.bench_shape, generator=gen).to(model.device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()  # as reading the loss each step would


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


class Contender:
    """Checkpoint callbacks: ``checkpoint(step)`` returns the seconds the caller was blocked;
    ``finish()`` waits for everything and returns durable times (seconds from each save call)."""

    name = ""

    def __init__(self, model, opt, root: Path) -> None:
        self.model, self.opt, self.root = model, opt, root
        self.durable: list[float] = []

    def state(self):
        return {"model": self.model.state_dict(), "optim": self.opt.state_dict()}

    def open(self):
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def checkpoint(self, step: int) -> float:
        return 0.0

    def extra_stall(self) -> float:
        return 0.0

    def finish(self) -> list[float]:
        return self.durable

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class TorchSave(Contender):
    name = "torch.save"

    def checkpoint(self, step):
        t0 = time.perf_counter()
        path = self.root / f"step{step}.pt"
        torch.save(self.state(), path)
        fsync_path(path)
        dt = time.perf_counter() - t0
        self.durable.append(dt)
        for old in self.root.glob("*.pt"):
            if old != path:
                old.unlink()
        return dt


class DcpSave(Contender):
    name = "dcp.save"

    def checkpoint(self, step):
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        path = self.root / f"step{step}"
        dcp.save(self.state(), storage_writer=dcp.FileSystemWriter(path))
        dt = time.perf_counter() - t0
        self.durable.append(dt)
        for old in self.root.iterdir():
            if old != path:
                shutil.rmtree(old)
        return dt


class DcpAsync(Contender):
    name = "dcp.async_save"

    def __init__(self, *a, tiered: bool = False):
        super().__init__(*a)
        self.tiered = tiered
        self.name = "dcp.async_save+tiered" if tiered else "dcp.async_save"
        self.fut = None
        self.done_at: dict[int, float] = {}
        self.lock = threading.Lock()

    def writer(self, path):
        import torch.distributed.checkpoint as dcp

        if self.tiered:
            from tiered.checkpoint import TieredStorageWriter

            return TieredStorageWriter(path, host_buffer="512MiB")
        return dcp.FileSystemWriter(path)

    def checkpoint(self, step):
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        if self.fut is not None:
            self.fut.result()  # one in flight at a time
        t1 = time.perf_counter()
        for old in self.root.iterdir():  # keep the disk use bounded (outside the timed stall)
            shutil.rmtree(old)
        t2 = time.perf_counter()
        path = self.root / f"step{step}"
        fut = dcp.async_save(self.state(), storage_writer=self.writer(path))
        fut.add_done_callback(lambda _f, t2=t2: self.durable.append(time.perf_counter() - t2))
        self.fut = fut
        return (t1 - t0) + (time.perf_counter() - t2)

    def finish(self):
        if self.fut is not None:
            self.fut.result()
        return self.durable


class Lazy(Contender):
    name = "lazy"

    def __init__(self, *a, host_buffer: int):
        super().__init__(*a)
        self.host_buffer = host_buffer
        self.handles = []

    def open(self):
        from tiered.checkpoint import LazyCheckpointer

        super().open()
        # the snapshot buffers come from the store's host tier: room for host_buffer and a little more
        cfg = {"tiers": {"host": {"capacity": self.host_buffer + (64 << 20)},
                         "nvme": {"path": str(self.root), "capacity": "64GiB"}},
               "engine": {"workers": 4}}
        self.ck = LazyCheckpointer(cfg, keep_last=2, host_buffer=self.host_buffer).open()
        self.ck.attach(self.opt)
        return self

    def checkpoint(self, step):
        h = self.ck.save(self.state(), step)
        self.handles.append(h)
        return h.stats["save_s"]

    def extra_stall(self):
        return sum(h.stats["guard_wait_s"] for h in self.handles)

    def finish(self):
        self.ck.wait_all()
        self.durable = [h.stats["durable_s"] for h in self.handles]
        return self.durable

    def close(self):
        self.ck.close()
        super().close()


def run(contender: Contender | None, model, opt, steps: int, every: int, label: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    stalls, step_times = [], []
    if contender is not None:
        contender.every = every
        contender.open()
    t_loop = time.perf_counter()
    for i in range(1, steps + 1):
        t = time.perf_counter()
        train_step(model, opt, gen)
        stall = contender.checkpoint(i) if (contender is not None and i % every == 0) else None
        step_times.append(time.perf_counter() - t)
        if stall is not None:
            stalls.append(stall)
            log(f"  {label}: step {i}: checkpoint stall {stall:.4f} s")
    loop_s = time.perf_counter() - t_loop
    out = {"contender": label, "steps": steps, "loop_s": loop_s, "median_step_s": statistics.median(step_times)}
    if contender is not None:
        t = time.perf_counter()
        durable = contender.finish()
        out["final_drain_s"] = time.perf_counter() - t
        extra = contender.extra_stall()
        out["checkpoints"] = len(stalls)
        out["stall_call_s"] = stalls
        out["stall_hook_s"] = extra
        out["stall_per_checkpoint_s"] = (sum(stalls) + extra) / max(1, len(stalls))
        out["durable_s"] = durable
        out["durable_mean_s"] = statistics.mean(durable) if durable else None
        contender.close()
    log(f"{label}: loop {loop_s:.2f} s, median step {out['median_step_s']:.3f} s"
        + (f", stall/ckpt {out['stall_per_checkpoint_s']:.4f} s, durable {out['durable_mean_s']:.2f} s"
           if contender is not None else ""))
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the results as JSON and save them in bench/results")
    ap.add_argument("--dir", default="/var/tmp/tiered-bench-checkpoint", help="where checkpoints are written")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the model trains")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None, help="JSON file name (default checkpoint_<device>.json)")
    ap.add_argument("--results", default=str(RESULTS), help="folder for the JSON and PNG (default bench/results)")
    ap.add_argument("--only", default=None, help="comma-separated contenders to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model, opt = build(args)
    gen = torch.Generator().manual_seed(0)
    train_step(model, opt, gen)  # creates the optimizer state
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    optim = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    log(f"model {params / 1e9:.3f} GB parameters + {optim / 1e9:.3f} GB optimizer state = "
        f"{(params + optim) / 1e9:.3f} GB per checkpoint; {args.steps} steps, checkpoint every {args.every}")
    for _ in range(2):
        train_step(model, opt, gen)  # warm up allocator and kernels
    host_buffer = ((params + optim) * 105 // 100 + (1 << 21)) // 4096 * 4096
    contenders = {
        "torch.save": lambda: TorchSave(model, opt, root / "torch_save"),
        "dcp.save": lambda: DcpSave(model, opt, root / "dcp_save"),
        "dcp.async_save": lambda: DcpAsync(model, opt, root / "dcp_async"),
        "dcp.async_save+tiered": lambda: DcpAsync(model, opt, root / "dcp_async_tiered", tiered=True),
        "lazy": lambda: Lazy(model, opt, root / "lazy", host_buffer=host_buffer),
    }
    only = args.only.split(",") if args.only else list(contenders)
    results = [run(None, model, opt, args.steps, args.every, "none")]
    for name in only:
        results.append(run(contenders[name](), model, opt, args.steps, args.every, name))
    results.append(run(None, model, opt, args.steps, args.every, "none (again)"))
    base = statistics.mean(r["loop_s"] for r in results if r["contender"].startswith("none"))
    by = {r["contender"]: r for r in results}
    for r in results:
        r["slowdown_vs_none"] = r["loop_s"] / base - 1
    summary = {"baseline_loop_s": base}
    lazy = by.get("lazy")
    if lazy:
        for peer in ("torch.save", "dcp.save", "dcp.async_save"):
            if peer in by:
                summary[f"lazy_stall_over_{peer}"] = lazy["stall_per_checkpoint_s"] / by[peer]["stall_per_checkpoint_s"]
        summary["lazy_slowdown"] = lazy["slowdown_vs_none"]
    doc = {"bench": "checkpoint", "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads,
                                              "load_avg_at_end": os.getloadavg(), "device": args.device,
                                              "gpu": torch.cuda.get_device_name() if args.device != "cpu" else None,
                                              "torch": torch.__version__},
           "batch": [args.batch, args.seq],
           "model": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers,
                     "param_bytes": params, "optim_bytes": optim},
           "steps": args.steps, "every": args.every, "results": results, "summary": summary}
    log("\n| contender | stall / checkpoint (s) | loop (s) | slowdown vs none | durable after (s, mean) |")
    log("|---|---|---|---|---|")
    for r in results:
        s = r.get("stall_per_checkpoint_s")
        d = r.get("durable_mean_s")
        log(f"| {r['contender']} | {'' if s is None else f'{s:.4f}'} | {r['loop_s']:.2f} | "
            f"{100 * r['slowdown_vs_none']:+.1f} % | {'' if d is None else f'{d:.2f}'} |")
    log(json.dumps(summary, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    if args.json:
        results_dir = Path(args.results)
        results_dir.mkdir(parents=True, exist_ok=True)
        out = results_dir / (args.out or f"checkpoint_{args.device}.json")
        out.write_text(json.dumps(doc, indent=1))
        _plot(results, out.with_suffix(".png"))
        print(json.dumps(doc, indent=1))


def _plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results if "stall_per_checkpoint_s" in r]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([r["contender"] for r in rows], [r["stall_per_checkpoint_s"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("training-thread stall per checkpoint (s, log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
