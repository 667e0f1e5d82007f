"""``tiered.optim.ZOSGD``: MeZO / ZO2 on offloaded weights equals in-memory MeZO, step by step.

What is proved here (CPU, fp32, weights streamed from the storage tier):

- on tiny Llama (GQA), GPT-2 (tied embeddings, position embeddings broadcast
  over the batch) and OPT built from config, ``loss_plus``, ``loss_minus`` and
  the projected gradient are bitwise equal to :func:`mezo_step` (the plain
  in-memory MeZO reference: perturb all, forward, perturb, forward, restore,
  update) on every step, and the final weights are equal after ``close``;
- resident units on/off give the same;
- each step reads every streamed weight about once (the dual forward runs both
  perturbed halves while a unit is resident) and writes it once;
- an ordinary forward between steps sees the updated weights;
- misuse is a clear error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, tiny_llama
from tiered import OffloadError
from tiered.offload import offload_units
from tiered.optim import ZOSGD, mezo_noise
from tiered.optim.zo import mezo_step

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(60), *TINY_MODEL_MARKS]

VOCAB = 128
LR, EPS, SEED = 1e-3, 1e-3, 11


def build(arch: str) -> nn.Module:
    if arch == "llama":
        return tiny_llama(vocab=VOCAB, layers=6, positions=64, pad_token_id=None)
    torch.manual_seed(0)
    if arch == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=6, n_head=4, n_positions=64))
    else:
        m = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=64))
    return m.eval()


def cfg(tmp_path, host="1MiB", resident=False) -> dict:
    return offload_config(tmp_path, host, nvme="256MiB", resident=resident)


def batch(step: int) -> dict:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded row: the attention mask is split along the doubled batch too
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("arch,resident", [("llama", False), ("gpt2", False), ("opt", False), ("llama", True)])
def test_each_step_equals_in_memory_mezo(tmp_path, arch, resident):
    ref = build(arch)
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path, host="2MiB" if resident else "1MiB", resident=resident))
    store = model._tiered.store
    with ZOSGD(model, lr=LR, eps=EPS, seed=SEED) as zo:
        for step in range(4):
            want = mezo_step(ref, batch(step), seed=SEED + step, lr=LR, eps=EPS)
            got = zo.step(batch(step))
            assert (got.loss_plus, got.loss_minus, got.projected_grad) == \
                (want.loss_plus, want.loss_minus, want.projected_grad), f"step {step}"
            assert got.projected_grad != 0.0
    if not resident:
        assert store.stats()["tiers"]["nvme"]["bytes_read"] >= 3 * weight_bytes(ref)
    tiered.detach(model)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_each_step_reads_and_writes_every_weight_about_once(tmp_path):
    ref = build("llama")
    model = tiered.offload(ref, cfg(tmp_path))
    st = model._tiered.store
    with ZOSGD(model, lr=LR, eps=EPS, seed=SEED) as zo:
        zo.step(batch(0))
        r0, w0 = st.stats()["tiers"]["nvme"]["bytes_read"], st.stats()["tiers"]["nvme"]["bytes_written"]
        for step in range(1, 4):
            zo.step(batch(step))
        read = st.stats()["tiers"]["nvme"]["bytes_read"] - r0
        written = st.stats()["tiers"]["nvme"]["bytes_written"] - w0
    per_step = weight_bytes(model)
    assert 0.5 * per_step * 3 <= read <= 1.25 * per_step * 3, (read, per_step)
    assert 0.9 * per_step * 3 <= written <= 1.25 * per_step * 3, (written, per_step)
    tiered.detach(model)


def test_a_forward_between_steps_sees_the_updated_weights(tmp_path):
    ref = build("llama")
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    with ZOSGD(model, lr=LR, eps=EPS, seed=SEED) as zo:
        for step in range(2):
            mezo_step(ref, batch(step), seed=SEED + step, lr=LR, eps=EPS)
            zo.step(batch(step))
        x = batch(5)["input_ids"]
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
        want = mezo_step(ref, batch(2), seed=SEED + 2, lr=LR, eps=EPS)
        assert zo.step(batch(2)).projected_grad == want.projected_grad
    tiered.detach(model)


def test_noise_is_regenerated_from_the_seed():
    a = mezo_noise(3, 7, (4, 5), torch.float32)
    assert torch.equal(a, mezo_noise(3, 7, (4, 5), torch.float32))
    assert not torch.equal(a, mezo_noise(3, 8, (4, 5), torch.float32))
    assert not torch.equal(a, mezo_noise(4, 7, (4, 5), torch.float32))


def test_the_noise_is_host_memory_of_the_zo_owner(tmp_path):
    ref = build("llama")
    model = tiered.offload(copy.deepcopy(ref), cfg(tmp_path))
    store = offload_units(model).store
    largest = max(sum(p.numel() for p in u.params()) for u in offload_units(model))
    with ZOSGD(model, lr=LR, eps=EPS, seed=SEED, name="run", host_share="256KiB") as zo:
        assert zo.owner == "zo/run"
        assert store.owners()["zo/run"]["host"]["reserved"] == 256 << 10
        for step in range(2):
            want = mezo_step(ref, batch(step), seed=SEED + step, lr=LR, eps=EPS)
            assert zo.step(batch(step)).projected_grad == want.projected_grad
        fig = store.owners()["zo/run"]["host"]
        assert fig["peak"] >= 4 * largest and fig["held"] == 0  # held while a unit computes
    assert store.owners()["zo/run"]["host"]["reserved"] == 0
    # another owner's share leaves too little room for the units and the noise
    store.trim()  # the units' cached copies
    with store.reserve("host", "60%", owner="kv/other"):
        with pytest.raises(OffloadError, match=r"\(\d+ reserved by other owners\) cannot hold 3 units"):
            ZOSGD(model)
    tiered.detach(model)


def test_misuse_is_a_clear_error(tmp_path):
    with pytest.raises(OffloadError, match="not wrapped by tiered.offload.*mezo_step"):
        ZOSGD(build("llama"))
    model = tiered.offload(build("llama"), cfg(tmp_path))
    try:
        with pytest.raises(ValueError, match="eps must be > 0"):
            ZOSGD(model, eps=0.0)
        zo = ZOSGD(model)
        zo.close()
        small = tiered.offload(build("llama"), cfg(tmp_path / "small", host="384KiB"))
        try:
            with pytest.raises(OffloadError, match=r"cannot hold 3 units of \d+ bytes .*raise \[tiers.host\]"):
                ZOSGD(small)
        finally:
            tiered.detach(small)
        with pytest.raises(OffloadError, match="ZOSGD is closed"):
            zo.step(batch(0))
    finally:
        tiered.detach(model)
    bundled = tiered.offload(build("llama"), cfg(tmp_path), layout="bundled")
    try:
        with pytest.raises(OffloadError, match="bundled layout cannot be trained"):
            ZOSGD(bundled)
    finally:
        tiered.detach(bundled)
