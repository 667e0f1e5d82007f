"""Every workload in one process on one store with a small host tier: an offloaded model
generating, a TieredCache holding its KV, a feature store serving gathers, an OffloadedAdamW step
and a lazy checkpoint. After every step no tier ever held more than its capacity (its peak
included), and each owner's use is reported under its own name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch_geometric")

import tiered  # noqa: E402
from helpers import tiny_llama  # noqa: E402
from tiered.checkpoint import LazyCheckpointer  # noqa: E402
from tiered.gnn import TieredFeatureStore  # noqa: E402
from tiered.kv import KVStore, TieredCache  # noqa: E402
from tiered.optim import OffloadedAdamW  # noqa: E402
from tiered.store import TieredStore  # noqa: E402

MiB = 1 << 20
T = 60.0


def llama(seed=0, layers=4):
    return tiny_llama(seed, layers=layers, positions=256, pad_token_id=None)


def config(tmp_path, gpu=None):
    tiers = {"host": {"capacity": "24MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "256MiB"}}
    if gpu:
        tiers = {"gpu": {"kind": "device", "device": gpu, "capacity": "16MiB"}, **tiers}
    return {"tiers": tiers, "engine": {"workers": 2}}


def check_budgets(store: TieredStore, step: str) -> dict:
    """No tier held more than its capacity at any time (its peak), and the owners' held bytes
    add up to what the tier holds."""
    st = store.stats()
    owners = st["owners"]
    for name, tier in st["tiers"].items():
        if tier is None:
            continue
        held = sum(o.get(name, {}).get("held", 0) for o in owners.values())
        assert held <= tier["capacity"], f"after {step}: owners hold {held} of tier {name}'s {tier['capacity']}"
        if "peak" in tier:
            assert tier["peak"] <= tier["capacity"], f"after {step}: tier {name} peaked at {tier['peak']}"
        if name == "host" or tier["kind"] == "device":
            assert held == tier["used"], f"after {step}: owners hold {held}, tier {name} uses {tier['used']}"
    return owners


def test_every_workload_shares_one_store_within_its_budgets(tmp_path):
    store = TieredStore.shared(config(tmp_path))
    peaks = {}
    try:
        # an offloaded model generating
        ref = llama()
        model = tiered.offload(llama(), store=store)
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=8, do_sample=False)
        # a TieredCache holding its KV (spilled to the same store)
        with TieredCache(model.config, KVStore(store, block_size=4), model=model, device_budget="16KiB") as cache, \
                torch.no_grad():
            got = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
        assert torch.equal(got, want)
        check_budgets(store, "generation")

        # a feature store serving gathers
        x = torch.randn(20_000, 32)
        with TieredFeatureStore(store, chunk_bytes=256 << 10, cache_bytes=1 << 20).open() as fs:
            fs.put_tensor(x, group_name=None, attr_name="x", index=None)
            rows = torch.from_numpy(np.random.default_rng(0).integers(0, 20_000, 3000))
            assert torch.equal(fs.get_tensor(group_name=None, attr_name="x", index=rows), x[rows])
            check_budgets(store, "gathers")

        # an OffloadedAdamW step on another model, and a lazy checkpoint of it
        student = llama(seed=2, layers=2).train()
        with OffloadedAdamW(student.parameters(), lr=1e-3, store=store) as opt, \
                LazyCheckpointer(store=store, keep_last=1, host_buffer="8MiB", prefault=False) as ck:
            ck.attach(opt)
            loss = student(ids, labels=ids).loss
            loss.backward()
            opt.step()
            check_budgets(store, "optimizer step")
            assert store.stats()["plans"]["active"][opt.owner]["keys"] > 0  # the next step's reads, declared
            ck.save({"model": student.state_dict()}, step=1).wait(T)
            owners = check_budgets(store, "checkpoint")
        assert opt.owner not in store.stats()["plans"]["active"]  # withdrawn by close()
        peaks = {o: {t: f["peak"] for t, f in tiers.items()} for o, tiers in owners.items()}
        tiered.detach(model)
    finally:
        store.close()
    # each workload's use is reported under its own name, never lumped together
    kinds = {o.split("/", 1)[0] for o, p in peaks.items() if any(p.values())}
    assert {"offload", "kv", "gnn", "optim", "checkpoint"} <= kinds, peaks


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_model_and_a_kv_cache_share_one_gpu_tier(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = config(tmp_path, gpu=device if device == "cpu" else "cuda:0")
    cfg["offload"] = {"device_cache": True}
    store = TieredStore.shared(cfg)
    try:
        ref = llama().to(device)
        model = tiered.offload(llama().to(device), store=store)
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            want = ref.generate(ids, max_new_tokens=8, do_sample=False)
        with TieredCache(model.config, KVStore(store, block_size=4), model=model, device_budget="64KiB") as cache, \
                torch.no_grad():
            got = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
            owners = check_budgets(store, "generation")
        assert torch.equal(got, want)
        gpu = {o: t["gpu"]["peak"] for o, t in owners.items() if t.get("gpu", {}).get("peak")}
        assert {o.split("/", 1)[0] for o in gpu} == {"offload", "kv"}, gpu
        assert store.stats()["tiers"]["gpu"]["peak"] <= store.stats()["tiers"]["gpu"]["capacity"]
        tiered.detach(model)
    finally:
        store.close()
