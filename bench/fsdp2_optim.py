"""OffloadedAdamW under FSDP2 at world 2 against one rank stepping half the parameters.

    python bench/fsdp2_optim.py [--params 40e6] [--host 64MiB] [--steps 4] [--json]

Each rank of a gloo group of two holds a ``fully_shard`` MLP of ``--params`` parameters, so
half of them locally, with its optimizer state (12 bytes per local parameter) in its own store
shard (``{rank}`` in the tier path) behind a host tier of ``--host``; the reference is one
process with an MLP of half the parameters and the same host tier. Reported: the optimizer
step's median (min) seconds per rank and the reference's, their ratio (goal: at most 1.3), and
the bytes each rank's store read and wrote per step. Storage reads are O_DIRECT (cold).
Results: ``bench/results/fsdp2_optim_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def mlp(params: float, seed: int = 0) -> torch.nn.Module:
    """Four square layers of about ``params`` parameters in all."""
    width = int((params / 4) ** 0.5) // 64 * 64
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(4)])


def run_steps(model, opt, store, steps: int, width: int) -> dict:
    times, reads, writes = [], [], []
    for i in range(steps + 1):
        model(torch.randn(8, width)).square().mean().backward()
        t = store.stats()["tiers"]["nvme"]
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        u = store.stats()["tiers"]["nvme"]
        opt.zero_grad()
        if i:  # the first step creates the state
            times.append(dt)
            reads.append(u["bytes_read"] - t["bytes_read"])
            writes.append(u["bytes_written"] - t["bytes_written"])
    return {"step_s": times, "median_s": statistics.median(times), "min_s": min(times),
            "read_per_step": statistics.median(reads), "written_per_step": statistics.median(writes)}


def _cfg(root: str, host: str) -> dict:
    return {"tiers": {"host": {"capacity": host}, "nvme": {"path": root, "capacity": "32GiB"}},
            "engine": {"workers": 4}}


def _rank(rank: int, world: int, spec: dict, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tiered.optim import OffloadedAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        model = mlp(spec["params"])
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        width = model[0].in_features
        with OffloadedAdamW(model.parameters(), lr=1e-4, config=_cfg(spec["dir"] + "/r{rank}", spec["host"])) as opt:
            r = run_steps(model, opt, opt.store, spec["steps"], width)
            r["local_params"] = sum(p.to_local().numel() for p in model.parameters())
        Path(out).write_text(json.dumps(r))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single(spec: dict, out: str) -> None:
    from tiered.optim import OffloadedAdamW

    torch.set_num_threads(1)
    model = mlp(spec["params"] / 2)
    width = model[0].in_features
    with OffloadedAdamW(model.parameters(), lr=1e-4, config=_cfg(spec["dir"] + "/single", spec["host"])) as opt:
        r = run_steps(model, opt, opt.store, spec["steps"], width)
        r["local_params"] = sum(p.numel() for p in model.parameters())
    Path(out).write_text(json.dumps(r))


def _spawn(target, args_list: list[tuple], timeout: float) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.kill()
    if bad:
        raise SystemExit(f"a process failed (exit codes {bad})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=40e6, help="parameters of the sharded model (default 40e6)")
    ap.add_argument("--host", default="64MiB", help="each store's host tier (default 64MiB)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each contender (default 2)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsdp2-bench-", dir=os.environ.get("TIERED_BENCH_DIR")))
    spec = {"params": args.params, "host": args.host, "steps": args.steps, "dir": str(work)}
    result = {"spec": {k: v for k, v in spec.items() if k != "dir"}, "loadavg_start": os.getloadavg(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": []}
    try:
        for rnd in range(args.rounds):  # interleaved: drift and other load hit both alike
            outs = [str(work / f"rank{r}.json") for r in range(2)]
            _spawn(_rank, [(r, 2, spec, str(work / f"init{rnd}"), outs[r]) for r in range(2)], 1800)
            single = str(work / "single.json")
            _spawn(_single, [(spec, single)], 1800)
            ranks = [json.loads(Path(o).read_text()) for o in outs]
            one = json.loads(Path(single).read_text())
            result["rounds"].append({"ranks": ranks, "single": one})
            print(f"round {rnd + 1}: ranks {[round(r['median_s'], 3) for r in ranks]} s, "
                  f"single rank on half the parameters {one['median_s']:.3f} s", file=sys.stderr)
            for d in work.iterdir():
                if d.is_dir():
                    shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rank_med = statistics.median(max(r["median_s"] for r in rd["ranks"]) for rd in result["rounds"])
    one_med = statistics.median(rd["single"]["median_s"] for rd in result["rounds"])
    result["summary"] = {
        "world2_step_s (slowest rank, median over rounds)": rank_med, "single_half_step_s": one_med,
        "ratio": rank_med / one_med, "goal_ratio_at_most": 1.3, "goal_met": rank_med / one_med <= 1.3,
        "per_rank_read_per_step": [r["read_per_step"] for r in result["rounds"][-1]["ranks"]],
        "per_rank_written_per_step": [r["written_per_step"] for r in result["rounds"][-1]["ranks"]],
        "single_read_per_step": result["rounds"][-1]["single"]["read_per_step"]}
    result["loadavg_end"] = os.getloadavg()
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"fsdp2_optim_{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1))
    for k, v in result["summary"].items():
        print(f"{k}: {v}")
    print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
