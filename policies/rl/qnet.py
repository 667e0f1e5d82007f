"""A small DQN-style value learner: MLP, experience replay, target network.

Each transition says: from state s, after a byte-clock distance d (in
fast-tier capacities) the object either was accessed (hit = 1) or was
still idle at the horizon (hit = 0, s' its state then); the target is
gamma^d * (hit + has_next * Q_target(s')), with Q_target a periodically
synced copy of the network, as in DQN. Censored samples always bootstrap
(has_next = 1), so an object that never returns is learned about without
waiting for the end of the trace. The
network regresses log(1 + Q) so that hot objects (Q in the hundreds) and
dead ones (Q ~ 0) share one well-conditioned output.

Torch runs on one thread inside every call (restored afterwards): decisions
are microseconds of work and must not fight the store's workers for cores.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LearnerConfig:
    n_features: int
    hidden: int = 64
    lr: float = 1e-3
    batch: int = 128
    replay: int = 65536
    target_every: int = 250  # gradient steps between target-network syncs
    seed: int = 0


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


class MLP(nn.Module):
    """Two hidden ReLU layers; forward by plain ``addmm`` calls (no per-layer module dispatch),
    which is most of the cost at this size."""

    def __init__(self, cfg: LearnerConfig, gen: torch.Generator | None = None) -> None:
        super().__init__()
        dims = [cfg.n_features, cfg.hidden, cfg.hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / fan_in ** 0.5
            w = (torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound
            b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weights, self.biases
        h = torch.relu(torch.addmm(b[0], x, w[0]))
        h = torch.relu(torch.addmm(b[1], h, w[1]))
        return torch.addmm(b[2], h, w[2])[:, 0]


class Replay:
    """Ring buffer of (s, discount, hit, s', has_next) transitions, numpy-backed."""

    def __init__(self, capacity: int, n_features: int, rng: np.random.Generator) -> None:
        self.s = np.zeros((capacity, n_features), np.float32)
        self.s2 = np.zeros((capacity, n_features), np.float32)
        self.disc = np.zeros(capacity, np.float32)
        self.hit = np.zeros(capacity, np.float32)
        self.has_next = np.zeros(capacity, np.float32)
        self.capacity = capacity
        self.size = 0
        self.pos = 0
        self.rng = rng

    def add(self, s: np.ndarray, disc: np.ndarray, hit: np.ndarray, s2: np.ndarray, has_next: np.ndarray) -> None:
        n = len(s)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.s[idx] = s
        self.s2[idx] = s2
        self.disc[idx] = disc
        self.hit[idx] = hit
        self.has_next[idx] = has_next
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int) -> tuple[np.ndarray, ...]:
        idx = self.rng.integers(0, self.size, size=n)
        return self.s[idx], self.disc[idx], self.hit[idx], self.s2[idx], self.has_next[idx]


class ValueLearner:
    """Q-network + target network + replay; ``value`` is batched and autograd-free."""

    def __init__(self, cfg: LearnerConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        with one_thread():
            # seeded init, independent of the global RNG state
            self.net = MLP(cfg, torch.Generator().manual_seed(cfg.seed))
            self.target = MLP(cfg)
            self.target.load_state_dict(self.net.state_dict())
            self.target.requires_grad_(False)
            self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, foreach=True)
        self.replay = Replay(cfg.replay, cfg.n_features, self.rng)
        self.steps = 0
        self.transitions = 0

    # -- inference ------------------------------------------------------------------
    def value(self, x: np.ndarray) -> np.ndarray:
        """Q for each row of ``x`` (float32, (n, n_features)), as float64 numpy."""
        with one_thread(), torch.inference_mode():
            z = self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return np.expm1(np.maximum(z.numpy().astype(np.float64), 0.0))

    # -- learning -------------------------------------------------------------------
    def add(self, s: np.ndarray, disc: np.ndarray, hit: np.ndarray, s2: np.ndarray, has_next: np.ndarray) -> None:
        """Transitions with target ``disc * (hit + has_next * Q_target(s2))``."""
        self.replay.add(s, disc, hit, s2, has_next)
        self.transitions += len(s)

    def train_step(self) -> float:
        """One minibatch TD update; returns the loss (nan when the buffer is too small)."""
        if self.replay.size < self.cfg.batch:
            return float("nan")
        s, disc, hit, s2, has_next = self.replay.sample(self.cfg.batch)
        with one_thread():
            s_t = torch.from_numpy(s)
            with torch.no_grad():
                q2 = torch.expm1(self.target(torch.from_numpy(s2)).clamp(min=0.0))
                y = torch.from_numpy(disc) * (torch.from_numpy(hit) + torch.from_numpy(has_next) * q2)
                y = torch.log1p(y)
            z = self.net(s_t)
            loss = nn.functional.smooth_l1_loss(z, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.steps += 1
            if self.steps % self.cfg.target_every == 0:
                self.target.load_state_dict(self.net.state_dict())
        return float(loss.detach())

    # -- persistence ----------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> None:
        own = self.net.state_dict()
        got = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if set(got) != set(own):
            raise ValueError(
                f"{source}: tensors for {prefix!r} are {sorted(got)}; expected {sorted(own)}"
            )
        for k, v in got.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{source}: {prefix}.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        with one_thread():
            self.net.load_state_dict(got)
            self.target.load_state_dict(got)

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def save_safetensors_json(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``path``.safetensors + ``path``.json, each written temp -> fsync -> rename -> fsync dir."""
    from safetensors.torch import save as st_save

    base = Path(path)
    _write_atomic(base.with_suffix(".safetensors"), st_save(tensors))
    _write_atomic(base.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def load_safetensors_json(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load as st_load

    base = Path(path)
    meta_path, weights_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
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
