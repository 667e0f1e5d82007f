"""Hugging Face ``Trainer`` over a model wrapped by ``tiered.offload`` with ``OffloadedAdamW``.

The Trainer clips (``max_grad_norm``), accumulates gradients and steps a scheduler as it does
in memory (``grads="keep"``: gradients wait in ``.grad`` for it), saves checkpoints (the
optimizer state by value, in ``optimizer.pt``) and resumes from one (the weights are loaded
into the store, the optimizer state written to the store as a complete step): losses, gradient
norms and final weights are bitwise those of the same Trainer run in memory with
``torch.optim.AdamW``.
"""

from __future__ import annotations

import pytest
import torch

import tiered
from helpers import TINY_MODEL_MARKS, offload_config, FT_VOCAB, finetune_llama as build
from tiered.optim import OffloadedAdamW, OptimStateError

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(180), *TINY_MODEL_MARKS]

VOCAB = FT_VOCAB
STEPS = 4


DATA = [{"input_ids": x, "labels": x}
        for x in torch.randint(0, VOCAB, (32, 12), generator=torch.Generator().manual_seed(0))]


def args(out):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, weight_decay=0.01, max_grad_norm=0.5, logging_steps=1, save_steps=2,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True)


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * STEPS))


def logs(trainer):
    return [(h["step"], h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def run_offloaded(tmp_path, out, resume=None):
    model = tiered.offload(build(), offload_config(tmp_path / "store", "1MiB", nvme="128MiB", resident=False))
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, model=model, grads="keep") as opt:
            trainer = transformers.Trainer(model=model, args=args(out), train_dataset=DATA,
                                           optimizers=(opt, schedule(opt)))
            trainer.train(resume_from_checkpoint=resume)
            return logs(trainer), model.state_dict()
    finally:
        tiered.detach(model)


def test_trainer_trains_saves_and_resumes_like_in_memory(tmp_path):
    ref = build()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    t_ref = transformers.Trainer(model=ref, args=args(tmp_path / "ref"), train_dataset=DATA,
                                 optimizers=(o_ref, schedule(o_ref)))
    t_ref.train()
    ref_logs, ref_sd = logs(t_ref), ref.state_dict()
    assert len(ref_logs) == STEPS and any(n > 0.5 for _s, _l, n in ref_logs)  # clipping is active

    got, sd = run_offloaded(tmp_path / "a", tmp_path / "off")
    assert got == ref_logs
    for k, v in ref_sd.items():
        assert torch.equal(v, sd[k]), k
    # the checkpoint holds the optimizer state by value, in torch's AdamW layout
    saved = torch.load(tmp_path / "off" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    theirs = torch.load(tmp_path / "ref" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["state"].keys() == theirs["state"].keys()
    for i, st in theirs["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[name], saved["state"][i][name]), (i, name)

    # a new process's view: a fresh model and store, resumed from the step-2 checkpoint
    resumed, sd = run_offloaded(tmp_path / "b", tmp_path / "resumed", resume=str(tmp_path / "off" / "checkpoint-2"))
    assert resumed == ref_logs  # steps 1-2 from the checkpoint's trainer state, 3-4 trained again
    for k, v in ref_sd.items():
        assert torch.equal(v, sd[k]), k


def test_the_default_mode_keeps_gradients_under_a_trainer(tmp_path):
    """Trainer's clipping and accumulation act on .grad, which the default streaming never fills:
    under a Trainer (which calls optimizer.train()) the default mode keeps them in .grad; an
    explicit grads= stays."""
    ref = build()
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01)
    t_ref = transformers.Trainer(model=ref, args=args(tmp_path / "ref"), train_dataset=DATA,
                                 optimizers=(o_ref, schedule(o_ref)))
    t_ref.train()
    model = tiered.offload(build(), offload_config(tmp_path / "store", "1MiB", nvme="128MiB", resident=False))
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, model=model) as opt:
            assert opt.grads == "stream"
            trainer = transformers.Trainer(model=model, args=args(tmp_path / "out"), train_dataset=DATA,
                                           optimizers=(opt, schedule(opt)))
            trainer.train()
            assert opt.grads == "keep"
            assert logs(trainer) == logs(t_ref)
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads="stream", name="explicit") as opt:
            opt.train()
            assert opt.grads == "stream"
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, name="mid-step") as opt:
            x = DATA[0]["input_ids"][None]
            model(input_ids=x, labels=x).loss.backward()
            with pytest.raises(OptimStateError, match=r"train\(\) \(a Trainer starting\) between a backward and step"):
                opt.train()
            opt.step()
    finally:
        tiered.detach(model)


def test_trainer_lora_over_an_offloaded_base_saves_and_resumes(tmp_path):
    """The common fine-tuning run: peft adapters over an offloaded base under a Trainer (the
    adapters are in memory, so the default grads= is fine); checkpoints hold the adapters."""
    peft = pytest.importorskip("peft")

    def lora(base):
        torch.manual_seed(1)
        return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0, init_lora_weights=False))

    ref = lora(build())
    o_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    t_ref = transformers.Trainer(model=ref, args=args(tmp_path / "ref"), train_dataset=DATA,
                                 optimizers=(o_ref, schedule(o_ref)))
    t_ref.train()

    def run(store, out, resume=None):
        base = tiered.offload(build(), offload_config(tmp_path / store, "1MiB", nvme="128MiB", resident=False))
        model = lora(base)
        try:
            with OffloadedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, model=model) as opt:
                trainer = transformers.Trainer(model=model, args=args(out), train_dataset=DATA,
                                               optimizers=(opt, schedule(opt)))
                trainer.train(resume_from_checkpoint=resume)
                return logs(trainer), {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        finally:
            tiered.detach(base)

    got, adapters = run("a", tmp_path / "off")
    assert got == logs(t_ref)
    assert (tmp_path / "off" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed, adapters2 = run("b", tmp_path / "resumed", resume=str(tmp_path / "off" / "checkpoint-2"))
    assert resumed == logs(t_ref)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, adapters[n]) and torch.equal(p, adapters2[n]), n


@pytest.mark.parametrize("grads", ["park", "stream"])
def test_a_clipping_trainer_is_refused_where_gradients_are_not_in_grad(tmp_path, grads):
    model = tiered.offload(build(), offload_config(tmp_path / "store", "1MiB", nvme="128MiB", resident=False))
    try:
        with OffloadedAdamW(model.parameters(), lr=1e-2, model=model, grads=grads) as opt:
            trainer = transformers.Trainer(model=model, args=args(tmp_path / "out"), train_dataset=DATA,
                                           optimizers=(opt, schedule(opt)))
            with pytest.raises(OptimStateError, match=rf"max_grad_norm=0.5 clips .grad, but with grads='{grads}'"):
                trainer.train()
    finally:
        tiered.detach(model)
