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

The network is a two-hidden-layer MLP in plain numpy (float32): at these sizes
(tens of rows, 64 units) a torch call costs ~4x more than the arithmetic, in
dispatch alone (measured: bench/rl_agents.py's microbench). Training: masked
binary cross-entropy on minibatches drawn from a replay buffer of labelled
rows, gradients by hand, Adam.

Every matrix product is kept at most :data:`GEMM_ONE_THREAD` multiply-adds (rows are processed
in chunks): OpenBLAS, numpy's BLAS, runs a product that small on the calling thread, and a
larger one on a thread pool whose spinning, on a loaded machine, made a 256-row training step
~100x slower (22 ms instead of 0.25 ms, measured on 2 shared cores). Decisions must not fight
the store's workers for cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: label horizons, in fast-tier capacities of traffic (byte clock), ascending
HORIZONS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
#: OpenBLAS computes a GEMM with M*N*K <= 65536 * 4 on one thread (interface/gemm.c)
GEMM_ONE_THREAD = 262144


@dataclass(frozen=True)
class PredictorConfig:
    n_features: int
    n_heads: int = len(HORIZONS)
    hidden: int = 64
    lr: float = 2e-3
    batch: int = 256
    replay: int = 65536
    seed: int = 0


class HeadsMLP:
    """Two hidden ReLU layers, one logit per horizon; ``weights[i]`` is (fan_in, fan_out)."""

    def __init__(self, cfg: PredictorConfig, rng: np.random.Generator) -> None:
        dims = [cfg.n_features, cfg.hidden, cfg.hidden, cfg.n_heads]
        shapes = [s for fi, fo in zip(dims[:-1], dims[1:]) for s in ((fi, fo), (fo,))]
        # every parameter is a view into one flat vector (and every gradient into another), so
        # the optimizer updates them all with a handful of vector operations
        self.flat = np.zeros(sum(int(np.prod(s)) for s in shapes), np.float32)
        self.grad = np.zeros_like(self.flat)
        views, gviews, o = [], [], 0
        for s in shapes:
            k = int(np.prod(s))
            views.append(self.flat[o:o + k].reshape(s))
            gviews.append(self.grad[o:o + k].reshape(s))
            o += k
        self.weights, self.biases = views[0::2], views[1::2]
        self._gw, self._gb = gviews[0::2], gviews[1::2]
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / w.shape[0] ** 0.5
            w[...] = (rng.random(w.shape) * 2 - 1) * bound
            b[...] = (rng.random(b.shape) * 2 - 1) * bound

        widest = max(w.shape[0] * w.shape[1] for w in self.weights)
        self.chunk = max(1, GEMM_ONE_THREAD // widest)  # rows per product (one BLAS thread)

    def params(self) -> list[np.ndarray]:
        return [p for pair in zip(self.weights, self.biases) for p in pair]

    def forward(self, x: np.ndarray) -> np.ndarray:
        c = self.chunk
        if len(x) <= c:
            return self._forward(x)
        return np.concatenate([self._forward(x[i:i + c]) for i in range(0, len(x), c)])

    def _forward(self, x: np.ndarray) -> np.ndarray:
        w, b = self.weights, self.biases
        h = x @ w[0]
        h += b[0]
        np.maximum(h, 0.0, out=h)
        h2 = h @ w[1]
        h2 += b[1]
        np.maximum(h2, 0.0, out=h2)
        z = h2 @ w[2]
        z += b[2]
        return z

    def forward_backward(self, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Masked mean BCE-with-logits and its gradients, in ``params()`` order (views of
        :attr:`grad`, overwritten by the next call)."""
        msum = max(float(m.sum()), 1.0)
        c = self.chunk
        self.grad[:] = 0.0
        loss = 0.0
        for i in range(0, len(x), c):
            part, g = self._forward_backward(x[i:i + c], y[i:i + c], m[i:i + c], msum)
            loss += part
            for w, gw, gb in zip(range(3), self._gw, self._gb):
                gw += g[2 * w]
                gb += g[2 * w + 1]
        return loss, [a for pair in zip(self._gw, self._gb) for a in pair]

    def _forward_backward(self, x, y, m, msum: float) -> tuple[float, list[np.ndarray]]:
        """Loss and gradients of rows ``x`` (a chunk), normalised by the whole batch's ``msum``."""
        w, b = self.weights, self.biases
        h1 = np.maximum(x @ w[0] + b[0], 0.0)
        h2 = np.maximum(h1 @ w[1] + b[1], 0.0)
        z = h2 @ w[2] + b[2]
        # BCE with logits, stable: max(z, 0) - z*y + log(1 + exp(-|z|))
        loss = float(((np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))) * m).sum() / msum)
        dz = (1.0 / (1.0 + np.exp(-z)) - y) * (m / msum)
        dz = dz.astype(np.float32, copy=False)
        g_w2, g_b2 = h2.T @ dz, dz.sum(axis=0)
        dh2 = (dz @ w[2].T) * (h2 > 0)
        g_w1, g_b1 = h1.T @ dh2, dh2.sum(axis=0)
        dh1 = (dh2 @ w[1].T) * (h1 > 0)
        g_w0, g_b0 = x.T @ dh1, dh1.sum(axis=0)
        return loss, [g_w0, g_b0, g_w1, g_b1, g_w2, g_b2]

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"weights.{i}"] = w
            out[f"biases.{i}"] = b
        return out


class Adam:
    """Adam (Kingma & Ba) over one flat float32 parameter vector, updated in place."""

    def __init__(self, flat: np.ndarray, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.flat = flat
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = np.zeros_like(flat)
        self.v = np.zeros_like(flat)
        self.t = 0

    def step(self, grad: np.ndarray) -> None:
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        self.m *= self.b1
        self.m += (1.0 - self.b1) * grad
        self.v *= self.b2
        self.v += (1.0 - self.b2) * (grad * grad)
        d = np.sqrt(self.v / c2)
        d += self.eps
        np.divide(self.m, d, out=d)
        d *= self.lr / c1
        self.flat -= d


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
        end = self.pos + n
        if end <= self.capacity:  # one slice, no index array
            self.s[self.pos:end], self.y[self.pos:end], self.m[self.pos:end] = s, y, m
        else:
            idx = (self.pos + np.arange(n)) % self.capacity
            self.s[idx], self.y[idx], self.m[idx] = s, y, m
        self.pos = int(end % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = self.rng.integers(0, self.size, size=n)
        return self.s[idx], self.y[idx], self.m[idx]


class HindsightPredictor:
    """Multi-horizon next-access classifier + replay; ``value`` is batched."""

    def __init__(self, cfg: PredictorConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.net = HeadsMLP(cfg, np.random.default_rng([cfg.seed, 1]))
        self.opt = Adam(self.net.flat, lr=cfg.lr)
        self.replay = LabelReplay(cfg.replay, cfg.n_features, cfg.n_heads, self.rng)
        self._avg = np.full(cfg.n_heads, 1.0 / cfg.n_heads, np.float32)
        self.steps = 0
        self.rows = 0

    def probs(self, x: np.ndarray) -> np.ndarray:
        """P(next access within h_k) per row and horizon, float64 (n, n_heads)."""
        z = self.net.forward(np.ascontiguousarray(x, np.float32))
        return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))

    def value(self, x: np.ndarray) -> np.ndarray:
        """Nearness of the next access in [0, 1]: the mean over horizons of P(access within h_k)."""
        return self.probs(x).mean(axis=1)

    def value_and_rank(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value, rank score): the rank score is the mean logit over horizons, which keeps
        ordering objects whose probabilities are all near 0 (where the value is flat)."""
        z = self.net.forward(np.ascontiguousarray(x, np.float32))
        np.clip(z, -60.0, 60.0, out=z)  # (exp overflows float32 beyond ~88)
        p = np.exp(-z)
        p += 1.0
        np.reciprocal(p, out=p)
        avg = self._avg  # means over the heads as one product each (ndarray.mean costs ~4x more)
        return (p @ avg).astype(np.float64), (z @ avg).astype(np.float64)

    def add(self, s: np.ndarray, y: np.ndarray, m: np.ndarray) -> None:
        self.replay.add(s, y, m)
        self.rows += len(s)

    def train_step(self) -> float:
        if self.replay.size < self.cfg.batch:
            return float("nan")
        s, y, m = self.replay.sample(self.cfg.batch)
        loss, _ = self.net.forward_backward(s, y, m)
        self.opt.step(self.net.grad)
        self.steps += 1
        return loss

    # -- persistence ----------------------------------------------------------------
    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": np.ascontiguousarray(v).copy() for k, v in self.net.state_dict().items()}

    def load_tensors(self, tensors: dict[str, np.ndarray], prefix: str, source: str) -> None:
        own = self.net.state_dict()
        got = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        if set(got) != set(own):
            raise ValueError(f"{source}: tensors for {prefix!r} are {sorted(got)}; expected {sorted(own)}")
        for k, v in got.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{source}: {prefix}.{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        for k, v in got.items():
            own[k][...] = np.asarray(v, np.float32)  # in place: the optimizer holds these arrays

    def config_dict(self) -> dict:
        return asdict(self.cfg)
