"""Helpers shared by the learners: one torch thread per call, safetensors + JSON persistence.

(The TD value learner with a target network that lived here was replaced by the
hindsight next-access predictor, :mod:`.predictor`: its labels are observed,
not bootstrapped, so it needs no target network.)

Torch runs on one thread inside every call (restored afterwards): decisions
are microseconds of work and must not fight the store's workers for cores.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the duration (tiny nets gain nothing from more)."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def save_safetensors_json(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``path``.safetensors + ``path``.json, each written temp -> fsync -> rename -> fsync dir."""
    from safetensors.torch import save as st_save

    base = Path(path)
    _write_atomic(_with(base, ".safetensors"), st_save(tensors))
    _write_atomic(_with(base, ".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def _with(base: Path, suffix: str) -> Path:
    """``base`` + ``suffix``, with a ``.json``/``.safetensors`` suffix of ``base`` replaced; any other
    dot stays part of the name ("agents.v1" -> "agents.v1.json", not "agents.json")."""
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    return base.with_name(base.name + suffix)


def load_safetensors_json(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load as st_load

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
