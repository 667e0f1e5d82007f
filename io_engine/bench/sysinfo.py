"""What the machine did while the benchmark ran: huge pages, device request sizes, other load."""

from __future__ import annotations

import os
import time

import numpy as np

from ...allocators import PAGE, HostArena, anon_hugepage_bytes

from .common import KiB


def open_arena(capacity: int, *, hugepages: bool, name: str) -> tuple[HostArena, int]:
    """An opened arena with every page touched (so no timed I/O pays for page faults) and
    the bytes of it that the kernel backed with transparent huge pages."""
    before = anon_hugepage_bytes()
    try:
        arena = HostArena(capacity, hugepages=hugepages, pin="auto", prefault=True, name=name)
    except TypeError:  # an arena without the prefault option touches its pages in open()
        arena = HostArena(capacity, hugepages=hugepages, pin="auto", name=name)
    arena.open()
    return arena, max(0, anon_hugepage_bytes() - before)


def device_stat_path(path: str) -> str | None:
    """sysfs ``stat`` of the block device (or partition) holding ``path``; None for tmpfs/overlay."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else None


class DeviceRequests:
    """Mean size of the requests the block device completed between ``start()`` and ``stop()``.

    From /sys/.../stat (reads: fields 0 and 2; writes: 4 and 6; sectors of 512 bytes).
    It counts all I/O on the device, so other processes' I/O blurs it a little.
    """

    def __init__(self, stat_path: str | None) -> None:
        self.stat_path = stat_path
        self._t0: list[int] | None = None

    def _read(self) -> list[int] | None:
        if not self.stat_path:
            return None
        try:
            with open(self.stat_path) as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return None

    def start(self) -> "DeviceRequests":
        self._t0 = self._read()
        return self

    def stop(self, write: bool) -> float | None:
        """Mean request size in KiB, or None when it cannot be read."""
        t1 = self._read()
        if not self._t0 or not t1:
            return None
        i, sec = (4, 6) if write else (0, 2)
        ios = t1[i] - self._t0[i]
        return (t1[sec] - self._t0[sec]) * 512 / ios / KiB if ios > 0 else None


def contiguous_run_kib(arr: np.ndarray) -> float | None:
    """Mean length of the physically contiguous runs of ``arr``'s pages (KiB), from
    /proc/self/pagemap; None when page frame numbers are hidden (needs CAP_SYS_ADMIN)."""
    npages = len(arr) // PAGE
    if npages == 0:
        return None
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(arr.ctypes.data // PAGE * 8)
            raw = f.read(npages * 8)
    except OSError:
        return None
    entries = np.frombuffer(raw, dtype=np.uint64)
    pfn = (entries & np.uint64((1 << 55) - 1)).astype(np.int64)
    if not pfn.any():
        return None
    runs = int(np.count_nonzero(np.diff(pfn) != 1)) + 1
    return npages / runs * PAGE / KiB


class OtherLoad:
    """How much CPU *other* processes used while we measured, as a fraction of all CPUs.

    The engine's random-read IOPS are CPU-bound on a small machine (Python per
    request), so they drop first when something else runs; fio's barely move.
    """

    def __init__(self) -> None:
        self._t0 = self._snap()

    @staticmethod
    def _snap() -> tuple[float, float, float] | None:
        try:
            import psutil

            ct = psutil.cpu_times()
            busy = sum(ct) - ct.idle - getattr(ct, "iowait", 0.0)
            pt = psutil.Process().cpu_times()
            own = pt.user + pt.system + getattr(pt, "children_user", 0.0) + getattr(pt, "children_system", 0.0)
            return busy, own, time.monotonic()
        except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: unknown
            return None

    def fraction(self) -> float | None:
        t1 = self._snap()
        if self._t0 is None or t1 is None or t1[2] <= self._t0[2]:
            return None
        other = (t1[0] - self._t0[0]) - (t1[1] - self._t0[1])
        return max(0.0, other / ((t1[2] - self._t0[2]) * (os.cpu_count() or 1)))


def mean_run(arrays: list[np.ndarray]) -> float | None:
    runs = [contiguous_run_kib(a) for a in arrays]
    return None if any(r is None for r in runs) else float(np.mean(runs))
