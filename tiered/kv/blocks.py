"""What the TieredCache modules share: the cache's error, its block record, three copy helpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheError(RuntimeError):
    """Misuse of a TieredCache, or a budget it cannot keep; the message says which."""


@dataclass
class Block:
    index: int
    data: torch.Tensor | None = None  # [L, 2, B, H, bs, D] on the compute device, when resident
    keys: list[str] | None = None  # store keys of its parts (layer ranges), once it has a stored copy
    prefix: bool = False  # keys are shared prefix blocks (kept when the cache closes)
    saving: list | None = None  # puts in flight
    host: list | None = None  # a prefill's block: per part (HostBuffer, tensor), until put (given to the store)
    host_nbytes: int = 0  # bytes of those parts

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def part(self, i: int, lo: int, hi: int):
        """Part ``i`` (layers ``lo:hi``) to put: a tensor, or for a host block ``(buffer, dtype, shape)``
        handed over (the block no longer holds it)."""
        if self.host is None:
            return self.data[lo:hi]
        buf, t = self.host[i]
        self.host[i] = None
        return buf, t.dtype, tuple(t.shape)

    def release_host(self) -> None:
        """Release the host buffers not handed to the store."""
        for got in self.host or ():
            if got is not None:
                got[0].release()
        self.host = None


def release_lease(f) -> None:
    """Done-callback for a read nobody will consume (an error stopped the loop): unpin it."""
    if not f.cancelled() and f.exception() is None:
        f.result().release()


def cat_into(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    """``torch.cat(parts, dim=-2, out=out)`` for parts that fill ``out`` exactly: cat would resize a
    mismatched ``out`` (a view of a slot: the slot keeps uninitialised memory) with only a warning."""
    if sum(p.shape[-2] for p in parts) != out.shape[-2] or any(
            p.shape[:-2] != out.shape[:-2] or p.dtype != out.dtype for p in parts):
        raise KVCacheError(f"TieredCache: gathering {[(p.dtype, tuple(p.shape)) for p in parts]} into a slot of "
                           f"{out.dtype}{tuple(out.shape)}: the stored blocks do not match the cache's rows/dtype")
    torch.cat(parts, dim=-2, out=out)


def blocks_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """Blocks ``src`` (``[n, B, H, bs, D]``: K or V of n consecutive blocks, as read) into ``out``
    (``[B, H, n * bs, D]``, a slot's range): one strided copy."""
    n, b, h, bs, d = src.shape
    if tuple(out.shape) != (b, h, n * bs, d) or src.dtype != out.dtype:
        raise KVCacheError(f"TieredCache: gathering blocks {src.dtype}{tuple(src.shape)} into a slot of "
                           f"{out.dtype}{tuple(out.shape)}: the stored blocks do not match the cache's rows/dtype")
    out.unflatten(2, (n, bs)).copy_(src.permute(1, 2, 0, 3, 4))
