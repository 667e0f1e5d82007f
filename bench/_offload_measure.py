"""Child side of ``bench/offload_inference.py``: what one contender's process measures -- wall
time, storage bytes read and CPU seconds of a code span, CPU time per thread group, a CPU speed
probe, and the timed prompt forwards and greedy decode of a loaded model."""

from __future__ import annotations

import os
import resource
import statistics
import time

from bench._offload_common import fmt_bytes, log


def _proc_io() -> dict:
    out = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phase:
    """Wall time, storage bytes read (/proc/self/io read_bytes) and CPU seconds of a code span."""

    def __enter__(self) -> "Phase":
        self.io0 = _proc_io().get("read_bytes", 0)
        self.cpu0 = _cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = _cpu_seconds() - self.cpu0
        self.read_bytes = _proc_io().get("read_bytes", 0) - self.io0


def _thread_cpu() -> dict:
    """CPU seconds (user+sys) so far by thread group: main (Python + torch's calling thread),
    io (the tiered engine's workers, which also verify checksums), other (torch's OpenMP pool, ...)."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {"main": 0.0, "io": 0.0, "other": 0.0}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        name = names.get(int(tid), "")
        group = "main" if name == "MainThread" else "io" if name.startswith("tiered-io") else "other"
        out[group] += cpu
    return out


def _cpu_delta(a: dict, b: dict, n: int) -> dict:
    return {k: round((b[k] - a[k]) / max(1, n), 3) for k in a}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _delta(a: dict | None, b: dict | None) -> dict | None:
    """b - a of the numeric offload counters."""
    if a is None or b is None:
        return None
    out = {}
    for k in ("forwards", "unit_loads", "prefetch_hits", "stall_seconds", "bytes_read_total", "prefetch_skipped"):
        out[k] = round(b[k] - a[k], 4) if isinstance(b[k], float) else b[k] - a[k]
    out["prefetch_hit_rate"] = round(out["prefetch_hits"] / out["unit_loads"], 4) if out["unit_loads"] else None
    return out


def _cpu_probe() -> float:
    """GFLOPS of a fixed fp32 matmul (best of 5): the CPU speed of this moment. The host's CPUs are
    shared, and their speed drifts between contenders run minutes apart."""
    import torch

    a, b = torch.randn(128, 2048), torch.randn(2048, 2048)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = max(best, 10 * 2 * 128 * 2048 * 2048 / (time.perf_counter() - t0) / 1e9)
    return best


def measure(model, snapshot, spec: dict, name: str) -> dict:
    """``spec["forwards"]`` prompt forwards, then a greedy decode of ``spec["new_tokens"]`` steps
    after a prefill, each timed (wall, bytes read, CPU); a CPU speed probe before and after; the
    offload counters over each phase when ``snapshot`` gives them."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, spec["vocab_size"], (1, spec["prompt"]), generator=gen)
    res: dict = {"forwards": [], "forward_read_bytes": [], "forward_cpu_s": [], "cpu_probe_gflops": [_cpu_probe()]}
    snaps = {"start": snapshot() if snapshot else None}
    with torch.inference_mode():
        _forwards(model, snapshot, spec, name, ids, res, snaps)
        steps, step_read, step_cpu, tokens = _decode(model, snapshot, spec, name, ids, res, snaps)
    res["cpu_probe_gflops"].append(_cpu_probe())
    later = res["forwards"][1:] or res["forwards"]
    res.update(
        forward_s=statistics.median(later),
        forward_read_bytes_steady=statistics.median(res["forward_read_bytes"][1:] or res["forward_read_bytes"]),
        token_s=statistics.fmean(steps) if steps else None,
        token_s_median=statistics.median(steps) if steps else None,
        token_steps=steps, token_read_bytes=step_read, token_cpu_s=step_cpu,
        token_read_bytes_mean=statistics.fmean(step_read) if step_read else None,
        tokens=tokens,
    )
    if snapshot:
        _offload_summary(res, snaps, spec)
    return res


def _forwards(model, snapshot, spec: dict, name: str, ids, res: dict, snaps: dict) -> None:
    """The timed prompt forwards (no KV cache); the first one's last-position logits are saved
    for the comparison with the in-memory model's."""
    import torch

    cpu_mark = None
    for i in range(spec["forwards"]):
        if i == 1:
            cpu_mark = _thread_cpu()
        with Phase() as ph:
            out = model(input_ids=ids, use_cache=False)
            last = out.logits[0, -1].float().clone()
        if i == 0:
            from safetensors.torch import save_file

            save_file({"logits": last}, os.path.join(spec["work_dir"], f"logits-{spec.get('label', name)}.safetensors"))
            res["first_logits_finite"] = bool(torch.isfinite(last).all())
            snaps["after_first_forward"] = snapshot() if snapshot else None
        del out
        res["forwards"].append(ph.seconds)
        res["forward_read_bytes"].append(ph.read_bytes)
        res["forward_cpu_s"].append(ph.cpu)
        log(f"  {spec.get('label', name)}: forward {i + 1}/{spec['forwards']}: {ph.seconds:.3f} s, "
            f"read {fmt_bytes(ph.read_bytes)}, cpu {ph.cpu:.2f} s")
    snaps["after_forwards"] = snapshot() if snapshot else None
    if cpu_mark is not None:
        res["thread_cpu_per_forward_s"] = _cpu_delta(cpu_mark, _thread_cpu(), spec["forwards"] - 1)


def _decode(model, snapshot, spec: dict, name: str, ids, res: dict, snaps: dict) -> tuple[list, list, list, list]:
    """Prefill the prompt with a KV cache, then greedy steps, each timed: (seconds, bytes read,
    CPU seconds per step; the tokens)."""
    import inspect

    # transformers 5.x renamed past_key_values to cache (the old name warns)
    new_api = "cache" in inspect.signature(type(model).forward).parameters
    cache_kw = "cache" if new_api else "past_key_values"
    with Phase() as ph:
        out = model(input_ids=ids, use_cache=True)
    res["prefill_s"] = ph.seconds
    past = getattr(out, cache_kw)
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    tokens, steps, step_read, step_cpu = [int(nxt)], [], [], []
    snaps["before_decode"] = snapshot() if snapshot else None
    cpu_mark = _thread_cpu()
    for i in range(spec["new_tokens"]):
        with Phase() as ph:
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            nxt = out.logits[:, -1:].argmax(-1)
        past = getattr(out, cache_kw)
        del out
        tokens.append(int(nxt))
        steps.append(ph.seconds)
        step_read.append(ph.read_bytes)
        step_cpu.append(ph.cpu)
        log(f"  {spec.get('label', name)}: token {i + 1}/{spec['new_tokens']}: {ph.seconds:.3f} s, "
            f"read {fmt_bytes(ph.read_bytes)}, cpu {ph.cpu:.2f} s")
    snaps["after_decode"] = snapshot() if snapshot else None
    res["thread_cpu_per_token_s"] = _cpu_delta(cpu_mark, _thread_cpu(), spec["new_tokens"])
    return steps, step_read, step_cpu, tokens


def _offload_summary(res: dict, snaps: dict, spec: dict) -> None:
    """The offload counters over the steady forwards and the decode: bytes and stalls per step."""
    n_later = max(1, spec["forwards"] - 1)
    fw = _delta(snaps["after_first_forward"], snaps["after_forwards"])
    dec = _delta(snaps["before_decode"], snaps["after_decode"])
    res["offload_stats"] = snaps["after_decode"]
    res["offload_forward"] = fw
    res["offload_decode"] = dec
    res["bytes_per_forward"] = fw["bytes_read_total"] / n_later if fw and spec["forwards"] > 1 else (
        snaps["after_first_forward"]["bytes_read_total"] - snaps["start"]["bytes_read_total"])
    res["bytes_per_token"] = dec["bytes_read_total"] / max(1, spec["new_tokens"]) if dec else None
    res["stall_per_forward_s"] = fw["stall_seconds"] / n_later if fw else None
    res["stall_per_token_s"] = dec["stall_seconds"] / max(1, spec["new_tokens"]) if dec else None
