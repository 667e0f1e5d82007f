"""Small collectives of the distributed checkpointer: integers and JSON documents over a
``torch.distributed`` group (CPU tensors: gloo). Nothing is pickled."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def all_gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's ``values`` (the same length on every rank), in rank order."""
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def broadcast_ints(values: list[int] | None, src: int, group) -> list[int]:
    """``values`` of rank ``src`` on every rank (any length)."""
    n = torch.tensor([len(values) if values is not None else 0], dtype=torch.int64)
    dist.broadcast(n, src, group=group)
    data = torch.tensor(values if values is not None else [0] * int(n), dtype=torch.int64)
    if int(n):
        dist.broadcast(data, src, group=group)
    return data.tolist()


def all_gather_json(doc, group) -> list:
    """Every rank's JSON document, in rank order."""
    raw = json.dumps(doc, separators=(",", ":")).encode()
    sizes = [s[0] for s in all_gather_ints([len(raw)], group)]
    buf = torch.zeros(max(sizes), dtype=torch.uint8)
    buf[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf, group=group)
    return [json.loads(t[:n].numpy().tobytes()) for t, n in zip(out, sizes)]


def broadcast_json(doc, src: int, group):
    """Rank ``src``'s JSON document on every rank (``doc`` is ignored elsewhere)."""
    raw = json.dumps(doc, separators=(",", ":")).encode() if dist.get_rank() == src else b""
    (n,) = broadcast_ints([len(raw)] if dist.get_rank() == src else None, src, group)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(n, dtype=torch.uint8)
    dist.broadcast(data, src, group=group)
    return json.loads(data.numpy().tobytes())


def send_json(doc, dst: int, group) -> list:
    """Start sending a JSON document to ``dst``; returns the works (wait for them) and the tensors
    they read (keep them alive until then)."""
    raw = json.dumps(doc, separators=(",", ":")).encode()
    n = torch.tensor([len(raw)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return [dist.isend(n, dst, group=group), dist.isend(data, dst, group=group), n, data]


def recv_json(src: int, group):
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src, group=group)
    data = torch.empty(int(n), dtype=torch.uint8)
    dist.recv(data, src, group=group)
    return json.loads(data.numpy().tobytes())


def wait_all(works: list) -> None:
    """Wait for every work among ``works`` (tensors kept alive alongside them are skipped), also
    after one fails (the last may return memory the others read); then raise the first failure."""
    first = None
    for w in works:
        if isinstance(w, torch.Tensor):
            continue
        try:
            w.wait()
        except BaseException as e:  # noqa: BLE001 - raised below, once every work has ended
            first = first or e
    if first is not None:
        raise first
