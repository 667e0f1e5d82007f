"""fio, the reference the engine is judged against: run a job, read its JSON."""

from __future__ import annotations

import json
import os
import subprocess

from .common import GB, Progress
from .sysinfo import DeviceRequests, device_stat_path


def fio_sequential(fio_path: str, path: str, rw: str, cfgs, size: int, runtime: float, prog: Progress) -> list[dict]:
    """fio sequential ``rw`` ("read" or "write", the latter with fsync) for each (bs, ioengine,
    numjobs, iodepth) setting, one row each."""
    rows = []
    for bs, eng, nj, qd in cfgs:
        sync = " (+fsync)" if rw == "write" else ""
        prog.phase(f"fio {rw} bs={prog.size(bs)} {eng} numjobs={nj} iodepth={qd}{sync}")
        row = run_fio(fio_path, path, rw=rw, bs=bs, ioengine=eng, numjobs=nj, iodepth=qd,
                       size=size, runtime=runtime, time_based=False)
        prog.note(f"  {row['gbps']:.2f} GB/s" if "gbps" in row else f"  {row['error']}")
        rows.append(row)
    return rows


def parse_fio_json(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio output")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    return obj


def run_fio(fio: str, path: str, *, rw: str, bs: int, ioengine: str, numjobs: int, iodepth: int,
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
    dev = DeviceRequests(device_stat_path(os.path.dirname(path))).start()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
        row["device_req_kib"] = dev.stop("write" in rw)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"fio did not finish within {runtime + 120:.0f} s"}
    except OSError as e:
        return {**row, "error": f"cannot run fio: {e}"}
    try:
        data = parse_fio_json(proc.stdout)
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


def fio_version(fio: str) -> str | None:
    try:
        return subprocess.run([fio, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
