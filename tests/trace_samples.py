"""Synthetic traces in the public formats the importers read (MQSim, ARC .lis.zst, Mooncake),
so a clean clone tests every importer on realistic volumes without the public files: the shared
traces may not be copied into the repository. Each generator returns the path and the counts a
test can assert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def mqsim(path: Path, requests: int = 7000, seed: int = 0) -> dict:
    """``arrival_time_ns device start_sector size_in_sectors type`` (type 0 write, 1 read)."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.integers(1_000, 200_000, requests))
    hot = rng.integers(0, 1 << 20, 64)
    start = np.where(rng.random(requests) < 0.6, hot[rng.integers(0, 64, requests)], rng.integers(0, 1 << 22, requests))
    size = rng.choice([8, 16, 32, 64], requests)
    kind = (rng.random(requests) < 0.7).astype(int)
    lines = [f"{a} 0 {s} {n} {k}" for a, s, n, k in zip(t, start, size, kind)]
    path.write_text("\n".join(lines) + "\n")
    return {"requests": requests}


def arc(path: Path, references: int = 50_000, seed: int = 1) -> dict:
    """zstd-compressed ``start_block num_blocks ignored request_id`` lines (512-byte pages)."""
    import zstandard

    rng = np.random.default_rng(seed)
    start = rng.zipf(1.3, references) % 200_000
    count = rng.choice([1, 1, 1, 2, 4, 8], references)
    text = "".join(f"{s} {c} 0 {i}\n" for i, (s, c) in enumerate(zip(start, count)))
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(text.encode()))
    return {"requests": references, "pages": int(count.sum())}


def mooncake(path: Path, requests: int = 2000, seed: int = 2) -> dict:
    """JSON lines of prompts with their 512-token KV block ids (shared prefixes share ids)."""
    rng = np.random.default_rng(seed)
    prefixes = [list(range(i * 100, i * 100 + int(n))) for i, n in enumerate(rng.integers(1, 20, 50))]
    next_id, blocks = 10_000, 0
    with open(path, "w") as f:
        for i in range(requests):
            ids = list(prefixes[int(rng.integers(0, 50))])
            fresh = int(rng.integers(0, 10))
            ids += list(range(next_id, next_id + fresh))
            next_id += fresh
            blocks += len(ids)
            f.write(json.dumps({"timestamp": i * 37, "input_length": 512 * len(ids),
                                "output_length": int(rng.integers(10, 500)), "hash_ids": ids}) + "\n")
    return {"requests": requests, "blocks": blocks}
