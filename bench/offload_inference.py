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

Modules: this driver (the command line); ``bench/_offload_run.py`` (the parent: model files,
contenders, variants, fio), ``_offload_child.py`` (the child process), ``_offload_contenders.py``
(the loaders), ``_offload_measure.py`` (what a child measures), ``_offload_refs.py`` (fio, bench
io), ``_offload_bounds.py`` (bounds, ratios, targets), ``_offload_report.py`` (table, plot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench._offload_child import run_contender  # noqa: E402
from bench._offload_common import log  # noqa: E402
from bench._offload_report import plot, print_report  # noqa: E402
from bench._offload_run import orchestrate  # noqa: E402


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
