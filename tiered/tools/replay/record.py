"""The project's own workloads recorded as traces (the ones shipped in traces/data/)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import TOOLS_OWNER


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

    out_dir, work_dir = Path(out_dir), Path(work_dir)

    def cfg(sub: str, host: str) -> dict:
        return {"tiers": {"host": {"capacity": host}, "nvme": {"path": str(work_dir / sub), "capacity": "1GiB"}},
                "engine": {"workers": 2, "chunk": "1MiB"}, "offload": {"lookahead": 1, "resident": False}}

    torch.manual_seed(0)  # one seed for the three, in this order: the shipped traces are these
    return [_record_generate(out_dir / "offload-llama-generate.trace", cfg("offload", "2MiB")),
            _record_roundtrip(out_dir / "store-roundtrip.trace", cfg("store", "4MiB")),
            _record_adamw(out_dir / "adamw-steps.trace", cfg("optim", "2MiB"))]


def _record_generate(p: Path, cfg: dict) -> Path:
    import torch
    import transformers

    from tiered.traces import TraceRecorder

    from ...offload import detach, offload
    from ...store import TieredStore

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with TieredStore(cfg) as store, \
            TraceRecorder(p, overwrite=True, meta={"workload": "tiered.offload tiny Llama, generate 48 tokens"}) as rec:
        store.add_listener(rec)
        offload(model, store=store)
        with torch.no_grad():
            model.generate(input_ids=torch.randint(3, 512, (1, 12)), max_new_tokens=48, do_sample=False, pad_token_id=0)
        detach(model)
    return p


def _record_roundtrip(p: Path, cfg: dict) -> Path:
    import torch

    from tiered.traces import TraceRecorder

    from ...store import TieredStore

    with TieredStore(cfg) as store, \
            TraceRecorder(p, overwrite=True, meta={"workload": "TieredStore put/get/rewrite/delete round trip"}) as rec:
        store.add_listener(rec)
        kinds = ["weight", "optim", "kv", "gnn", "blob"]
        ts = {f"t{i}": torch.randn(int(1024 * (1 + i % 7) * 4)) for i in range(24)}
        for i, (k, t) in enumerate(ts.items()):
            store.put(k, t, kind=kinds[i % len(kinds)], owner=TOOLS_OWNER).result(timeout=60)
        for rnd in range(3):
            for k in list(ts)[:: (rnd + 1)]:
                store.get(k, owner=TOOLS_OWNER).result(timeout=60)
        for k in list(ts)[:6]:
            store.put(k, ts[k] * 2, kind="optim", owner=TOOLS_OWNER).result(timeout=60)
            store.get(k, owner=TOOLS_OWNER).result(timeout=60)
        for k in list(ts)[-4:]:
            store.delete(k)
    return p


def _record_adamw(p: Path, cfg: dict) -> Path:
    import torch
    from torch import nn

    from tiered.traces import TraceRecorder

    from ...optim import OffloadedAdamW
    from ...store import TieredStore

    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    with TieredStore(cfg) as store, \
            TraceRecorder(p, overwrite=True, meta={"workload": "OffloadedAdamW, 6 steps of a 2-layer MLP, state in the store"}) as rec:
        store.add_listener(rec)
        opt = OffloadedAdamW(mlp.parameters(), lr=1e-3, store=store, chunk_bytes=256 << 10)
        opt.open()
        for _ in range(6):
            mlp(torch.randn(8, 256)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        opt.close()
    return p
