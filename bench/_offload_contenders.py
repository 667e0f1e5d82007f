"""The contenders of ``bench/offload_inference.py``, each loaded in its own child process from
the same safetensors files: the model in RAM, tiered, Accelerate (disk offload from its own
folder or from the safetensors in place; cpu offload) and DeepSpeed ZeRO-Inference. A loader
returns (model, offload-counter snapshot or None, info)."""

from __future__ import annotations

import os


def _load_memory(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    # transformers may leave the weights as views of the mmap'ed checkpoint (page cache, evictable):
    # give every tensor its own anonymous memory, so that this is the model truly in RAM
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    return model.eval(), None, {}


def _tiered_config(spec: dict) -> dict:
    store = os.path.join(spec["work_dir"], "tiered-store")
    os.makedirs(store, exist_ok=True)
    cfg = {"tiers": {"host": {"capacity": spec["budget"]},
                     "nvme": {"path": store, "capacity": 1 << 30}}}
    engine = {k: spec[k] for k in ("workers", "chunk") if spec.get(k)}
    if engine:
        cfg["engine"] = engine
    if spec.get("lookahead") is not None:
        cfg["offload"] = {"lookahead": spec["lookahead"]}
    if spec.get("two_tiers"):  # a second, empty storage tier: the governor has a choice to make
        flash = os.path.join(spec["work_dir"], "tiered-store-flash")
        os.makedirs(flash, exist_ok=True)
        cfg["tiers"]["flash"] = {"path": flash, "capacity": 1 << 30}
        cfg["policy"] = {"migration": spec.get("migration", "none")}
    return cfg


def _patch_diagnostics(spec: dict) -> None:
    """The diagnostic monkeypatches a tiered variant asks for (this child process only)."""
    if spec.get("diag_no_crc") or spec.get("nocrc"):  # diagnostic only: what the crc32 of every read costs
        import tiered.store as _store

        class _NoCrc:
            def __getattr__(self, name):
                import zlib

                return getattr(zlib, name)

            @staticmethod
            def crc32(*_a, **_k):
                return 0

        _store.zlib = _NoCrc()
    if spec.get("force_lookahead") is not None:  # diagnostic only: overlap at a budget the planner refuses
        from tiered.offload import OffloadedModule

        plan = OffloadedModule.plan_budget
        want = int(spec["force_lookahead"])

        def forced(self) -> None:
            plan(self)
            self.lookahead = self.stats.lookahead = want
            self._resident_budget = 0  # a prefetch that does not fit is skipped (read on demand)

        OffloadedModule.plan_budget = forced


def _load_tiered(spec: dict):
    import tiered

    _patch_diagnostics(spec)
    model = tiered.from_pretrained(spec["model_dir"], _tiered_config(spec))
    model.eval()
    rt = model._tiered
    info = {
        "budget": spec["budget"],
        "units": [{"name": u.name, "nbytes": u.nbytes, "resident": u.resident, "objects": len(u.keys)}
                  for u in rt.units],
        "engine": {"workers": rt.store.engine.workers, "chunk": rt.store.engine.chunk,
                   "backend": rt.store.engine.backend.name},
        "arena_hugepages": rt.store.arena.stats().hugepages,
    }

    def snapshot() -> dict:
        s = tiered.offload_stats(model)
        s["bytes_read_total"] = sum(s["bytes_read"].values())
        s["prefetch_hits"] = rt.stats.prefetch_hits  # as_dict() only has the rate
        s["stall_seconds"] = rt.stats.stall_seconds  # unrounded
        s["governor"] = rt.store.stats()["governor"]
        return s

    return model, snapshot, info


def _accelerate_meta_model(spec: dict):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(spec["model_dir"])
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) real
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def _load_accelerate_disk(spec: dict):
    from accelerate import disk_offload

    offload_dir = os.path.join(spec["work_dir"], "accelerate-offload")
    if not os.path.isfile(os.path.join(offload_dir, "index.json")):
        raise RuntimeError(f"{offload_dir} was not prepared (run the accelerate_prep step)")
    model = _accelerate_meta_model(spec)
    disk_offload(model, offload_dir, execution_device="cpu")
    return model, None, {"offload_dir": offload_dir}


def _load_accelerate_disk_st(spec: dict):
    from accelerate import dispatch_model

    from tiered.pretrained import checkpoint_index

    model = _accelerate_meta_model(spec)
    index = {name: {"safetensors_file": loc.path, "weight_name": name, "dtype": str(loc.dtype).split(".")[-1]}
             for name, loc in checkpoint_index(spec["model_dir"]).items()}
    dispatch_model(model, device_map={"": "disk"}, main_device="cpu", offload_index=index)
    return model, None, {"offload_index": "safetensors files in place"}


def _load_accelerate_cpu(spec: dict):
    from accelerate import cpu_offload

    model, _, _ = _load_memory(spec)
    cpu_offload(model, execution_device="cpu")
    return model, None, {}


def _load_deepspeed(spec: dict):
    """ZeRO-Inference: ZeRO-3 with parameters offloaded to NVMe (best effort; CPU accelerator here)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.integrations import HfDeepSpeedConfig
    except ImportError:  # older transformers
        from transformers.deepspeed import HfDeepSpeedConfig
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    nvme = os.path.join(spec["work_dir"], "deepspeed-nvme")
    os.makedirs(nvme, exist_ok=True)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": True,
                              "buffer_count": 5, "buffer_size": max(spec["largest_tensor_elems"] + 1, int(1e8))},
            "stage3_param_persistence_threshold": 0,
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 32, "thread_count": 4, "single_submit": False,
                "overlap_events": True},
    }
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive while from_pretrained runs
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    engine = deepspeed.initialize(model=model, config_params=ds_config)[0]
    engine.module.eval()
    return engine.module, None, {"ds_config": ds_config, "deepspeed_version": deepspeed.__version__,
                                 "_keep": hf_ds}


LOADERS = {
    "memory": _load_memory, "tiered": _load_tiered, "accelerate_disk": _load_accelerate_disk,
    "accelerate_disk_st": _load_accelerate_disk_st, "accelerate_cpu": _load_accelerate_cpu,
    "deepspeed": _load_deepspeed,
}
