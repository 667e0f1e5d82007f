"""``tiered bench io``: the I/O engine against the device limit, measured in the same run.

The measuring is the engine's own (:mod:`io_engine.bench`, whose docstring says what runs in
which order); this is the front end: options, sizes as people write them, progress lines on
stderr, the report (:mod:`.bench_report`) or one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json as _json
import os
import sys
import time

from tiered.io_engine.bench import (
    FIO_HINT, RAND_BS, REQUIRED_KEYS, TARGETS, BenchError, BenchSettings, Pattern, Progress, parse_fio_json,
    run_engine_bench, run_fio,
)

from tiered.io_engine import backend_names

from ..sizes import format_size, parse_size
from .args import UsageError, positive_float, positive_int, size_arg
from .bench_report import fio_label, print_report

__all__ = [
    "FIO_HINT", "RAND_BS", "REQUIRED_KEYS", "TARGETS", "BenchError", "Pattern", "add_bench_io_arguments",
    "bench_io_main", "print_report", "run_bench_io",
]

GiB = 1 << 30
# the spellings the bench scripts import
_fio_label, _run_fio, _parse_fio_json, _Pattern = fio_label, run_fio, parse_fio_json, Pattern


class StderrProgress(Progress):
    """Progress lines on stderr: a line per phase, then at most one update a second."""

    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream
        self._last = 0.0

    def _out(self, text: str) -> None:
        if self.enabled:
            print(f"[bench io] {text}", file=self.stream or sys.stderr, flush=True)

    def phase(self, text: str) -> None:
        self._last = time.monotonic()
        self._out(text)

    def update(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self._last >= 1.0:
            self._last = now
            self._out(f"  {what} {done / GiB:.1f}/{total / GiB:.1f} GiB")

    def note(self, text: str) -> None:
        self._out(text)

    def size(self, n: int) -> str:
        return format_size(n)


def run_bench_io(
    dir: str | os.PathLike,  # noqa: A002 - the CLI's name
    size: int | str,
    *,
    json: bool = False,  # noqa: A002 - mirrors --json; this function never prints to stdout
    progress: bool = True,
    chunk: int | str = 8 << 20,
    window: int | str = 256 << 20,
    backends_compare: tuple[str, ...] | list[str] = ("aiofiles",),
    **options,
) -> dict:
    """:func:`io_engine.bench.run_engine_bench` with sizes as people write them ("1GiB"),
    progress on stderr, and the labels the report prints; a JSON-able dict.

    ``options``: the other fields of :class:`io_engine.bench.BenchSettings` (backend, workers,
    rand_seconds, rand_rounds, hugepages, keep, fio, deepnvme, sweep, slots, seed).
    """
    settings = BenchSettings(
        os.fspath(dir), parse_size(size, where="size"), chunk=parse_size(chunk, where="chunk"),
        window=parse_size(window, where="window"), backends_compare=tuple(backends_compare), **options)
    result = run_engine_bench(settings, StderrProgress(progress))
    result["size_human"] = format_size(result["size"])
    for op in ("read", "write", "rand64k"):
        result[f"fio_{op}_setting"] = fio_label(result.pop(f"fio_{op}_best"))
    result["json"] = bool(json)
    return result


def add_bench_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tiered bench io`` (and ``bench/io.py``)."""
    parser.add_argument("--dir", default=None,
                        help="directory to benchmark (default: the first storage tier of the config)")
    parser.add_argument("--size", default="1GiB", type=size_arg(), help="file size (default 1GiB)")
    parser.add_argument("--config", default=None, help="offload TOML file (default: the built-in default)")
    parser.add_argument("--backend", default=None, choices=(*backend_names(), "auto"),
                        help="engine backend (default: the config's, threads)")
    parser.add_argument("--workers", type=positive_int, default=None, help="engine workers (default: the config's)")
    parser.add_argument("--chunk", type=size_arg(), default=None,
                        help="engine chunk size (default: the config's, 8MiB)")
    parser.add_argument("--rand-seconds", type=positive_float, default=10.0,
                        help="seconds of 64 KiB random reads per tool (default 10)")
    parser.add_argument("--rand-rounds", type=positive_int, default=2,
                        help="engine/fio random-read rounds, alternating, best of each (default 2)")
    parser.add_argument("--compare", default="aiofiles",
                        help="comma-separated backends measured side by side ('' for none; default aiofiles)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="measure only the given (workers, chunk), not the best of a few")
    parser.add_argument("--no-hugepages", action="store_true", help="main arena without transparent huge pages")
    parser.add_argument("--no-fio", action="store_true", help="skip the fio reference")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def bench_io_main(args: argparse.Namespace) -> int:
    """Run ``tiered bench io`` from parsed arguments; returns the exit code. Errors propagate:
    :func:`tiered.tools.args.run_command` turns them into one line."""
    from ..config import load_config

    cfg = None
    if args.dir is None or args.workers is None or args.chunk is None or args.backend is None:
        cfg = load_config(getattr(args, "config", None))
    directory = args.dir or str(cfg.storage_tiers[0].path)
    if args.dir is not None and not os.path.isdir(args.dir):
        why = "not a directory" if os.path.exists(args.dir) else "no such directory"
        raise UsageError(f"--dir {args.dir}: {why} (the benchmark writes its file into an existing directory)")
    result = run_bench_io(
        directory, args.size,
        backend=args.backend or cfg.engine.backend,
        workers=args.workers or cfg.engine.workers,
        chunk=args.chunk or cfg.engine.chunk,
        rand_seconds=args.rand_seconds,
        rand_rounds=args.rand_rounds,
        json=args.json,
        progress=True,
        backends_compare=tuple(b.strip() for b in args.compare.split(",") if b.strip()),
        hugepages=not args.no_hugepages,
        keep=args.keep,
        fio=not args.no_fio,
        sweep=not args.no_sweep,
    )
    if args.json:
        print(_json.dumps(result, indent=2, sort_keys=True))
    else:
        print_report(result)
    if getattr(args, "check", False) and not all(v is not False for v in result["meets_targets"].values()):
        return 1
    return 0
