"""Small builders the tests share: store configs, tiny transformers models built from their
configs (no downloads), and figures read back from a store. Plain functions, imported by name
(``from helpers import store_config``); the pytest fixtures are in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tiered.store import DATA_FILE

#: The marks of a file that runs tiny transformers models: one intra-op thread (the conftest
#: fixture ``one_intra_op_thread``), and no UserWarning or FutureWarning from building and running them.
TINY_MODEL_MARKS = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def store_config(tmp_path: Path, host: str = "16MiB", nvme: str = "64MiB", *, workers: int = 2,
                 chunk: str = "1MiB", flash: str | None = None) -> dict:
    """A host tier and an nvme tier under ``tmp_path`` (and a flash tier after it, when given)."""
    tiers: dict = {"host": {"capacity": host}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": nvme}}
    if flash is not None:
        tiers["flash"] = {"path": str(tmp_path / "flash"), "capacity": flash}
    return {"tiers": tiers, "engine": {"workers": workers, "chunk": chunk}}


def offload_config(tmp_path: Path, host: str | int, *, nvme: str = "1GiB", lookahead: int = 1,
                   resident: bool = True) -> dict:
    """A store config with an ``[offload]`` table: ``host`` is the compute budget of the model."""
    cfg = store_config(tmp_path, host, nvme)
    cfg["offload"] = {"lookahead": lookahead, "resident": resident}
    return cfg


def tiny_llama(seed: int = 0, *, layers: int = 4, hidden: int = 64, vocab: int = 256, positions: int = 128,
               pad_token_id: int | None = 0):
    """A Llama with grouped-query attention (4 heads, 2 KV heads), seeded, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id)).eval()


def tiny_gpt2(seed: int = 0):
    """A 3-layer GPT-2 (its head tied to the token embedding), seeded, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=3, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def kv_bytes(model, tokens: int) -> int:
    """What ``tokens`` tokens of fp32 K and V take over all of ``model``'s layers."""
    from tiered.kv import kv_geometry

    layers, heads, dim = kv_geometry(model.config)
    return tokens * layers * 2 * heads * dim * 4


def owner_figures(store, owner: str, tier: str = "host") -> dict:
    """What ``owner`` holds, peaked at and has reserved of ``tier`` (zeros for an owner it never saw)."""
    return store.owners().get(owner, {}).get(tier, {"held": 0, "peak": 0, "reserved": 0})


def allocated_bytes(tier_dir: Path) -> int:
    """The disk blocks the data file of a storage tier really takes (holes punched are not counted)."""
    return os.stat(Path(tier_dir) / DATA_FILE).st_blocks * 512


def wait_until(cond, timeout: float = 30.0) -> bool:
    """Poll ``cond`` until it is true (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def rank_exit_codes(target, world: int, args_of, *, start: str = "fork", timeout: float = 150.0) -> list[int]:
    """Run ``target(*args_of(rank))`` in one process per rank; their exit codes (a process
    still running after ``timeout`` s is killed). ``start``: the multiprocessing start method."""
    import multiprocessing as mp

    ctx = mp.get_context(start)
    procs = [ctx.Process(target=target, args=args_of(r)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    return [p.exitcode for p in procs]


def run_ranks(target, world: int, args_of, *, start: str = "fork", timeout: float = 150.0) -> None:
    """:func:`rank_exit_codes`, checking that every rank exits 0 in time."""
    codes = rank_exit_codes(target, world, args_of, start=start, timeout=timeout)
    assert codes == [0] * world, f"exit codes of the {world} ranks"


#: vocabulary of the fine-tuning tests' tiny Llama
FT_VOCAB = 64


def finetune_llama():
    """The fine-tuning tests' model: a seeded 2-layer Llama (GQA) in training mode."""
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=FT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).train()


def finetune_config(tmp_path: Path) -> dict:
    """Its store: a 1 MiB compute budget, every unit streamed."""
    return offload_config(tmp_path, "1MiB", nvme="128MiB", lookahead=1, resident=False)


def finetune_batch(step: int) -> torch.Tensor:
    """Token ids of training step ``step`` (2 sequences of 12)."""
    return torch.randint(0, FT_VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))


def lm_loss(model, x):
    """A causal LM's loss on token ids ``x`` (the labels are the inputs)."""
    return model(input_ids=x, labels=x).loss


def step_beside_in_memory(ref, o_ref, model, opt, x, step: int, loss_of=lm_loss) -> None:
    """One optimizer step of the in-memory ``ref`` (``o_ref``) and of the offloaded ``model``
    (``opt``) on batch ``x``; their losses are bitwise equal."""
    import torch

    l_ref = loss_of(ref, x)
    l_ref.backward()
    o_ref.step()
    o_ref.zero_grad()
    loss = loss_of(model, x)
    loss.backward()
    opt.step()
    assert torch.equal(l_ref, loss), f"step {step}: {l_ref.item()} != {loss.item()}"


def failing_once(store, monkeypatch) -> list:
    """Make the store's first ``delete_prefix`` raise an injected EIO; the prefixes asked for."""
    delete_prefix = store.delete_prefix
    calls = []

    def failing(prefix):
        calls.append(prefix)
        if len(calls) == 1:
            raise OSError(5, "injected I/O error")
        return delete_prefix(prefix)

    monkeypatch.setattr(store, "delete_prefix", failing)
    return calls
