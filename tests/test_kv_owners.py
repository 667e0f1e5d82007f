"""A TieredCache is an owner of its store: its host and GPU-tier memory is charged to ``kv/<id>``,
comes from its share, and stays within the tiers when other owners use them too."""

from __future__ import annotations

import pytest
import torch

import tiered
from tiered.kv import KVCacheError, KVStore, TieredCache, model_identity

from helpers import kv_bytes, owner_figures, store_config, wait_until
from test_kv_parity import assert_bitwise, generate, make_model, prompt, reference

BS = 8
KiB = 1 << 10


def config(tmp_path, host="8MiB", gpu=None, owners=None) -> dict:
    cfg = store_config(tmp_path, host)
    if gpu is not None:  # the GPU tier's code, run on the CPU
        cfg["tiers"] = {"gpu": {"kind": "device", "device": "cpu", "capacity": gpu}, **cfg["tiers"]}
    if owners:
        cfg["owners"] = owners
    return cfg


@pytest.fixture
def poisoned_frees(monkeypatch):
    """Every buffer the cache gives back to the GPU tier is poisoned (NaN) as it is freed."""
    from tiered.kv.memory import DeviceMemory

    free = DeviceMemory.free

    def poisoning(self, t):
        if t is not None and t.numel() and self.res is not None and self.owns(t) and t.is_floating_point():
            t.fill_(float("nan"))
        free(self, t)

    monkeypatch.setattr(DeviceMemory, "free", poisoning)


def test_the_cache_memory_is_charged_to_its_owner(tmp_path):
    model = make_model("llama")
    ids = prompt(40)
    want = generate(model, ids, reference(model), n=12)
    with tiered.TieredStore(config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        budget = kv_bytes(model, 20)
        with TieredCache(model.config, kv, model=model, device_budget=budget, cache_id="req-1") as cache:
            assert cache.owner == "kv/req-1"
            cache.load_prefix(ids)
            got = generate(model, ids, cache, n=12)
            assert cache.stats()["spilled_blocks"] and cache.stats()["store_reads"]
            mine = owner_figures(store, "kv/req-1", "host")
            assert mine["peak"] >= kv_bytes(model, BS)  # prefill host blocks, spills, reads
            assert owner_figures(store, "kv/req-1", "nvme")["held"] > 0  # its session blocks
        assert_bitwise(want, got)
        store.trim()  # what stays charged after close is only cached copies it read, evictable
        assert owner_figures(store, "kv/req-1", "host")["held"] == 0
        assert owner_figures(store, "kv/req-1", "nvme")["held"] == 0  # session blocks deleted
        prefix = owner_figures(store, kv.owner, "nvme")["held"]  # the saved prefix blocks and the identity record
        assert 5 * kv_bytes(model, BS) <= prefix < 6 * kv_bytes(model, BS)
        assert store.owners().get("default", {}).get("host", {}).get("peak", 0) == 0  # nothing unowned


def test_a_copy_and_a_default_id_are_owners_of_their_own(tmp_path):
    import copy

    model = make_model("llama")
    with tiered.TieredStore(config(tmp_path)) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model) as a, TieredCache(model.config, kv, model=model) as b:
            assert a.owner.startswith("kv/") and a.owner != b.owner
            generate(model, prompt(20), a, n=2)
            c = copy.deepcopy(a)
            try:
                assert c.owner not in (a.owner, b.owner)
            finally:
                c.close()
    with pytest.raises(KVCacheError, match="cache_id"):
        TieredCache(model.config, cache_id="a b")


def test_an_explicit_or_configured_host_share_is_reserved(tmp_path):
    model = make_model("llama")
    with tiered.TieredStore(config(tmp_path, owners={"kv": {"host": "25%"}})) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, cache_id="a") as a, \
                TieredCache(model.config, kv, model=model, cache_id="b", host_share="1MiB") as b:
            assert a.owner == "kv/a" and owner_figures(store, "kv/a", "host")["reserved"] == 2 << 20  # [owners.kv] 25%
            assert owner_figures(store, "kv/b", "host")["reserved"] == 1 << 20
            generate(model, prompt(20), b, n=2)
            assert b._pin_limit() == (1 << 20) // 2  # its pins are planned within its share
        assert owner_figures(store, "kv/a", "host")["reserved"] == 0  # given back at close
        assert owner_figures(store, "kv/b", "host")["reserved"] == 0


def test_a_kv_cache_and_another_owner_share_a_small_host_tier(tmp_path):
    """Another owner holds half of a small host tier: the cache's spills and reads fit the rest,
    and its pinned blocks are let go mid-step when the other owner asks for room."""
    model = make_model("llama")
    ids = prompt(60)
    want = generate(model, ids, reference(model), n=10)
    with tiered.TieredStore(config(tmp_path, host="512KiB")) as store:
        other = store.reserve("host", "256KiB", owner="gnn/feats")
        held = other.alloc(192 * KiB)
        held.tensor(torch.uint8)[:] = 7
        kv = KVStore(store, model_identity(model), block_size=BS)
        asked = []

        def other_wants_room(_module, _args, _out):  # mid-step: the cache pins this step's blocks
            pinned = cache.stats()["host_pinned"]
            if pinned >= 2 * kv_bytes(model, BS):
                asked.append(pinned)
                # room only if the cache lets go of some of its pins (unpinned copies are evicted first)
                buf = other.alloc(store.arena.capacity - 192 * KiB - pinned // 2, wait=0)
                buf.release()
                assert cache.stats()["host_pinned"] < pinned

        with TieredCache(model.config, kv, model=model, cache_id="c", device_budget=kv_bytes(model, 40),
                         lookahead=0) as cache:
            hook = model.model.layers[1].register_forward_hook(other_wants_room)
            try:
                got = generate(model, ids, cache, n=10)
            finally:
                hook.remove()
            assert asked, "no step pinned blocks: the test did not exercise the pressure"
            assert cache.stats()["store_reads"] > 0
        assert_bitwise(want, got)
        kv_peak = owner_figures(store, "kv/c", "host")["peak"]
        assert kv_peak <= store.arena.capacity - 192 * KiB
        assert bool((held.tensor(torch.uint8) == 7).all())  # the other owner's bytes untouched
        held.release()
        other.close()


# --------------------------------------------------------------------------- the GPU tier (device "cpu")
def test_the_gpu_tier_holds_the_cache_device_memory(tmp_path):
    model = make_model("llama")
    ids = prompt(40)
    want = generate(model, ids, reference(model), n=12)
    share = kv_bytes(model, 36)
    with tiered.TieredStore(config(tmp_path, gpu="1MiB")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, cache_id="g", device_budget=share) as cache:
            got = generate(model, ids, cache, n=12)
            st = cache.stats()
            assert st["device_tier"] and st["spilled_blocks"] > 0
            fig = owner_figures(store, "kv/g", "gpu")
            assert fig["reserved"] == share and 0 < fig["held"] <= share  # the explicit share is kept
            assert cache.device_bytes()["total"] <= share
            assert store.stats()["tiers"]["gpu"]["used"] == fig["held"]
        assert_bitwise(want, got)
        assert owner_figures(store, "kv/g", "gpu") == {"held": 0, "peak": fig["peak"], "reserved": 0}


@pytest.mark.parametrize("lookahead", [0, 1])
def test_a_kv_cache_and_another_owner_share_one_gpu_tier(tmp_path, lookahead):
    """An elastic cache on a GPU tier half held by an offloaded model: it spills when the tier has
    no room, stays exact, and never takes the other owner's bytes."""
    model = make_model("llama")
    ids = prompt(50)
    want = generate(model, ids, reference(model), n=20)
    capacity = 160 * KiB
    with tiered.TieredStore(config(tmp_path, gpu=f"{capacity}B")) as store:
        weights = store.reserve("gpu", owner="offload/model")
        held = weights.alloc(64 * KiB)
        held.tensor(torch.float32)[:] = 1.5
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, cache_id="e", lookahead=lookahead) as cache:
            got = generate(model, ids, cache, n=20)
            assert cache.stats()["spilled_blocks"] > 0  # the tier, not a budget, made it spill
        assert_bitwise(want, got)
        assert owner_figures(store, "kv/e", "gpu")["peak"] <= capacity - 64 * KiB
        assert bool((held.tensor(torch.float32) == 1.5).all())
        held.release()
        weights.close()


def test_an_elastic_cache_gives_gpu_memory_back_after_its_step(tmp_path):
    """Another owner that finds the GPU tier full asks the cache (mid-step, from a hook here);
    the cache spills resident blocks for it at the end of that step, and stays exact."""
    model = make_model("llama")
    ids = prompt(50)
    want = generate(model, ids, reference(model), n=8)
    with tiered.TieredStore(config(tmp_path, gpu="256KiB")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        other = store.reserve("gpu", owner="offload/model")
        refused = []

        def other_wants_room(_module, _args, _out):
            if not refused and cache.stats()["resident_blocks"] >= 3:
                tier = store.stats()["tiers"]["gpu"]
                try:
                    other.alloc(tier["capacity"] - tier["used"] + 2 * kv_bytes(model, BS), wait=0)
                except MemoryError:
                    refused.append(cache.stats()["spilled_blocks"])

        with TieredCache(model.config, kv, model=model, cache_id="p") as cache:
            hook = model.model.layers[1].register_forward_hook(other_wants_room)
            try:
                got = generate(model, ids, cache, n=8)
            finally:
                hook.remove()
            assert refused == [0]  # the tier was full of the cache's blocks, none spilled yet
            assert cache.stats()["spilled_blocks"] >= 2  # given back after that step
        other.close()
        assert_bitwise(want, got)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_edits_on_the_gpu_tier_are_bitwise(tmp_path, arch):
    """Beam search (row selection), prompt lookup (crop) and deepcopy with blocks, slots and
    tails in GPU-tier buffers: the same tokens and logits as the default cache."""
    import copy

    from test_kv_ops import _prefilled, gen, repetitive, tiered_cache

    model = make_model(arch)
    ids, rep = prompt(30), repetitive()
    want_beam = gen(model, ids, reference(model), num_beams=2)
    want_lookup = gen(model, rep, reference(model), n=12, prompt_lookup_num_tokens=3)
    ref = _prefilled(model, reference(model), ids)
    more = torch.cat([ids, prompt(6, 2)], 1)
    want_a, want_b = gen(model, more, ref), gen(model, more, copy.deepcopy(_prefilled(model, reference(model), ids)))
    with tiered.TieredStore(config(tmp_path, gpu="512KiB")) as store:
        with tiered_cache(store, model, budget="64KiB") as cache:
            got_beam = gen(model, ids, cache, num_beams=2)
            assert cache.stats()["device_tier"] and cache.stats()["spilled_blocks"] > 0
        with tiered_cache(store, model, budget="64KiB") as cache:
            got_lookup = gen(model, rep, cache, n=12, prompt_lookup_num_tokens=3)
        with tiered_cache(store, model, budget="64KiB") as cache:
            _prefilled(model, cache, ids)
            with copy.deepcopy(cache) as twin:
                assert twin.stats()["device_tier"] and twin.owner != cache.owner
                got_a, got_b = gen(model, more, cache), gen(model, more, twin)
        assert store.stats()["tiers"]["gpu"]["used"] == 0  # every buffer given back
    assert_bitwise(want_beam, got_beam)
    assert torch.equal(want_lookup.sequences, got_lookup.sequences)
    assert_bitwise(want_a, got_a)
    assert_bitwise(want_b, got_b)


@pytest.mark.parametrize("lookahead", [0, 1])
def test_gpu_tier_buffers_are_never_read_after_they_are_freed(tmp_path, poisoned_frees, lookahead):
    """Every buffer the cache gives back to the GPU tier is poisoned (NaN) as it is freed: the
    logits stay exact, so no attention read a slot, tail or block after its free (a grown slot
    is freed only once the step's forward is over)."""
    model = make_model("llama")
    ids = prompt(30)
    want = generate(model, ids, reference(model), n=30)
    with tiered.TieredStore(config(tmp_path, gpu="1MiB")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget=kv_bytes(model, 40),
                         lookahead=lookahead) as cache:
            got = generate(model, ids, cache, n=30)
            assert cache.stats()["device_tier"] and cache.stats()["spilled_blocks"] > 0
    assert_bitwise(want, got)


def test_crop_into_a_resident_block_copies_it_before_giving_the_buffer_back(tmp_path, poisoned_frees):
    model = make_model("llama")
    ids = prompt(30)

    def run(cache):
        with torch.no_grad():
            model(ids[:, :20], cache=cache, use_cache=True)
            for i in range(20, 30):  # decoded blocks are committed resident
                model(ids[:, i:i + 1], cache=cache, use_cache=True)
            cache.crop(-9)  # keep 21 tokens: inside a resident block
            return model(ids[:, 21:22], cache=cache, use_cache=True).logits

    want = run(reference(model))
    with tiered.TieredStore(config(tmp_path, gpu="1MiB")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, cache_id="c", device_budget="512KiB", lookahead=0) as cache:
            got = run(cache)
    assert torch.equal(got, want)


@pytest.mark.parametrize("lookahead", [0, 1])
def test_an_unclosed_cache_gives_its_reservations_back(tmp_path, lookahead):
    import gc
    import weakref

    model = make_model("llama")
    with tiered.TieredStore(config(tmp_path, gpu="1MiB")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        cache = TieredCache(model.config, kv, model=model, device_budget=kv_bytes(model, 40), lookahead=lookahead,
                            cache_id="u", host_share="1MiB").open()
        generate(model, prompt(20), cache, n=3)
        assert owner_figures(store, "kv/u", "gpu")["held"] > 0
        assert owner_figures(store, "kv/u", "host")["reserved"] == 1 << 20
        ref = weakref.ref(cache)
        del cache
        # a gather the cache's thread started for the next step holds it until that gather ends
        assert wait_until(lambda: gc.collect() >= 0 and ref() is None, timeout=30)
        assert owner_figures(store, "kv/u", "gpu")["held"] == 0 and owner_figures(store, "kv/u", "gpu")["reserved"] == 0
        assert owner_figures(store, "kv/u", "host")["reserved"] == 0
        with store.reserve("host", "1MiB", owner="kv/u"):  # the name is free again
            pass


def test_a_device_budget_in_percent_is_a_share_of_the_gpu_tier(tmp_path):
    model = make_model("llama")
    with tiered.TieredStore(config(tmp_path, gpu="1MiB")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget="10%", cache_id="pct") as cache:
            generate(model, prompt(20), cache, n=2)
            reserved = owner_figures(store, "kv/pct", "gpu")["reserved"]
            assert abs(reserved - (1 << 20) // 10) < 1024  # (rounded to the tier's alignment)
            assert cache.stats()["device_budget"] == reserved
    with tiered.TieredStore(config(tmp_path / "b")) as store:
        kv = KVStore(store, model_identity(model), block_size=BS)
        with TieredCache(model.config, kv, model=model, device_budget="10%") as cache:
            with pytest.raises(KVCacheError, match="share of the store's GPU tier.*give a size"):
                generate(model, prompt(20), cache, n=2)
