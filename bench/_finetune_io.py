"""Storage bandwidths for ``bench/finetune.py``'s I/O bounds: fio's sequential O_DIRECT reads
and writes, one at a time and both at once."""

from __future__ import annotations

import os
import shutil
import subprocess

from bench._finetune_common import GB, MiB, log


def fio_bandwidth(directory: str, size: int) -> dict:
    from tiered.bench_io import _run_fio

    fio = shutil.which("fio")
    if fio is None:
        return {"error": "fio not installed"}
    path = os.path.join(directory, "fio.dat")
    with open(path, "wb") as f:  # a real file (allow_file_create=0): written once, then read cold
        chunk = os.urandom(MiB) * 8
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    out = {}
    path2 = os.path.join(directory, "fio2.dat")
    try:
        for rw in ("write", "read"):
            row = _run_fio(fio, path, rw=rw, bs=8 * MiB, ioengine="libaio", numjobs=1, iodepth=32,
                           size=size, runtime=20, time_based=False)
            out[rw] = row
            log(f"fio {rw} bs=8M libaio qd=32 O_DIRECT: " + (f"{row['gbps']:.2f} GB/s" if "gbps" in row
                                                             else row.get("error", "?")))
        shutil.copyfile(path, path2)
        out["mixed"] = fio_mixed(fio, path, path2, size)
        m = out["mixed"]
        log("fio read + write at once (two jobs, bs=8M libaio qd=32 O_DIRECT): " +
            (f"read {m['read_gbps']:.2f} GB/s, write {m['write_gbps']:.2f} GB/s" if "read_gbps" in m
             else m.get("error", "?")))
    finally:
        os.remove(path)
        if os.path.exists(path2):
            os.remove(path2)
    return out


def fio_mixed(fio: str, rpath: str, wpath: str, size: int) -> dict:
    """A read job and a write job in one fio run (both start together): each job's bandwidth."""
    from tiered.bench_io import _parse_fio_json

    common = ["--bs=8M", "--direct=1", "--ioengine=libaio", "--iodepth=32", f"--size={size}",
              "--allow_file_create=0"]
    cmd = [fio, "--output-format=json", "--name=r", f"--filename={rpath}", "--rw=read", *common,
           "--name=w", f"--filename={wpath}", "--rw=write", "--end_fsync=1", *common]
    row = {"command": " ".join(cmd[1:])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        jobs = {j["jobname"]: j for j in _parse_fio_json(proc.stdout)["jobs"]}
        r, w = jobs["r"]["read"], jobs["w"]["write"]
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
        return {**row, "error": f"fio mixed run failed: {e!r}"}
    return {**row, "read_gbps": r["bw_bytes"] / GB, "write_gbps": w["bw_bytes"] / GB,
            "read_s": r["runtime"] / 1e3, "write_s": w["runtime"] / 1e3}
