"""The child process of ``bench/offload_inference.py`` (``--contender NAME --spec FILE --out
FILE``): build the model files, prepare Accelerate's offload folder, or load and measure one
contender; the result goes to ``--out`` as JSON."""

from __future__ import annotations

import json
import os
import shutil

from bench._offload_common import fmt_bytes, log
from bench._offload_contenders import LOADERS
from bench._offload_measure import Phase, measure, peak_rss


def run_contender(name: str, spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.manual_seed(0)
    res: dict = {"contender": name, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}
    try:
        if name == "build":
            res.update(_build(spec))
        elif name == "accelerate_prep":
            res.update(_accelerate_prep(spec))
        else:
            log(f"{spec.get('label', name)}: loading")
            with Phase() as ph:
                model, snapshot, info = LOADERS[name](spec)
            info.pop("_keep", None)
            res.update(load_s=ph.seconds, load_read_bytes=ph.read_bytes, load_cpu_s=ph.cpu, info=info)
            log(f"{spec.get('label', name)}: loaded in {ph.seconds:.2f} s (read {fmt_bytes(ph.read_bytes)})")
            res.update(measure(model, snapshot, spec, name))
            if name == "tiered":
                res["store_engine"] = model._tiered.store.stats().get("engine")
                # not tiered.detach(): it would materialize the whole model, which does not fit
                model._tiered.remove_hooks()
                model._tiered.release_all()
                model._tiered.store.close()
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the result
        import traceback

        traceback.print_exc()
        res.update(ok=False, error=f"{type(e).__name__}: {e}")
    res["peak_rss_bytes"] = peak_rss()
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0 if res["ok"] else 1


def _build(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**spec["llama"], max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    log(f"build: initializing the model ({fmt_bytes(spec['model_bytes'])} fp32)")
    with Phase() as ph:
        model = LlamaForCausalLM(cfg).eval()
    init_s = ph.seconds
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"build: saving safetensors to {spec['model_dir']}")
    with Phase() as ph:
        model.save_pretrained(spec["model_dir"], safe_serialization=True, max_shard_size="100GB")
        os.sync()
    return {"init_s": init_s, "save_s": ph.seconds, "param_bytes": n}


def _accelerate_prep(spec: dict) -> dict:
    """Accelerate's offload folder (``offload_weight`` per tensor + ``index.json``), streamed
    tensor by tensor from the safetensors so that it runs under the memory limit."""
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    from tiered.pretrained import checkpoint_index

    out = os.path.join(spec["work_dir"], "accelerate-offload")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    index: dict = {}
    locs = checkpoint_index(spec["model_dir"])
    by_file: dict[str, list[str]] = {}
    for name, loc in locs.items():
        by_file.setdefault(loc.path, []).append(name)
    with Phase() as ph:
        done = 0
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    offload_weight(t, name, out, index=index)
                    del t
                    done += 1
                    if done % 20 == 0:
                        log(f"accelerate_prep: {done}/{len(locs)} tensors")
        save_offload_index(index, out)
        os.sync()
    return {"prep_s": ph.seconds, "prep_read_bytes": ph.read_bytes, "tensors": len(index)}
