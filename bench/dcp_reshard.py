"""DCP load time with resharding against loading at the world size the checkpoint was saved at.

    python bench/dcp_reshard.py [--hidden 768] [--layers 4] [--vocab 8192] [--rounds 3] [--json [--out PATH]]

A Llama built from its config (tiny-model shapes scaled up: ``--hidden``, ``--layers``,
``--vocab``), ``fully_shard`` per decoder layer and at the root, with ``torch.optim.AdamW``
state after one step: model and optimizer state (12 bytes per parameter, DTensors) saved with
``dcp.save`` through ``TieredStorageWriter`` at world 1, 2 and 3 (gloo on CPU, one process per
rank, each rank's store in the checkpoint directory). Then, interleaved for ``--rounds`` rounds
(order reversed every other round), ``dcp.load`` through ``TieredStorageReader`` of:

- 1 -> 1 (baseline) and 2 -> 1 (resharding): one process loads the whole state;
- 3 -> 3 (baseline) and 1 -> 3 (resharding): each of three processes loads a third.

Load time: from a barrier before ``dcp.load`` to a barrier after it, as rank 0 sees it (new
processes each time; the model and the optimizer state to load into are built before). Page
caches are dropped before every load (``echo 3 > /proc/sys/vm/drop_caches`` after ``sync``
when this process may; else ``posix_fadvise(DONTNEED)`` on the checkpoint's files), and the
store reads the data with O_DIRECT anyway. Each load is checked: the float64 sum of every
DTensor shard over the ranks equals the saved state's. Also reported per load: the bytes the
reader read per rank (its store engine's read counter during ``read_data``: data, block tables,
4 KiB padding) against the bytes of tensor data its load plan needs.
Goal: each resharding load within 1.5x of its baseline. Results with ``uptime`` before and
after: ``bench/results/dcp_reshard_2026-12-07.json`` (``--json``; ``--out`` another file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "dcp_reshard_2026-12-07.json"
PAIRS = [("1->1", 1, 1), ("2->1", 2, 1), ("3->3", 3, 3), ("1->3", 1, 3)]  # baseline, resharding, ...
GOAL = 1.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(spec: dict, world: int):
    """The model (sharded over ``world`` ranks) and its AdamW."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    h = spec["hidden"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=h, intermediate_size=spec["ffn"], num_hidden_layers=spec["layers"],
        num_attention_heads=h // 64, num_key_value_heads=max(1, h // 256), max_position_embeddings=128,
        tie_word_embeddings=False))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def shard_sum(state: dict) -> float:
    """float64 sum of every DTensor's local shard over all ranks (replicated values skipped)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    total = torch.zeros((), dtype=torch.float64)

    def walk(v) -> None:
        nonlocal total
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, DTensor):
            total += v.to_local().double().sum()

    walk(state)
    dist.all_reduce(total)
    return float(total)


def counting_reader(path: str):
    """A TieredStorageReader that counts the bytes it reads and the bytes its plan needs."""
    from contextlib import contextmanager

    from torch.distributed.checkpoint.planner import LoadItemType

    from tiered.checkpoint import TieredStorageReader
    from tiered.checkpoint.format import dtype_from

    class Counting(TieredStorageReader):
        read_bytes = 0
        needed_bytes = 0

        def read_data(self, plan, planner):
            for req in plan.items:
                info = self.storage_data.get(req.storage_index)
                if req.type == LoadItemType.TENSOR and info is not None:
                    size = dtype_from(info["dtype"], "bench").itemsize
                    self.needed_bytes += math.prod(req.lengths) * size
            return super().read_data(plan, planner)

        @contextmanager
        def _open_store(self):
            with super()._open_store() as store:
                before = store.engine.stats()["read"]["bytes"]
                yield store
                self.read_bytes += store.engine.stats()["read"]["bytes"] - before

    return Counting(path)


def _rank(rank: int, world: int, mode: str, spec: dict, ckpt: str, init: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tiered.checkpoint import TieredStorageWriter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        model, opt = build(spec, world)
        found: dict = {"rank": rank}
        if mode == "save":
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.01)
            opt.step()
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.save(state, storage_writer=TieredStorageWriter(ckpt))
        else:
            msd, osd = get_state_dict(model, opt)  # also creates the optimizer state to load into
            state = {"model": msd, "optim": osd}
            reader = counting_reader(ckpt)
            dist.barrier()
            t0 = time.perf_counter()
            dcp.load(state, storage_reader=reader)
            dist.barrier()
            found.update(load_s=time.perf_counter() - t0, read_bytes=reader.read_bytes,
                         needed_bytes=reader.needed_bytes)
        found["sum"] = shard_sum(state)
        Path(out, f"r{rank}.json").write_text(json.dumps(found))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(world: int, mode: str, spec: dict, ckpt: Path, work: Path) -> list[dict]:
    """One process per rank (fork); what each wrote."""
    tag = f"{mode}-{world}-{time.monotonic_ns()}"
    out = work / tag
    out.mkdir()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, world, mode, spec, str(ckpt), str(work / f"init-{tag}"), str(out)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(900)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise SystemExit(f"{mode} at world {world} of {ckpt}: exit codes {codes}")
    return [json.loads((out / f"r{r}.json").read_text()) for r in range(world)]


def drop_caches(ckpt_dirs: list[Path]) -> str:
    """Drop the page cache before a load: all of it if this process may, else the checkpoint's files."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for d in ckpt_dirs:
            for p in d.rglob("*"):
                if p.is_file():
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
        return "fadvise"


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="where the checkpoints go (default: a temporary directory, removed after)")
    ap.add_argument("--json", action="store_true", help="write the results to --out")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"the results file (default {RESULTS})")
    a = ap.parse_args()
    spec = {"hidden": a.hidden, "ffn": a.ffn, "layers": a.layers, "vocab": a.vocab}
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="dcp_reshard_"))
    work.mkdir(parents=True, exist_ok=True)
    before = uptime()
    log(f"uptime before: {before}")
    try:
        ckpts = {w: work / f"saved-w{w}" for w in (1, 2, 3)}
        sums = {}
        for w, d in ckpts.items():
            sums[w] = run(w, "save", spec, d, work)[0]["sum"]
            log(f"saved at world {w}: {dir_bytes(d) / 2**20:.0f} MiB on disk")
        loads: dict = {name: [] for name, _s, _l in PAIRS}
        caches = None
        for rnd in range(a.rounds):
            for name, saved, world in (PAIRS if rnd % 2 == 0 else PAIRS[::-1]):
                caches = drop_caches(list(ckpts.values()))
                ranks = run(world, "load", spec, ckpts[saved], work)
                got = ranks[0]["sum"]
                if not math.isclose(got, sums[saved], rel_tol=1e-9):
                    raise SystemExit(f"load {name}: shard sum {got!r}, saved {sums[saved]!r}")
                loads[name].append({"load_s": ranks[0]["load_s"],
                                    "read_bytes_per_rank": max(r["read_bytes"] for r in ranks),
                                    "needed_bytes_per_rank": max(r["needed_bytes"] for r in ranks),
                                    "read_bytes_by_rank": [r["read_bytes"] for r in ranks],
                                    "needed_bytes_by_rank": [r["needed_bytes"] for r in ranks]})
                log(f"round {rnd} {name}: {ranks[0]['load_s']:.3f} s, "
                    f"read {loads[name][-1]['read_bytes_per_rank'] / 2**20:.0f} MiB per rank "
                    f"(plan needs {loads[name][-1]['needed_bytes_per_rank'] / 2**20:.0f} MiB)")
        after = uptime()
        summary = {name: {"median_s": statistics.median(x["load_s"] for x in v),
                          "min_s": min(x["load_s"] for x in v),
                          "read_bytes_per_rank": v[0]["read_bytes_per_rank"],
                          "needed_bytes_per_rank": v[0]["needed_bytes_per_rank"],
                          "read_bytes_by_rank": v[0]["read_bytes_by_rank"],
                          "needed_bytes_by_rank": v[0]["needed_bytes_by_rank"]} for name, v in loads.items()}
        ratios = {"2->1 / 1->1": summary["2->1"]["median_s"] / summary["1->1"]["median_s"],
                  "1->3 / 3->3": summary["1->3"]["median_s"] / summary["3->3"]["median_s"]}
        for name, s in summary.items():
            print(f"{name}: median {s['median_s']:.3f} s (min {s['min_s']:.3f}), read "
                  f"{s['read_bytes_per_rank'] / 2**20:.0f} MiB per rank, plan needs "
                  f"{s['needed_bytes_per_rank'] / 2**20:.0f} MiB")
        for name, r in ratios.items():
            print(f"ratio {name}: {r:.2f} (goal <= {GOAL}: {'met' if r <= GOAL else 'NOT met'})")
        print(f"uptime before: {before}\nuptime after: {after}")
        result = {"bench": "dcp_reshard", "date": "2026-12-07", "spec": spec,
                  "state_bytes_on_disk": {f"world{w}": dir_bytes(d) for w, d in ckpts.items()},
                  "caches": caches + " before every load; data reads are O_DIRECT",
                  "cpus": os.cpu_count(), "rounds": a.rounds, "loads": loads, "summary": summary,
                  "ratios": ratios, "goal": GOAL, "uptime_before": before, "uptime_after": after,
                  "torch": torch.__version__}
        if a.json:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1) + "\n")
            log(f"wrote {a.out}")
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
