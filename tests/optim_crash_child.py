"""Child process of tests/test_optim.py's kill -9 tests: trains, optionally pausing mid-step.

``--pause-step S --pause-chunk C``: in step S, after chunk C was updated and its write
started, print PAUSED and sleep (the parent kills it). ``--pause-before-marker``: when step
S is committed (at the start of step S+1), after every chunk is written but before the
data file's fdatasync and the step marker. Otherwise it
prints ``STEP n`` after each step and the parent kills it at some time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_optim import batch, groups, make_model  # noqa: E402

from tiered.optim import OffloadedAdamW  # noqa: E402

CHUNK = 12 * 4096 * 2


def config(root) -> dict:
    return {"tiers": {"host": {"capacity": "1MiB"}, "nvme": {"path": str(Path(root) / "nvme"), "capacity": "256MiB"}},
            "engine": {"workers": 2, "chunk": "1MiB"}}


class Pausing(OffloadedAdamW):
    pause_step: int | None = None
    pause_chunk: int | None = None
    before_marker = False

    def _update(self, c, s, lease_f, deferred=None):
        super()._update(c, s, lease_f, deferred)
        if s == self.pause_step and c.index == self.pause_chunk:
            print("PAUSED", flush=True)
            time.sleep(120)

    def _commit(self, s, prev=None):
        if s == self.pause_step and self.before_marker:
            self._wait_writes()
            print("PAUSED", flush=True)
            time.sleep(120)
        super()._commit(s, prev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--pause-step", type=int)
    ap.add_argument("--pause-chunk", type=int)
    ap.add_argument("--pause-before-marker", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    Pausing.pause_step, Pausing.pause_chunk, Pausing.before_marker = a.pause_step, a.pause_chunk, a.pause_before_marker
    model = make_model()
    with Pausing(groups(model), lr=3e-3, config=config(a.root), chunk_bytes=CHUNK) as opt:
        for step in range(a.steps):
            opt.zero_grad()
            model(batch(step)).float().square().mean().backward()
            opt.step()
            print(f"STEP {step + 1}", flush=True)


if __name__ == "__main__":
    main()
