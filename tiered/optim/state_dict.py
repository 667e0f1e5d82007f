"""``state_dict``/``load_state_dict`` in torch's AdamW layout, read from and written to the store."""

from __future__ import annotations

import torch

from .layout import TAG, Chunk, encode_step
from .pipeline import same_bits


class _StateDict:
    """Part of :class:`~tiered.optim.OffloadedAdamW`."""

    def state_dict(self) -> dict:
        """torch's AdamW layout (``state`` by parameter index, ``param_groups``), read from the
        store (it materializes the whole state in memory); ``master`` is added for parameters
        that are not fp32. The last step is committed on this rank first; not a collective (one
        rank may call it alone): under a process group it holds this rank's shards."""
        self._check_open()
        self._settle()
        groups, start = [], 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        state: dict = {}
        if self._step > 0:
            full: dict = {}
            for c in self._chunks:
                self._load_chunk(c, self._step, out=full)
                self._fresh_masters(c, full)
            for i, parts in full.items():
                if self._param_steps[i] == 0:
                    continue
                p = self._params[i]
                st = {"step": torch.tensor(float(self._param_steps[i]), dtype=torch.float32),
                      "exp_avg": parts["exp_avg"].view(p.shape), "exp_avg_sq": parts["exp_avg_sq"].view(p.shape)}
                if p.dtype != torch.float32:
                    st["master"] = parts["master"].view(p.shape)
                state[i] = st
        return {"state": state, "param_groups": groups, "tiered_step": self._step}

    def _fresh_masters(self, c: Chunk, full: dict) -> None:
        """The masters the next update starts from: of weights changed since the last one
        (``model.load_state_dict``), those weights (see ``_refresh_masters``)."""
        if c.split:
            return  # the parameters are the masters
        edit = self._units.open_unit_params(c.unit) if c.unit is not None else None
        try:
            for seg in c.segments:
                master = full[seg.param]["master"][seg.start:seg.stop]
                weights = self._weights_of(seg, edit)
                if not same_bits(master, weights):
                    master.copy_(weights)
        finally:
            if edit is not None:
                edit.abandon()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this class or of ``torch.optim.AdamW``: it is written to the store
        as a complete step (masters from ``master`` entries, else from the parameters). Under a
        process group a collective: every rank loads its shards' state dict as the same step,
        and a rank that fails (an invalid state dict, a failed write) makes every rank raise."""
        self._check_open(agreeing=True)
        error = s = None
        try:
            self._settle()
            steps, per_param = self._check_state_dict(state_dict)
            s = self._loaded_step(state_dict, steps)
            self._drop_state_reads()
            self._wait_writes()
        except Exception as e:  # noqa: BLE001 - raised by _agree once the other ranks know
            error = e
        # every rank's last step is durable before the loaded one writes over the step before it
        self._agree(self._step, loading=-1 if s is None else s, error=error)
        try:
            with self._breaks_on_error():
                self._write_loaded(s, steps, per_param)
        except Exception as e:
            self._agree(self._step, error=e)  # the other ranks agree on the loaded step now
            raise
        self._agree(s)
        with self._breaks_on_error():  # the loaded masters are the parameters now (they differ
            for c in self._chunks:  # from them for low precision)
                self._load_chunk(c, s, into_params=True)
                with self._res_lock:
                    if c.resident is not None:  # holds the state before the load: read again on first use
                        encode_step(c.resident.tensor(torch.float32), -1)
            self._wait_writes()
        self._unmark_changing(loaded=True)

    def _loaded_step(self, state_dict: dict, steps: list[int]) -> int:
        """The step a loaded state dict is written as: after its own and this optimizer's, of
        the other parity than the committed marker's (never overwrite the keys it names)."""
        s = max(int(state_dict.get("tiered_step", 0)), max(steps, default=0), self._step + 1)
        return s + 1 if s % 2 == self._step % 2 else s

    def _write_loaded(self, s: int, steps: list[int], per_param: list[dict | None]) -> None:
        """Write the loaded state as step ``s`` and commit it on this rank."""
        for c in self._chunks:
            self._write_loaded_chunk(c, s, per_param)
        before = (self._step, list(self._param_steps))  # what the marker names as the step before
        self._param_steps, self._step = steps, s - 1
        self._updated.clear()
        self._stepped_params.clear()
        try:
            self._commit(s, prev=before)
        except BaseException:
            self._step, self._param_steps = before
            raise

    def _check_state_dict(self, state_dict: dict) -> tuple[list[int], list[dict | None]]:
        """Validate ``state_dict`` against this optimizer, take its hyperparameters; returns the
        step count and the state entry (or None) of every parameter."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"load_state_dict: expected {len(self.param_groups)} param_groups, got "
                             f"{len(groups) if isinstance(groups, list) else type(groups).__name__}")
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise ValueError(f"load_state_dict: param_groups[{gi}] has {len(theirs.get('params', ()))} "
                                 f"parameters, this optimizer {len(mine['params'])}")
        ids = [i for g in groups for i in g["params"]]
        state = state_dict.get("state", {})
        for k in state:
            if k not in ids:
                raise ValueError(f"load_state_dict: state for parameter {k!r}, which no param_group lists")
        steps = [0] * len(self._params)
        per_param: list[dict | None] = [None] * len(self._params)
        for i, sid in enumerate(ids):
            st = state.get(sid)
            if st is None:
                continue
            p = self._params[i]
            for name in ("exp_avg", "exp_avg_sq"):
                t = st.get(name)
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    raise ValueError(f"load_state_dict: state[{sid}][{name!r}] must be a tensor of shape "
                                     f"{tuple(p.shape)}, got {getattr(t, 'shape', type(t).__name__)}")
            steps[i] = int(float(st["step"]))
            per_param[i] = st
        for mine, theirs in zip(self.param_groups, groups):
            for k, v in theirs.items():
                if k != "params":
                    mine[k] = v
        return steps, per_param

    def _write_loaded_chunk(self, c: Chunk, s: int, per_param: list[dict | None]) -> None:
        """Start writing chunk ``c`` of step ``s`` from loaded state (masters from the
        parameters where the state has none)."""
        n = c.numel
        buf = torch.zeros(3 * n + TAG, dtype=torch.float32)
        edit = self._units.open_unit_params(c.unit) if c.unit is not None else None
        try:
            self._init_master(c, buf[:n], edit)
            off = 0
            for seg in c.segments:
                st = per_param[seg.param]
                if st is not None:
                    sl = slice(seg.start, seg.stop)
                    if "master" in st:
                        buf[off:off + seg.numel].copy_(st["master"].reshape(-1)[sl])
                    buf[n + off:n + off + seg.numel].copy_(st["exp_avg"].reshape(-1)[sl])
                    buf[2 * n + off:2 * n + off + seg.numel].copy_(st["exp_avg_sq"].reshape(-1)[sl])
                off += seg.numel
        finally:
            if edit is not None:
                edit.abandon()
        encode_step(buf, s)
        if c.split:  # [master | tag] and [exp_avg | exp_avg_sq | tag]
            mt = torch.cat([buf[:n], buf[3 * n:]])
            self._writes.append(self._store.put(self._master_key(c, s), mt, kind="optim", owner=self.owner))
            buf = buf[n:]
        self._writes.append(self._store.put(self._chunk_key(c, s), buf, kind="optim", owner=self.owner))
