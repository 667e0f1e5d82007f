"""``tiered bench io``: the I/O engine against the device limit, measured in the same run.

What it does, in order, on one file ``DIR/tiered-bench-io-PID.dat`` of ``size`` bytes:

1. engine sequential **write** of the whole file from a host arena (huge-page
   backed), in window-sized requests that the engine splits into ``chunk``
   pieces, timed up to and including ``fsync``; once per engine setting of
   the sweep (the first write of a fresh file is reported separately: it
   also allocates the blocks, which fio's writes to an existing file do not);
2. engine sequential **read** back, cold: every piece goes with O_DIRECT,
   checked through ``engine.stats()`` (``buffered_bytes == 0``), and every
   4 KiB block is verified (each carries its own file offset, plus sampled
   payload bytes), so a read that did not happen cannot be reported;
3. the same reads into an arena **without huge pages** (shows what physically
   contiguous buffers are worth), and a plain ``os.preadv`` thread loop into
   the huge-page arena ("posix-contig": the device limit without the engine);
4. **64 KiB random reads** for ``rand_seconds`` with the engine keeping
   ``2 x workers`` requests queued (``workers`` in flight at the device),
   alternating with fio ``psync numjobs=workers`` (the same concurrency) in
   ``rand_rounds`` rounds, best of each, so drift favours neither;
5. the comparison backends (aiofiles by default) with the same work;
6. **fio** on the same file with matching settings (bs=1M and bs=chunk, each
   with ``psync numjobs=workers`` and ``libaio iodepth=32``; random reads also
   with ``libaio iodepth=32``, for information) and DeepSpeed's **DeepNVMe**
   (``ds_io``'s ``aio_handle``) when deepspeed is installed;
7. fio writes last (they overwrite the verified content).

The reference a ratio is judged against is the *best* of the references for
that operation, not fio's default: here fio with 1 MiB requests gets much
less than a read into one large physically contiguous buffer.

Bandwidths are in GB/s with GB = 1e9 bytes. Nothing is printed to stdout by
:func:`run_bench_io`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json as _json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from allocators import PAGE, HostArena, anon_hugepage_bytes
from io_engine import IOEngine, available_backends
from io_engine.errors import BackendUnavailable

from .sizes import format_size, parse_size

__all__ = [
    "REQUIRED_KEYS", "TARGETS", "add_bench_io_arguments", "bench_io_main", "print_report", "run_bench_io",
]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GB = 1e9
RAND_BS = 64 * KiB
TARGETS = {"read": 0.95, "write": 0.95, "rand64k": 0.8}
REQUIRED_KEYS = (
    "read_gbps", "write_gbps", "fio_read_gbps", "fio_write_gbps", "rand64k_read_iops", "fio_rand64k_read_iops",
)
FIO_HINT = "fio not installed (apt-get install fio)"
_BLOCK_U64 = PAGE // 8  # uint64 words per 4 KiB block: each block starts with its file offset


class BenchError(RuntimeError):
    """The benchmark cannot run (bad directory, no space, engine failure, wrong data read back)."""


# --------------------------------------------------------------------------- progress


class _Progress:
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


# --------------------------------------------------------------------------- data pattern


class _Pattern:
    """Random payload; the first 8 bytes of every 4 KiB block hold that block's file offset.

    Each window of the file is the payload with its own offsets stamped in, so
    a read from the wrong place, a short read or no read at all is caught by
    comparing the stamps (all of them) and a few sampled payload blocks.
    """

    def __init__(self, window: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.window = window
        self.payload = np.frombuffer(rng.bytes(window), dtype=np.uint8)
        self.block_offsets = np.arange(window // PAGE, dtype=np.uint64) * PAGE
        nblocks = window // PAGE
        picks = rng.choice(nblocks, size=min(8, nblocks), replace=False)
        self.samples = sorted(int(b) * PAGE for b in picks)

    def fill(self, slot: np.ndarray) -> None:
        slot[:] = self.payload[: len(slot)]

    def stamp(self, slot: np.ndarray, file_offset: int, n: int) -> None:
        nblk = n // PAGE
        slot[: nblk * PAGE].view(np.uint64)[::_BLOCK_U64] = self.block_offsets[:nblk] + np.uint64(file_offset)

    def verify(self, slot: np.ndarray, file_offset: int, n: int, path: str) -> int:
        """Raise BenchError unless ``slot[:n]`` is what was written at ``file_offset``; return blocks checked."""
        nblk = n // PAGE
        got = slot[: nblk * PAGE].view(np.uint64)[::_BLOCK_U64]
        want = self.block_offsets[:nblk] + np.uint64(file_offset)
        if not np.array_equal(got, want):
            bad = int(np.flatnonzero(got != want)[0])
            raise BenchError(
                f"{path}: block at file offset {file_offset + bad * PAGE} read back stamped "
                f"{int(got[bad])}: the read did not return that block"
            )
        for p in self.samples:
            if p + PAGE <= n and not np.array_equal(slot[p + 8 : p + PAGE], self.payload[p + 8 : p + PAGE]):
                raise BenchError(f"{path}: payload at file offset {file_offset + p} differs from what was written")
        return nblk


# --------------------------------------------------------------------------- engine passes


def _open_arena(capacity: int, *, hugepages: bool, name: str) -> tuple[HostArena, int]:
    """An opened arena with every page touched (so no timed I/O pays for page faults) and
    the bytes of it that the kernel backed with transparent huge pages."""
    before = anon_hugepage_bytes()
    try:
        arena = HostArena(capacity, hugepages=hugepages, pin="auto", prefault=True, name=name)
    except TypeError:  # an arena without the prefault option touches its pages in open()
        arena = HostArena(capacity, hugepages=hugepages, pin="auto", name=name)
    arena.open()
    return arena, max(0, anon_hugepage_bytes() - before)


def _device_stat_path(path: str) -> str | None:
    """sysfs ``stat`` of the block device (or partition) holding ``path``; None for tmpfs/overlay."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else None


class _DeviceRequests:
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

    def start(self) -> "_DeviceRequests":
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


def _contiguous_run_kib(arr: np.ndarray) -> float | None:
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


class _OtherLoad:
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


def _wait_timeout(nbytes: int) -> float:
    """Seconds to wait for one request before calling the device stuck (>= 20 MB/s or 120 s)."""
    return max(120.0, nbytes / 20e6)


def _windows(size: int, window: int) -> list[tuple[int, int]]:
    return [(off, min(window, size - off)) for off in range(0, size, window)]


def _engine_seq(
    engine: IOEngine, path: str, size: int, slots: list[np.ndarray], pattern: _Pattern, *,
    write: bool, progress: _Progress, what: str,
) -> dict:
    """One timed sequential pass (write incl. fsync, or verified read) through the slots."""
    wins = _windows(size, len(slots[0]))
    if write:
        for s in slots:
            pattern.fill(s)
    engine.reset_stats()
    inflight: list[tuple[Any, int, int, int]] = []  # (future, slot index, offset, n)
    done_bytes = verified = 0
    nxt = 0

    def submit(slot_i: int) -> None:
        nonlocal nxt
        off, n = wins[nxt]
        nxt += 1
        buf = slots[slot_i]
        if write:
            pattern.stamp(buf, off, n)
            fut = engine.write(path, off, buf, n)
        else:
            fut = engine.read(path, off, buf, n)
        inflight.append((fut, slot_i, off, n))

    t0 = time.perf_counter()
    for i in range(min(len(slots), len(wins))):
        submit(i)
    while inflight:
        fut, slot_i, off, n = inflight.pop(0)
        fut.result(timeout=_wait_timeout(n))
        if not write:
            verified += pattern.verify(slots[slot_i], off, n, path)
        done_bytes += n
        if nxt < len(wins):
            submit(slot_i)
        progress.update(what, done_bytes, size)
    if write:
        engine.fsync(path)
    seconds = time.perf_counter() - t0
    st = engine.stats()["write" if write else "read"]
    return {
        "gbps": size / seconds / GB, "seconds": seconds, "bytes": size,
        "direct_bytes": st["direct_bytes"], "buffered_bytes": st["buffered_bytes"],
        "bounced_bytes": st["bounced_bytes"], "verified_blocks": verified,
    }


class _RandLoop:
    """Keeps ``depth`` 64 KiB random reads queued on the engine until the deadline.

    Each completion (in the engine's worker thread) checks the block's stamp
    and submits the next read into the same slot, so the caller's thread does
    nothing while it runs. A thread-local trampoline avoids recursion when a
    future is already complete as its callback is attached.
    """

    def __init__(self, engine: IOEngine, path: str, size: int, slots: list[np.ndarray],
                 seconds: float, seed: int) -> None:
        self.engine, self.path, self.slots = engine, path, slots
        nblocks = size // RAND_BS
        if nblocks < 1:
            raise BenchError(f"file of {size} bytes is too small for {RAND_BS}-byte random reads")
        rng = np.random.default_rng(seed)
        self.offsets = (rng.integers(0, nblocks, size=1 << 20, dtype=np.int64) * RAND_BS).tolist()
        self.seconds = seconds
        self._i = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._outstanding = 0
        self.completed = 0
        self.error: BaseException | None = None
        self._tls = threading.local()
        self.deadline = 0.0

    def _next_offset(self) -> int:
        with self._lock:
            off = self.offsets[self._i]
            self._i = (self._i + 1) % len(self.offsets)
            return off

    def _submit(self, slot: int) -> None:
        tls = self._tls
        if getattr(tls, "active", False):
            tls.pending.append(slot)
            return
        tls.active, tls.pending = True, [slot]
        try:
            while tls.pending:
                s = tls.pending.pop()
                off = self._next_offset()
                try:
                    fut = self.engine.read(self.path, off, self.slots[s], RAND_BS)
                except BaseException as e:  # noqa: BLE001 - reported by run()
                    self._finish(e)
                    continue
                fut.add_done_callback(lambda f, s=s, off=off: self._on_done(f, s, off))
        finally:
            tls.active = False

    def _finish(self, err: BaseException | None) -> None:
        with self._lock:
            if err is not None and self.error is None:
                self.error = err
            self._outstanding -= 1
            last = self._outstanding == 0
        if last:
            self._done.set()

    def _on_done(self, fut, slot: int, off: int) -> None:
        err = fut.exception()
        if err is None:
            stamp = int(self.slots[slot][:8].view(np.uint64)[0])
            if stamp != off:
                err = BenchError(f"{self.path}: 64 KiB read at offset {off} returned the block stamped {stamp}")
        if err is not None:
            self._finish(err)
            return
        with self._lock:
            self.completed += 1
            go_on = self.error is None and time.perf_counter() < self.deadline
        if go_on:
            self._submit(slot)
        else:
            self._finish(None)

    def run(self) -> dict:
        self.engine.reset_stats()
        self._outstanding = len(self.slots)
        t0 = time.perf_counter()
        self.deadline = t0 + self.seconds
        for s in range(len(self.slots)):
            self._submit(s)
        if not self._done.wait(self.seconds + 120):
            raise BenchError(f"random reads of {self.path} did not finish within {self.seconds + 120:.0f} s")
        seconds = time.perf_counter() - t0
        if self.error is not None:
            raise BenchError(f"random read failed: {self.error}") from self.error
        st = self.engine.stats()["read"]
        return {
            "iops": self.completed / seconds, "gbps": self.completed * RAND_BS / seconds / GB,
            "ios": self.completed, "seconds": seconds, "queued": len(self.slots),
            "p50_us": st["p50_us"], "p99_us": st["p99_us"], "buffered_bytes": st["buffered_bytes"],
        }


def _posix_read(path: str, size: int, slots: list[np.ndarray], workers: int, bs: int) -> dict:
    """The device limit without the engine: ``workers`` threads, O_DIRECT ``os.preadv`` of ``bs``.

    Request ``k`` covers file bytes ``[k*bs, (k+1)*bs)`` and lands in the slot
    window the engine would use, so buffers and request sizes match the engine's.
    The first stamp of each request is checked.
    """
    return _posix_transfer(path, size, slots, workers, bs, write=False)


def _posix_write(path: str, size: int, slots: list[np.ndarray], workers: int, bs: int) -> dict:
    """The write limit without the engine: ``workers`` threads of O_DIRECT ``os.pwritev`` of ``bs``
    from the huge-page arena, then fdatasync (timed). Writes the slots as they are; the engine
    write that follows restores the verified pattern."""
    return _posix_transfer(path, size, slots, workers, bs, write=True)


def _posix_transfer(path: str, size: int, slots: list[np.ndarray], workers: int, bs: int, *, write: bool) -> dict:
    window = len(slots[0])
    if window % bs:
        bs = window  # keep requests inside one slot
    flags = (os.O_WRONLY if write else os.O_RDONLY) | getattr(os, "O_DIRECT", 0) | os.O_CLOEXEC
    fd = os.open(path, flags)
    op = "write" if write else "read"
    lock = threading.Lock()
    nreq = (size + bs - 1) // bs
    state: dict[str, Any] = {"next": 0, "error": None}

    def worker() -> None:
        while True:
            with lock:
                k = state["next"]
                if k >= nreq or state["error"] is not None:
                    return
                state["next"] = k + 1
            off = k * bs
            n = min(bs, size - off)
            slot = slots[(off // window) % len(slots)]
            view = slot[off % window : off % window + n]
            try:
                pos = 0
                while pos < n:
                    got = (os.pwritev if write else os.preadv)(fd, [view[pos:]], off + pos)
                    if got <= 0:
                        raise BenchError(f"{path}: short {op} at offset {off + pos}")
                    pos += got
                if not write and int(view[:8].view(np.uint64)[0]) != off:
                    raise BenchError(f"{path}: posix read at offset {off} returned the wrong block")
            except BaseException as e:  # noqa: BLE001 - re-raised below
                with lock:
                    state["error"] = state["error"] or e
                return

    threads = [threading.Thread(target=worker, name=f"bench-posix-{op}-{i}", daemon=True) for i in range(workers)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(_wait_timeout(size))
            if t.is_alive():
                raise BenchError(f"posix {op} of {path} did not finish in {_wait_timeout(size):.0f} s")
        if write and state["error"] is None:
            os.fdatasync(fd)
    finally:
        seconds = time.perf_counter() - t0
        os.close(fd)
    if state["error"] is not None:
        raise BenchError(f"posix {op} failed: {state['error']}")
    return {"gbps": size / seconds / GB, "seconds": seconds, "bs": bs, "workers": workers}


# --------------------------------------------------------------------------- fio


def _fio_sequential(fio_path: str, path: str, rw: str, cfgs, size: int, runtime: float, prog) -> list[dict]:
    """fio sequential ``rw`` ("read" or "write", the latter with fsync) for each (bs, ioengine,
    numjobs, iodepth) setting, one row each."""
    rows = []
    for bs, eng, nj, qd in cfgs:
        sync = " (+fsync)" if rw == "write" else ""
        prog.phase(f"fio {rw} bs={format_size(bs)} {eng} numjobs={nj} iodepth={qd}{sync}")
        row = _run_fio(fio_path, path, rw=rw, bs=bs, ioengine=eng, numjobs=nj, iodepth=qd,
                       size=size, runtime=runtime, time_based=False)
        prog.note(f"  {row['gbps']:.2f} GB/s" if "gbps" in row else f"  {row['error']}")
        rows.append(row)
    return rows


def _parse_fio_json(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio output")
    obj, _ = _json.JSONDecoder().raw_decode(text[start:])
    return obj


def _run_fio(fio: str, path: str, *, rw: str, bs: int, ioengine: str, numjobs: int, iodepth: int,
             size: int, runtime: float, time_based: bool) -> dict:
    """One fio job (summed over ``numjobs`` with group_reporting); {gbps, iops, ...} or {error}."""
    cmd = [
        fio, "--name=tiered-bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
        f"--ioengine={ioengine}", f"--iodepth={iodepth}", f"--numjobs={numjobs}", "--group_reporting",
        "--output-format=json", f"--runtime={max(1, int(round(runtime)))}", "--allow_file_create=0",
    ]
    if time_based:
        cmd += ["--time_based=1", f"--size={size}"]
    else:
        cmd += ["--time_based=0"]
        if numjobs > 1:  # each job its own contiguous region, like the engine's workers over one file
            per = size // numjobs // bs * bs
            if per == 0:
                return {"tool": "fio", "rw": rw, "bs": bs, "ioengine": ioengine, "numjobs": numjobs,
                        "iodepth": iodepth, "error": f"file too small for {numjobs} jobs of bs={bs}"}
            cmd += [f"--size={per}", f"--offset_increment={per}"]
        else:
            cmd += [f"--size={size}"]
    if rw in ("randread", "randwrite"):
        cmd += ["--randrepeat=0", "--norandommap"]
    if rw in ("write", "randwrite"):
        cmd += ["--end_fsync=1"]  # fio counts the fsync in the job's runtime, as the engine pass does
    row = {"tool": "fio", "rw": rw, "bs": bs, "ioengine": ioengine, "numjobs": numjobs, "iodepth": iodepth,
           "command": " ".join(cmd[1:])}
    dev = _DeviceRequests(_device_stat_path(os.path.dirname(path))).start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
        row["device_req_kib"] = dev.stop("write" in rw)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"fio did not finish within {runtime + 120:.0f} s"}
    except OSError as e:
        return {**row, "error": f"cannot run fio: {e}"}
    try:
        data = _parse_fio_json(proc.stdout)
        job = data["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return {**row, "error": f"fio exited {proc.returncode}: {err[-1] if err else e}"}
    if job.get("error"):
        return {**row, "error": f"fio job error {job['error']}: {(proc.stderr or '').strip()[:200]}"}
    side = job["write" if "write" in rw else "read"]
    bw, iops = float(side["bw_bytes"]), float(side["iops"])
    if bw <= 0:
        return {**row, "error": f"fio reported no {rw} bandwidth"}
    return {**row, "gbps": bw / GB, "iops": iops, "seconds": float(side.get("runtime", 0)) / 1e3,
            "io_bytes": int(side.get("io_bytes", 0))}


def _fio_version(fio: str) -> str | None:
    try:
        return subprocess.run([fio, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


# --------------------------------------------------------------------------- DeepNVMe


def _deepnvme(path: str, size: int, workers: int, progress: _Progress) -> tuple[dict | None, str | None]:
    """DeepSpeed's aio_handle (what ``ds_io`` drives) reading/writing the file from a page-locked tensor."""
    try:
        # deepspeed logs to stdout from import on; results go to stdout, so send its chatter to stderr
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
            from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError:
        return None, "deepspeed not installed (DeepNVMe/ds_io reference skipped; pip install deepspeed)"
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
        return None, f"deepspeed import failed: {e}"
    try:
        import psutil
        import torch

        if size > psutil.virtual_memory().available // 2:
            return None, f"DeepNVMe skipped: needs a {format_size(size)} page-locked buffer (too little RAM free)"
        with contextlib.redirect_stdout(sys.stderr):
            lib = AsyncIOBuilder().load(verbose=False)
        best: dict[str, Any] = {}
        for block in (1 * MiB, 8 * MiB):
            handle = lib.aio_handle(block, 32, False, True, workers)
            try:
                buf = handle.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
            except Exception:  # noqa: BLE001 - older releases: pinned torch memory
                buf = torch.empty(size, dtype=torch.uint8).pin_memory()
            progress.phase(f"DeepNVMe read block={format_size(block)} qd=32 threads={workers}")
            t0 = time.perf_counter()
            handle.sync_pread(buf, path)
            rd = size / (time.perf_counter() - t0) / GB
            if int(buf[:8].numpy().view(np.uint64)[0]) != 0:  # block 0 is stamped with offset 0
                raise BenchError("DeepNVMe read returned the wrong first block")
            progress.phase(f"DeepNVMe write block={format_size(block)}")
            t0 = time.perf_counter()
            handle.sync_pwrite(buf, path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            wr = size / (time.perf_counter() - t0) / GB
            if rd > best.get("read_gbps", 0):
                best.update(read_gbps=rd, read_block=block)
            if wr > best.get("write_gbps", 0):
                best.update(write_gbps=wr, write_block=block)
            try:
                handle.free_cpu_locked_tensor(buf)
            except Exception:  # noqa: BLE001
                pass
            del buf
        return best, None
    except Exception as e:  # noqa: BLE001
        return None, f"DeepNVMe (ds_io) failed: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- the benchmark


def _setting_name(workers: int, chunk: int) -> str:
    return f"workers={workers} chunk={format_size(chunk)}"


def _sweep_settings(workers: int, chunk: int, sweep: bool) -> list[tuple[int, int]]:
    if not sweep:
        return [(workers, chunk)]
    out = [(workers, chunk), (workers * 2, chunk), (workers, chunk * 4)]
    return list(dict.fromkeys(out))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run_bench_io(
    dir: str | os.PathLike,  # noqa: A002 - the CLI's name
    size: int | str,
    *,
    backend: str = "threads",
    workers: int = 4,
    chunk: int | str = 8 << 20,
    rand_seconds: float = 10.0,
    rand_rounds: int = 2,
    json: bool = False,  # noqa: A002 - mirrors --json; this function never prints to stdout
    progress: bool = True,
    backends_compare: tuple[str, ...] | list[str] = ("aiofiles",),
    hugepages: bool = True,
    keep: bool = False,
    fio: bool = True,
    deepnvme: bool = True,
    sweep: bool = True,
    window: int | str = 256 << 20,
    slots: int = 4,
    seed: int = 0,
) -> dict:
    """Run the benchmark (see the module docstring) and return every number as a JSON-able dict.

    ``sweep`` tries a few (workers, chunk) settings for the engine and reports
    the best (all rows are kept); fio gets the same courtesy. ``hugepages``
    backs the main arena with transparent huge pages; a second arena without
    them is always measured for ``read_gbps_no_hugepages``.
    """
    t_start = time.perf_counter()
    load_all = _OtherLoad()
    prog = _Progress(progress)
    size = parse_size(size, where="size")
    chunk = parse_size(chunk, where="chunk")
    window = parse_size(window, where="window")
    if chunk <= 0 or chunk % PAGE:
        raise BenchError(f"chunk must be a positive multiple of {PAGE} bytes, got {chunk}")
    if workers < 1:
        raise BenchError(f"workers must be >= 1, got {workers}")
    size = size // MiB * MiB
    if size < MiB:
        raise BenchError("size must be at least 1 MiB")
    window = max(PAGE, min(window, size) // PAGE * PAGE)
    slots = max(2, slots)
    dirpath = os.path.abspath(os.fspath(dir))
    os.makedirs(dirpath, exist_ok=True)
    free = shutil.disk_usage(dirpath).free
    if free < size + 64 * MiB:
        raise BenchError(f"{dirpath}: {format_size(free)} free, the benchmark needs {format_size(size)} plus headroom")
    path = os.path.join(dirpath, f"tiered-bench-io-{os.getpid()}.dat")

    avail = available_backends()
    if backend == "auto":
        backend = "kvikio" if avail.get("kvikio") is None else "threads"
    if avail.get(backend, f"unknown backend {backend!r}") is not None:
        raise BenchError(f"I/O backend {backend!r} cannot run here: {avail.get(backend) or 'unknown backend'}")
    notes: list[str] = []
    if avail.get("kvikio") is not None:
        notes.append(f"kvikio not measured: {avail['kvikio']}")
    compare = [b for b in dict.fromkeys(backends_compare) if b != backend]
    for b in list(compare):
        if avail.get(b, "unknown backend") is not None:
            notes.append(f"{b} not measured: {avail.get(b) or 'unknown backend'}")
            compare.remove(b)

    fio_path = shutil.which("fio") if fio else None
    if fio and fio_path is None:
        notes.append(FIO_HINT)
    elif not fio:
        notes.append("fio skipped (--no-fio)")

    pattern = _Pattern(window, seed)
    settings = _sweep_settings(workers, chunk, sweep)
    devreq = _DeviceRequests(_device_stat_path(dirpath))
    result: dict[str, Any] = {
        "path": path, "size": size, "size_human": format_size(size), "backend": backend,
        "cold": "O_DIRECT", "window": window, "slots": slots, "rand_bs": RAND_BS,
        "rand_seconds": rand_seconds, "targets": dict(TARGETS), "notes": notes,
        "backends_available": avail, "engine_rows": [], "fio_rows": [], "compare": {},
    }
    rand_slots_n = 64
    arena_bytes = window * slots + rand_slots_n * RAND_BS
    main_arena = flat_arena = None
    try:
        main_arena, hp_bytes = _open_arena(arena_bytes, hugepages=hugepages, name="bench-hp")
        bufs = [main_arena.alloc(window) for _ in range(slots)]
        rbufs = [main_arena.alloc(RAND_BS) for _ in range(rand_slots_n)]
        slot_arrays = [b.array for b in bufs]
        result["arena"] = {
            "bytes": arena_bytes, "hugepages": main_arena.hugepages, "pinned": main_arena.pinned,
            "hugepage_bytes": hp_bytes, "contiguous_run_kib": _mean_run(slot_arrays),
        }
        if hugepages and hp_bytes < arena_bytes // 2:
            notes.append(f"the arena asked for huge pages but only {format_size(hp_bytes)} of "
                         f"{format_size(arena_bytes)} got them (THP mode, fragmentation?)")

        def engine(backend_name: str, w: int, c: int) -> IOEngine:
            qd = w if backend_name == "aiofiles" else 32  # aiofiles: w coroutines = w transfers in flight
            return IOEngine(backend_name, workers=w, queue_depth=qd, chunk=c, direct=True)

        def seq(backend_name: str, w: int, c: int, *, write: bool, arrays=None) -> dict:
            arrays = arrays or slot_arrays
            label = f"{backend_name} {'write' if write else 'read'} ({_setting_name(w, c)})"
            prog.phase(f"engine {label}, {format_size(size)}")
            with engine(backend_name, w, c) as e:
                dev = devreq.start()
                try:
                    r = _engine_seq(e, path, size, arrays, pattern, write=write, progress=prog,
                                    what="written" if write else "read")
                finally:
                    e.forget(path)
                req = dev.stop(write)
            r.update(backend=backend_name, workers=w, chunk=c, device_req_kib=req)
            prog.note(f"  {r['gbps']:.2f} GB/s" + (f", device requests {req:.0f} KiB" if req else ""))
            return r

        # 1. writes: the first one also allocates the file's blocks
        if os.path.exists(path):
            os.unlink(path)
        fresh = seq(backend, workers, chunk, write=True)
        result["write_gbps_fresh_file"] = fresh["gbps"]
        rows: dict[tuple[int, int], dict] = {}
        write_checks: list[dict] = [fresh]
        for w, c in settings:
            prog.phase(f"posix-contig write ({_setting_name(w, c)}) (+fdatasync)")
            pw = _posix_write(path, size, slot_arrays, w, c)
            prog.note(f"  {pw['gbps']:.2f} GB/s")
            r = seq(backend, w, c, write=True)  # after the posix write: restores the verified pattern
            write_checks.append(r)
            rows[(w, c)] = {"workers": w, "chunk": c, "write_gbps": r["gbps"], "posix_write_gbps": pw["gbps"],
                            "write_device_req_kib": r["device_req_kib"]}
        # 2. cold reads, verified
        read_checks: list[dict] = []
        for w, c in settings:
            r = seq(backend, w, c, write=False)
            read_checks.append(r)
            rows[(w, c)]["read_gbps"] = r["gbps"]
            rows[(w, c)]["read_device_req_kib"] = r["device_req_kib"]
            prog.phase(f"posix-contig read ({_setting_name(w, c)})")
            dev = devreq.start()
            p = _posix_read(path, size, slot_arrays, w, c)
            preq = dev.stop(False)
            prog.note(f"  {p['gbps']:.2f} GB/s" + (f", device requests {preq:.0f} KiB" if preq else ""))
            rows[(w, c)]["posix_read_gbps"] = p["gbps"]
            rows[(w, c)]["posix_read_device_req_kib"] = preq
        result["engine_rows"] = list(rows.values())
        best_w = max(rows.values(), key=lambda r: r["write_gbps"])
        best_r = max(rows.values(), key=lambda r: r["read_gbps"])
        result["write_gbps"] = best_w["write_gbps"]
        result["write_setting"] = {"workers": best_w["workers"], "chunk": best_w["chunk"]}
        result["read_gbps"] = best_r["read_gbps"]
        result["read_setting"] = {"workers": best_r["workers"], "chunk": best_r["chunk"]}
        result["settings_tried"] = len(rows)
        result["posix_read_gbps"] = max(r["posix_read_gbps"] for r in rows.values())
        result["posix_write_gbps"] = max(r["posix_write_gbps"] for r in rows.values())
        result["write_buffered_bytes"] = sum(r["buffered_bytes"] for r in write_checks)
        if result["write_buffered_bytes"]:
            notes.append(f"{result['write_buffered_bytes']} bytes of the engine's writes went through "
                         "the page cache (not O_DIRECT)")
        first = rows[(workers, chunk)]
        result["default_setting"] = {"workers": workers, "chunk": chunk,
                                     "read_gbps": first["read_gbps"], "write_gbps": first["write_gbps"]}
        buffered = sum(r["buffered_bytes"] for r in read_checks)
        result["read_buffered_bytes"] = buffered
        result["read_direct_bytes"] = sum(r["direct_bytes"] for r in read_checks)
        result["verified_blocks"] = sum(r["verified_blocks"] for r in read_checks)
        if buffered:
            notes.append(f"NOT cold: {buffered} bytes of the reads went through the page cache "
                         "(filesystem without O_DIRECT?)")
            result["cold"] = "buffered (no O_DIRECT here)"

        # 3. huge pages vs 4 KiB pages, same setting, back to back (best of two each)
        bw, bc = best_r["workers"], best_r["chunk"]
        flat_arena, flat_hp = _open_arena(window * slots, hugepages=False, name="bench-4k")
        flat_bufs = [flat_arena.alloc(window) for _ in range(slots)]
        flat_arrays = [b.array for b in flat_bufs]
        hp_runs, flat_runs, hp_req, flat_req = [], [], [], []
        for _ in range(2):
            r = seq(backend, bw, bc, write=False, arrays=flat_arrays)
            flat_runs.append(r["gbps"])
            flat_req.append(r["device_req_kib"])
            r = seq(backend, bw, bc, write=False)
            hp_runs.append(r["gbps"])
            hp_req.append(r["device_req_kib"])
        result["read_gbps_hugepages"] = max(hp_runs)
        result["read_gbps_no_hugepages"] = max(flat_runs)
        result["hugepage_runs"] = {
            "workers": bw, "chunk": bc, "hugepages": hp_runs, "no_hugepages": flat_runs,
            "hugepages_device_req_kib": hp_req, "no_hugepages_device_req_kib": flat_req,
            "hugepages_contiguous_run_kib": result["arena"]["contiguous_run_kib"],
            "no_hugepages_contiguous_run_kib": _mean_run(flat_arrays),
            "no_hugepages_arena_hugepage_bytes": flat_hp,
        }
        for b in flat_bufs:
            b.release()
        flat_arena.close()

        # 4. random 64 KiB reads, `workers` in flight at the device, 2x workers queued
        rw = workers
        rand_arrays = [b.array for b in rbufs]

        def rand(backend_name: str, seconds: float, rnd: int = 0) -> dict:
            prog.phase(f"engine {backend_name} 64 KiB random reads for {seconds:g} s ({rw} in flight)")
            with engine(backend_name, rw, chunk) as e:
                try:
                    r = _RandLoop(e, path, size, rand_arrays[: 2 * rw], seconds, seed + 1 + rnd).run()
                finally:
                    e.forget(path)
            prog.note(f"  {r['iops']:.0f} IOPS")
            return r

        # engine and fio (matching concurrency) alternate, best of `rand_rounds` each, so that
        # the device's drift during the run does not favour whichever happened to go first
        fio_rows: list[dict] = result["fio_rows"]
        rounds = max(1, int(rand_rounds))
        per_round = rand_seconds / rounds
        rand_runs = []
        load_rand = _OtherLoad()
        for rnd in range(rounds):
            rand_runs.append(rand(backend, per_round, rnd))
            if fio_path:
                prog.phase(f"fio 64 KiB randread psync numjobs={workers} for {per_round:g} s")
                row = _run_fio(fio_path, path, rw="randread", bs=RAND_BS, ioengine="psync", numjobs=workers,
                               iodepth=1, size=size, runtime=per_round, time_based=True)
                row.update(concurrency="matching", round=rnd)
                prog.note(f"  {row['iops']:.0f} IOPS" if "iops" in row else f"  {row['error']}")
                fio_rows.append(row)
        r = max(rand_runs, key=lambda x: x["iops"])
        result["other_cpu_load_rand"] = load_rand.fraction()
        result["rand64k_read_iops"] = r["iops"]
        result["rand64k"] = {**r, "workers": rw, "in_flight": rw, "rounds": rounds,
                             "runs_iops": [x["iops"] for x in rand_runs]}

        # 5. comparison backends (same work: write, verified read, random)
        for b in compare:
            cw, cc = best_r["workers"], best_r["chunk"]
            wr = seq(b, cw, cc, write=True)
            rd = seq(b, cw, cc, write=False)
            rr = rand(b, rand_seconds)
            result["compare"][b] = {"workers": cw, "chunk": cc, "queue_depth": cw, "write_gbps": wr["gbps"],
                                    "read_gbps": rd["gbps"], "rand64k_read_iops": rr["iops"],
                                    "read_buffered_bytes": rd["buffered_bytes"]}
            result[f"{b}_write_gbps"] = wr["gbps"]
            result[f"{b}_read_gbps"] = rd["gbps"]
            result[f"{b}_rand64k_read_iops"] = rr["iops"]
        for b in backends_compare:
            if b not in result["compare"] and b != backend:
                for k in ("write_gbps", "read_gbps", "rand64k_read_iops"):
                    result[f"{b}_{k}"] = None

        # 6. fio reads (and deep-queue random) on the same file, then DeepNVMe, then fio writes
        seq_runtime = max(30.0, size / 200e6)
        if fio_path:
            result["fio"] = {"installed": True, "path": fio_path, "version": _fio_version(fio_path)}
            seq_cfgs = [(bs, eng, nj, qd) for bs in dict.fromkeys((MiB, chunk))
                        for eng, nj, qd in (("psync", workers, 1), ("libaio", 1, 32))]
            fio_rows += _fio_sequential(fio_path, path, "read", seq_cfgs, size, seq_runtime, prog)
            prog.phase(f"fio 64 KiB randread libaio numjobs=1 iodepth=32 for {rand_seconds:g} s")
            row = _run_fio(fio_path, path, rw="randread", bs=RAND_BS, ioengine="libaio", numjobs=1,
                           iodepth=32, size=size, runtime=rand_seconds, time_based=True)
            row["concurrency"] = "deep"
            prog.note(f"  {row['iops']:.0f} IOPS" if "iops" in row else f"  {row['error']}")
            fio_rows.append(row)
        else:
            result["fio"] = {"installed": fio_path is not None, "path": None, "version": None}

        ds, ds_note = (None, "DeepNVMe skipped") if not deepnvme else _deepnvme(path, size, workers, prog)
        if ds_note:
            notes.append(ds_note)
        result["ds_io_read_gbps"] = ds.get("read_gbps") if ds else None
        result["ds_io_write_gbps"] = ds.get("write_gbps") if ds else None
        result["deepnvme"] = ds

        if fio_path:
            fio_rows += _fio_sequential(fio_path, path, "write", seq_cfgs, size, seq_runtime, prog)
        for row in fio_rows:
            if "error" in row:
                notes.append(f"fio {row['rw']} bs={row['bs']} {row['ioengine']}: {row['error']}")

        def best_fio(rw_: str, key: str, pred: Callable[[dict], bool] = lambda r: True) -> dict | None:
            ok = [r for r in fio_rows if r["rw"] == rw_ and key in r and pred(r)]
            return max(ok, key=lambda r: r[key]) if ok else None

        fr, fw = best_fio("read", "gbps"), best_fio("write", "gbps")
        frand = best_fio("randread", "iops", lambda r: r.get("concurrency") == "matching")
        frand_deep = best_fio("randread", "iops", lambda r: r.get("concurrency") == "deep")
        f1m = best_fio("read", "gbps", lambda r: r["bs"] == MiB)
        result["fio_read_gbps"] = fr["gbps"] if fr else None
        result["fio_write_gbps"] = fw["gbps"] if fw else None
        result["fio_read_gbps_1m"] = f1m["gbps"] if f1m else None
        result["fio_rand64k_read_iops"] = frand["iops"] if frand else None
        result["fio_rand64k_read_iops_qd32"] = frand_deep["iops"] if frand_deep else None
        result["fio_read_setting"] = _fio_label(fr)
        result["fio_write_setting"] = _fio_label(fw)
        result["fio_rand64k_setting"] = _fio_label(frand)

        # 7. references and ratios
        read_refs = {"fio": result["fio_read_gbps"], "posix-contig": result["posix_read_gbps"],
                     "ds_io": result["ds_io_read_gbps"]}
        write_refs = {"fio": result["fio_write_gbps"], "posix-contig": result["posix_write_gbps"],
                      "ds_io": result["ds_io_write_gbps"]}
        rname, rval = max(((k, v) for k, v in read_refs.items() if v), key=lambda kv: kv[1], default=(None, None))
        wname, wval = max(((k, v) for k, v in write_refs.items() if v), key=lambda kv: kv[1], default=(None, None))
        result.update(
            best_read_ref=rname, best_read_ref_gbps=rval, best_write_ref=wname, best_write_ref_gbps=wval,
            read_ratio=_ratio(result["read_gbps"], rval), write_ratio=_ratio(result["write_gbps"], wval),
            rand64k_ratio=_ratio(result["rand64k_read_iops"], result["fio_rand64k_read_iops"]),
            rand64k_ref=f"fio psync numjobs={workers} (same number of reads in flight; best of {rounds} "
                        "runs alternating with the engine's)",
        )
        result["meets_targets"] = {
            k: (None if result[f"{k}_ratio"] is None else result[f"{k}_ratio"] >= TARGETS[k])
            for k in ("read", "write", "rand64k")
        }
    finally:
        for a in (main_arena, flat_arena):
            if a is not None:
                a.close()
        if not keep:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    result["other_cpu_load"] = load_all.fraction()
    for key, what in (("other_cpu_load", "the run"), ("other_cpu_load_rand", "the random reads")):
        v = result.get(key)
        if v is not None and v > 0.15:
            notes.append(f"other processes used {v:.0%} of the CPUs during {what}: the engine's CPU-bound "
                         "random IOPS suffer more than fio's; rerun on a quiet machine")
    result["kept_file"] = path if keep else None
    result["elapsed_seconds"] = time.perf_counter() - t_start
    result["json"] = bool(json)
    return result


def _mean_run(arrays: list[np.ndarray]) -> float | None:
    runs = [_contiguous_run_kib(a) for a in arrays]
    return None if any(r is None for r in runs) else float(np.mean(runs))


def _fio_label(row: dict | None) -> str | None:
    if not row:
        return None
    return f"bs={format_size(row['bs'])} {row['ioengine']} numjobs={row['numjobs']} iodepth={row['iodepth']}"


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def print_report(result: dict, file=None) -> None:
    """A readable table of :func:`run_bench_io`'s result (stdout by default)."""
    out = file or sys.stdout

    def p(s: str = "") -> None:
        print(s, file=out)

    rs, ws = result.get("read_setting", {}), result.get("write_setting", {})
    p(f"tiered bench io: {result['size_human']} file in {os.path.dirname(result['path'])}, "
      f"backend {result['backend']}, cold: {result['cold']}")
    p(f"  read back verified: {result.get('verified_blocks', 0)} blocks of 4 KiB; "
      f"{result.get('read_buffered_bytes', 0)} bytes through the page cache")
    p(f"  engine numbers are the best of {result.get('settings_tried', 1)} (workers, chunk) settings; "
      "fio's the best of its settings below")
    ol, olr = result.get("other_cpu_load"), result.get("other_cpu_load_rand")
    if ol is not None:
        p(f"  other processes used {ol:.0%} of the CPUs during the run"
          + (f" ({olr:.0%} during the random reads)" if olr is not None else ""))
    p()
    p(f"{'':26}{'engine':>10}  {'best reference':<34}{'ratio':>7}  target")

    def line(name: str, val, ref, ref_name, ratio, target, ok, fmt="{:.2f}") -> None:
        mark = "" if ok is None else ("ok" if ok else "MISSED")
        p(f"{name:26}{_f(val, fmt):>10}  {(_f(ref, fmt) + ' ' + (ref_name or '')):<34}"
          f"{_f(ratio):>7}  >={target:.2f} {mark}")

    mt = result.get("meets_targets", {})
    line("seq read GB/s", result.get("read_gbps"), result.get("best_read_ref_gbps"), result.get("best_read_ref"),
         result.get("read_ratio"), TARGETS["read"], mt.get("read"))
    line("seq write GB/s", result.get("write_gbps"), result.get("best_write_ref_gbps"),
         result.get("best_write_ref"), result.get("write_ratio"), TARGETS["write"], mt.get("write"))
    line("rand 64 KiB read IOPS", result.get("rand64k_read_iops"), result.get("fio_rand64k_read_iops"),
         "fio psync", result.get("rand64k_ratio"), TARGETS["rand64k"], mt.get("rand64k"), fmt="{:.0f}")
    rr = result.get("rand64k", {})
    p(f"  read: {_setting_name(rs.get('workers', 0), rs.get('chunk', 0))}; "
      f"write: {_setting_name(ws.get('workers', 0), ws.get('chunk', 0))}; "
      f"random: {rr.get('in_flight', '?')} reads in flight, engine runs "
      + "/".join(f"{x:.0f}" for x in rr.get("runs_iops", [])) + " IOPS alternating with fio's")
    p()
    p("references (same file, O_DIRECT):")
    for row in result.get("fio_rows", []):
        what = f"fio {row['rw']:9} bs={format_size(row['bs']):8} {row['ioengine']:6} " \
               f"numjobs={row['numjobs']} iodepth={row['iodepth']}"
        val = f"{row['iops']:.0f} IOPS" if row["rw"].startswith("rand") and "iops" in row else (
            f"{row['gbps']:.2f} GB/s" if "gbps" in row else row.get("error", ""))
        req = row.get("device_req_kib")
        p(f"  {what:58} {val:11}" + (f"  device requests {req:.0f} KiB" if req and "error" not in row else ""))
    for rw_ in ("read", "write"):
        if result.get(f"posix_{rw_}_gbps") is not None:
            p(f"  {'posix-contig ' + rw_ + ' (threads, O_DIRECT, huge-page arena)':58} "
              f"{result[f'posix_{rw_}_gbps']:.2f} GB/s")
    if result.get("ds_io_read_gbps") is not None:
        p(f"  {'DeepNVMe (ds_io aio_handle, page-locked) read / write':58} "
          f"{result['ds_io_read_gbps']:.2f} / {_f(result.get('ds_io_write_gbps'))} GB/s")
    p()
    p("GB/s by setting            engine write  posix write  engine read  posix read")
    for row in result.get("engine_rows", []):
        p(f"  {_setting_name(row['workers'], row['chunk']):24}{_f(row.get('write_gbps')):>14}"
          f"{_f(row.get('posix_write_gbps')):>13}{_f(row.get('read_gbps')):>13}{_f(row.get('posix_read_gbps')):>12}")
    if result.get("write_gbps_fresh_file") is not None:
        p(f"  first write of the fresh file (allocates blocks): {result['write_gbps_fresh_file']:.2f} GB/s")
    p()
    hp = result.get("hugepage_runs", {})
    p(f"huge pages ({_setting_name(hp.get('workers', 0), hp.get('chunk', 0))}, best of 2 each; "
      f"{format_size(result.get('arena', {}).get('hugepage_bytes', 0))} of the arena on huge pages):")

    def kib(v) -> str:
        vals = [x for x in (v if isinstance(v, list) else [v]) if x]
        return "/".join(f"{x:.0f}" for x in vals) if vals else "n/a"

    for label, key in (("huge-page arena", "hugepages"), ("4 KiB-page arena", "no_hugepages")):
        gb = result.get("read_gbps_hugepages" if key == "hugepages" else "read_gbps_no_hugepages")
        p(f"  read into {label:17}{_f(gb)} GB/s; physically contiguous runs {kib(hp.get(key + '_contiguous_run_kib'))}"
          f" KiB; device requests {kib(hp.get(key + '_device_req_kib'))} KiB")
    p()
    p("backends:             write GB/s  read GB/s  rand 64 KiB IOPS")
    p(f"  {result['backend']:20}{_f(result.get('write_gbps')):>10}{_f(result.get('read_gbps')):>11}"
      f"{_f(result.get('rand64k_read_iops'), '{:.0f}'):>18}")
    for name, c in result.get("compare", {}).items():
        p(f"  {name:20}{_f(c['write_gbps']):>10}{_f(c['read_gbps']):>11}{_f(c['rand64k_read_iops'], '{:.0f}'):>18}")
    for name, reason in result.get("backends_available", {}).items():
        if reason is not None:
            p(f"  {name:20}unavailable: {reason}")
    for n in result.get("notes", []):
        p(f"note: {n}")
    p(f"({result.get('elapsed_seconds', 0):.0f} s)")


# --------------------------------------------------------------------------- CLI glue


def add_bench_io_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tiered bench io`` (and ``bench/io.py``)."""
    parser.add_argument("--dir", default=None,
                        help="directory to benchmark (default: the first storage tier of the config)")
    parser.add_argument("--size", default="1GiB", help="file size (default 1GiB)")
    parser.add_argument("--config", default=None, help="offload TOML file (default: the built-in default)")
    parser.add_argument("--backend", default=None, choices=("threads", "aiofiles", "kvikio", "auto"),
                        help="engine backend (default: the config's, threads)")
    parser.add_argument("--workers", type=int, default=None, help="engine workers (default: the config's)")
    parser.add_argument("--chunk", default=None, help="engine chunk size (default: the config's, 8MiB)")
    parser.add_argument("--rand-seconds", type=float, default=10.0,
                        help="seconds of 64 KiB random reads per tool (default 10)")
    parser.add_argument("--rand-rounds", type=int, default=2,
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
    """Run ``tiered bench io`` from parsed arguments; returns the exit code."""
    from .config import ConfigError, load_config

    try:
        cfg = None
        if args.dir is None or args.workers is None or args.chunk is None or args.backend is None:
            cfg = load_config(getattr(args, "config", None))
        directory = args.dir or str(cfg.storage_tiers[0].path)
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
    except (BenchError, ConfigError, BackendUnavailable, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(_json.dumps(result, indent=2, sort_keys=True))
    else:
        print_report(result)
    if getattr(args, "check", False) and not all(v is not False for v in result["meets_targets"].values()):
        return 1
    return 0
