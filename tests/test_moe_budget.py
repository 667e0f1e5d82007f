"""Expert units under tight budgets: only routed experts are read, wrong predictions cost reads but
never change a token, a room smaller than one layer's experts works, the cache keeps the experts
routed to most, and budgets too small for one token's experts are refused with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

import tiered
from test_moe_offload import build, config, prompt
from tiered import OffloadError

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_intra_op_thread")]


def storage_reads(model) -> list[tuple[str, int]]:
    """(key, bytes) of every read from a storage tier from now on (host-tier hits excluded)."""
    seen: list[tuple[str, int]] = []
    model._tiered.store.add_listener(
        lambda ev: ev.op in ("read", "prefetch") and ev.tier != "host" and seen.append((ev.key, ev.nbytes)))
    return seen


def routing(model) -> list[tuple[int, set[int]]]:
    """(bank index, experts chosen) of every bank call from now on, as the model's router chose."""
    calls: list[tuple[int, set[int]]] = []
    for b in model._tiered.banks:
        def hook(_m, args, kwargs, b=b):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            calls.append((b.index, set(torch.unique(index).tolist())))
        b.module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


class WrongGuess(torch.nn.Module):
    """A predictor that picks the experts the router likes least."""

    def __init__(self, router) -> None:
        super().__init__()
        self.router = router

    def forward(self, x):
        logits, weights, index = self.router(x)
        return logits, weights, torch.topk(-logits, index.shape[-1], dim=-1).indices


def test_only_routed_experts_are_read(tmp_path):
    model = build("mixtral", layers=3)
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        for b in rt.banks:
            b.predictor = None  # demand reads only: what is read is what was routed
        reads, calls = storage_reads(model), routing(model)
        with torch.no_grad():
            model(prompt(1, length=1))
        expert_reads = [(k, n) for k, n in reads if "/expert" in k]
        routed = {rt.banks[i].keys[e] for i, chosen in calls for e in chosen}
        assert len(calls) == 3 and all(len(chosen) == 2 for _i, chosen in calls)
        assert sorted(k for k, _n in expert_reads) == sorted(routed)  # each routed expert once, nothing else
        assert sum(n for _k, n in expert_reads) == len(routed) * rt.banks[0].nbytes
        ex = tiered.offload_stats(model)["experts"]
        assert ex["hits"]["storage"] == 6 and ex["routed"] == 6 and ex["tokens"] == 1
        reads.clear()
        with torch.no_grad():  # the same token again: its experts are present, used in place
            model(prompt(1, length=1))
        assert not [k for k, _n in reads if "/expert" in k]
        assert tiered.offload_stats(model)["experts"]["hits"]["compute"] == 6
    finally:
        tiered.detach(model)


def test_reads_ahead_only_predicted_experts_and_reports_accuracy(tmp_path):
    model = build("qwen3_moe", layers=3)
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        reads, calls = storage_reads(model), routing(model)
        with torch.no_grad():
            model.generate(prompt(1, length=2), max_new_tokens=6, do_sample=False)
        routed = {rt.banks[i].keys[e] for i, chosen in calls for e in chosen}
        read = {k for k, _n in reads if "/expert" in k}
        ex = tiered.offload_stats(model)["experts"]
        # read ahead are only experts the next router picked; most of them it then chose
        assert ex["hits"]["prefetched"] > 0 and ex["prediction"]["predicted"] > 0
        assert ex["prediction"]["precision"] > 0.5
        assert len(read - routed) <= ex["prediction"]["predicted"] - ex["prediction"]["correct"]
        assert sum(ex["hits"].values()) == ex["routed"] == sum(len(c) for _i, c in calls)
        per = ex["per_expert"]
        assert sorted(per) == [b.name for b in rt.banks]
        assert [sum(v["uses"]) for v in per.values()] == [sum(len(c) for i, c in calls if i == j) for j in range(3)]
    finally:
        tiered.detach(model)


def test_wrong_predictions_still_give_identical_tokens(tmp_path):
    model = build("deepseek_v3")
    ref = copy.deepcopy(model)
    ids = prompt(2, length=3)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=mask)
    tiered.offload(model, config(tmp_path, host="600KiB", resident=False))
    try:
        for b in model._tiered.banks:
            b.predictor = WrongGuess(b.predictor)
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=mask)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["prediction"]["predicted"] > 0 and ex["prediction"]["precision"] < 0.5
        assert ex["hits"]["storage"] + ex["hits"]["host"] > 0  # mispredictions were read on demand
    finally:
        tiered.detach(model)


@pytest.mark.parametrize("batch,length,paged", [(1, 2, False), (2, 1, False), (1, 2, True), (2, 1, True)])
def test_room_smaller_than_one_layers_experts(tmp_path, batch, length, paged):
    model = build("mixtral", layers=3, paged=paged, experts=8 if paged else 16)
    ref = copy.deepcopy(model)
    ids = prompt(batch, length=length)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=mask)
    tiered.offload(model, config(tmp_path, host="400KiB" if paged else "250KiB", resident=False))
    try:
        rt = model._tiered
        assert all(b.direct == paged for b in rt.banks)
        one, layer = rt.banks[0].nbytes, rt.banks[0].nbytes * rt.banks[0].num
        room = rt._expert_capacity + rt._expert_prefetch_room
        assert 2 * one <= rt._expert_capacity and room < layer
        committed = []  # pool memory really committed at each bank call, once its experts are in
        for b in rt.banks:
            b.module.register_forward_pre_hook(lambda *_a: committed.append(committed_pool_bytes(rt)))
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=mask)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["evictions"] > 0 and ex["present_bytes"] <= room
        if paged:  # every expert sits in pool memory, all of it charged to the model
            assert 0 < max(committed) <= rt._expert_room.nbytes
    finally:
        tiered.detach(model)


def test_cache_keeps_the_experts_routed_to_most(tmp_path):
    model = build("mixtral")
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        b = rt.banks[0]
        rt._expert_capacity, rt._expert_prefetch_room = 4 * rt._room_bytes(b), 0
        b.direct = False  # the copy path (read through the host tier)
        for routed in [[0, 1]] * 5 + [[2, 3], [4, 5]]:
            rt.load_experts(b, routed)
        # the least recently used would be 0 and 1; the least often routed to are 2 and 3
        assert sorted(b.cached) == [0, 1, 4, 5]
        assert b.reads[0] == 1 and b.uses[0] == 5
        rt.load_experts(b, [2, 6])
        assert sorted(b.cached) == [0, 1, 2, 6]
    finally:
        tiered.detach(model)


def test_budget_below_one_tokens_experts_is_refused(tmp_path):
    model = build("mixtral")
    ref = copy.deepcopy(model)
    with pytest.raises(OffloadError, match="less than the 2 experts"):
        tiered.offload(model, config(tmp_path, host="80KiB", resident=False))
    assert getattr(model, "_tiered", None) is None
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):  # refused before anything moved
        assert torch.equal(p, q), name


def test_call_routing_beyond_the_room_is_refused_clearly(tmp_path):
    model = build("mixtral")
    tiered.offload(model, config(tmp_path, host="110KiB", resident=False))
    try:
        with torch.no_grad(), pytest.raises(OffloadError, match="routes to .* experts .* more than the room"):
            model(prompt(1, length=8))
        with torch.no_grad():  # a single token still fits afterwards
            model(prompt(1, length=1))
    finally:
        tiered.detach(model)


def test_a_failed_expert_load_releases_what_was_read_ahead(tmp_path):
    model = build("qwen3_moe", layers=3)
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        ahead, load, make_room = {}, rt.load_experts, rt._make_expert_room

        def load_spying(b, routed):
            if b.index == 1 and not ahead:
                ahead.update(b.pending)
            return load(b, routed)

        def failing_room(b, n, keep):
            if b.index == 1:
                raise OffloadError("no room")
            return make_room(b, n, keep)

        rt.load_experts, rt._make_expert_room = load_spying, failing_room
        with torch.no_grad(), pytest.raises(OffloadError, match="no room"):
            model(prompt(1, length=1))
        assert ahead, "bank 1 had nothing read ahead"
        for e, f in ahead.items():
            assert f.cancelled() or f.exception(timeout=10) is not None or f.result().tensor is None, e
        assert not rt.banks[1].pending
    finally:
        tiered.detach(model)


def committed_pool_bytes(rt) -> int:
    import os

    return sum(os.fstat(p.fd).st_blocks * 512 for p in rt.pools.values())


def test_giving_the_experts_back_uncommits_their_memory(tmp_path):
    model = build("mixtral", layers=2, paged=True)
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        ids = prompt(2, length=3)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
        assert 0 < committed_pool_bytes(rt) <= rt._expert_room.nbytes  # the pools hold no more than is charged
        assert sum(p.slots * p.slice_bytes for p in rt.pools.values()) <= rt._expert_room.nbytes
        rt.drop_experts()  # what giving the model's memory back does with its experts
        assert rt._expert_room is None and committed_pool_bytes(rt) == 0
        with torch.no_grad():  # and they load again
            model.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))
    finally:
        tiered.detach(model)


def committed_slab_bytes(rt) -> int:
    """Anonymous memory committed in the banks' slabs outside the pools (from /proc/self/smaps)."""
    import re

    spans = [(s.address, s.address + len(s._map)) for b in rt.banks for s in b.slabs.values() if not s.pooled]
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                lo, hi = int(m.group(1), 16), int(m.group(2), 16)
                inside = any(lo < b and hi > a for a, b in spans)
            elif inside and line.startswith("Anonymous:"):
                total += int(line.split()[1]) * 1024
    return total


def test_dropped_experts_leave_no_pages_committed_between_them(tmp_path):
    model = build("mixtral", experts=16)  # down_proj's slice of an expert is not whole pages
    tiered.offload(model, config(tmp_path, host="250KiB", resident=False))
    try:
        rt = model._tiered
        assert any(not s.pooled for b in rt.banks for s in b.slabs.values())
        ids = prompt(2, length=1)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        assert tiered.offload_stats(model)["experts"]["evictions"] > 0
        rt.drop_experts()
        assert committed_slab_bytes(rt) == 0
    finally:
        tiered.detach(model)


def test_offload_failing_after_the_weights_left_gives_them_back(tmp_path, monkeypatch):
    from tiered.offload.runtime import OffloadedModule

    model = build("mixtral")
    ref = copy.deepcopy(model)

    def refuse(_rt):
        raise OffloadError("no room for experts")

    monkeypatch.setattr(OffloadedModule, "hold_expert_room", refuse)  # after units and banks are written
    with pytest.raises(OffloadError, match="no room for experts"):
        tiered.offload(model, config(tmp_path))
    assert getattr(model, "_tiered", None) is None
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


def charged_expert_bytes(rt) -> int:
    """What the model is charged for its experts' memory: the room it holds for them."""
    return rt._expert_room.nbytes if rt._expert_room is not None else 0


def test_experts_not_whole_pages_stay_within_their_charge(tmp_path):
    """Expert memory committed in the slabs (pages touched, pool slots) never exceeds the room
    charged for it; a call needing more than that is refused instead of taking the read-ahead
    room, which holds host copies."""
    model = build("mixtral", layers=3, experts=16)  # down_proj's slice of an expert is 1.5 pages
    ref = copy.deepcopy(model)
    one, two = prompt(1, length=1), prompt(2, length=1)
    with torch.no_grad():
        want = ref.generate(one, max_new_tokens=8, do_sample=False)
    tiered.offload(model, config(tmp_path, host="150KiB", resident=False))
    try:
        rt = model._tiered
        assert any(not s.pooled for b in rt.banks for s in b.slabs.values())
        seen = []  # (committed, charged) at each bank call, once its experts are in
        def measure(*_a):
            seen.append((committed_slab_bytes(rt) + committed_pool_bytes(rt), charged_expert_bytes(rt)))

        for b in rt.banks:
            b.module.register_forward_pre_hook(measure)
        with torch.no_grad():
            assert torch.equal(model.generate(one, max_new_tokens=8, do_sample=False), want)
            # two tokens route to three or four experts: more than the room charged holds
            with pytest.raises(OffloadError, match=r"routes to [34] experts .* more than the room"):
                model.generate(two, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(two))
        assert max(c for c, _ in seen) > 0
        over = [(c, charge) for c, charge in seen if c > charge]
        assert not over, f"experts' memory beyond their charge at {len(over)} of {len(seen)} calls: {over[:3]}"
    finally:
        tiered.detach(model)
