"""The report of ``tiered bench io``: a readable table of :func:`~io_engine.bench.run_engine_bench`'s numbers."""

from __future__ import annotations

import os
import sys

from tiered.io_engine.bench import TARGETS

from ..sizes import format_size


def setting_name(workers: int, chunk: int) -> str:
    return f"workers={workers} chunk={format_size(chunk)}"


def fio_label(row: dict | None) -> str | None:
    if not row:
        return None
    return f"bs={format_size(row['bs'])} {row['ioengine']} numjobs={row['numjobs']} iodepth={row['iodepth']}"


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def print_report(result: dict, file=None) -> None:
    """A readable table of :func:`run_bench_io`'s result (stdout by default)."""
    out = file or sys.stdout

    def p(s: str = "") -> None:
        print(s, file=out)

    for section in (_header, _summary, _references, _by_setting, _hugepages, _backends):
        section(result, p)
    for n in result.get("notes", []):
        p(f"note: {n}")
    p(f"({result.get('elapsed_seconds', 0):.0f} s)")


def _header(result: dict, p) -> None:
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


def _summary(result: dict, p) -> None:
    """The engine against the best reference, with the ratio and the target, per measure."""
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
    rs, ws, rr = result.get("read_setting", {}), result.get("write_setting", {}), result.get("rand64k", {})
    p(f"  read: {setting_name(rs.get('workers', 0), rs.get('chunk', 0))}; "
      f"write: {setting_name(ws.get('workers', 0), ws.get('chunk', 0))}; "
      f"random: {rr.get('in_flight', '?')} reads in flight, engine runs "
      + "/".join(f"{x:.0f}" for x in rr.get("runs_iops", [])) + " IOPS alternating with fio's")
    p()


def _references(result: dict, p) -> None:
    """fio, plain O_DIRECT threads and DeepNVMe on the same file."""
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


def _by_setting(result: dict, p) -> None:
    p("GB/s by setting            engine write  posix write  engine read  posix read")
    for row in result.get("engine_rows", []):
        p(f"  {setting_name(row['workers'], row['chunk']):24}{_f(row.get('write_gbps')):>14}"
          f"{_f(row.get('posix_write_gbps')):>13}{_f(row.get('read_gbps')):>13}{_f(row.get('posix_read_gbps')):>12}")
    if result.get("write_gbps_fresh_file") is not None:
        p(f"  first write of the fresh file (allocates blocks): {result['write_gbps_fresh_file']:.2f} GB/s")
    p()


def _hugepages(result: dict, p) -> None:
    hp = result.get("hugepage_runs", {})
    p(f"huge pages ({setting_name(hp.get('workers', 0), hp.get('chunk', 0))}, best of 2 each; "
      f"{format_size(result.get('arena', {}).get('hugepage_bytes', 0))} of the arena on huge pages):")

    def kib(v) -> str:
        vals = [x for x in (v if isinstance(v, list) else [v]) if x]
        return "/".join(f"{x:.0f}" for x in vals) if vals else "n/a"

    for label, key in (("huge-page arena", "hugepages"), ("4 KiB-page arena", "no_hugepages")):
        gb = result.get("read_gbps_hugepages" if key == "hugepages" else "read_gbps_no_hugepages")
        p(f"  read into {label:17}{_f(gb)} GB/s; physically contiguous runs {kib(hp.get(key + '_contiguous_run_kib'))}"
          f" KiB; device requests {kib(hp.get(key + '_device_req_kib'))} KiB")
    p()


def _backends(result: dict, p) -> None:
    p("backends:             write GB/s  read GB/s  rand 64 KiB IOPS")
    p(f"  {result['backend']:20}{_f(result.get('write_gbps')):>10}{_f(result.get('read_gbps')):>11}"
      f"{_f(result.get('rand64k_read_iops'), '{:.0f}'):>18}")
    for name, c in result.get("compare", {}).items():
        p(f"  {name:20}{_f(c['write_gbps']):>10}{_f(c['read_gbps']):>11}{_f(c['rand64k_read_iops'], '{:.0f}'):>18}")
    for name, reason in result.get("backends_available", {}).items():
        if reason is not None:
            p(f"  {name:20}unavailable: {reason}")
