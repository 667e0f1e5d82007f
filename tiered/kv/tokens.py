"""The token ids a TieredCache holds, learned from the forwards that feed it.

A prefix block is saved under the chained hash of the tokens it holds, and a
``Cache`` never sees token ids: only K/V. So the cache watches the model: a
forward pre-hook records the ``input_ids`` of each forward given this cache,
and the cache's first layer update of the step takes them. Whenever the
tokens of a step are not known exactly (``inputs_embeds``, a forward of an
unwatched module, a batch of several rows, a batch operation), the log
becomes unknown for good and nothing more is saved: a block is never stored
under a name it may not deserve.
"""

from __future__ import annotations

import torch

from .prefix import block_hash

_CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5 name, and its deprecated alias


class TokenLog:
    """Row 0's token ids (batch of one), and the chained hashes of its full blocks.

    A step's ids are kept as a copy on their own device (no host synchronisation per
    decode step); they are brought to the host only when a block's hash is needed."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] | None = []  # None: unknown from here on
        self._len = 0
        self.hashes: list[str] = []
        self._pending = None  # ids of the forward in flight; "unknown" when it had none
        self._hook = None

    @property
    def known(self) -> bool:
        return self._chunks is not None

    # -- watching a model ---------------------------------------------------------------------
    def watch(self, model: torch.nn.Module, cache) -> None:
        """Record the ids of every forward of ``model`` given ``cache``."""
        def before_forward(_module, args, kwargs):
            if not any(kwargs.get(name) is cache for name in _CACHE_KWARGS):
                return
            ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            self._pending = ids if ids is not None else "unknown"

        self.unwatch()
        self._hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)

    def unwatch(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- what the cache tells it ----------------------------------------------------------------
    def step(self, n_new: int, batch: int) -> None:
        """A step adds ``n_new`` tokens: they are the watched forward's ids, or unknown."""
        ids, self._pending = self._pending, None
        if (self._chunks is None or batch != 1 or not isinstance(ids, torch.Tensor) or ids.dim() != 2
                or tuple(ids.shape) != (1, n_new)):
            self.forget()
            return
        self._chunks.append(ids[0].clone())  # the caller may reuse its input buffer
        self._len += n_new

    def start(self, ids: torch.Tensor) -> None:
        """The cache now holds exactly ``ids`` (a loaded prefix)."""
        self._chunks, self._len, self.hashes = [ids.clone()], ids.numel(), []

    def forget(self) -> None:
        self._chunks, self._len, self.hashes = None, 0, []

    def reset(self) -> None:
        self._chunks, self._len, self.hashes, self._pending = [], 0, [], None

    def copy_from(self, other: "TokenLog") -> None:
        self._chunks = None if other._chunks is None else list(other._chunks)
        self._len, self.hashes = other._len, list(other.hashes)

    def crop(self, tokens: int, block_size: int) -> None:
        """The cache keeps its first ``tokens`` tokens."""
        if self._chunks is not None and tokens < self._len:
            self._chunks = [self._ids()[:tokens]]
            self._len = tokens
        del self.hashes[tokens // block_size:]

    def _ids(self) -> torch.Tensor:
        """All ids as one host tensor (kept as the only chunk)."""
        if len(self._chunks) != 1 or self._chunks[0].device.type != "cpu":
            self._chunks = [torch.cat([c.to("cpu", torch.int64) for c in self._chunks])
                            if self._chunks else torch.empty(0, dtype=torch.int64)]
        return self._chunks[0]

    def block(self, index: int, block_size: int, identity: str) -> str | None:
        """The chained hash of block ``index`` if its tokens are known, else None."""
        if self._chunks is None or self._len < (index + 1) * block_size:
            return None
        if len(self.hashes) <= index:
            ids = self._ids()
            while len(self.hashes) <= index:
                i = len(self.hashes)
                parent = self.hashes[-1] if self.hashes else identity
                self.hashes.append(block_hash(parent, identity, ids[i * block_size:(i + 1) * block_size]))
        return self.hashes[index]
