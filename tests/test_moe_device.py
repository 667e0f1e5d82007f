"""Expert units through the device cache (the path CUDA takes; ``[offload] device_cache = true``
forces it on a CPU with a ``device = "cpu"`` GPU tier): routed experts are placed in the GPU tier,
kept there while useful, gathered per call into a staging buffer, read ahead by the next router, and the tokens stay bitwise the
in-memory model's under budgets smaller than one layer's experts."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from test_moe_budget import WrongGuess, storage_reads
from test_moe_offload import build, config, prompt

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_intra_op_thread")]


def device_config(tmp_path, gpu: str, host: str = "2MiB", resident: bool = True, **offload) -> dict:
    """The device-cache path on a CPU: a GPU tier of ``gpu`` bytes (the compute budget) on device
    "cpu", a host tier of ``host`` staging its copies."""
    cfg = config(tmp_path, host=host, resident=resident, device_cache=True, **offload)
    cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": gpu}
    return cfg


def routing(model) -> list[tuple[int, set[int]]]:
    """(bank index, experts chosen) of every bank call from now on, as the router chose them
    (seen before the call's expert ids are mapped onto its staged rows)."""
    calls: list[tuple[int, set[int]]] = []
    for b in model._tiered.banks:
        def hook(_m, args, kwargs, b=b):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            calls.append((b.index, set(torch.unique(index).tolist())))
        b.module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return calls


def reference(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).generate(ids, max_new_tokens=8, do_sample=False,
                                             attention_mask=torch.ones_like(ids))


def generate(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))


def assert_within_budget(rt) -> None:
    """The device cache and the compute tier's charges never went past the budget."""
    assert rt.dcache.peak <= rt.dcache.limit
    assert rt.compute_res.peak <= rt._budget()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_parity_through_the_device_cache(tmp_path, arch, batch):
    model = build(arch)
    ids = prompt(batch, length=3)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        rt = model._tiered
        assert rt.dcache is not None and rt.banks, "experts = auto makes expert units on the device-cache path"
        got = generate(model, ids)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["compute_tier"] == "gpu"
        assert set(ex["hits"]) == {"gpu", "prefetched", "host", "storage"}
        assert ex["routed"] > 0 and sum(ex["hits"].values()) == ex["routed"]
        assert ex["hits"]["gpu"] > 0  # experts kept on the device were used again
        assert_within_budget(rt)
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch,gpu", [("mixtral", "200KiB"), ("olmoe", "120KiB")])
def test_device_room_smaller_than_one_layers_experts(tmp_path, arch, gpu, batch):
    model = build(arch, layers=3, experts=16)  # a call of two tokens (four experts) fits, with its staging
    ids = prompt(batch, length=2 if batch == 1 else 1)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu=gpu, host="1MiB", resident=False))
    try:
        rt = model._tiered
        one, layer = rt.banks[0].nbytes, rt.banks[0].nbytes * rt.banks[0].num
        room = rt._expert_capacity + rt._expert_prefetch_room
        assert one < room < layer
        in_use = []  # GPU tier bytes of the experts and their staging at each bank call
        for b in rt.banks:
            b.module.register_forward_pre_hook(lambda *_a: in_use.append(rt._expert_held() + rt.staged_bytes()))
        got = generate(model, ids)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["evictions"] > 0 and ex["present_bytes"] <= room
        assert 0 < max(in_use) <= room
        assert ex["hits"]["storage"] + ex["hits"]["host"] > 0
        assert_within_budget(rt)
    finally:
        tiered.detach(model)


def test_only_routed_experts_are_read_and_placed(tmp_path):
    model = build("mixtral", layers=3)
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        rt = model._tiered
        for b in rt.banks:
            b.predictor = None  # demand reads only: what is read is what was routed
        reads, calls = storage_reads(model), routing(model)
        placed0 = rt.dcache.stats.bytes_loaded
        with torch.no_grad():
            model(prompt(1, length=1))
        expert_reads = [(k, n) for k, n in reads if "/expert" in k]
        routed = {rt.banks[i].keys[e] for i, chosen in calls for e in chosen}
        assert len(calls) == 3 and all(len(chosen) == 2 for _i, chosen in calls)
        assert sorted(k for k, _n in expert_reads) == sorted(routed)  # each routed expert once, nothing else
        assert sum(n for _k, n in expert_reads) == len(routed) * rt.banks[0].nbytes
        units_placed = sum(u.nbytes for u in rt.units if not u.resident)
        assert rt.dcache.stats.bytes_loaded - placed0 == len(routed) * rt.banks[0].nbytes + units_placed
        ex = tiered.offload_stats(model)["experts"]
        assert ex["hits"]["storage"] == 6 and ex["routed"] == 6 and ex["tokens"] == 1
        reads.clear()
        placed1 = rt.dcache.stats.bytes_loaded
        with torch.no_grad():  # the same token again: its experts are on the device, not copied again
            model(prompt(1, length=1))
        assert not [k for k, _n in reads if "/expert" in k]
        assert rt.dcache.stats.bytes_loaded - placed1 == units_placed  # no expert copied to the device again
        assert tiered.offload_stats(model)["experts"]["hits"]["gpu"] == 6
    finally:
        tiered.detach(model)


def test_reads_ahead_onto_the_device(tmp_path):
    model = build("qwen3_moe", layers=3)
    ids = prompt(1, length=2)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        got = generate(model, ids)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["hits"]["prefetched"] > 0 and ex["prediction"]["precision"] > 0.5
    finally:
        tiered.detach(model)


def test_wrong_predictions_through_the_device_cache_give_identical_tokens(tmp_path):
    model = build("deepseek_v3")
    ids = prompt(2, length=3)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu="300KiB", host="1MiB", resident=False))
    try:
        rt = model._tiered
        for b in rt.banks:
            b.predictor = WrongGuess(b.predictor)
        got = generate(model, ids)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["prediction"]["predicted"] > 0 and ex["prediction"]["precision"] < 0.5
        assert ex["hits"]["storage"] + ex["hits"]["host"] > 0  # mispredictions were read on demand
        assert_within_budget(rt)
    finally:
        tiered.detach(model)


def test_experts_true_is_served_through_the_device_cache(tmp_path):
    model = build("olmoe")
    ids = prompt(1)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu="2MiB", experts=True))
    try:
        assert model._tiered.banks and model._tiered.dcache is not None
        assert torch.equal(generate(model, ids), want)
    finally:
        tiered.detach(model)


def test_every_experts_kernel_through_the_device_cache(tmp_path):
    for kernel in ("eager", "batched_mm", "grouped_mm"):
        model = build("qwen2_moe")
        model.set_experts_implementation(kernel)
        ids = prompt(2)
        want = reference(model, ids)
        tiered.offload(model, device_config(tmp_path / kernel, gpu="2MiB"))
        try:
            assert torch.equal(generate(model, ids), want), kernel
        finally:
            tiered.detach(model)


def test_giving_the_device_back_drops_the_experts(tmp_path):
    model = build("mixtral")
    ids = prompt(1)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        rt = model._tiered
        generate(model, ids)
        assert any(b.cached for b in rt.banks)
        rt.drop_experts()
        assert not any(b.cached for b in rt.banks)
        assert not any(k in rt.dcache for k in rt.bank_keys())
        assert torch.equal(generate(model, ids), want)  # and they are placed again
    finally:
        tiered.detach(model)
    assert torch.equal(reference(model, ids), want)  # detach restored the experts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_on_cuda_experts_through_the_device_cache_match_the_in_gpu_model(tmp_path, arch):
    model = build(arch, layers=3, experts=16).cuda()
    ids = prompt(2, length=3).cuda()
    want = reference(model, ids)
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].mlp.experts.parameters())
    cfg = config(tmp_path, host="4MiB", resident=False)
    cfg["tiers"]["gpu"] = {"kind": "device", "capacity": str(layer + layer // 2)}  # less than two layers' experts
    tiered.offload(model, cfg)
    try:
        rt = model._tiered
        assert rt.dcache is not None and rt.banks and rt.device.type == "cuda"
        assert torch.equal(generate(model, ids), want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["compute_tier"] == "gpu" and sum(ex["hits"].values()) == ex["routed"]
        assert_within_budget(rt)
    finally:
        tiered.detach(model)
    assert all(p.is_cuda for p in model.parameters())


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_bundled_layout_on_cuda_keeps_experts_in_their_layers_units(tmp_path, arch, monkeypatch):
    """experts = auto with the bundled layout on CUDA: no expert units (the device cache cannot
    serve bundled FFNs), the experts stay in their layers' units. Only the decisions taken before
    any CUDA call are exercised, with the runtime told it computes on CUDA."""
    from tiered.offload.runtime import OffloadedModule

    monkeypatch.setattr(OffloadedModule, "cuda", property(lambda self: True))
    model = build(arch)
    cfg = config(tmp_path, layout="bundled")
    cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": "4MiB"}
    tiered.offload(model, cfg)
    try:
        rt = model._tiered
        assert not rt.banks and rt.dcache is None and rt._bundled
        expert_params = {id(p) for m in model.modules() if type(m).__name__.endswith("Experts")
                         for p in m.parameters(recurse=False)}
        in_units = {id(s.tensor()) for u in rt.units for s in u.slots}
        assert expert_params and expert_params <= in_units
    finally:
        tiered.detach(model)


def test_staging_of_the_call_in_progress_stays_while_its_experts_are_placed_again(tmp_path):
    """A GPU tier in pieces: the staging first finds no room, so one of the call's present experts
    makes way and is placed again; that placement finds no room either and merges the free room
    (``_make_room``), which must keep the staging the call just took."""
    from tiered.allocators import OutOfBudget

    model = build("mixtral")
    ids = prompt(1, length=1)
    with torch.no_grad():
        want = copy.deepcopy(model)(ids).logits
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        rt = model._tiered
        for b in rt.banks:
            b.predictor = None
        with torch.no_grad():
            model(ids)  # the experts of this token are present from now on
        res, dc = rt.compute_res, rt.dcache
        real_alloc, real_acquire = res.alloc, dc.acquire
        staging_fails = [1]

        def alloc(n, wait=None):
            if wait == 0.0 and staging_fails[0] > 0:
                staging_fails[0] -= 1
                raise OutOfBudget("in pieces")
            return real_alloc(n, wait)

        def acquire(key, priority=None, wait=None):
            if wait == 0.0:
                raise OutOfBudget("in pieces")
            return real_acquire(key, priority=priority, wait=wait)

        res.alloc, dc.acquire = alloc, acquire
        rt._make_way = lambda protect: False
        rt.release_staging()  # the next call takes its staging again
        with torch.no_grad():
            got = model(ids).logits
        assert staging_fails == [0]
        assert torch.equal(got, want)
    finally:
        tiered.detach(model)


class QueuedCopy:
    """Stands in for the CUDA event of a host -> device copy still queued on the copy stream."""

    def __init__(self, buffer):
        self.buffer, self.waited_before_release = buffer, None

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        self.waited_before_release = not self.buffer.released


def test_an_expert_leaving_the_device_frees_its_buffer_after_its_copy(tmp_path):
    """An expert placed but never read: no reader waited for its copy, so freeing its buffer must
    wait for the copy itself (else a new allocation there is overwritten by the late copy)."""
    model = build("mixtral")
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        rt = model._tiered
        with torch.no_grad():
            model(prompt(1, length=1))
        b = rt.banks[0]
        e, lease = next(iter(b.cached.items()))
        entry = rt.dcache._entries[b.keys[e]]
        entry.copied = copy_event = QueuedCopy(entry.buffer)
        del b.cached[e]
        rt.unplace(b, e, lease)
        assert entry.buffer.released
        assert copy_event.waited_before_release is True
    finally:
        tiered.detach(model)


def test_staging_stays_within_a_share_below_the_tier(tmp_path):
    """The staging is counted with the device cache's entries: with a share below the tier's
    capacity (the tier could grant more), the model's compute bytes never pass its share."""
    model = build("mixtral", layers=3, experts=16)
    ids = prompt(1, length=4)
    want = reference(model, ids)
    tiered.offload(model, device_config(tmp_path, gpu="4MiB", host="1MiB", resident=False), share="400KiB")
    try:
        rt = model._tiered
        assert rt._budget() == 400 * 1024 < rt.dcache.capacity
        assert torch.equal(generate(model, ids), want)
        assert rt.compute_res.peak <= 400 * 1024
        assert rt.dcache.peak <= rt.dcache.limit
    finally:
        tiered.detach(model)


def test_a_larger_staging_makes_room_among_present_experts(tmp_path):
    """A call routed to more experts than the last, all of them present: its larger staging is
    taken within the room for experts (the least useful present experts leave), also where the
    tier has room beyond the model's share."""
    model = build("mixtral", layers=3, experts=16)
    tiered.offload(model, device_config(tmp_path, gpu="4MiB", host="1MiB", resident=False), share="200KiB")
    try:
        rt = model._tiered
        b = rt.banks[0]
        for v in rt.banks:
            v.predictor = None
        room = rt._expert_capacity + rt._expert_prefetch_room
        in_use = []
        b.module.register_forward_pre_hook(lambda *_a: in_use.append(rt._expert_held() + rt.staged_bytes()))
        hidden = torch.randn(1, 32)

        def call(experts):
            index = torch.tensor([experts])
            with torch.no_grad():
                return b.module(hidden, index, torch.full((1, len(experts)), 1.0 / len(experts)))

        for pair in ([0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]):
            call(pair)
        four = sorted(b.cached)[-4:]
        two = rt.staged_bytes()
        assert len(four) == 4 and all(e in b.cached for e in four)
        call(four)  # all present, more than the last call
        assert rt.staged_bytes() > two
        assert max(in_use) <= room
    finally:
        tiered.detach(model)


def test_top4_eager_logits_are_bitwise_the_in_memory_models(tmp_path):
    """Four experts per token: the eager kernel sums a token's experts in expert id order, and sums
    of more than two terms depend on their order, so the staged rows must keep the experts'
    ascending order for the logits to be bitwise equal."""
    import transformers as T

    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
        num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, intermediate_size=48,
        num_local_experts=8, num_experts_per_tok=4)).eval()
    model.set_experts_implementation("eager")
    ids = prompt(2, length=3)
    with torch.no_grad():
        want = copy.deepcopy(model)(ids).logits
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        with torch.no_grad():
            got = model(ids).logits
        assert torch.equal(got, want)
    finally:
        tiered.detach(model)


def test_a_call_routed_to_no_expert_matches_the_in_memory_bank(tmp_path):
    """Every token's top_k_index a sentinel (>= the expert count, as expert parallelism masks
    experts of other ranks): no expert is placed, and the eager kernel (the one that masks
    sentinels outside expert parallelism) gives the in-memory result."""
    model = build("mixtral")
    model.set_experts_implementation("eager")
    bank = copy.deepcopy(model.model.layers[0].mlp.experts)
    hidden, weights = torch.randn(3, 32), torch.full((3, 2), 0.5)
    index = torch.full((3, 2), bank.num_experts)
    with torch.no_grad():
        want = bank(hidden, index, weights)
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        with torch.no_grad():
            got = model.model.layers[0].mlp.experts(hidden, index, weights)
        assert torch.equal(got, want)
        assert not model._tiered.banks[0].cached
    finally:
        tiered.detach(model)


def test_a_staging_is_kept_for_smaller_calls(tmp_path):
    """A call routed to fewer experts than the last reuses its staging (not carved again)."""
    model = build("mixtral")
    tiered.offload(model, device_config(tmp_path, gpu="2MiB"))
    try:
        rt = model._tiered
        b = rt.banks[0]
        hidden = torch.randn(2, 32)
        with torch.no_grad():
            b.module(hidden, torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5))
            staging = rt._staging
            b.module(hidden, torch.tensor([[0, 1], [1, 0]]), torch.full((2, 2), 0.5))
        assert staging is not None and rt._staging is staging
    finally:
        tiered.detach(model)
