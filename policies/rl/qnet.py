"""Persistence shared by the learners: safetensors (numpy arrays) + JSON, written atomically.

(The TD value learner with a target network that lived here was replaced by the
hindsight next-access predictor, :mod:`.predictor`: its labels are observed,
not bootstrapped, so it needs no target network. The networks are numpy now:
nothing here imports torch.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def save_safetensors_json(path: str | os.PathLike, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """``path``.safetensors + ``path``.json, each written temp -> fsync -> rename -> fsync dir."""
    from safetensors.numpy import save as st_save

    base = Path(path)
    _write_atomic(_with(base, ".safetensors"), st_save(tensors))
    _write_atomic(_with(base, ".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def _with(base: Path, suffix: str) -> Path:
    """``base`` + ``suffix``, with a ``.json``/``.safetensors`` suffix of ``base`` replaced; any other
    dot stays part of the name ("agents.v1" -> "agents.v1.json", not "agents.json")."""
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    return base.with_name(base.name + suffix)


def load_safetensors_json(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load as st_load

    base = Path(path)
    meta_path, weights_path = _with(base, ".json"), _with(base, ".safetensors")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return st_load(weights_path.read_bytes()), meta


def _write_atomic(path: Path, data: bytes) -> None:
    # policies/ may not import tiered (layering), so this is the few lines of
    # tiered.atomic's recipe: temp file, fsync, rename, fsync the directory.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
