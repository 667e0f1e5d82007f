"""``tiered probe``: what tiers this machine has, and how fast each storage directory is.

Detects the GPU(s) (torch), host RAM (psutil) and its transparent-huge-page
mode, and for every storage tier of the config: capacity, free disk, the
filesystem and block device under it, whether O_DIRECT works there, and its
read/write bandwidth from a short cold test with the I/O engine (write
``size`` bytes with O_DIRECT + fdatasync, read them back with O_DIRECT,
verified). Also lists the I/O backends with the reason any is unavailable.
The default run takes a few seconds.
"""

from __future__ import annotations

import argparse
import errno
import json as _json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from allocators import PAGE, aligned_empty
from io_engine import available_backends
from io_engine.bench import measure_storage

from ..sizes import format_size, parse_size
from .args import UsageError, size_arg

__all__ = ["add_probe_arguments", "print_probe", "probe", "probe_main"]

MiB = 1 << 20
GB = 1e9
_THP = "/sys/kernel/mm/transparent_hugepage"


def _bracketed(text: str) -> str | None:
    """``always [madvise] never`` -> ``madvise``."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip() or None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _hugepages() -> dict:
    enabled, defrag = _read(f"{_THP}/enabled"), _read(f"{_THP}/defrag")
    mode = _bracketed(enabled) if enabled else None
    note = {
        "always": "every large anonymous mapping gets 2 MiB pages",
        "madvise": "the host arena asks for them (MADV_HUGEPAGE), so it gets 2 MiB pages",
        "never": "no transparent huge pages: I/O buffers are 4 KiB pages, device requests stay small",
    }.get(mode or "", "transparent huge pages not available on this kernel")
    return {"thp_enabled": mode, "thp_defrag": _bracketed(defrag) if defrag else None, "note": note}


def _gpus() -> dict:
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": False, "devices": [], "reason": "torch is not installed"}
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": False, "devices": []}
    try:
        if not torch.cuda.is_available():
            out["reason"] = "no CUDA device visible to torch" + (
                " (CPU build of torch)" if torch.version.cuda is None else "")
            return out
        out["cuda"] = True
        out["cuda_version"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            out["devices"].append({"index": i, "name": props.name, "total_bytes": int(total),
                                   "free_bytes": int(free)})
    except Exception as e:  # noqa: BLE001 - a broken driver is reported, not fatal
        out["reason"] = f"CUDA query failed: {e}"
    return out


def _unescape_mount(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mount_of(path: Path) -> dict:
    """Mount point, filesystem type and source device of ``path`` (longest matching mount)."""
    real = os.path.realpath(path)
    best: dict[str, str] = {}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = _unescape_mount(parts[1])
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best.get("mount", "")):
                    best = {"mount": mnt, "fstype": parts[2], "source": _unescape_mount(parts[0])}
    except OSError:
        pass
    return best


def _block_device(path: Path) -> dict:
    """The block device under ``path`` from sysfs: name, rotational, scheduler, max request size."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    base = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    if not os.path.exists(base):
        return {}
    dev = os.path.realpath(base)
    queue = os.path.join(dev, "queue")
    if not os.path.isdir(queue):  # a partition: the queue belongs to the parent disk
        queue = os.path.join(os.path.dirname(dev), "queue")
    out: dict[str, Any] = {"name": os.path.basename(dev)}
    for key, fname in (("rotational", "rotational"), ("scheduler", "scheduler"),
                       ("max_sectors_kb", "max_sectors_kb"), ("max_segments", "max_segments"),
                       ("nr_requests", "nr_requests")):
        v = _read(os.path.join(queue, fname))
        if v is None:
            continue
        out[key] = _bracketed(v) if key == "scheduler" else (int(v) if v.isdigit() else v)
    return out


def _direct_io_ok(path: Path) -> tuple[bool, str | None]:
    """Whether a 4 KiB O_DIRECT write works in ``path`` (it fails on tmpfs and some FUSE mounts)."""
    if not hasattr(os, "O_DIRECT"):
        return False, "this OS has no O_DIRECT"
    probe_file = path / f".tiered-probe-direct-{os.getpid()}"
    buf = aligned_empty(PAGE)
    try:
        fd = os.open(probe_file, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return False, "the filesystem refuses O_DIRECT" if e.errno == errno.EINVAL else str(e)
    try:
        os.pwritev(fd, [buf], 0)
        return True, None
    except OSError as e:
        return False, f"O_DIRECT write failed: {e.strerror or e}"
    finally:
        os.close(fd)
        try:
            os.unlink(probe_file)
        except OSError:
            pass


def _measure(path: Path, size: int, engine_spec: Any) -> dict:
    """The engine's own storage test (:func:`io_engine.bench.measure_storage`) with the config's engine."""
    return measure_storage(path, size, backend=engine_spec.backend, workers=engine_spec.workers,
                           queue_depth=engine_spec.queue_depth, chunk=engine_spec.chunk, direct=engine_spec.direct)


def probe(config=None, *, measure: bool = True, size: int | str = 256 << 20) -> dict:
    """Detect tiers and (with ``measure``) time each storage directory; a JSON-able dict."""
    from ..config import load_config, machine_warnings

    import psutil

    t0 = time.perf_counter()
    cfg = load_config(config)
    size = parse_size(size, where="size")
    if size < MiB:
        raise UsageError(f"probe size {format_size(size)}: expected at least 1 MiB")
    size = size // MiB * MiB
    vm = psutil.virtual_memory()
    host_tier = cfg.host_tier
    result: dict[str, Any] = {
        "config": cfg.source,
        "gpu": _gpus(),
        "device_tiers": [{"name": t.name, "device": t.device, "capacity": t.capacity}
                         for t in cfg.device_tiers],
        "host": {
            "total_bytes": int(vm.total), "available_bytes": int(vm.available), "cpus": os.cpu_count(),
            "tier": host_tier.name if host_tier else None,
            "tier_capacity": host_tier.capacity if host_tier else None,
            **_hugepages(),
        },
        "engine": {"backend": cfg.engine.backend, "workers": cfg.engine.workers,
                   "queue_depth": cfg.engine.queue_depth, "chunk": cfg.engine.chunk, "direct": cfg.engine.direct},
        "backends": available_backends(),
        "fio": shutil.which("fio"),
        "storage": [],
        "warnings": machine_warnings(cfg),
    }
    for t in cfg.storage_tiers:
        path = Path(t.path)
        du = shutil.disk_usage(path)
        direct, why = _direct_io_ok(path)
        entry: dict[str, Any] = {
            "name": t.name, "path": str(path), "capacity": t.capacity,
            "disk_total_bytes": du.total, "disk_free_bytes": du.free,
            **{k: v for k, v in _mount_of(path).items()},
            "block_device": _block_device(path),
            "o_direct": direct, "o_direct_reason": why,
            "read_bandwidth_limit": t.read_bandwidth, "write_bandwidth_limit": t.write_bandwidth,
            "read_gbps": None, "write_gbps": None,
        }
        if measure:
            if du.free < size + 64 * MiB:
                entry["measure_error"] = f"not measured: only {format_size(du.free)} free"
            else:
                try:
                    m = _measure(path, size, cfg.engine)
                    entry.update(read_gbps=m["read_gbps"], write_gbps=m["write_gbps"], measured=m)
                except Exception as e:  # noqa: BLE001 - one bad directory must not hide the others
                    entry["measure_error"] = f"{type(e).__name__}: {e}"
        result["storage"].append(entry)
    result["elapsed_seconds"] = time.perf_counter() - t0
    return result


def print_probe(result: dict, file=None) -> None:
    out = file or sys.stdout

    def p(s: str = "") -> None:
        print(s, file=out)

    g = result["gpu"]
    p(f"config: {result['config']}")
    p(f"torch {g.get('torch') or 'not installed'}")
    if g["devices"]:
        for d in g["devices"]:
            p(f"  GPU {d['index']}: {d['name']}, {format_size(d['total_bytes'])} total, "
              f"{format_size(d['free_bytes'])} free")
    else:
        p(f"  GPU: none ({g.get('reason', 'no CUDA device')})")
    for t in result["device_tiers"]:
        p(f"  tier {t['name']}: {t['device']}, {format_size(t['capacity'])}")
    h = result["host"]
    p(f"host RAM: {format_size(h['total_bytes'])} total, {format_size(h['available_bytes'])} available, "
      f"{h['cpus']} CPUs" + (f"; tier {h['tier']}: {format_size(h['tier_capacity'])}" if h["tier"] else ""))
    p(f"  transparent huge pages: {h['thp_enabled']} (defrag {h['thp_defrag']}): {h['note']}")
    e = result["engine"]
    p(f"engine: backend {e['backend']}, {e['workers']} workers, chunk {format_size(e['chunk'])}, "
      f"O_DIRECT {'on' if e['direct'] else 'off'}")
    for s in result["storage"]:
        p(f"storage tier {s['name']}: {s['path']}")
        p(f"  capacity {format_size(s['capacity'])}, disk {format_size(s['disk_free_bytes'])} free of "
          f"{format_size(s['disk_total_bytes'])}")
        if s.get("fstype"):
            bd = s.get("block_device") or {}
            dev = f", device {bd['name']}" if bd.get("name") else ""
            extra = ", ".join(f"{k} {bd[k]}" for k in ("rotational", "scheduler", "max_sectors_kb") if k in bd)
            p(f"  filesystem {s['fstype']} on {s.get('source')} mounted at {s.get('mount')}{dev}"
              + (f" ({extra})" if extra else ""))
        p(f"  O_DIRECT: {'yes' if s['o_direct'] else 'no (' + str(s['o_direct_reason']) + ')'}")
        if s.get("read_gbps") is not None:
            m = s["measured"]
            p(f"  cold {format_size(m['bytes'])} test: write {s['write_gbps']:.2f} GB/s (incl. fdatasync), "
              f"read {s['read_gbps']:.2f} GB/s" + ("" if m["cold"] else " (NOT cold: page cache used)"))
        elif s.get("measure_error"):
            p(f"  {s['measure_error']}")
        for k in ("read_bandwidth_limit", "write_bandwidth_limit"):
            if s.get(k):
                p(f"  {k.replace('_', ' ')}: {format_size(s[k])}/s")
    p("I/O backends:")
    for name, reason in result["backends"].items():
        p(f"  {name}: {'available' if reason is None else reason}")
    p(f"fio: {result['fio'] or 'not installed (apt-get install fio) -- tiered bench io uses it as a reference'}")
    p(f"({result['elapsed_seconds']:.1f} s)")


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="offload TOML file (default: the built-in default)")
    parser.add_argument("--size", default="256MiB", type=size_arg(MiB),
                        help="bytes written and read per storage tier, at least 1MiB, rounded down to whole MiB "
                             "(default 256MiB)")
    parser.add_argument("--no-measure", action="store_true", help="detect only; no bandwidth test")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def probe_main(args: argparse.Namespace) -> int:
    """``tiered probe``: the report (or JSON) on stdout, budgets beyond the machine as warnings on stderr."""
    result = probe(getattr(args, "config", None), measure=not args.no_measure, size=args.size)
    if args.json:
        print(_json.dumps(result, indent=2, sort_keys=True))
    else:
        print_probe(result)
    for msg in result["warnings"]:
        print(f"warning: {msg}", file=sys.stderr)
    return 0
