"""Next-access predictor learned online from hindsight labels (LRB-style, multi-horizon).

For a state s of an object (its features at some byte clock c) the network
outputs, for each horizon h_k in :data:`HORIZONS` (fast-tier capacities of
traffic), the logit of P(the object is accessed again before c + h_k). The
labels come from hindsight and are never guessed: when the object is accessed
at distance d, every horizon not yet labelled gets y_k = [d < h_k]; when
horizon h_k passes with no access, y_k = 0 becomes known (a row with only
head k unmasked). So a sample's short horizons are learned from as soon as
they expire, without waiting for its long ones (no survivor bias from
labelling the returning objects first), and each (sample, horizon) pair is
labelled exactly once.

The agents' *value* of an object is the mean over horizons of these
probabilities: a discounted nearness of its next access on a log scale of
distance (1 for "accessed at once", 0 for "not within the longest horizon"),
the quantity Belady's rule ranks by.

Training: masked binary cross-entropy on minibatches drawn from a replay
buffer of labelled rows, Adam; inference batched under ``torch.inference_mode``
on one thread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .qnet import one_thread

#: label horizons, in fast-tier capacities of traffic (byte clock), ascending
HORIZONS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class PredictorConfig:
    n_features: int
    n_heads: int = len(HORIZONS)
    hidden: int = 64
    lr: float = 2e-3
    batch: int = 256
    replay: int = 65536
    seed: int = 0


class HeadsMLP(nn.Module):
    """Two hidden ReLU layers, one logit per horizon; forward by plain ``addmm``."""

    def __init__(self, cfg: PredictorConfig, gen: torch.Generator | None = None) -> None:
        super().__init__()
        dims = [cfg.n_features, cfg.hidden, cfg.hidden, cfg.n_heads]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / fan_in ** 0.5
            self.weights.append(nn.Parameter((torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(fan_out, generator=gen) * 2 - 1) * bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weights, self.biases
        h = torch.relu(torch.addmm(b[0], x, w[0]))
        h = torch.relu(torch.addmm(b[1], h, w[1]))
        return torch.addmm(b[2], h, w[2])


class LabelReplay:
    """Ring buffer of (state, labels per head, mask per head) rows."""

    def __init__(self, capacity: int, n_features: int, n_heads: int, rng: np.random.Generator) -> None:
        self.s = np.zeros((capacity, n_features), np.float32)
        self.y = np.zeros((capacity, n_heads), np.float32)
        self.m = np.zeros((capacity, n_heads), np.float32)
        self.capacity = capacity
        self.size = 0
        self.pos = 0
        self.rng = rng

    def add(self, s: np.ndarray, y: np.ndarray, m: np.ndarray) -> None:
        n = len(s)
        if n > self.capacity:
            s, y, m = s[-self.capacity:], y[-self.capacity:], m[-self.capacity:]
            n = self.capacity
        idx = (self.pos + np.arange(n)) % self.capacity
        self.s[idx] = s
        self.y[idx] = y
        self.m[idx] = m
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = self.rng.integers(0, self.size, size=n)
        return self.s[idx], self.y[idx], self.m[idx]


class HindsightPredictor:
    """Multi-horizon next-access classifier + replay; ``value`` is batched and autograd-free."""

    def __init__(self, cfg: PredictorConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        with one_thread():
            self.net = HeadsMLP(cfg, torch.Generator().manual_seed(cfg.seed))
            self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, foreach=True)
        self.replay = LabelReplay(cfg.replay, cfg.n_features, cfg.n_heads, self.rng)
        self.steps = 0
        self.rows = 0

    def probs(self, x: np.ndarray) -> np.ndarray:
        """P(next access within h_k) per row and horizon, float64 (n, n_heads)."""
        with one_thread(), torch.inference_mode():
            z = self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            p = torch.sigmoid(z)
        return p.numpy().astype(np.float64)

    def value(self, x: np.ndarray) -> np.ndarray:
        """Nearness of the next access in [0, 1]: the mean over horizons of P(access within h_k)."""
        return self.probs(x).mean(axis=1)

    def value_and_rank(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value, rank score): the rank score is the mean logit over horizons, which keeps
        ordering objects whose probabilities are all near 0 (where the value is flat)."""
        with one_thread(), torch.inference_mode():
            z = self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            v = torch.sigmoid(z).mean(dim=1)
            r = z.mean(dim=1)
        return v.numpy().astype(np.float64), r.numpy().astype(np.float64)

    def add(self, s: np.ndarray, y: np.ndarray, m: np.ndarray) -> None:
        self.replay.add(s, y, m)
        self.rows += len(s)

    def train_step(self) -> float:
        if self.replay.size < self.cfg.batch:
            return float("nan")
        s, y, m = self.replay.sample(self.cfg.batch)
        with one_thread():
            z = self.net(torch.from_numpy(s))
            mt = torch.from_numpy(m)
            loss = nn.functional.binary_cross_entropy_with_logits(z, torch.from_numpy(y), weight=mt,
                                                                  reduction="sum") / mt.sum().clamp(min=1.0)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.steps += 1
        return float(loss.detach())

    # -- persistence ----------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in self.net.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> None:
        own = self.net.state_dict()
        got = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if set(got) != set(own):
            raise ValueError(f"{source}: tensors for {prefix!r} are {sorted(got)}; expected {sorted(own)}")
        for k, v in got.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{source}: {prefix}.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        with one_thread():
            self.net.load_state_dict(got)

    def config_dict(self) -> dict:
        return asdict(self.cfg)
