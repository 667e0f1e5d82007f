"""``tiered bench replay``: options and the command."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ...config import NOT_LIVE, load_config
from ...sizes import format_size
from ..args import positive_float, positive_int
from .models import choose_loop, measured_bandwidths, tier_models
from .report import format_table, plot_rows, pyplot
from .runner import DEFAULT_POLICIES, run_replay


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace file or tiered trace directory")
    p.add_argument("--format", default="auto", choices=["auto", "tiered", "mqsim", "arc", "msr", "mooncake"])
    p.add_argument("--config", default=None, help="offload TOML: tier speeds (sim) and directories (real)")
    p.add_argument("--policy", default=None,
                   help=f"comma-separated policy names (default {','.join(DEFAULT_POLICIES)}, without belady in "
                        "--mode real; also rl, sim mode only, and schedule: Belady over the plans a trace "
                        "declares, LRU beyond them)")
    p.add_argument("--mode", default="sim", choices=["sim", "real"])
    p.add_argument("--json", action="store_true", help="print a JSON list of rows on stdout")
    p.add_argument("--plot", default=None, help="write a PNG of latency and hit ratio per policy")
    p.add_argument("--fast-fraction", type=positive_float, default=0.08,
                   help="fast tier capacity as a fraction of the trace footprint (default 0.08)")
    p.add_argument("--config-capacity", action="store_true", help="use the config's tier capacities instead")
    p.add_argument("--probe", default=None, help="JSON from `tiered probe --json`: measured storage bandwidths")
    p.add_argument("--limit", type=positive_int, default=None, help="replay only the first N accesses")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="block size for block traces (importer default)")
    p.add_argument("--bytes-per-token", type=positive_int, default=None, help="Mooncake: KV bytes per token")
    p.add_argument("--loop", default="auto", choices=["auto", "open", "closed"],
                   help="arrivals: at trace times (open), or each after the previous (closed); auto: closed for "
                        "untimed traces and when the trace offers more bytes/s than the backing tier reads")
    p.add_argument("--window", type=float, default=0.2, help="final window reported for learning policies")
    p.add_argument("--no-progress", action="store_true")


def replay_main(args: argparse.Namespace) -> int:
    """Replay, then print the rows (table or JSON) before the plot: a plot that cannot be written
    loses no results. Errors propagate to :func:`tiered.tools.args.run_command`."""
    from tiered.traces import load

    if args.plot:
        pyplot()  # a missing matplotlib is said before the replay, not after it
    options: dict[str, Any] = {}
    if args.block_size is not None:
        options["block_size"] = args.block_size
    if args.bytes_per_token is not None:
        options["bytes_per_token"] = args.bytes_per_token
    trace = load(args.trace, args.format, **options)
    if args.limit is not None:
        trace = _head(trace, args.limit)
    cfg = load_config(args.config) if (args.config or args.mode == "real") else None
    measured = measured_bandwidths(args.probe) if args.probe else None
    if measured and cfg is None:
        cfg = load_config(None)
    tiers = tier_models(cfg, trace.footprint, args.fast_fraction, args.config_capacity, measured)
    names = _policy_names(args)
    closed = None if args.loop == "auto" else args.loop == "closed"
    rows = run_replay(trace, names, tiers, mode=args.mode, cfg=cfg, closed_loop=closed, window=args.window,
                      progress=not args.no_progress and sys.stderr.isatty())
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_header(args, trace, tiers, closed))
        print(format_table(rows))
    sys.stdout.flush()
    if args.plot:
        plot_rows(rows, args.plot, Path(args.trace).name)
    return 0


def _policy_names(args: argparse.Namespace) -> list[str]:
    """The --policy names; by default every policy the mode can run."""
    if args.policy is not None:
        return [p.strip() for p in args.policy.split(",") if p.strip()]
    return [p for p in DEFAULT_POLICIES if args.mode == "sim" or p not in NOT_LIVE]


def _header(args: argparse.Namespace, trace, tiers, closed: bool | None) -> str:
    """The line above the table: the trace, its footprint and tier capacities, the mode and loop."""
    caps = ", ".join(f"{t.name} {'unbounded' if t.capacity == math.inf else format_size(int(t.capacity))}"
                     for t in tiers)
    if args.mode == "real":
        loop = "closed loop, one access at a time, synchronous with the store's governor (real I/O)"
    elif closed is None:
        loop = choose_loop(trace, tiers)[1]
    else:
        loop = ("closed" if closed else "open") + " loop (--loop)"
    return (f"{args.trace}: {len(trace)} accesses, footprint {format_size(trace.footprint)}; {caps}; "
            f"mode {args.mode}; {loop}")


def _head(trace, n: int):
    from tiered.traces import Trace

    return Trace(trace.time[:n], trace.key[:n], trace.size[:n], trace.op[:n], trace.kind[:n],
                 trace.key_names, trace.timed, dict(trace.meta, limit=n), tuple(p for p in trace.plans if p.at < n))
