"""CUDA paths: pinned arena, device reads through kvikio, the gpu tier, offload on a GPU.

Marked ``cuda`` and skipped without a CUDA device (CPU-only CI runs none of
these); ``bench/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tiered.allocators import HostArena
from tiered.io_engine import IOEngine, available_backends

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
T = 60.0


def test_arena_is_pinned_once_and_copies_async():
    with HostArena(64 << 20, pin=True) as arena:
        assert arena.stats().pinned
        buf = arena.alloc(16 << 20)
        host = buf.tensor(torch.float32)
        host.copy_(torch.arange(host.numel(), dtype=torch.float32))
        dev = torch.empty_like(host, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            dev.copy_(host, non_blocking=True)
        stream.synchronize()
        assert torch.equal(dev.cpu(), host)
        buf.release()


def _write_file(path, data: np.ndarray) -> None:
    with IOEngine("threads", workers=2, chunk=1 << 20) as e:
        e.write(path, 0, data, sync=True).result(T)


@pytest.mark.skipif(available_backends().get("kvikio") is not None, reason="kvikio not usable here")
def test_kvikio_reads_into_device_and_host_buffers(tmp_path):
    path = str(tmp_path / "data.bin")
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    _write_file(path, data)
    with IOEngine("kvikio", workers=4, chunk=1 << 20) as e:
        dev = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
        e.read(path, 0, dev).result(T)
        assert torch.equal(dev.cpu(), torch.from_numpy(data))
        part = torch.empty(12345, dtype=torch.uint8, device="cuda")
        e.read(path, 777, part).result(T)
        assert torch.equal(part.cpu(), torch.from_numpy(data[777:777 + 12345]))
        host = np.zeros(1 << 20, dtype=np.uint8)
        e.read(path, 4096, host).result(T)
        assert (host == data[4096:4096 + (1 << 20)]).all()
        out = torch.arange(1 << 20, dtype=torch.uint8, device="cuda")
        e.write(path, 0, out, sync=True).result(T)
    with open(path, "rb") as f:
        assert f.read(1 << 20) == out.cpu().numpy().tobytes()


def _config(tmp_path, host="64MiB", gpu="32MiB") -> dict:
    return {"tiers": {"gpu": {"capacity": gpu}, "host": {"capacity": host},
                      "nvme": {"path": str(tmp_path / "nvme"), "capacity": "1GiB"}},
            "engine": {"workers": 4, "chunk": "1MiB"}}


def test_store_get_to_gpu(tmp_path):
    from tiered import TieredStore

    with TieredStore(_config(tmp_path)) as store:
        assert store.arena.stats().pinned
        t = torch.randn(1000, 300)
        store.put("w", t).result(T)
        store.evict("w")
        g = store.get("w", tier="gpu").result(T)
        assert g.is_cuda and torch.equal(g.cpu(), t)


@pytest.mark.parametrize("device_cache", [True, False])
def test_offloaded_llama_on_gpu_matches_in_gpu_model(tmp_path, device_cache):
    transformers = pytest.importorskip("transformers")
    import tiered

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 1000, (2, 24), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    budget = nbytes // 3
    conf = _config(tmp_path, host="64MiB", gpu=str(budget))
    conf["offload"] = {"device_cache": device_cache}
    tiered.offload(model, conf)
    assert (model._tiered.dcache is not None) == device_cache
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    stats = tiered.offload_stats(model)
    tiered.detach(model)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"
    assert torch.equal(got_gen, want_gen)
    assert stats["bytes_read"].get("nvme", 0) > 0 or stats["resident_bytes"] < nbytes
    assert stats["peak_device_bytes"] <= budget
    if device_cache:
        assert stats["device_cache"]["peak"] <= budget + 512 * 64, stats
    assert all(p.is_cuda for p in model.parameters())


def test_bundled_layout_on_gpu_and_auto_backend(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tiered
    from tiered.io_engine import create_backend
    from tiered.io_engine.backends.kvikio_backend import KvikioBackend

    expected = "kvikio" if KvikioBackend.gds_available() else "threads"
    assert create_backend("auto").name == expected
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 1000, (1, 16), device="cuda")
    with torch.no_grad():
        want = model(ids).logits
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    tiered.offload(model, _config(tmp_path, host="64MiB", gpu=str(nbytes // 2)), layout="bundled")
    with torch.no_grad():
        got = model(ids).logits
    stats = tiered.offload_stats(model)
    tiered.detach(model)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"
    assert stats["peak_device_bytes"] <= nbytes // 2


@pytest.mark.parametrize("lookahead", [0, 1])
def test_kv_cache_in_the_gpu_tier_beside_another_owner_is_bitwise(tmp_path, lookahead):
    """Blocks, slots, tails and the gather's staging are buffers of the store's GPU tier (freed
    only once the streams that use them are past them); another owner holds part of the tier."""
    import transformers
    from transformers import DynamicCache

    from tiered import TieredStore
    from tiered.kv import KVStore, TieredCache, kv_geometry, model_identity

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().to("cuda")
    ids = torch.randint(3, 300, (1, 70), generator=torch.Generator().manual_seed(1)).to("cuda")

    def generate(cache):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=20, do_sample=False, cache=cache, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=0)

    want = generate(DynamicCache(config=cfg))
    layers, heads, dim = kv_geometry(cfg)
    share = 40 * layers * 2 * heads * dim * 4  # 40 tokens of K/V: blocks are spilled
    with TieredStore(_config(tmp_path, gpu="4MiB")) as store:
        weights = store.reserve("gpu", "1MiB", owner="offload/model")
        held = weights.alloc(1 << 20)
        held.tensor(torch.float32)[:] = 3.0
        kv = KVStore(store, model_identity(model), block_size=8)
        with TieredCache(cfg, kv, model=model, device_budget=share, lookahead=lookahead, cache_id="gpu") as cache:
            got = generate(cache)
            st = cache.stats()
            assert st["device_tier"] and st["spilled_blocks"] > 0 and st["store_reads"] > 0
            assert store.owners()["kv/gpu"]["gpu"]["reserved"] == share
        torch.cuda.synchronize()
        assert store.owners()["kv/gpu"]["gpu"]["held"] == 0
        assert bool((held.tensor(torch.float32) == 3.0).all())
        held.release()
        weights.close()
    assert torch.equal(want.sequences, got.sequences)
    assert all(torch.equal(a, b) for a, b in zip(want.scores, got.scores))


def test_backward_through_the_device_cache_on_gpu(tmp_path):
    """Saved weights are placed again in backward (not kept by autograd); gradients match the
    in-GPU model's. Embedding backward accumulates with atomics on CUDA, so gradients are
    compared to 1e-6 rather than bit for bit."""
    transformers = pytest.importorskip("transformers")
    import copy

    import tiered

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    ref = transformers.LlamaForCausalLM(cfg).cuda().train()
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 1000, (2, 24), device="cuda")
    ref(input_ids=ids, labels=ids).loss.backward()
    budget = sum(p.numel() * 4 for p in ref.parameters()) // 3
    conf = _config(tmp_path, host="64MiB", gpu=str(budget))
    conf["offload"] = {"device_cache": True, "resident": False}
    tiered.offload(model, conf)
    rt = model._tiered
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loads = rt.stats.unit_loads
        assert sum(rt._saved.values()) > 0
        loss.backward()
        assert rt.stats.unit_loads >= loads + 3
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
        rt.finish_backward()
        assert tiered.offload_stats(model)["device_cache"]["peak"] <= budget + 512 * 64
    finally:
        tiered.detach(model)


def test_offloaded_adamw_trains_a_model_computing_on_gpu(tmp_path):
    """The update runs on the CPU: each chunk's gradients come over from the GPU and new weights
    reach the device cache through the store. Against torch's AdamW in GPU memory the losses
    agree to float32 rounding (CUDA kernels and the CPU's fused AdamW round differently)."""
    transformers = pytest.importorskip("transformers")
    import copy

    import tiered
    from tiered.optim import OffloadedAdamW

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    ref = transformers.LlamaForCausalLM(cfg).cuda().train()
    model = copy.deepcopy(ref)
    budget = sum(p.numel() * 4 for p in ref.parameters()) // 2
    conf = _config(tmp_path, host="128MiB", gpu=str(budget))
    conf["offload"] = {"device_cache": True, "resident": False}
    tiered.offload(model, conf)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    try:
        with OffloadedAdamW(list(model.parameters()), lr=1e-3, model=model) as opt:
            for step in range(3):
                ids = torch.randint(0, 1000, (2, 24), device="cuda", generator=None)
                l_ref = ref(input_ids=ids, labels=ids).loss
                l_ref.backward()
                o_ref.step()
                o_ref.zero_grad()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                torch.testing.assert_close(loss, l_ref, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    finally:
        tiered.detach(model)
