"""Engine vs fio (and DeepNVMe) on one directory: the same code as ``tiered bench io``.

    python bench/io.py --dir DIR --size 4GiB [--json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiered.tools.args import run_command  # noqa: E402
from tiered.tools.bench_io import add_bench_io_arguments, bench_io_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/io.py", description=__doc__.split("\n\n")[0])
    add_bench_io_arguments(parser)
    return run_command(bench_io_main, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
