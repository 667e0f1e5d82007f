"""Load a model straight from its ``.safetensors`` files, without loading it into RAM.

The model is built with its parameters on the meta device (buffers, which
are small and often computed in ``__init__``, stay real), and every tensor
inside the checkpoint files becomes the storage-tier home of its parameter:
the store reads it in place with O_DIRECT at its offset. Nothing is copied to
an offload folder first (Accelerate's ``disk_offload`` writes the whole model
to ``.dat`` files, and often loads it into RAM to do so).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import offload_life
from .offload import OffloadError, _model_prefix, offload
from .store import TieredStore

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are inside a safetensors file."""

    path: str
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_index(path: str | os.PathLike) -> dict[str, TensorLocation]:
    """Name -> location of every tensor in one ``.safetensors`` file (reads only its header)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise OffloadError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise OffloadError(f"{path}: safetensors header of {n} bytes is implausibly large")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise OffloadError(f"{path}: safetensors header is not valid JSON ({e})") from e
    size = os.stat(path).st_size
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
        except KeyError as e:
            raise OffloadError(f"{path}: tensor {name!r} has an unsupported or missing field {e}") from e
        if not 0 <= begin <= end or base + end > size:
            raise OffloadError(f"{path}: tensor {name!r} lies outside the file ({begin}..{end})")
        out[name] = TensorLocation(path, base + begin, end - begin, dtype, shape)
    return out


def checkpoint_index(model_dir: str | os.PathLike) -> dict[str, TensorLocation]:
    """All tensors of a model folder: ``model.safetensors`` or the shards of its index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [model_dir / f for f in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths:
        raise OffloadError(f"{model_dir}: no .safetensors files (and no model.safetensors.index.json)")
    out: dict[str, TensorLocation] = {}
    for p in paths:
        out.update(read_safetensors_index(p))
    return out


@contextlib.contextmanager
def init_empty_weights():
    """Create parameters on the meta device (no memory); buffers stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # re-registering (tying) keeps the object
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _lookup(name: str, index: dict[str, TensorLocation], prefix: str) -> TensorLocation | None:
    for cand in (name, f"{prefix}.{name}" if prefix else None,
                 name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
        if cand and cand in index:
            return index[cand]
    return None


def from_pretrained(model_dir: str | os.PathLike, config=None, *, model_cls=None, units=None,
                    store: TieredStore | None = None, device=None, share: int | str | None = None) -> nn.Module:
    """Build a transformers model from ``model_dir`` with its weights served from the
    checkpoint files in place, streamed through the forward like :func:`tiered.offload`.

    ``model_cls``: a transformers class (default: ``AutoModelForCausalLM`` when the
    config's architecture is a causal LM, else ``AutoModel``). ``share``: the model's
    compute budget, as for :func:`tiered.offload`.
    """
    model = _empty_model(model_dir, model_cls)
    index = checkpoint_index(model_dir)
    # the model's own prefix in its external keys: two models of one checkpoint in one store
    # are apart (detach deletes its keys; training writes new versions of them)
    model._tiered_prefix = _model_prefix(model)
    owns = store is None
    if owns:
        offload_life.collect()  # models dropped without detach give back their handles first
        store = TieredStore.shared(config)
    external: dict[int, str] = {}  # id(parameter) -> its key, registered in the store
    try:
        _register_weights(model, model_dir, index, store, external)
        # offload closes nothing it was handed when it fails: the store is closed below, once
        return offload(model, store=store, units=units, device=device, share=share, _external=external,
                       _owns_store=owns)
    except BaseException:
        try:
            for key in external.values():  # registered for this model only
                if key in store:
                    store.delete(key)
        finally:
            if owns:
                store.close()
        raise


def _empty_model(model_dir, model_cls) -> nn.Module:
    """The model ``model_dir``'s config describes, on the meta device, in eval mode; ``model_cls``
    default: the class the checkpoint was saved from, when transformers has it."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir)
    if model_cls is None:
        import transformers

        archs = getattr(hf_config, "architectures", None) or []
        model_cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        if model_cls is None:
            model_cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    with init_empty_weights():
        model = (model_cls.from_config(hf_config) if hasattr(model_cls, "from_config")
                 else model_cls(hf_config))
        model.tie_weights()
    return model.eval()


def _register_weights(model: nn.Module, model_dir, index, store: TieredStore, external: dict[int, str]) -> None:
    """Each parameter's tensor in the checkpoint registered in ``store`` as an external object
    (``external``: id(parameter) -> key, filled as it goes so a failure can undo it); persistent
    buffers saved in the checkpoint are small and loaded."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in external:
            continue
        loc = _lookup(name, index, prefix)
        if loc is None:
            missing.append(name)
            continue
        if loc.shape != tuple(p.shape):
            raise OffloadError(f"{loc.path}: {name} has shape {loc.shape}, the model expects {tuple(p.shape)}")
        key = _external_key(model, loc, name)
        store.register_external(key, loc.path, loc.offset, loc.nbytes, loc.dtype, loc.shape)
        external[id(p)] = key
        if p.dtype != loc.dtype:  # the checkpoint's dtype is what is read in place
            p.data = torch.empty(p.shape, dtype=loc.dtype, device="meta")
    # tied parameters appear under several names; only those with no copy anywhere are missing
    missing = [n for n in missing if id(model.get_parameter(n)) not in external]
    if missing:
        raise OffloadError(f"{model_dir}: no tensor in the checkpoint for parameters {missing[:8]}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for name, buf in model.named_buffers():
        loc = _lookup(name, index, prefix)
        if loc is not None and loc.shape == tuple(buf.shape):
            _load_buffer(store, _external_key(model, loc, name), buf, loc, model._tiered_prefix)


def _external_key(model: nn.Module, loc: TensorLocation, name: str) -> str:
    return f"{model._tiered_prefix}/ckpt/{Path(loc.path).name}/{name}"


def _load_buffer(store: TieredStore, key: str, buf: torch.Tensor, loc: TensorLocation, owner: str) -> None:
    """Copy a persistent buffer out of the checkpoint (registered only for this read)."""
    store.register_external(key, loc.path, loc.offset, loc.nbytes, loc.dtype, loc.shape)
    try:
        buf.copy_(store.get(key, owner=owner).result(timeout=600))
    finally:
        store.delete(key)
