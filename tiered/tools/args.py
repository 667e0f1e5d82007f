"""What every ``tiered`` command shares: the one place errors become an ``error:`` line and an exit
code, and argument types that refuse a bad number where it is parsed, naming the flag and the value."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..sizes import SizeError, format_size, parse_size

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# Failures of the input or the machine, by the module that defines them: looked up when an error
# arrives, so a command imports only what it uses (an instance implies its module is loaded).
_USER_ERRORS = (
    ("tiered.config", "ConfigError"),
    ("tiered.sizes", "SizeError"),
    ("tiered.store.errors", "StoreError"),  # FeatureStoreError, KVStoreError, OptimStateError too
    ("tiered.offload", "OffloadError"),
    ("tiered.kv.cache", "KVCacheError"),
    ("tiered.gnn.feature_store", "FeatureStoreError"),
    ("tiered.checkpoint.format", "CheckpointError"),
    ("traces.errors", "TraceFormatError"),
    ("policies.base", "PolicyError"),
    ("io_engine.bench.common", "BenchError"),
    ("io_engine.errors", "BackendUnavailable"),
    (__name__, "UsageError"),
)


class UsageError(ValueError):
    """Input a tool itself finds unusable (a replay that needs a storage tier, a missing --dir)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [OSError, MemoryError]  # MemoryError: OutOfBudget too
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def error_message(e: BaseException) -> str:
    """One line for the user: the message; for an OSError that words itself the default way
    (``[Errno 2] No such file or directory: 'x'``), ``x: No such file or directory``."""
    plain_os_error = isinstance(e, OSError) and type(e).__str__ is OSError.__str__
    if plain_os_error and e.strerror and e.filename is not None:
        files = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{files}: {e.strerror}"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if not text:
        text = "out of memory" if isinstance(e, MemoryError) else type(e).__name__
    return " ".join(text.splitlines())


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
                debug: bool = False) -> int:
    """Run a command; an error of the input or the machine becomes one ``error:`` line and exit 2,
    Ctrl-C exit 130. With ``debug`` they propagate with their traceback; a bug always does."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - narrowed below: anything else is re-raised
        if debug or not isinstance(e, user_error_types()):
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return EXIT_ERROR


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the flag in its message)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return n


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        x = float("nan")
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return x


def size_arg(minimum: int = 1) -> Callable[[str], int]:
    """An argparse type: a size as people write it ("16MiB"), at least ``minimum`` bytes."""
    def size(text: str) -> int:
        try:
            n = parse_size(text, where="size")
        except SizeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e.reason}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected at least {format_size(minimum)}")
        return n
    return size
