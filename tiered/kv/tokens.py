"""The token ids a TieredCache holds, learned from the forwards that feed it.

A prefix block is saved under the chained hash of the tokens it holds, and a
``Cache`` never sees token ids: only K/V. So the cache watches the model: a
forward pre-hook records the ``input_ids`` of each forward given this cache,
and the cache's first layer update of the step takes them; a post-hook (run
even when the forward raised) drops ids no update took, so a later forward
never takes another's. Ids count only when they alone decide the K/V: any
other input that changes it (an attention mask with zeros, positions other
than the default ones, ``token_type_ids``, ``inputs_embeds``, images, audio,
any tensor the hook does not know) makes the step's tokens unknown. Whenever
the tokens of a step are not known exactly (also: a forward of an unwatched
module, a batch of several rows, a batch operation), the log becomes unknown
for good and nothing more is saved: a block is never stored under a name it
may not deserve.

Only the declared prompt (``load_prefix``) can be saved, so ids are recorded
only up to its end: a long decode does not grow the log.
"""

from __future__ import annotations

import weakref

import torch

from .prefix import block_hash

_CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5 name, and its deprecated alias
_POSITION_KWARGS = ("position_ids", "cache_position")  # allowed when they are the default range
# inputs that do not change the K/V: what the model returns, not what it computes before attention
_OUTPUT_KWARGS = ("labels", "logits_to_keep", "num_logits_to_keep")


def _all_ones(mask, ids: torch.Tensor) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == ids.shape[0]
            and bool(mask.eq(1).all()))


def _default_positions(pos, ids: torch.Tensor, seen: int) -> bool:
    """``pos`` is the range the model uses when given none: the ``seen`` cached tokens, then these."""
    n = ids.shape[-1]
    if not isinstance(pos, torch.Tensor) or pos.dim() not in (1, 2) or pos.shape[-1] != n \
            or (pos.dim() == 2 and pos.shape[0] not in (1, ids.shape[0])):
        return False
    return torch.equal(pos, torch.arange(seen, seen + n, device=pos.device, dtype=pos.dtype).expand_as(pos))


def fed_ids(args: tuple, kwargs: dict, seen: int) -> torch.Tensor | None:
    """The ``input_ids`` of a forward if they alone decide the K/V it computes, else None.

    ``seen``: tokens the cache held before this forward (the default positions start there)."""
    ids, rest = kwargs.get("input_ids"), args
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids, rest = args[0], args[1:]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or any(a is not None for a in rest):
        return None  # an input passed by position: its name (and so its effect) is unknown
    for name, value in kwargs.items():
        if value is None or name == "input_ids" or name in _CACHE_KWARGS:
            continue
        if name == "attention_mask":
            ok = _all_ones(value, ids)
        elif name in _POSITION_KWARGS:
            ok = _default_positions(value, ids, seen)
        elif name in _OUTPUT_KWARGS:
            ok = True
        else:  # flags (use_cache, return_dict, ...) are fine; any other tensor or object may change K/V
            ok = isinstance(value, (bool, int, float, str))
        if not ok:
            return None
    return ids


class TokenLog:
    """Row 0's token ids (batch of one) up to the end of the declared prompt, and the chained
    hashes of its full blocks.

    A step's ids are kept as a copy on their own device (no host synchronisation per
    step); they are brought to the host only when a block's hash is needed."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] | None = []  # None: unknown from here on
        self._len = 0  # tokens the cache holds (while known)
        self._held = 0  # of those, recorded in _chunks (all of them up to the prompt's end)
        self._prompt: torch.Tensor | None = None  # the declared prompt (host ids), None: none declared
        self.hashes: list[str] = []
        self._pending = None  # ids of the forward in flight; "unknown" when they do not decide its K/V
        self._unwatch: list[weakref.finalize] = []

    @property
    def known(self) -> bool:
        return self._chunks is not None

    @property
    def recording(self) -> bool:
        """Whether the next step's ids matter: known, and still inside the declared prompt."""
        return self._chunks is not None and self._prompt is not None and self._len < self._prompt.numel()

    # -- watching a model ---------------------------------------------------------------------
    def watch(self, model: torch.nn.Module, cache) -> None:
        """Record the ids of every forward of ``model`` given ``cache``.

        The hooks hold the log and the cache weakly (an unclosed cache is still freed), and
        are removed when the cache is freed."""
        self.unwatch()
        log_ref, cache_ref = weakref.ref(self), weakref.ref(cache)

        def before_forward(_module, args, kwargs):
            log, owner = log_ref(), cache_ref()
            if log is None or owner is None or not any(kwargs.get(n) is owner for n in _CACHE_KWARGS):
                return
            ids = fed_ids(args, kwargs, owner.get_seq_length()) if log.recording else None
            log._pending = ids if ids is not None else "unknown"

        def after_forward(_module, _args, _kwargs, _output):
            log = log_ref()
            if log is not None:
                log._pending = None  # ids no update took (the forward failed first, or fed no layer)

        handles = [model.register_forward_pre_hook(before_forward, with_kwargs=True),
                   model.register_forward_hook(after_forward, with_kwargs=True, always_call=True)]
        self._unwatch = [weakref.finalize(cache, h.remove) for h in handles]

    def unwatch(self) -> None:
        for remove in self._unwatch:
            remove()  # runs once: a no-op if the cache was freed (and the hook removed) already
        self._unwatch = []
        self._pending = None

    # -- what the cache tells it ----------------------------------------------------------------
    def step(self, n_new: int, batch: int) -> None:
        """A step adds ``n_new`` tokens: they are the watched forward's ids, or unknown."""
        ids, self._pending = self._pending, None
        if self._chunks is None:
            return
        if batch != 1:
            self.forget()
            return
        if not self.recording:  # past the prompt: only the count matters
            self._len += n_new
            return
        if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (1, n_new):
            self.forget()
            return
        self._chunks.append(ids[0].clone())  # the caller may reuse its input buffer
        self._len += n_new
        self._held += n_new

    def rows_are_prompt(self, batch: int) -> bool:
        """Whether the forward in flight feeds ``batch`` rows, each the declared prompt's next tokens
        (the cache holds the prompt's first tokens, for one row)."""
        ids = self._pending
        if not (isinstance(ids, torch.Tensor) and self.recording and self._held == self._len) \
                or ids.shape[0] != batch or self._len + ids.shape[1] > self._prompt.numel():
            return False
        want = self._prompt[self._len:self._len + ids.shape[1]]
        return bool(ids.to("cpu", torch.int64).eq(want).all())

    def start(self, prompt: torch.Tensor, held: int) -> None:
        """The cache now holds the first ``held`` tokens of ``prompt`` (a loaded prefix)."""
        self._prompt = prompt.to("cpu", torch.int64).clone()
        self._chunks, self._len, self._held, self.hashes = [self._prompt[:held]], held, held, []
        self._pending = None

    def forget(self) -> None:
        self._chunks, self._len, self._held, self.hashes = None, 0, 0, []

    def reset(self) -> None:
        self._chunks, self._len, self._held, self.hashes, self._pending = [], 0, 0, [], None
        self._prompt = None

    def copy_from(self, other: "TokenLog") -> None:
        self._chunks = None if other._chunks is None else list(other._chunks)
        self._len, self._held, self._prompt = other._len, other._held, other._prompt
        self.hashes = list(other.hashes)

    def crop(self, tokens: int, block_size: int) -> None:
        """The cache keeps its first ``tokens`` tokens."""
        if self._chunks is not None and tokens < self._len:
            if tokens < self._held:
                self._chunks = [self._ids()[:tokens]]
                self._held = tokens
            self._len = tokens
        del self.hashes[tokens // block_size:]

    def _ids(self) -> torch.Tensor:
        """All recorded ids as one host tensor (kept as the only chunk)."""
        if len(self._chunks) != 1 or self._chunks[0].device.type != "cpu":
            self._chunks = [torch.cat([c.to("cpu", torch.int64) for c in self._chunks])
                            if self._chunks else torch.empty(0, dtype=torch.int64)]
        return self._chunks[0]

    def block(self, index: int, block_size: int, identity: str) -> str | None:
        """The chained hash of block ``index`` if its tokens are known, else None."""
        if self._chunks is None or self._held < (index + 1) * block_size:
            return None
        if len(self.hashes) <= index:
            ids = self._ids()
            while len(self.hashes) <= index:
                i = len(self.hashes)
                parent = self.hashes[-1] if self.hashes else identity
                self.hashes.append(block_hash(parent, identity, ids[i * block_size:(i + 1) * block_size]))
        return self.hashes[index]
