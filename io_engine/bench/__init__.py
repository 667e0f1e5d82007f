"""The engine's own benchmark: the I/O engine against the device limit (posix threads, fio,
DeepNVMe) on one file, and the short storage test ``tiered probe`` runs.

Imports only ``allocators`` and ``io_engine``; sizes are ints. The command line and the
report are ``tiered bench io`` (:mod:`tiered.tools.bench_io`).
"""

from .common import FIO_HINT, RAND_BS, REQUIRED_KEYS, TARGETS, BenchError, Progress
from .fio import parse_fio_json, run_fio
from .pattern import Pattern
from .run import BenchSettings, run_engine_bench, sweep_settings
from .storage import measure_storage

__all__ = [
    "FIO_HINT", "RAND_BS", "REQUIRED_KEYS", "TARGETS", "BenchError", "BenchSettings", "Pattern", "Progress",
    "measure_storage", "parse_fio_json", "run_engine_bench", "run_fio", "sweep_settings",
]
