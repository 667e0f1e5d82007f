"""How replay rows read: a text table and a PNG of latency and hit ratio per policy."""

from __future__ import annotations

import os

import numpy as np

from ...sizes import format_size
from ..args import UsageError


def format_table(rows: list[dict]) -> str:
    tiers = list(rows[0]["hit_ratio"]) if rows else []
    head = ["policy"] + [f"hit {t}" for t in tiers] + ["mean us", "p99 us", "migrated", "total s", "wall s"]
    lines = [head]
    for r in rows:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append([r["policy"]] + [f"{r['hit_ratio'][t]:.4f}" for t in tiers] + [
            f(r["mean_latency_us"], ".2f"), f(r["p99_latency_us"], ".2f"),
            "-" if r["bytes_migrated"] is None else format_size(r["bytes_migrated"]),
            f(r["total_time_s"], ".3f"), f(r["wall_s"], ".1f")])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
                     for row in lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend; a clear error when the ``plot`` extra is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install 'tiered[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rows(rows: list[dict], out: str | os.PathLike, title: str = "") -> None:
    """Mean/p99 latency and fast-tier hit ratio per policy, side by side."""
    plt = pyplot()

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
