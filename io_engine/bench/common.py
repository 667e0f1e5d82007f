"""What every part of the engine benchmark shares: units, the error, the progress protocol."""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GB = 1e9
RAND_BS = 64 * KiB
TARGETS = {"read": 0.95, "write": 0.95, "rand64k": 0.8}
REQUIRED_KEYS = (
    "read_gbps", "write_gbps", "fio_read_gbps", "fio_write_gbps", "rand64k_read_iops", "fio_rand64k_read_iops",
)
FIO_HINT = "fio not installed (apt-get install fio)"


class BenchError(RuntimeError):
    """The benchmark cannot run (bad directory, no space, engine failure, wrong data read back)."""


class Progress:
    """Where the benchmark says what it is doing. Silent here: a front end (``tiered bench io``)
    subclasses it to print, and decides how sizes read (``size``), since formatting is its job."""

    def phase(self, text: str) -> None:
        """A new step starts."""

    def update(self, what: str, done: int, total: int) -> None:
        """``done`` of ``total`` bytes of the current step are through."""

    def note(self, text: str) -> None:
        """A result line of the current step."""

    def size(self, n: int) -> str:
        return f"{n} B"


def wait_timeout(nbytes: int) -> float:
    """Seconds to wait for one request before calling the device stuck (>= 20 MB/s or 120 s)."""
    return max(120.0, nbytes / 20e6)


def windows(size: int, window: int) -> list[tuple[int, int]]:
    return [(off, min(window, size - off)) for off in range(0, size, window)]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
