"""Colocated generation and fine-tuning on one store: fixed per-workload shares vs the governor.

One process, one ``TieredStore`` per contender with three tiers: a host tier, ``nvme`` (a
storage tier on the local disk, unthrottled) and ``flash`` (a second storage tier in another
directory, throttled to ``--flash-bw`` both ways with the tier's ``read_bandwidth`` /
``write_bandwidth``). The job alternates rounds of

(a) generation: a Llama-style model (built from a transformers config, seeded fp32 weights)
    wrapped by ``tiered.offload`` generates ``--new-tokens`` greedy tokens for a batch of
    prompts with a ``TieredCache`` whose KV spills into the same store, and
(b) fine-tuning: one step of ``OffloadedAdamW(model=...)`` training the same offloaded weights
    (backward re-reads each unit, its state chunk is read, updated and written, the new weights
    are written back).

The model's weights plus the optimizer state (master + two moments, two step parities) do not
fit ``nvme``, so where each object lives matters. Contenders, all in the same run, interleaved
round by round (the order rotates each round), with the same seeds:

- ``fixed``: ``[policy] migration = "none"``; each workload reserves its part of nvme through
  ``[owners]`` shares (``offload``: the weights and a rewrite of them; ``optim``: the rest),
  so the optimizer state that does not fit its share lives on flash;
- ``governed``: ``migration = "auto"`` (``schedule`` over the plans workloads declare,
  ``fallback = "lru"`` elsewhere), no storage shares; the module wrapper declares each forward's
  units, while ``OffloadedAdamW(model=...)`` declares no plan (``step()`` withdraws its plan);
- ``governed-sieve``: the same with ``fallback = "sieve"``;
- ``governed-lru-planned`` (a separate, shorter case against ``fixed``, ``--planned-rounds``:
  its governor falls behind, and its moves would run into the other contenders' rounds):
  ``governed`` where the benchmark also declares, after each step, the state chunks the next
  step will read (``store.plan``, owner ``optim/adamw-next``), so it shows what such plans change;
- ``bound``: ``fixed`` with the flash tier unthrottled (as fast as nvme): what no placement of
  the objects can beat, so ``fixed / bound`` is the most a governor could gain here.

Every contender must produce the same tokens and the same losses, bit for bit (checked). A
round's end-to-end time is generation + training + the time to let the governor finish the
moves it decided during the round (``store.sync_governor``: they must not run into another
contender's round; 0 for ``fixed``). Round 0 (the optimizer's first step, no state to read)
is a warm-up, not timed. Per contender: median and min per round, bytes read and written per
storage tier, bytes the governor moved per tier pair, its decisions and refusals
(``store.stats()["governor"]``), and where each workload's objects ended up.

Usage: ``python bench/colocated.py [--rounds 9] [--flash-bw 400MB/s,100MB/s] [--json]``;
``--json`` writes ``bench/results/colocated_2026-12-07.json`` (and the plot next to it).
Recorded with ``--json --rounds 9 --nvme-x 3 --flash-bw 400MB/s,100MB/s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiered.sizes import parse_rate  # noqa: E402

from _colocated_job import MiB, Contender, build_model, weight_bytes  # noqa: E402
from _colocated_report import plot, summarize, table  # noqa: E402

RESULT = os.path.join(_ROOT, "bench", "results", "colocated_2026-12-07.json")
GOAL = 1.5  # governed end to end vs fixed shares


def log(msg: str) -> None:
    print(f"[colocated {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_spec(a: argparse.Namespace, nvme_x: float, flash_bw: str, sync_timeout: float) -> dict:
    """The model, the workloads and the tier sizes (derived from the model's weight bytes)."""
    spec = {"seed": 0, "vocab": a.vocab, "hidden": a.hidden, "inter": a.inter, "layers": a.layers,
            "heads": a.heads, "prompt": a.prompt, "new_tokens": a.new_tokens, "gen_batch": a.gen_batch,
            "kv_block": 16, "kv_device_kib": a.kv_device_kib, "train_batch": a.train_batch, "seq": a.seq,
            "lr": 1e-4, "workers": a.workers, "flash_bw": flash_bw,
            "migration_bandwidth": a.migration_bandwidth, "migration_batch": a.migration_batch}
    w = weight_bytes(build_model(spec))
    unit = max(w // (a.layers + 2), 1)  # about one decoder layer's weights
    kv = a.layers * a.gen_batch * (a.prompt + a.new_tokens) * a.hidden * 2 * 4  # K and V, fp32
    w_mib = -(-w // MiB)
    spec["weight_bytes"] = w
    spec["nvme_x"] = nvme_x
    spec["optim_state_bytes"] = 2 * 3 * w  # master + 2 moments (fp32), two step parities
    spec["kv_bytes"] = kv
    spec["sync_timeout_s"] = sync_timeout
    spec["flash_bytes_per_s"] = parse_rate(flash_bw, where="--flash-bw")
    spec["mib"] = {
        "offload_host": -(-4 * unit // MiB) + 4,  # the streaming window: the weights do not fit
        "optim_host": -(-6 * 3 * unit // MiB) + 4,  # the optimizer's pipeline (5 chunks of 12 B/param)
        "nvme": round(nvme_x * w_mib),  # weights + state do not fit
        "offload_nvme": 2 * w_mib + 8,  # fixed: the weights and one rewrite of them
        "kv_nvme": -(-kv // MiB) + 4,  # fixed: the generation's KV
        "flash": max(2048, 12 * w_mib),
    }
    spec["mib"]["host"] = spec["mib"]["offload_host"] + spec["mib"]["optim_host"] + a.host_extra
    return spec


def run(root: str, names: list[str], n_rounds: int, spec: dict) -> dict:
    root = os.path.join(root, "colocated")
    contenders = {}
    try:
        for n in names:
            log(f"open {n}")
            contenders[n] = Contender(n, spec, root)
        rounds: dict[str, list] = {n: [] for n in names}
        for r in range(n_rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                rec = contenders[n].round(r)
                rec["round"] = r
                rounds[n].append(rec)
                log(_round_line(r, n, rec))
        final = {n: {"governor": c.store.stats()["governor"], "placement": c.placement(),
                     "owners": c.store.stats()["owners"]} for n, c in contenders.items()}
    finally:
        for c in contenders.values():
            c.close()
    return {"rounds": rounds, "final": final}


def _round_line(r: int, name: str, rec: dict) -> str:
    room = rec["nvme"]
    return (f"round {r} {name:15s} e2e {rec['e2e_s']:.2f}s gen {rec['gen_s']:.2f} train {rec['train_s']:.2f} "
            f"drain {rec['drain_s']:.2f} loss {rec['loss']:.6f} | gen read {_mb(rec['gen_io']['bytes_read'])} | "
            f"nvme free {room['free'] / 1e6:.0f} (policy {room.get('policy_free', 0) / 1e6:.0f}) "
            f"piece {room['largest_free'] / 1e6:.0f} | train read {_mb(rec['train_io']['bytes_read'])} "
            f"wrote {_mb(rec['train_io']['bytes_written'])} | moved {_mb(rec['bytes_migrated'])} {rec['governor']}")


def _mb(d: dict) -> str:
    return " ".join(f"{k}:{v / 1e6:.0f}" for k, v in d.items()) or "-"


def check_identical(rounds: dict) -> dict:
    """Tokens and losses of every contender equal the first one's, round by round."""
    names = list(rounds)
    ref = rounds[names[0]]
    bad = [f"{n} round {i}: {'tokens' if a['tokens'] != b['tokens'] else 'loss'} differ"
           for n in names[1:] for i, (a, b) in enumerate(zip(ref, rounds[n]))
           if a["tokens"] != b["tokens"] or a["loss"] != b["loss"]]
    return {"identical": not bad, "mismatches": bad[:10]}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/colocated.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help=f"write {os.path.relpath(RESULT, _ROOT)} (+ .png)")
    ap.add_argument("--plot", default=None, help="write the per-round plot here (default with --json: next to it)")
    ap.add_argument("--dir", default=os.path.join(_ROOT, ".benchdir"), help="where the tiers' directories go")
    ap.add_argument("--contenders", default="fixed,governed,governed-sieve,bound")
    ap.add_argument("--sync-timeout", type=float, default=120.0,
                    help="seconds a round waits for the governor's moves (store.sync_governor)")
    ap.add_argument("--planned-rounds", type=int, default=4,
                    help="rounds of the separate fixed vs governed-lru-planned case (0: skip it)")
    ap.add_argument("--planned-sync-timeout", type=float, default=30.0,
                    help="store.sync_governor timeout in that case (its governor falls behind)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per contender, the first untimed (default 6)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per round")
    ap.add_argument("--gen-batch", type=int, default=1, help="prompts generated together")
    ap.add_argument("--kv-device-kib", type=int, default=4096, help="TieredCache device budget (KV past it spills)")
    ap.add_argument("--train-batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64, help="training sequence length")
    ap.add_argument("--nvme-x", default="3,5", help="nvme capacity in multiples of the weight bytes; a comma "
                    "list runs one case per value (default 3,5)")
    ap.add_argument("--host-extra", type=int, default=32, help="MiB of host tier beyond the two shares (KV, cache)")
    ap.add_argument("--flash-bw", default="400MB/s", help="flash tier's read and write throttle; a comma list "
                    "runs the nvme cases once per value (default 400MB/s)")
    ap.add_argument("--migration-bandwidth", default="128MB/s", help="[policy] migration_bandwidth")
    ap.add_argument("--migration-batch", type=int, default=64, help="[policy] migration_batch")
    ap.add_argument("--workers", type=int, default=4, help="[engine] workers")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    return ap


def main() -> int:
    ap = _parser()
    a = ap.parse_args()
    if a.rounds < 2 or a.planned_rounds == 1:
        ap.error("--rounds and --planned-rounds must be at least 2 (the first is a warm-up)")
    import torch

    torch.set_num_threads(a.threads)
    cases = []
    names = a.contenders.split(",")
    for bw in a.flash_bw.split(","):
        for x in [float(v) for v in a.nvme_x.split(",")]:
            cases.append(run_case(a.dir, names, a.rounds, make_spec(a, x, bw, a.sync_timeout)))
            print(table(cases[-1]), flush=True)
    out = {"cases": cases, "torch": torch.__version__, "cpus": os.cpu_count(), "threads": a.threads}
    if a.planned_rounds:  # its governor falls behind: a short separate case, not interleaved with the others
        spec = make_spec(a, float(a.nvme_x.split(",")[0]), a.flash_bw.split(",")[0], a.planned_sync_timeout)
        out["planned_diagnostic"] = run_case(a.dir, ["fixed", "governed-lru-planned"], a.planned_rounds, spec)
        print(table(out["planned_diagnostic"]), flush=True)
    out["identical"] = all(c["identical"] for c in cases + [out.get("planned_diagnostic", {"identical": True})])
    if a.json:
        os.makedirs(os.path.dirname(RESULT), exist_ok=True)
        with open(RESULT, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {RESULT}")
    png = a.plot or (RESULT[:-5] + ".png" if a.json else None)
    if png:
        plot(cases + ([out["planned_diagnostic"]] if "planned_diagnostic" in out else []), png)
        log(f"wrote {png}")
    return 0 if out["identical"] else 1


def run_case(root: str, names: list[str], rounds: int, spec: dict) -> dict:
    """All contenders on one tier sizing, interleaved; the result with its load and checks."""
    log(f"nvme {spec['nvme_x']}x the weights, flash {spec['flash_bw']}: weights {spec['weight_bytes'] / 1e6:.0f} MB, "
        f"optimizer state {spec['optim_state_bytes'] / 1e6:.0f} MB, tiers (MiB) {spec['mib']}")
    load_before = uptime()
    t0 = time.time()
    res = run(root, names, rounds, spec)
    return {"spec": spec, "contenders": names, "uptime_before": load_before, "uptime_after": uptime(), "wall_s": time.time() - t0,
            **check_identical(res["rounds"]), "summary": summarize(res["rounds"], res["final"], GOAL,
                                                                   spec["flash_bytes_per_s"]), **res}


if __name__ == "__main__":
    sys.exit(main())
