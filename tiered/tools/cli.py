"""The ``tiered`` command line.

    tiered demo                 the main job on the embedded default config
    tiered probe                detect tiers and measure storage bandwidth
    tiered config check [FILE]  validate a config (or the embedded default) and print it resolved
    tiered config from-deepspeed DS.json [-o FILE]  the offload TOML equivalent to a DeepSpeed config
    tiered bench io             engine vs fio (and DeepNVMe) on a directory
    tiered bench replay TRACE   placement/migration policies over a trace (simulated or real I/O)
    tiered store ls|check|rm    list, verify and repair, delete objects of a store on disk

A command that fails on its input or on the machine prints one ``error: ...`` line and exits 2
(Ctrl-C: exit 130); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from .args import run_command


def _cmd_config_check(args: argparse.Namespace) -> int:
    from ..config import check_config, load_config, machine_warnings

    cfg = check_config(args.file) if args.file is not None else load_config(None)
    print(json.dumps(cfg.to_dict(), indent=2))
    for msg in machine_warnings(cfg):
        print(f"warning: {msg}", file=sys.stderr)
    if args.file is None:
        print("no file given: this is the embedded default, sized from this machine (TIERED_HOME sets its "
              "storage directory): OK", file=sys.stderr)
    else:
        print(f"{args.file}: OK", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.config)


def _version() -> str:
    from .. import __version__

    return f"tiered {__version__}"


def build_parser() -> argparse.ArgumentParser:
    from .bench_io import add_bench_io_arguments, bench_io_main
    from .probe import add_probe_arguments, probe_main

    p = argparse.ArgumentParser(prog="tiered", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the embedded default config")
    demo.add_argument("--config", default=None, help="offload TOML file (default: embedded default)")
    demo.set_defaults(func=_cmd_demo)

    probe = sub.add_parser("probe", help="detect tiers and measure each storage directory")
    add_probe_arguments(probe)
    probe.set_defaults(func=probe_main)

    config = sub.add_parser("config", help="offload config files")
    csub = config.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a config file and print it resolved")
    check.add_argument("file", nargs="?", default=None,
                       help="the TOML file (none: print the embedded default, resolved on this machine)")
    check.set_defaults(func=_cmd_config_check)
    from .from_deepspeed import add_from_deepspeed_arguments, from_deepspeed_main

    from_ds = csub.add_parser("from-deepspeed", help="write the offload TOML equivalent to a DeepSpeed config")
    add_from_deepspeed_arguments(from_ds)
    from_ds.set_defaults(func=from_deepspeed_main)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    io = bsub.add_parser("io", help="engine read/write bandwidth and IOPS vs fio / DeepNVMe")
    add_bench_io_arguments(io)
    io.set_defaults(func=bench_io_main)
    from .replay import add_replay_arguments, replay_main

    replay = bsub.add_parser("replay", help="replay a trace through placement/migration policies")
    add_replay_arguments(replay)
    replay.set_defaults(func=replay_main)
    from .store_cli import add_store_arguments

    add_store_arguments(sub.add_parser("store", help="list, check and repair, delete objects of a store on disk"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
