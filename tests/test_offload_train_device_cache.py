"""Training through the device cache (the path CUDA takes), forced on a CPU device.

``[offload] device_cache = true`` with a GPU tier on device "cpu" runs the CUDA code path here:
units are placed in the cache's region, saved tensors that view a streamed unit's copy there
become handles whose copy is placed again in backward (nothing is cloned), and the optimizer's
new weights reach resident units' device copies in place and streamed units' next placement
through the store. Results are bitwise equal to in-memory training.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, step_beside_in_memory, tiny_llama
from tiered.offload import offload_units
from tiered.optim import OffloadedAdamW

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(90), *TINY_MODEL_MARKS]

VOCAB = 128


def build(arch: str):
    if arch == "llama":
        return tiny_llama(vocab=VOCAB, layers=6, positions=64, pad_token_id=None).train()
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=6, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def cache_cfg(tmp_path, host: str, *, lookahead: int = 1, resident: bool = False) -> dict:
    cfg = offload_config(tmp_path, host, nvme="256MiB", lookahead=lookahead, resident=resident)
    cfg["offload"]["device_cache"] = True
    cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": cfg["tiers"]["host"]["capacity"]}
    return cfg


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backward_refetches_device_copies_and_gradients_are_bitwise(tmp_path, arch):
    ref = build(arch)
    model = tiered.offload(copy.deepcopy(ref), cache_cfg(tmp_path, "2MiB"))
    rt = model._tiered
    assert rt.dcache is not None
    try:
        x = batch(0)
        ref(input_ids=x, labels=x).loss.backward()
        loss = model(input_ids=x, labels=x).loss
        placed, loads = rt.dcache.stats.hits + rt.dcache.stats.misses, rt.stats.unit_loads
        assert sum(rt._saved.values()) > 0  # device copies saved as handles, not cloned
        loss.backward()
        assert rt.stats.unit_loads >= loads + 3  # blocks acquired again in backward
        assert rt.dcache.stats.hits + rt.dcache.stats.misses >= placed + 3
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), name
        rt.finish_backward()
        assert rt.dcache.peak <= rt.dcache.limit
        assert all(not u.leases for u in rt.units if not u.resident)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("arch,lookahead,resident", [("llama", 1, False), ("gpt2", 2, True), ("llama", 0, True), ("llama", 0, False), ("llama", 1, True), ("gpt2", 1, False)])
def test_training_through_the_device_cache_is_bitwise_equal_to_in_memory(tmp_path, arch, lookahead, resident):
    ref = build(arch)
    model = tiered.offload(copy.deepcopy(ref), cache_cfg(tmp_path, "3MiB", lookahead=lookahead, resident=resident))
    rt = offload_units(model)
    assert model._tiered.dcache is not None
    if resident:
        assert rt.resident_bytes > 0
    try:
        train(ref, model, steps=4, chunk_bytes=None)
        dc = model._tiered.dcache
        assert dc.peak <= dc.limit
    finally:
        tiered.detach(model)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_load_state_dict_through_the_device_cache(tmp_path):
    ref = build("llama")
    other = tiny_llama(seed=3, vocab=VOCAB, layers=6, positions=64, pad_token_id=None).train()
    model = tiered.offload(copy.deepcopy(ref), cache_cfg(tmp_path, "3MiB", resident=True))
    try:
        x = batch(0)
        model(input_ids=x)  # placed once: resident units hold device copies
        model.load_state_dict(other.state_dict())
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("resident", [False, True])
def test_zeroth_order_steps_through_the_device_cache_equal_in_memory_mezo(tmp_path, resident):
    from test_zo import EPS, LR, SEED, mezo_step
    from test_zo import batch as zo_batch
    from tiered.optim import ZOSGD

    ref = build("llama")
    model = tiered.offload(copy.deepcopy(ref), cache_cfg(tmp_path, "2MiB", resident=resident))
    with ZOSGD(model, lr=LR, eps=EPS, seed=SEED) as zo:
        for step in range(3):
            want = mezo_step(ref, zo_batch(step), seed=SEED + step, lr=LR, eps=EPS)
            got = zo.step(zo_batch(step))
            assert (got.loss_plus, got.loss_minus, got.projected_grad) == \
                (want.loss_plus, want.loss_minus, want.projected_grad), f"step {step}"
    tiered.detach(model)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- resident, host-resident and streamed units together
# A host tier with just the room asked for (the rest reserved while the model is offloaded) and a small
# device tier give a mix: resident units (R), host-resident ones whose device copies come and go (H) and
# streamed ones (.), e.g. llama RRRRHHHRH, gpt2 RRRRHHH.RH (the tied embedding resident, the head not).


def mixed(tmp_path, arch: str, host: int, gpu: str, *, lookahead: int = 1, ckpt: bool = False):
    ref = build(arch)
    if ckpt:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = cache_cfg(tmp_path, "8MiB", lookahead=lookahead, resident=True)
    cfg["tiers"]["gpu"]["capacity"] = gpu
    store = tiered.TieredStore(cfg).open()
    pad = store.reserve("host", (8 << 20) - host, owner="pad")
    try:
        model = tiered.offload(copy.deepcopy(ref), store=store)
    finally:
        pad.close()
    kinds = "".join("R" if u.resident else "H" if u.host_resident else "." for u in model._tiered.units)
    assert "R" in kinds and "H" in kinds, kinds
    return ref, model, store


def train(ref, model, steps: int = 3, chunk_bytes: int | None = 64 << 10) -> None:
    """``steps`` of OffloadedAdamW on ``model`` beside torch's AdamW on ``ref``: losses bitwise equal."""
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    with OffloadedAdamW(list(model.parameters()), lr=1e-2, weight_decay=0.05, model=model, lookahead=1,
                        chunk_bytes=chunk_bytes) as opt:
        for step in range(steps):
            step_beside_in_memory(ref, o_ref, model, opt, batch(step), step)


@pytest.mark.parametrize("arch,gpu,lookahead,ckpt", [
    ("llama", "640KiB", 1, False), ("gpt2", "640KiB", 2, True), ("gpt2", "768KiB", 0, False), ("llama", "640KiB", 0, True)])
def test_mixed_units_train_bitwise(tmp_path, arch, gpu, lookahead, ckpt):
    ref, model, store = mixed(tmp_path, arch, 1 << 20, gpu, lookahead=lookahead, ckpt=ckpt)
    try:
        train(ref, model)
    finally:
        tiered.detach(model)
        store.close()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_mixed_units_load_state_dict(tmp_path):
    ref, model, store = mixed(tmp_path, "llama", 1 << 20, "640KiB")
    other = build("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    try:
        x = batch(0)
        model(input_ids=x)
        model.load_state_dict(other.state_dict())
        with torch.no_grad():
            for _ in range(2):  # resident copies changed in place, the others placed again at the new version
                assert torch.equal(model(input_ids=x).logits, other(input_ids=x).logits)
    finally:
        tiered.detach(model)
        store.close()


def test_host_residents_stay_within_the_models_host_share_and_leave_the_optimizer_room(tmp_path):
    """Through the device cache, host-resident units are planned within ``[owners.offload] host``
    (they took the whole host tier before, and the optimizer's first update waited for room the
    model never gives back during backward)."""
    ref = build("llama")
    cfg = cache_cfg(tmp_path, "8MiB", resident=True)
    cfg["tiers"]["gpu"]["capacity"] = "640KiB"
    cfg["owners"] = {"offload": {"host": "320KiB"}}
    model = tiered.offload(copy.deepcopy(ref), cfg)
    store = model._tiered.store
    try:
        pinned = tiered.offload_stats(model)["host_resident_bytes"]
        assert pinned <= 320 << 10, pinned
        train(ref, model, steps=2)
        assert store.owners()[model._tiered.owner]["host"]["reserved"] == 320 << 10
    finally:
        tiered.detach(model)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
