"""Expert units of mixture-of-experts models: recognised by structure, bitwise parity with the
in-memory model (forward and ``generate``, batch 1 and 2) on several transformers MoE
architectures and expert kernels, only routed experts read, detach restoring the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tiered
from helpers import offload_config
from tiered import OffloadError
from tiered.config import ConfigError, load_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_intra_op_thread")]

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def build(arch: str, seed: int = 0, layers: int = 2, experts: int = 8, paged: bool = False):
    """A tiny seeded model of a transformers MoE architecture (top-2 of ``experts``), eval mode.
    ``paged``: each expert's slices are whole pages (hidden and expert width 64, fp32), so experts
    are read straight into their slabs instead of through the host tier."""
    import transformers as T

    if paged:
        if arch != "mixtral":
            raise ValueError("paged models are built for mixtral")
        torch.manual_seed(seed)
        m = T.MixtralForCausalLM(T.MixtralConfig(
            hidden_size=64, intermediate_size=64, num_local_experts=experts, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
            num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
        with torch.no_grad():
            m.model.embed_tokens.weight.normal_(0, 1.0)  # routing spread over the experts
        return m
    c = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
             max_position_embeddings=64, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    moe = dict(num_experts_per_tok=2)
    if arch == "mixtral":
        model = T.MixtralForCausalLM, T.MixtralConfig(intermediate_size=48, num_local_experts=experts, **moe, **c)
    elif arch == "qwen2_moe":
        model = T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=experts,
            decoder_sparse_step=1, mlp_only_layers=[], **moe, **c)
    elif arch == "qwen3_moe":
        model = T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, num_experts=experts, head_dim=8, decoder_sparse_step=1,
            mlp_only_layers=[], **moe, **c)
    elif arch == "olmoe":
        model = T.OlmoeForCausalLM, T.OlmoeConfig(intermediate_size=24, num_experts=experts, **moe, **c)
    else:  # shared + routed experts, grouped routing, a dense first layer
        c.update(num_key_value_heads=4, num_hidden_layers=layers + 1)
        model = T.DeepseekV3ForCausalLM, T.DeepseekV3Config(
            intermediate_size=48, moe_intermediate_size=24, n_routed_experts=experts, n_group=2, topk_group=1,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, **moe, **c)
    torch.manual_seed(seed)
    cls, cfg = model
    m = cls(cfg).eval()
    with torch.no_grad():  # routers start at zero in some architectures: give them a real choice
        for name, p in m.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return m


def prompt(batch: int, length: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def config(tmp_path, host="2MiB", resident=True, **offload):
    cfg = offload_config(tmp_path, host, nvme="64MiB", resident=resident)
    cfg["offload"].update(offload)
    return cfg


def bank_names(model) -> list[str]:
    return [b.name for b in model._tiered.banks]


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_forward_and_generate(tmp_path, arch):
    model = build(arch)
    ref = copy.deepcopy(model)
    one, two = prompt(1), prompt(2)
    with torch.no_grad():
        want_logits = ref(two).logits
        want_one = ref.generate(one, max_new_tokens=6, do_sample=False)
        want_two = ref.generate(two, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(two))
    tiered.offload(model, config(tmp_path))
    try:
        assert bank_names(model) and all(n.endswith("mlp.experts") for n in bank_names(model))
        with torch.no_grad():
            assert torch.equal(model(two).logits, want_logits)
            assert torch.equal(model.generate(one, max_new_tokens=6, do_sample=False), want_one)
            got = model.generate(two, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(two))
        assert torch.equal(got, want_two)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["routed"] > 0 and sum(ex["hits"].values()) == ex["routed"]
        # the layer units no longer hold the experts
        unit_params = {id(s.tensor()) for u in model._tiered.units for s in u.slots}
        assert not any(id(b.module._parameters[a]) in unit_params for b in model._tiered.banks for a in b.attrs)
    finally:
        tiered.detach(model)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("batch", [1, 2])
def test_parity_reading_experts_straight_into_slabs(tmp_path, batch):
    model = build("mixtral", layers=3, paged=True)
    ref = copy.deepcopy(model)
    ids = prompt(batch, length=3)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=mask)
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        assert all(b.direct for b in rt.banks) and rt.pools
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=mask)
        assert torch.equal(got, want)
        ex = tiered.offload_stats(model)["experts"]
        assert ex["hits"]["host"] == 0 and ex["hits"]["storage"] > 0 and ex["hits"]["prefetched"] > 0
    finally:
        tiered.detach(model)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kernel", ["eager", "batched_mm", "grouped_mm"])
def test_parity_every_experts_kernel(tmp_path, kernel):
    model = build("qwen2_moe")
    model.set_experts_implementation(kernel)
    ref = copy.deepcopy(model)
    ids = prompt(2)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
    tiered.offload(model, config(tmp_path))
    try:
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(got, want)
    finally:
        tiered.detach(model)


class FusedExperts(nn.Module):
    """Not a transformers class: fused [E, ...] experts with biases, called like transformers' ones."""

    def __init__(self, num: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(num, inter, hidden) * 0.3)
        self.up_bias = nn.Parameter(torch.randn(num, inter) * 0.1)
        self.down = nn.Parameter(torch.randn(num, hidden, inter) * 0.3)

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in torch.unique(top_k_index).tolist():
            rows, slot = torch.where(top_k_index == e)
            h = torch.relu(hidden[rows] @ self.up[e].t() + self.up_bias[e]) @ self.down[e].t()
            out.index_add_(0, rows, h * top_k_weights[rows, slot, None])
        return out


class Router(nn.Module):
    def __init__(self, num: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, hidden))
        self.top_k = 2

    def forward(self, x):
        logits = x @ self.weight.t()
        w, i = torch.topk(logits.softmax(-1), 2, dim=-1)
        return logits, w, i


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.router = Router(6, 16)
        self.experts = FusedExperts(6, 16, 8)

    def forward(self, x):
        h = self.norm(x)
        _, w, i = self.router(h)
        return x + self.experts(h, i, w)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_recognised_by_structure_not_class_name(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = ref(x)
    tiered.offload(model, config(tmp_path))
    try:
        rt = model._tiered
        assert [b.name for b in rt.banks] == [f"blocks.{i}.experts" for i in range(3)]
        assert all(b.router is model.blocks[b.index].router for b in rt.banks)
        assert [b.attrs for b in rt.banks][0] == ["up", "up_bias", "down"]
        with torch.no_grad():
            assert torch.equal(model(x), want)
            assert torch.equal(model(x), want)
        assert torch.isnan(model.blocks[0].experts.up).all()  # outside the bank's forward: a placeholder
    finally:
        tiered.detach(model)
    assert torch.equal(model.blocks[1].experts.down, ref.blocks[1].experts.down)


def test_experts_false_keeps_whole_layer_units(tmp_path):
    model = build("mixtral")
    ref = copy.deepcopy(model)
    ids = prompt(1)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=4, do_sample=False)
    tiered.offload(model, config(tmp_path, experts=False))
    try:
        assert model._tiered.banks == []
        assert "experts" not in tiered.offload_stats(model)
        with torch.no_grad():
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)
    finally:
        tiered.detach(model)


def test_experts_true_without_moe_is_refused(tmp_path):
    from helpers import tiny_llama

    model = tiny_llama(layers=2)
    with pytest.raises(OffloadError, match="experts = true"):
        tiered.offload(model, config(tmp_path, experts=True))
    assert getattr(model, "_tiered", None) is None


def test_config_key_experts(tmp_path):
    def with_experts(value):
        return load_config({**config(tmp_path), "offload": {"experts": value}})

    assert with_experts("auto").offload.experts is None
    assert with_experts(False).offload.experts is False
    assert with_experts("auto").to_dict()["offload"]["experts"] == "auto"
    with pytest.raises(ConfigError, match="offload.experts"):
        with_experts("yes")


def test_grad_enabled_forward_is_refused_with_a_clear_error(tmp_path):
    model = build("olmoe")
    tiered.offload(model, config(tmp_path))
    try:
        with pytest.raises(OffloadError, match="serve inference"):
            model(prompt(1))
        with torch.no_grad():
            model(prompt(1))  # the interrupted forward left nothing behind
    finally:
        tiered.detach(model)


def test_state_dict_reads_the_real_experts(tmp_path):
    model = build("qwen2_moe")
    want = {k: v.clone() for k, v in model.state_dict().items()}
    tiered.offload(model, config(tmp_path))
    try:
        got = model.state_dict()
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        sub = model.model.layers[1].mlp.state_dict()  # a submodule: the same real values
        assert torch.equal(sub["experts.down_proj"], want["model.layers.1.mlp.experts.down_proj"])
    finally:
        tiered.detach(model)


class PerHead(nn.Module):
    """Not experts: per-head projections ([heads, ...] 3-D parameters), every head used, called
    with the positions of the tokens to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 16, 16))
        self.w2 = nn.Parameter(torch.randn(4, 16, 16))

    def forward(self, x, keep):
        h = torch.einsum("td,hed->the", x[keep], self.w1).relu()
        return torch.einsum("the,hde->td", h, self.w2)


class PerHeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.body, self.out = nn.Linear(16, 16), PerHead(), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.body(self.inp(x), torch.arange(0, x.shape[0], 2)))


def test_auto_leaves_modules_not_called_like_fused_experts(tmp_path):
    torch.manual_seed(0)
    model = PerHeadNet().eval()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 16)
    with torch.no_grad():
        want = ref(x)
    tiered.offload(model, config(tmp_path))
    try:
        assert model._tiered.banks == []
        with torch.no_grad():
            assert torch.equal(model(x), want)
    finally:
        tiered.detach(model)


def test_llama4_experts_called_without_routing_keep_whole_layer_units(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Llama4TextConfig(
        hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, num_hidden_layers=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, moe_layers=[0, 1])
    model = T.Llama4ForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    ids = prompt(1)
    with torch.no_grad():
        want = ref(ids).logits
    tiered.offload(model, config(tmp_path))
    try:
        assert model._tiered.banks == []
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
    finally:
        tiered.detach(model)


def test_bank_called_with_a_bad_index_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    model = Net()
    tiered.offload(model, config(tmp_path))
    try:
        experts, x = model.blocks[1].experts, torch.randn(5, 16)
        _, w, i = model.blocks[1].router(x)
        with torch.no_grad():
            with pytest.raises(OffloadError, match=r"'blocks\.1\.experts'.*integer"):
                experts(x, i.float(), w)
            with pytest.raises(OffloadError, match=r"'blocks\.1\.experts'.*shape"):
                experts(x, i[:3], w)
            experts(x, i, w)  # the refused calls left nothing bound
    finally:
        tiered.detach(model)


def test_load_state_dict_with_experts_is_refused_before_anything_is_written(tmp_path):
    model, other = build("mixtral"), build("mixtral", seed=5)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    new = other.state_dict()
    tiered.offload(model, config(tmp_path))
    try:
        with pytest.raises(OffloadError, match=r"expert bank 'model\.layers\.0\.mlp\.experts'"):
            model.load_state_dict(new)
        with pytest.raises(OffloadError, match=r"expert bank 'model\.layers\.1\.mlp\.experts'"):
            model.model.layers[1].mlp.experts.load_state_dict({"down_proj": new["model.layers.1.mlp.experts.down_proj"]},
                                                              strict=False)
        got = model.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        rest = {k: v for k, v in new.items() if ".experts." not in k}  # the other weights still load
        model.load_state_dict(rest, strict=False)
        assert torch.equal(model.state_dict()["model.layers.0.mlp.gate.weight"], new["model.layers.0.mlp.gate.weight"])
    finally:
        tiered.detach(model)


def tied_net() -> tuple[Net, Net]:
    """Net whose first two experts modules share their parameters, and an in-memory copy."""
    torch.manual_seed(0)
    model = Net()
    for a in ("up", "up_bias", "down"):
        setattr(model.blocks[1].experts, a, getattr(model.blocks[0].experts, a))
    return model, copy.deepcopy(model)


def test_experts_sharing_parameters_stay_in_units_on_auto(tmp_path):
    model, ref = tied_net()
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = ref(x)
    tiered.offload(model, config(tmp_path))
    try:
        assert bank_names(model) == ["blocks.2.experts"]
        with torch.no_grad():
            assert torch.equal(model(x), want)
    finally:
        tiered.detach(model)
    assert model.blocks[0].experts.up is model.blocks[1].experts.up
    assert torch.equal(model.blocks[1].experts.up, ref.blocks[1].experts.up)


def test_experts_sharing_parameters_are_refused_when_insisted_on(tmp_path):
    model, ref = tied_net()
    with pytest.raises(OffloadError, match=r"'blocks\.0\.experts'.*'blocks\.1\.experts'"):
        tiered.offload(model, config(tmp_path, experts=True))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
