"""I/O references of ``bench/offload_inference.py``: fio's sequential O_DIRECT read bandwidth of
the checkpoint file (a few settings, or one quick read next to a contender) and tiered bench
io's posix-contig/engine reference reads."""

from __future__ import annotations

import os
import shutil

from bench._offload_common import MiB, fmt, log


def fio_refs(path: str, size: int) -> dict:
    """fio's sequential O_DIRECT read bandwidth of ``path`` (read-only), best of a few settings."""
    from tiered.bench_io import _fio_label, _run_fio

    fio = shutil.which("fio")
    if fio is None:
        return {"error": "fio not installed (apt-get install fio)", "rows": []}
    size = size // (8 * MiB) * (8 * MiB)
    rows = []
    for bs, eng, nj, qd in ((8 * MiB, "libaio", 1, 32), (1 * MiB, "libaio", 1, 32), (8 * MiB, "psync", 4, 1)):
        log(f"fio read {os.path.basename(path)} bs={bs // MiB}M {eng} numjobs={nj} iodepth={qd}")
        row = _run_fio(fio, path, rw="read", bs=bs, ioengine=eng, numjobs=nj, iodepth=qd, size=size,
                       runtime=max(30.0, size / 100e6), time_based=False)
        log(f"  {row['gbps']:.2f} GB/s" if "gbps" in row else f"  {row.get('error')}")
        row.pop("command", None)
        rows.append(row)
    ok = [r for r in rows if "gbps" in r]
    best = max(ok, key=lambda r: r["gbps"]) if ok else None
    return {"rows": rows, "best_gbps": best["gbps"] if best else None, "best_setting": _fio_label(best)}


def fio_quick(path: str) -> float | None:
    from tiered.bench_io import _run_fio

    fio = shutil.which("fio")
    if fio is None:
        return None
    size = os.path.getsize(path) // (8 * MiB) * (8 * MiB)
    row = _run_fio(fio, path, rw="read", bs=8 * MiB, ioengine="libaio", numjobs=1, iodepth=32, size=size,
                   runtime=max(30.0, size / 100e6), time_based=False)
    log(f"fio (adjacent) bs=8M libaio qd=32: {row['gbps']:.2f} GB/s" if "gbps" in row else f"fio: {row.get('error')}")
    return row.get("gbps")


def posix_contig(directory: str) -> dict:
    """tiered bench io's reference reads (posix-contig: O_DIRECT preadv into a huge-page arena; and
    the engine) on a 1 GiB file in the same directory, no sweep, no random reads to speak of."""
    from tiered.bench_io import run_bench_io

    log("bench io (posix-contig and engine reference reads, 1 GiB file)")
    r = run_bench_io(directory, "1GiB", rand_seconds=1.0, rand_rounds=1, backends_compare=(), fio=False,
                     deepnvme=False, sweep=False, progress=False)
    out = {"posix_contig_read_gbps": r.get("posix_read_gbps"), "engine_read_gbps": r.get("read_gbps"),
           "engine_read_gbps_no_hugepages": r.get("read_gbps_no_hugepages"),
           "setting": r.get("read_setting")}
    log(f"  posix-contig {fmt(out['posix_contig_read_gbps'], '{:.2f}')} GB/s, engine "
        f"{fmt(out['engine_read_gbps'], '{:.2f}')} GB/s (4 KiB pages: "
        f"{fmt(out['engine_read_gbps_no_hugepages'], '{:.2f}')})")
    return out
