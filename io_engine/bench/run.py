"""The engine benchmark: the I/O engine at a few settings against the device limit (posix
threads, fio, DeepNVMe), measured in the same run on one file.

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

Sizes are ints (bytes); bandwidths are in GB/s with GB = 1e9 bytes. Nothing is
printed: progress goes to the ``progress`` object, the numbers to the returned dict.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

from ...allocators import PAGE

from ..backends import available_backends, create_backend
from ..engine import IOEngine
from .common import FIO_HINT, MiB, RAND_BS, TARGETS, BenchError, Progress, ratio
from .deepnvme import deepnvme
from .fio import fio_sequential, fio_version, run_fio
from .passes import RandLoop, engine_seq
from .pattern import Pattern
from .posix import posix_read, posix_write
from .sysinfo import DeviceRequests, OtherLoad, device_stat_path, mean_run, open_arena

RAND_SLOTS = 64


@dataclass
class BenchSettings:
    """What :func:`run_engine_bench` measures (sizes in bytes)."""

    directory: str
    size: int
    backend: str = "threads"
    workers: int = 4
    chunk: int = 8 << 20
    rand_seconds: float = 10.0
    rand_rounds: int = 2
    backends_compare: tuple[str, ...] = ("aiofiles",)
    hugepages: bool = True
    keep: bool = False
    fio: bool = True
    deepnvme: bool = True
    sweep: bool = True
    window: int = 256 << 20
    slots: int = 4
    seed: int = 0


def sweep_settings(workers: int, chunk: int, sweep: bool) -> list[tuple[int, int]]:
    if not sweep:
        return [(workers, chunk)]
    return list(dict.fromkeys([(workers, chunk), (workers * 2, chunk), (workers, chunk * 4)]))


def run_engine_bench(s: BenchSettings, progress: Progress | None = None) -> dict:
    """Run the benchmark (see the module docstring) and return every number as a JSON-able dict."""
    return _Bench(s, progress or Progress()).run()


class _Bench:
    """One run: the file, the arenas, the result dict filled phase by phase."""

    def __init__(self, s: BenchSettings, prog: Progress) -> None:
        self.s, self.prog = s, prog
        self.t_start = time.perf_counter()
        self.load_all = OtherLoad()
        self._check_settings()
        self.dirpath = os.path.abspath(os.fspath(s.directory))
        os.makedirs(self.dirpath, exist_ok=True)
        free = shutil.disk_usage(self.dirpath).free
        if free < s.size + 64 * MiB:
            raise BenchError(f"{self.dirpath}: {prog.size(free)} free, the benchmark needs {prog.size(s.size)} "
                             "plus headroom")
        self.path = os.path.join(self.dirpath, f"tiered-bench-io-{os.getpid()}.dat")
        self.notes: list[str] = []
        self._choose_backends()
        self.fio_path = shutil.which("fio") if s.fio else None
        if s.fio and self.fio_path is None:
            self.notes.append(FIO_HINT)
        elif not s.fio:
            self.notes.append("fio skipped (--no-fio)")
        self.pattern = Pattern(s.window, s.seed)
        self.settings = sweep_settings(s.workers, s.chunk, s.sweep)
        self.devreq = DeviceRequests(device_stat_path(self.dirpath))
        self.result: dict[str, Any] = {
            "path": self.path, "size": s.size, "backend": s.backend,
            "cold": "O_DIRECT", "window": s.window, "slots": s.slots, "rand_bs": RAND_BS,
            "rand_seconds": s.rand_seconds, "targets": dict(TARGETS), "notes": self.notes,
            "backends_available": self.avail, "engine_rows": [], "fio_rows": [], "compare": {},
        }
        self.fio_rows: list[dict] = self.result["fio_rows"]
        self.main_arena = self.flat_arena = None

    def _check_settings(self) -> None:
        s = self.s
        if s.chunk <= 0 or s.chunk % PAGE:
            raise BenchError(f"chunk must be a positive multiple of {PAGE} bytes, got {s.chunk}")
        if s.workers < 1:
            raise BenchError(f"workers must be >= 1, got {s.workers}")
        s.size = s.size // MiB * MiB
        if s.size < MiB:
            raise BenchError("size must be at least 1 MiB")
        s.window = max(PAGE, min(s.window, s.size) // PAGE * PAGE)
        s.slots = max(2, s.slots)

    def _choose_backends(self) -> None:
        s, avail = self.s, available_backends()
        self.avail = avail
        if s.backend == "auto":
            s.backend = create_backend("auto").name  # the engine's own choice
        if avail.get(s.backend, f"unknown backend {s.backend!r}") is not None:
            raise BenchError(f"I/O backend {s.backend!r} cannot run here: {avail.get(s.backend) or 'unknown backend'}")
        if avail.get("kvikio") is not None:
            self.notes.append(f"kvikio not measured: {avail['kvikio']}")
        self.compare = [b for b in dict.fromkeys(s.backends_compare) if b != s.backend]
        for b in list(self.compare):
            if avail.get(b, "unknown backend") is not None:
                self.notes.append(f"{b} not measured: {avail.get(b) or 'unknown backend'}")
                self.compare.remove(b)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self._open_main_arena()
            rows = self._writes_and_reads()
            best_r = max(rows.values(), key=lambda r: r["read_gbps"])
            self._hugepages(best_r["workers"], best_r["chunk"])
            self._random()
            self._compare(best_r["workers"], best_r["chunk"])
            self._references()
            self._ratios()
        finally:
            for a in (self.main_arena, self.flat_arena):
                if a is not None:
                    a.close()
            if not self.s.keep:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        return self._finish()

    def _finish(self) -> dict:
        r = self.result
        r["other_cpu_load"] = self.load_all.fraction()
        for key, what in (("other_cpu_load", "the run"), ("other_cpu_load_rand", "the random reads")):
            v = r.get(key)
            if v is not None and v > 0.15:
                self.notes.append(f"other processes used {v:.0%} of the CPUs during {what}: the engine's CPU-bound "
                                  "random IOPS suffer more than fio's; rerun on a quiet machine")
        r["kept_file"] = self.path if self.s.keep else None
        r["elapsed_seconds"] = time.perf_counter() - self.t_start
        return r

    def _open_main_arena(self) -> None:
        s = self.s
        arena_bytes = s.window * s.slots + RAND_SLOTS * RAND_BS
        self.main_arena, hp_bytes = open_arena(arena_bytes, hugepages=s.hugepages, name="bench-hp")
        self.slot_arrays = [self.main_arena.alloc(s.window).array for _ in range(s.slots)]
        self.rand_arrays = [self.main_arena.alloc(RAND_BS).array for _ in range(RAND_SLOTS)]
        self.result["arena"] = {
            "bytes": arena_bytes, "hugepages": self.main_arena.hugepages, "pinned": self.main_arena.pinned,
            "hugepage_bytes": hp_bytes, "contiguous_run_kib": mean_run(self.slot_arrays),
        }
        if s.hugepages and hp_bytes < arena_bytes // 2:
            self.notes.append(f"the arena asked for huge pages but only {self.prog.size(hp_bytes)} of "
                              f"{self.prog.size(arena_bytes)} got them (THP mode, fragmentation?)")

    def setting_name(self, workers: int, chunk: int) -> str:
        return f"workers={workers} chunk={self.prog.size(chunk)}"

    def _engine(self, backend: str, workers: int, chunk: int) -> IOEngine:
        qd = workers if backend == "aiofiles" else 32  # aiofiles: w coroutines = w transfers in flight
        return IOEngine(backend, workers=workers, queue_depth=qd, chunk=chunk, direct=True)

    def _seq(self, backend: str, w: int, c: int, *, write: bool, arrays=None) -> dict:
        label = f"{backend} {'write' if write else 'read'} ({self.setting_name(w, c)})"
        self.prog.phase(f"engine {label}, {self.prog.size(self.s.size)}")
        with self._engine(backend, w, c) as e:
            dev = self.devreq.start()
            try:
                r = engine_seq(e, self.path, self.s.size, arrays or self.slot_arrays, self.pattern, write=write,
                               progress=self.prog, what="written" if write else "read")
            finally:
                e.forget(self.path)
            req = dev.stop(write)
        r.update(backend=backend, workers=w, chunk=c, device_req_kib=req)
        self.prog.note(f"  {r['gbps']:.2f} GB/s" + (f", device requests {req:.0f} KiB" if req else ""))
        return r

    # -- 1. and 2.: writes, then cold verified reads, per setting -----------------------------
    def _writes_and_reads(self) -> dict:
        s, result = self.s, self.result
        if os.path.exists(self.path):
            os.unlink(self.path)
        fresh = self._seq(s.backend, s.workers, s.chunk, write=True)  # also allocates the file's blocks
        result["write_gbps_fresh_file"] = fresh["gbps"]
        rows: dict[tuple[int, int], dict] = {}
        write_checks = [fresh] + [self._write_setting(w, c, rows) for w, c in self.settings]
        read_checks = [self._read_setting(w, c, rows[(w, c)]) for w, c in self.settings]
        result["engine_rows"] = list(rows.values())
        best_w = max(rows.values(), key=lambda r: r["write_gbps"])
        best_r = max(rows.values(), key=lambda r: r["read_gbps"])
        result.update(write_gbps=best_w["write_gbps"], read_gbps=best_r["read_gbps"], settings_tried=len(rows),
                      write_setting={"workers": best_w["workers"], "chunk": best_w["chunk"]},
                      read_setting={"workers": best_r["workers"], "chunk": best_r["chunk"]},
                      posix_read_gbps=max(r["posix_read_gbps"] for r in rows.values()),
                      posix_write_gbps=max(r["posix_write_gbps"] for r in rows.values()),
                      write_buffered_bytes=sum(r["buffered_bytes"] for r in write_checks))
        if result["write_buffered_bytes"]:
            self.notes.append(f"{result['write_buffered_bytes']} bytes of the engine's writes went through "
                              "the page cache (not O_DIRECT)")
        first = rows[(s.workers, s.chunk)]
        result["default_setting"] = {"workers": s.workers, "chunk": s.chunk,
                                     "read_gbps": first["read_gbps"], "write_gbps": first["write_gbps"]}
        buffered = sum(r["buffered_bytes"] for r in read_checks)
        result.update(read_buffered_bytes=buffered, read_direct_bytes=sum(r["direct_bytes"] for r in read_checks),
                      verified_blocks=sum(r["verified_blocks"] for r in read_checks))
        if buffered:
            self.notes.append(f"NOT cold: {buffered} bytes of the reads went through the page cache "
                              "(filesystem without O_DIRECT?)")
            result["cold"] = "buffered (no O_DIRECT here)"
        return rows

    def _write_setting(self, w: int, c: int, rows: dict) -> dict:
        self.prog.phase(f"posix-contig write ({self.setting_name(w, c)}) (+fdatasync)")
        pw = posix_write(self.path, self.s.size, self.slot_arrays, w, c)
        self.prog.note(f"  {pw['gbps']:.2f} GB/s")
        r = self._seq(self.s.backend, w, c, write=True)  # after the posix write: restores the verified pattern
        rows[(w, c)] = {"workers": w, "chunk": c, "write_gbps": r["gbps"], "posix_write_gbps": pw["gbps"],
                        "write_device_req_kib": r["device_req_kib"]}
        return r

    def _read_setting(self, w: int, c: int, row: dict) -> dict:
        r = self._seq(self.s.backend, w, c, write=False)
        row["read_gbps"] = r["gbps"]
        row["read_device_req_kib"] = r["device_req_kib"]
        self.prog.phase(f"posix-contig read ({self.setting_name(w, c)})")
        dev = self.devreq.start()
        p = posix_read(self.path, self.s.size, self.slot_arrays, w, c)
        preq = dev.stop(False)
        self.prog.note(f"  {p['gbps']:.2f} GB/s" + (f", device requests {preq:.0f} KiB" if preq else ""))
        row["posix_read_gbps"] = p["gbps"]
        row["posix_read_device_req_kib"] = preq
        return r

    # -- 3. huge pages vs 4 KiB pages, same setting, back to back (best of two each) -----------
    def _hugepages(self, bw: int, bc: int) -> None:
        s, result = self.s, self.result
        self.flat_arena, flat_hp = open_arena(s.window * s.slots, hugepages=False, name="bench-4k")
        flat_bufs = [self.flat_arena.alloc(s.window) for _ in range(s.slots)]
        flat_arrays = [b.array for b in flat_bufs]
        hp_runs, flat_runs, hp_req, flat_req = [], [], [], []
        for _ in range(2):
            r = self._seq(s.backend, bw, bc, write=False, arrays=flat_arrays)
            flat_runs.append(r["gbps"])
            flat_req.append(r["device_req_kib"])
            r = self._seq(s.backend, bw, bc, write=False)
            hp_runs.append(r["gbps"])
            hp_req.append(r["device_req_kib"])
        result["read_gbps_hugepages"] = max(hp_runs)
        result["read_gbps_no_hugepages"] = max(flat_runs)
        result["hugepage_runs"] = {
            "workers": bw, "chunk": bc, "hugepages": hp_runs, "no_hugepages": flat_runs,
            "hugepages_device_req_kib": hp_req, "no_hugepages_device_req_kib": flat_req,
            "hugepages_contiguous_run_kib": result["arena"]["contiguous_run_kib"],
            "no_hugepages_contiguous_run_kib": mean_run(flat_arrays),
            "no_hugepages_arena_hugepage_bytes": flat_hp,
        }
        for b in flat_bufs:
            b.release()
        self.flat_arena.close()
        self.flat_arena = None

    # -- 4. random 64 KiB reads, `workers` in flight at the device, 2x workers queued ----------
    def _rand(self, backend: str, seconds: float, rnd: int = 0) -> dict:
        rw = self.s.workers
        self.prog.phase(f"engine {backend} 64 KiB random reads for {seconds:g} s ({rw} in flight)")
        with self._engine(backend, rw, self.s.chunk) as e:
            try:
                r = RandLoop(e, self.path, self.s.size, self.rand_arrays[: 2 * rw], seconds,
                             self.s.seed + 1 + rnd).run()
            finally:
                e.forget(self.path)
        self.prog.note(f"  {r['iops']:.0f} IOPS")
        return r

    def _random(self) -> None:
        """Engine and fio (matching concurrency) alternate, best of ``rand_rounds`` each, so that
        the device's drift during the run does not favour whichever happened to go first."""
        s = self.s
        rounds = max(1, int(s.rand_rounds))
        per_round = s.rand_seconds / rounds
        rand_runs = []
        load_rand = OtherLoad()
        for rnd in range(rounds):
            rand_runs.append(self._rand(s.backend, per_round, rnd))
            if self.fio_path:
                self.prog.phase(f"fio 64 KiB randread psync numjobs={s.workers} for {per_round:g} s")
                row = run_fio(self.fio_path, self.path, rw="randread", bs=RAND_BS, ioengine="psync",
                              numjobs=s.workers, iodepth=1, size=s.size, runtime=per_round, time_based=True)
                row.update(concurrency="matching", round=rnd)
                self.prog.note(f"  {row['iops']:.0f} IOPS" if "iops" in row else f"  {row['error']}")
                self.fio_rows.append(row)
        r = max(rand_runs, key=lambda x: x["iops"])
        self.result["other_cpu_load_rand"] = load_rand.fraction()
        self.result["rand64k_read_iops"] = r["iops"]
        self.result["rand64k"] = {**r, "workers": s.workers, "in_flight": s.workers, "rounds": rounds,
                                  "runs_iops": [x["iops"] for x in rand_runs]}

    # -- 5. comparison backends (same work: write, verified read, random) ----------------------
    def _compare(self, cw: int, cc: int) -> None:
        result = self.result
        for b in self.compare:
            wr = self._seq(b, cw, cc, write=True)
            rd = self._seq(b, cw, cc, write=False)
            rr = self._rand(b, self.s.rand_seconds)
            result["compare"][b] = {"workers": cw, "chunk": cc, "queue_depth": cw, "write_gbps": wr["gbps"],
                                    "read_gbps": rd["gbps"], "rand64k_read_iops": rr["iops"],
                                    "read_buffered_bytes": rd["buffered_bytes"]}
            result[f"{b}_write_gbps"] = wr["gbps"]
            result[f"{b}_read_gbps"] = rd["gbps"]
            result[f"{b}_rand64k_read_iops"] = rr["iops"]
        for b in self.s.backends_compare:
            if b not in result["compare"] and b != self.s.backend:
                for k in ("write_gbps", "read_gbps", "rand64k_read_iops"):
                    result[f"{b}_{k}"] = None

    # -- 6. fio reads (and deep-queue random) on the same file, then DeepNVMe, then fio writes --
    def _references(self) -> None:
        s, result, fio_path = self.s, self.result, self.fio_path
        seq_runtime = max(30.0, s.size / 200e6)
        seq_cfgs = [(bs, eng, nj, qd) for bs in dict.fromkeys((MiB, s.chunk))
                    for eng, nj, qd in (("psync", s.workers, 1), ("libaio", 1, 32))]
        if fio_path:
            result["fio"] = {"installed": True, "path": fio_path, "version": fio_version(fio_path)}
            self.fio_rows += fio_sequential(fio_path, self.path, "read", seq_cfgs, s.size, seq_runtime, self.prog)
            self.prog.phase(f"fio 64 KiB randread libaio numjobs=1 iodepth=32 for {s.rand_seconds:g} s")
            row = run_fio(fio_path, self.path, rw="randread", bs=RAND_BS, ioengine="libaio", numjobs=1,
                          iodepth=32, size=s.size, runtime=s.rand_seconds, time_based=True)
            row["concurrency"] = "deep"
            self.prog.note(f"  {row['iops']:.0f} IOPS" if "iops" in row else f"  {row['error']}")
            self.fio_rows.append(row)
        else:
            result["fio"] = {"installed": fio_path is not None, "path": None, "version": None}
        ds, ds_note = (None, "DeepNVMe skipped") if not s.deepnvme else deepnvme(self.path, s.size, s.workers,
                                                                                 self.prog)
        if ds_note:
            self.notes.append(ds_note)
        result["ds_io_read_gbps"] = ds.get("read_gbps") if ds else None
        result["ds_io_write_gbps"] = ds.get("write_gbps") if ds else None
        result["deepnvme"] = ds
        if fio_path:
            self.fio_rows += fio_sequential(fio_path, self.path, "write", seq_cfgs, s.size, seq_runtime, self.prog)
        for row in self.fio_rows:
            if "error" in row:
                self.notes.append(f"fio {row['rw']} bs={row['bs']} {row['ioengine']}: {row['error']}")
        self._best_fio()

    def _best_fio(self) -> None:
        def best(rw: str, key: str, pred: Callable[[dict], bool] = lambda r: True) -> dict | None:
            ok = [r for r in self.fio_rows if r["rw"] == rw and key in r and pred(r)]
            return max(ok, key=lambda r: r[key]) if ok else None

        fr, fw = best("read", "gbps"), best("write", "gbps")
        frand = best("randread", "iops", lambda r: r.get("concurrency") == "matching")
        frand_deep = best("randread", "iops", lambda r: r.get("concurrency") == "deep")
        f1m = best("read", "gbps", lambda r: r["bs"] == MiB)
        self.result.update(
            fio_read_gbps=fr["gbps"] if fr else None, fio_write_gbps=fw["gbps"] if fw else None,
            fio_read_gbps_1m=f1m["gbps"] if f1m else None,
            fio_rand64k_read_iops=frand["iops"] if frand else None,
            fio_rand64k_read_iops_qd32=frand_deep["iops"] if frand_deep else None,
            fio_read_best=fr, fio_write_best=fw, fio_rand64k_best=frand,
        )

    # -- 7. references and ratios ---------------------------------------------------------------
    def _ratios(self) -> None:
        result = self.result
        read_refs = {"fio": result["fio_read_gbps"], "posix-contig": result["posix_read_gbps"],
                     "ds_io": result["ds_io_read_gbps"]}
        write_refs = {"fio": result["fio_write_gbps"], "posix-contig": result["posix_write_gbps"],
                      "ds_io": result["ds_io_write_gbps"]}
        rname, rval = max(((k, v) for k, v in read_refs.items() if v), key=lambda kv: kv[1], default=(None, None))
        wname, wval = max(((k, v) for k, v in write_refs.items() if v), key=lambda kv: kv[1], default=(None, None))
        rounds = result["rand64k"]["rounds"]
        result.update(
            best_read_ref=rname, best_read_ref_gbps=rval, best_write_ref=wname, best_write_ref_gbps=wval,
            read_ratio=ratio(result["read_gbps"], rval), write_ratio=ratio(result["write_gbps"], wval),
            rand64k_ratio=ratio(result["rand64k_read_iops"], result["fio_rand64k_read_iops"]),
            rand64k_ref=f"fio psync numjobs={self.s.workers} (same number of reads in flight; best of {rounds} "
                        "runs alternating with the engine's)",
        )
        result["meets_targets"] = {
            k: (None if result[f"{k}_ratio"] is None else result[f"{k}_ratio"] >= TARGETS[k])
            for k in ("read", "write", "rand64k")
        }
