"""Raw CUDA measurements of the layers below the store: host->device copies from the pinned
arena vs torch's pinned and pageable memory, pinned bytes for mixed-size buffers (arena vs torch's
caching host allocator), and storage->device reads (kvikio vs the threads backend through the
pinned arena). Used by bench/gpu_check.py; needs a CUDA device."""

from __future__ import annotations

import subprocess
import time

import numpy as np

from allocators import HostArena

from ..backends import available_backends
from ..engine import IOEngine

GB = 1e9


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cuda_time(fn, repeat: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeat


def h2d_bandwidth(nbytes: int) -> dict:
    import torch

    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    with HostArena(nbytes + (4 << 20), pin=True) as arena:
        buf = arena.alloc(nbytes)
        t = buf.tensor()
        t.fill_(1)
        out["arena_pinned_gbps"] = nbytes / cuda_time(lambda: dev.copy_(t, non_blocking=True)) / GB
        buf.release()
    pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    out["torch_pin_memory_gbps"] = nbytes / cuda_time(lambda: dev.copy_(pinned, non_blocking=True)) / GB
    pageable = torch.ones(nbytes, dtype=torch.uint8)
    out["pageable_gbps"] = nbytes / cuda_time(lambda: dev.copy_(pageable, non_blocking=True)) / GB
    del pinned, pageable, dev
    return out


def pinned_peak(count: int = 1000, seed: int = 0) -> dict:
    import torch

    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(4 << 10), np.log(8 << 20), count)).astype(np.int64)
    torch.cuda.synchronize()
    before = torch.cuda.host_memory_stats().get("reserved_bytes.current", 0) if hasattr(torch.cuda, "host_memory_stats") else 0
    held = [torch.empty(int(n), dtype=torch.uint8, pin_memory=True) for n in sizes]
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    torch_reserved = stats.get("reserved_bytes.current", 0) - before
    if torch_reserved <= 0:  # pin_memory=True tensors: torch rounds each block up to a power of two
        torch_reserved = int(sum(1 << int(np.ceil(np.log2(max(int(n), 1)))) for n in sizes))
        stats = {"estimated_from_power_of_two_rounding": True,
                 **{k: v for k, v in stats.items() if "bytes" in k and "current" in k}}
    del held
    total = int(sizes.sum())
    with HostArena(int(total * 1.05) + (64 << 20), pin=True) as arena:
        bufs = [arena.alloc(int(n)) for n in sizes]
        arena_peak = arena.stats().peak
        for b in bufs:
            b.release()
    return {"buffers": count, "requested_bytes": total, "torch_host_allocator_reserved_bytes": int(torch_reserved),
            "arena_reserved_bytes": int(arena_peak),
            "torch_over_requested": torch_reserved / total if torch_reserved else None,
            "arena_over_requested": arena_peak / total, "torch_host_stats": stats}


def storage_to_device(path: str, nbytes: int) -> dict:
    import torch

    out = {"file_bytes": nbytes}
    data = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8)
    with HostArena(256 << 20, pin=False) as arena, IOEngine("threads", workers=8, chunk=8 << 20) as eng:
        buf = arena.alloc(64 << 20)
        buf.array[:] = data
        futs = [eng.write(path, off, buf.array) for off in range(0, nbytes, 64 << 20)]
        for f in futs:
            f.result(600)
        eng.fsync(path)
        buf.release()
    out["caches_dropped"] = drop_caches()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    reason = available_backends().get("kvikio")
    if reason is None:
        import kvikio
        import kvikio.defaults

        out["kvikio_compat_mode"] = str(kvikio.defaults.get("compat_mode"))
        with IOEngine("kvikio", workers=8, chunk=16 << 20) as eng:
            t0 = time.perf_counter()
            eng.read(path, 0, dev).result(600)
            torch.cuda.synchronize()
            out["kvikio_gbps"] = nbytes / (time.perf_counter() - t0) / GB
        assert torch.equal(dev[: 64 << 20].cpu(), torch.from_numpy(data))
        drop_caches()
    else:
        out["kvikio_gbps"] = None
        out["kvikio_unavailable"] = reason
    window = 256 << 20
    stream = torch.cuda.Stream()
    with HostArena(2 * window + (4 << 20), pin=True) as arena, IOEngine("threads", workers=8, chunk=8 << 20) as eng:
        slots = [arena.alloc(window), arena.alloc(window)]
        events = [None, None]
        t0 = time.perf_counter()
        pending = None
        for i, off in enumerate(range(0, nbytes, window)):
            slot = i % 2
            if events[slot] is not None:
                events[slot].synchronize()
            n = min(window, nbytes - off)
            eng.read(path, off, slots[slot].array, n).result(600)
            with torch.cuda.stream(stream):
                dev[off:off + n].copy_(slots[slot].tensor()[:n], non_blocking=True)
                events[slot] = torch.cuda.Event()
                events[slot].record(stream)
            pending = events[slot]
        pending.synchronize()
        out["threads_pinned_bounce_gbps"] = nbytes / (time.perf_counter() - t0) / GB
        st = eng.stats()["read"]
        out["threads_buffered_bytes"] = st["buffered_bytes"]
        for s in slots:
            s.release()
    assert torch.equal(dev[: 64 << 20].cpu(), torch.from_numpy(data))
    del dev
    return out
