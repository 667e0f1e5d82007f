"""``tiered bench replay``: run placement/migration policies over a trace, simulated or for real.

* ``sim`` replays the trace through :func:`policies.sim.simulate` against
  tier cost models: speeds from the config's tiers (a storage tier's
  ``read_bandwidth``/``write_bandwidth`` when set, else typical NVMe figures),
  or measured by ``tiered probe --json`` (``--probe FILE``);
  capacities by default a fraction of the trace's footprint (the fast tier
  is ``--fast-fraction`` of it, 8% unless told: the regime where policies differ).
* ``real`` performs the I/O: the fast tier is a :class:`~allocators.HostArena`
  of that capacity, the backing tier one file on the config's first storage
  tier read and written through the :class:`~io_engine.IOEngine` with
  O_DIRECT (cold reads); migrations are engine futures running in the
  background while the replay goes on, so their traffic delays later
  accesses as on a real machine. Latency is wall-clock per access.

Both produce one row per policy: hit ratio per tier, mean and p99 latency,
bytes migrated, total time; learning policies also get a row over the final
window (``--window``, the last 20% of accesses) since they start cold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from policies import HEURISTICS, KINDS, OPS, Backing, MigrationPolicy, Observation, Outcome, PlacementPolicy
from policies import PolicyError, TierModel, create_policy
from policies.sim import Prepared, SimResult, prepare, simulate

from .config import Config, load_config

__all__ = ["DEFAULT_POLICIES", "add_replay_arguments", "replay_main", "rows_for", "run_real", "run_replay",
           "tier_models", "record_workloads"]

DEFAULT_POLICIES = (*HEURISTICS, "belady")
_SPEED = {  # latency s, read B/s, write B/s: typical figures when the config says nothing
    "device": (2e-6, 2e11, 2e11),
    "host": (1e-6, 1e10, 1e10),
    "storage": (80e-6, 3e9, 2e9),
}


def measured_bandwidths(probe_json: str | os.PathLike) -> dict[str, tuple[float | None, float | None]]:
    """Storage tier name -> (read, write) bytes/s from a ``tiered probe --json`` output file."""
    data = json.loads(Path(probe_json).read_text())
    out = {}
    for t in data.get("storage", []):
        r, w = t.get("read_gbps"), t.get("write_gbps")
        out[t["name"]] = (r * 1e9 if r else None, w * 1e9 if w else None)
    return out


def tier_models(cfg: Config | None, footprint: int, fast_fraction: float = 0.08,
                use_config_capacity: bool = False,
                measured: dict[str, tuple[float | None, float | None]] | None = None) -> tuple[TierModel, ...]:
    """Tier models fastest first, the last storage tier as the backing tier.

    Cache tiers get ``fast_fraction`` of ``footprint`` (each slower cache tier
    four times the one above), unless ``use_config_capacity``. Bandwidths:
    ``measured`` (from ``tiered probe``) over the config's throttles over typical figures.
    """
    if not 0 < fast_fraction <= 1:
        raise ValueError(f"fast fraction must be in (0, 1], got {fast_fraction}")
    if cfg is None:
        specs = [("host", "host", None, None, None), ("nvme", "storage", None, None, None)]
    else:
        specs = [(t.name, t.kind, t.capacity, t.read_bandwidth, t.write_bandwidth) for t in cfg.tiers]
    out = []
    cap = max(1, int(footprint * fast_fraction))
    for i, (name, kind, capacity, rbw, wbw) in enumerate(specs):
        lat, r, w = _SPEED[kind]
        mr, mw = (measured or {}).get(name, (None, None))
        rbw, wbw = mr or rbw, mw or wbw
        last = i == len(specs) - 1
        c = math.inf if last else (capacity if use_config_capacity and capacity else cap)
        out.append(TierModel(name, c, lat, float(rbw or r), float(wbw or w)))
        if not last and not use_config_capacity:
            cap *= 4
    if len(out) < 2:
        raise ValueError("replay needs at least two tiers (a cache tier and a backing tier)")
    return tuple(out)


def rows_for(result: SimResult, *, learns: bool, window: float) -> list[dict]:
    """The table rows of one replay (a second row over the final window for learning policies)."""
    s = result.summary()
    row = {**s, "bytes_migrated": result.bytes_migrated, "migrations": result.migrations,
           "total_time_s": result.total_time_s, "wall_s": result.wall_s}
    rows = [row]
    if window > 0 and result.latency_s.size:
        start = int(result.latency_s.size * (1 - window))
        fw = result.summary(start)
        row["final_window"] = {k: fw[k] for k in ("accesses", "hit_ratio", "mean_latency_us", "p99_latency_us")}
    if learns and window > 0 and result.latency_s.size:
        w = result.summary(start)
        w["policy"] = f"{result.policy} (final {window:.0%})"
        w["window_start"] = start
        w.update(bytes_migrated=None, migrations=None, total_time_s=None, wall_s=None)
        rows.append(w)
    return rows


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, or forced)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.t0 = label, enabled, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        end = "\n" if done >= total else ""
        print(f"\r{self.label:<12} [{bar:<30}] {frac:6.1%} {rate / 1e3:8.1f}k acc/s", end=end, file=sys.stderr, flush=True)


def choose_loop(trace, tiers: Sequence[TierModel]) -> tuple[bool, str]:
    """Closed loop for untimed traces and for traces whose offered load exceeds the backing tier.

    Replaying open-loop a trace recorded on a bigger system (Mooncake's is a
    production cluster's: ~5 GB/s of KV blocks) against one node's backing
    tier only measures a queue that grows without bound.
    """
    if not trace.timed:
        return True, "closed loop (the trace has no timestamps)"
    span = float(trace.time[-1] - trace.time[0]) if len(trace) > 1 else 0.0
    offered = float(trace.size.sum()) / span if span > 0 else math.inf
    if offered > tiers[-1].read_bw:
        return True, (f"closed loop (offered load {offered / 1e9:.2f} GB/s exceeds the {tiers[-1].name} "
                      f"tier's {tiers[-1].read_bw / 1e9:.2f} GB/s)")
    return False, f"open loop at trace times (offered load {offered / 1e9:.3f} GB/s)"


def run_replay(trace, policies: Sequence[str], tiers: Sequence[TierModel], *, mode: str = "sim",
               cfg: Config | None = None, closed_loop: bool | None = None, window: float = 0.2,
               progress: bool = False, policy_options: dict[str, dict] | None = None) -> list[dict]:
    """Replay ``trace`` (a :class:`traces.Trace`) once per policy name; the table's rows."""
    prep = prepare(trace.time, trace.key, trace.size, trace.op, trace.kind)
    closed = choose_loop(trace, tiers)[0] if closed_loop is None else closed_loop
    rows: list[dict] = []
    for name in policies:
        pol = create_policy(name, **(policy_options or {}).get(name, {}))
        bar = _Progress(name, progress)
        try:
            if mode == "sim":
                res = simulate(prep, tiers, pol, closed_loop=closed, progress=bar)
            elif mode == "real":
                if cfg is None:
                    raise ValueError("real mode needs a config naming a storage tier directory")
                res = run_real(prep, tiers, pol, cfg, progress=bar)
            else:
                raise ValueError(f"unknown mode {mode!r}; expected sim or real")
        finally:
            pol.close()
        rows += rows_for(res, learns=pol.learns, window=window)
    return rows


# ----------------------------------------------------------------------------- real mode

def run_real(trace: Prepared, tiers: Sequence[TierModel], policy: MigrationPolicy, cfg: Config,
             placement: PlacementPolicy | None = None, *, progress: Callable[[int, int], None] | None = None,
             max_footprint: int = 4 << 30) -> SimResult:
    """Replay with real I/O: host arena as the fast tier, one engine-backed file as the backing tier.

    Follows the call order of :class:`policies.base.MigrationPolicy` and the
    same checks as the simulator (a bad decision is a :class:`PolicyError`).
    Two tiers only (the first cache tier and the backing tier).
    """
    from allocators import HostArena
    from allocators.host_arena import align_up
    from io_engine import IOEngine, Priority

    if not cfg.storage_tiers:
        raise ValueError(f"{cfg.source}: real replay needs a storage tier")
    tiers = (tiers[0], tiers[-1])
    cap0 = int(tiers[0].capacity)
    names = (tiers[0].name, tiers[1].name)
    if placement is None:
        placement = policy if isinstance(policy, PlacementPolicy) else Backing()
    sizes = [align_up(max(1, s)) for s in trace.obj_size.tolist()]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist() if sizes else []
    total = int(sum(sizes))
    if total > max_footprint:
        raise ValueError(f"trace footprint {total} bytes exceeds the real-mode limit {max_footprint}; "
                         "replay fewer events or smaller blocks")
    directory = Path(cfg.storage_tiers[-1].path)
    path = directory / f".replay-{os.getpid()}.data"
    e = cfg.engine
    big = max(sizes) if sizes else 4096
    # objects are page-aligned in memory: small objects (ARC's 512-byte pages) take more arena than budget
    blowup = max((a / max(1, o) for a, o in zip(sizes, trace.obj_size.tolist())), default=1.0)
    arena = HostArena(int(cap0 * blowup) + 4 * big + (8 << 20), hugepages=False, pin=False, name="replay-fast").open()
    engine = IOEngine(e.backend if e.backend != "auto" else "threads", workers=e.workers, queue_depth=e.queue_depth,
                      chunk=e.chunk, direct=True).open()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        scratch = arena.alloc(big, timeout=None)
        fill = arena.alloc(min(big * 16, 8 << 20) if big <= (8 << 20) else big, timeout=None)
        fill.array[:] = 0x5A
        pos = 0
        while pos < total:  # lay the objects out on the backing file
            n = min(len(fill.array), total - pos)
            engine.write(path, pos, fill.array, align_up(n)).result(timeout=600)
            pos += n
        engine.fsync(path)
        res = _real_loop(trace, tiers, names, policy, placement, engine, arena, path, offsets, sizes,
                         scratch, cap0, progress, Priority)
    finally:
        engine.close()
        arena.close()
        path.unlink(missing_ok=True)
    return res


def _real_loop(trace, tiers, names, policy, placement, engine, arena, path, offsets, sizes, scratch, cap0,
               progress, Priority) -> SimResult:
    n, K = trace.n, trace.n_keys
    kl, sl, opl, kindl = trace.key.tolist(), trace.size.tolist(), trace.op.tolist(), trace.kind.tolist()
    osz, prevl, cntl, tl = trace.obj_size.tolist(), trace.prev.tolist(), trace.count.tolist(), trace.time.tolist()
    policy.reset(tiers)
    future = bool(policy.needs_future)
    if future:
        policy.prepare_future(trace.key)
    nextl = trace.next.tolist() if future else None
    tier_of = [-1] * K
    cache: dict[int, Any] = {}  # key -> HostBuffer on the fast tier
    inflight: dict[int, Any] = {}  # key -> future of a promotion read into its buffer
    writebacks: list[tuple[Any, Any]] = []  # (future, buffer) of demotions being written
    dirty = bytearray(K)
    used0 = 0
    peak0 = 0
    lats = np.zeros(n)
    served = np.zeros(n, dtype=np.int8)
    migrated = moves_n = decisions = 0
    batch_size = max(1, int(policy.batch))
    pending: list[Observation] = []
    pend_keys: set[int] = set()
    inf = math.inf
    t_start = time.perf_counter()

    def reap(block: bool = False) -> None:
        keep = []
        for fut, buf in writebacks:
            if block or fut.done():
                fut.result(timeout=600)
                buf.release()
            else:
                keep.append((fut, buf))
        writebacks[:] = keep

    def alloc(nbytes: int):
        b = arena.try_alloc(nbytes)
        if b is None:
            reap(block=True)
            b = arena.alloc(nbytes, timeout=60)
        return b

    for i in range(n):
        k, w, s = kl[i], opl[i], sizes[kl[i]]
        t0 = time.perf_counter()
        filled = False
        if tier_of[k] < 0:
            pobs = Observation(k, osz[k], KINDS[kindl[i]], OPS[w], None, tl[i], i, 1, inf, inf, -1,
                               (used0 / cap0 if cap0 else 1.0, 0.0))
            name = placement.place(pobs, [(names[0], cap0, cap0 - used0), (names[1], math.inf, math.inf)])
            if name not in names:
                raise PolicyError(f"placement {placement.name!r} named tier {name!r}; tiers: {names}")
            tier_of[k] = names.index(name)
            if tier_of[k] == 0:
                if used0 + osz[k] > cap0:
                    raise PolicyError(f"placement {placement.name!r} put key {k} on full tier {names[0]!r}")
                used0 += osz[k]
                peak0 = max(peak0, used0)
                buf = alloc(s)
                if not w:  # bytes of an object never seen come from the backing tier: a fill
                    engine.read(path, offsets[k], buf.array, s).result(timeout=600)
                    np.copyto(scratch.array[: sl[i]], buf.array[: sl[i]])
                    migrated += osz[k]
                    moves_n += 1
                    filled = True
                    served[i] = 1
                cache[k] = buf
        src = tier_of[k]
        if filled:
            pass
        elif src == 0:
            fut = inflight.pop(k, None)
            if fut is not None:
                fut.result(timeout=600)
            buf = cache[k]
            if w:
                np.copyto(buf.array[: sl[i]], scratch.array[: sl[i]])
                dirty[k] = 1
            else:
                np.copyto(scratch.array[: sl[i]], buf.array[: sl[i]])
            served[i] = 0
        else:
            if w:
                engine.write(path, offsets[k], scratch.array, s, priority=Priority.DEMAND).result(timeout=600)
            else:
                engine.read(path, offsets[k], scratch.array, s).result(timeout=600)
            served[i] = 1
        lats[i] = time.perf_counter() - t0
        p = prevl[i]
        pending.append(Observation(k, osz[k], KINDS[kindl[i]], OPS[w], names[src], tl[i], i, cntl[i],
                                   (tl[i] - tl[p]) if p >= 0 else inf, (i - p) if p >= 0 else inf, src,
                                   (used0 / cap0 if cap0 else 1.0, 0.0), nextl[i] if future else inf))
        pend_keys.add(k)
        if len(pending) < batch_size and i != n - 1:
            continue
        moves = policy.decide(pending)
        decisions += 1
        batch_bytes = 0
        for key, dst in moves:
            key, dst = int(key), int(dst)
            if not 0 <= key < K or tier_of[key] < 0:
                raise PolicyError(f"policy {policy.name!r}: move names unknown object {key!r}")
            if dst not in (0, 1):
                raise PolicyError(f"policy {policy.name!r}: move to tier {dst}; real mode has tiers 0..1 {names}")
            if tier_of[key] == dst:
                continue
            ks = sizes[key]
            if dst == 0:
                if used0 + osz[key] > cap0:
                    raise PolicyError(f"policy {policy.name!r}: moving key {key} to {names[0]!r} would exceed its capacity")
                used0 += osz[key]
                peak0 = max(peak0, used0)
                buf = alloc(ks)
                if kl[i] == key:
                    np.copyto(buf.array[:ks], scratch.array[:ks])  # just served: fill on miss
                else:
                    inflight[key] = engine.read(path, offsets[key], buf.array, ks, priority=Priority.PREFETCH)
                cache[key] = buf
                dirty[key] = 0
                batch_bytes += osz[key]
            else:
                fut = inflight.pop(key, None)
                if fut is not None:
                    fut.result(timeout=600)
                buf = cache.pop(key)
                used0 -= osz[key]
                if dirty[key]:
                    writebacks.append((engine.write(path, offsets[key], buf.array, ks, priority=Priority.WRITEBACK), buf))
                    dirty[key] = 0
                    batch_bytes += osz[key]
                else:
                    buf.release()
            tier_of[key] = dst
            moves_n += 1
        migrated += batch_bytes
        if policy.learns:
            m = len(pending)
            policy.observe([Outcome(o, float(lats[o.index]), int(served[o.index]), batch_bytes if j == m - 1 else 0)
                            for j, o in enumerate(pending)])
        pending = []
        pend_keys.clear()
        batch_size = max(1, int(policy.batch))  # a policy may adapt its batch (as sim re-reads it)
        reap()
        if progress is not None and (i + 1) % 4096 == 0:
            progress(i + 1, n)
    for fut in inflight.values():
        fut.result(timeout=600)
    reap(block=True)
    wall = time.perf_counter() - t_start
    if progress is not None:
        progress(n, n)
    for buf in cache.values():
        buf.release()
    return SimResult(policy=policy.name or type(policy).__name__, tier_names=names, latency_s=lats,
                     served=served, bytes_migrated=int(migrated), migrations=moves_n, total_time_s=wall,
                     wall_s=wall, decisions=decisions, peak_used=(peak0, 0))


# ----------------------------------------------------------------------------- CLI

def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace file or tiered trace directory")
    p.add_argument("--format", default="auto", choices=["auto", "tiered", "mqsim", "arc", "msr", "mooncake"])
    p.add_argument("--config", default=None, help="offload TOML: tier speeds (sim) and directories (real)")
    p.add_argument("--policy", default=",".join(DEFAULT_POLICIES),
                   help=f"comma-separated policy names (default {','.join(DEFAULT_POLICIES)}; also rl)")
    p.add_argument("--mode", default="sim", choices=["sim", "real"])
    p.add_argument("--json", action="store_true", help="print a JSON list of rows on stdout")
    p.add_argument("--plot", default=None, help="write a PNG of latency and hit ratio per policy")
    p.add_argument("--fast-fraction", type=float, default=0.08,
                   help="fast tier capacity as a fraction of the trace footprint (default 0.08)")
    p.add_argument("--config-capacity", action="store_true", help="use the config's tier capacities instead")
    p.add_argument("--probe", default=None, help="JSON from `tiered probe --json`: measured storage bandwidths")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N accesses")
    p.add_argument("--block-size", type=int, default=None, help="block size for block traces (importer default)")
    p.add_argument("--bytes-per-token", type=int, default=None, help="Mooncake: KV bytes per token")
    p.add_argument("--loop", default="auto", choices=["auto", "open", "closed"],
                   help="arrivals: at trace times (open), or each after the previous (closed); auto: closed for "
                        "untimed traces and when the trace offers more bytes/s than the backing tier reads")
    p.add_argument("--window", type=float, default=0.2, help="final window reported for learning policies")
    p.add_argument("--no-progress", action="store_true")


def _format_table(rows: list[dict]) -> str:
    tiers = list(rows[0]["hit_ratio"]) if rows else []
    head = ["policy"] + [f"hit {t}" for t in tiers] + ["mean us", "p99 us", "migrated MiB", "total s", "wall s"]
    lines = [head]
    for r in rows:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append([r["policy"]] + [f"{r['hit_ratio'][t]:.4f}" for t in tiers] + [
            f(r["mean_latency_us"], ".2f"), f(r["p99_latency_us"], ".2f"),
            f(None if r["bytes_migrated"] is None else r["bytes_migrated"] / 2**20, ".1f"),
            f(r["total_time_s"], ".3f"), f(r["wall_s"], ".1f")])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


def plot_rows(rows: list[dict], out: str | os.PathLike, title: str = "") -> None:
    """Mean/p99 latency and fast-tier hit ratio per policy, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in rows]
    fast = list(rows[0]["hit_ratio"])[0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(rows) + 4), 4))
    x = np.arange(len(rows))
    a.bar(x - 0.2, [r["mean_latency_us"] for r in rows], 0.4, label="mean")
    a.bar(x + 0.2, [r["p99_latency_us"] for r in rows], 0.4, label="p99")
    a.set_yscale("log")
    a.set_ylabel("access latency (us)")
    a.legend()
    b.bar(x, [r["hit_ratio"][fast] for r in rows], 0.6, color="tab:green")
    b.set_ylabel(f"hit ratio ({fast})")
    b.set_ylim(0, 1)
    for ax in (a, b):
        ax.set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def replay_main(args: argparse.Namespace) -> int:
    from traces import TraceFormatError, load

    from .config import ConfigError

    try:
        options: dict[str, Any] = {}
        if args.block_size is not None:
            options["block_size"] = args.block_size
        if args.bytes_per_token is not None:
            options["bytes_per_token"] = args.bytes_per_token
        trace = load(args.trace, args.format, **options)
        if args.limit is not None:
            trace = _head(trace, args.limit)
        cfg = load_config(args.config) if (args.config or args.mode == "real") else None
        footprint = trace.footprint
        measured = measured_bandwidths(args.probe) if args.probe else None
        if measured and cfg is None:
            cfg = load_config(None)
        tiers = tier_models(cfg, footprint, args.fast_fraction, args.config_capacity, measured)
        names = [p.strip() for p in args.policy.split(",") if p.strip()]
        closed = None if args.loop == "auto" else args.loop == "closed"
        rows = run_replay(trace, names, tiers, mode=args.mode, cfg=cfg, closed_loop=closed, window=args.window,
                          progress=not args.no_progress and sys.stderr.isatty())
    except (TraceFormatError, ConfigError, PolicyError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    info = (f"{args.trace}: {len(trace)} accesses, footprint {footprint} bytes; "
            + ", ".join(f"{t.name} {'unbounded' if t.capacity == math.inf else int(t.capacity)} B" for t in tiers)
            + f"; mode {args.mode}; "
            + ("one access at a time (real I/O)" if args.mode == "real" else
               choose_loop(trace, tiers)[1] if closed is None else ("closed" if closed else "open") + " loop (--loop)"))
    if args.plot:
        plot_rows(rows, args.plot, Path(args.trace).name)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(info)
        print(_format_table(rows))
    return 0


def _head(trace, n: int):
    from traces import Trace

    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    return Trace(trace.time[:n], trace.key[:n], trace.size[:n], trace.op[:n], trace.kind[:n],
                 trace.key_names, trace.timed, dict(trace.meta, limit=n))


# ----------------------------------------------------------------------------- recorded workloads

def record_workloads(out_dir: str | os.PathLike, work_dir: str | os.PathLike) -> list[Path]:
    """Record the project's own workloads into ``out_dir`` (the traces shipped in traces/data/).

    * ``offload-llama-generate.trace``: ``tiered.offload`` of a tiny Llama (built from
      config) generating 16 tokens with a host budget of about half its weights;
    * ``store-roundtrip.trace``: puts, gets (cold and cached), a rewrite and
      deletes of mixed-size tensors through one :class:`TieredStore`;
    * ``adamw-steps.trace``: six steps of :class:`tiered.optim.OffloadedAdamW`
      (moments and master weights in the store) on a small MLP.
    """
    import torch

    from traces import TraceRecorder

    from .offload import detach, offload
    from .store import TieredStore

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out = []
    torch.manual_seed(0)

    def cfg(sub: str, host: str) -> dict:
        return {"tiers": {"host": {"capacity": host}, "nvme": {"path": str(work_dir / sub), "capacity": "1GiB"}},
                "engine": {"workers": 2, "chunk": "1MiB"}, "offload": {"lookahead": 1, "resident": False}}

    import transformers

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    p = out_dir / "offload-llama-generate.trace"
    with TieredStore(cfg("offload", "2MiB")) as store, \
            TraceRecorder(p, overwrite=True, meta={"workload": "tiered.offload tiny Llama, generate 48 tokens"}) as rec:
        store.add_listener(rec)
        offload(model, store=store)
        with torch.no_grad():
            model.generate(input_ids=torch.randint(3, 512, (1, 12)), max_new_tokens=48, do_sample=False, pad_token_id=0)
        detach(model)
    out.append(p)

    p = out_dir / "store-roundtrip.trace"
    with TieredStore(cfg("store", "4MiB")) as store, \
            TraceRecorder(p, overwrite=True, meta={"workload": "TieredStore put/get/rewrite/delete round trip"}) as rec:
        store.add_listener(rec)
        kinds = ["weight", "optim", "kv", "gnn", "blob"]
        ts = {f"t{i}": torch.randn(int(1024 * (1 + i % 7) * 4)) for i in range(24)}
        for i, (k, t) in enumerate(ts.items()):
            store.put(k, t, kind=kinds[i % len(kinds)]).result(timeout=60)
        for rnd in range(3):
            for k in list(ts)[:: (rnd + 1)]:
                store.get(k).result(timeout=60)
        for k in list(ts)[:6]:
            store.put(k, ts[k] * 2, kind="optim").result(timeout=60)
            store.get(k).result(timeout=60)
        for k in list(ts)[-4:]:
            store.delete(k)
    out.append(p)

    from torch import nn

    from .optim import OffloadedAdamW

    p = out_dir / "adamw-steps.trace"
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    with TieredStore(cfg("optim", "2MiB")) as store, \
            TraceRecorder(p, overwrite=True, meta={"workload": "OffloadedAdamW, 6 steps of a 2-layer MLP, state in the store"}) as rec:
        store.add_listener(rec)
        opt = OffloadedAdamW(mlp.parameters(), lr=1e-3, store=store, chunk_bytes=256 << 10)
        opt.open()
        for _ in range(6):
            mlp(torch.randn(8, 256)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    out.append(p)
    return out
