"""Child process for tests/test_checkpoint.py: saves checkpoints in a loop until SIGKILLed.

Usage::

    python checkpoint_crash_child.py CONFIG_JSON FIRST_STEP

Opens a LazyCheckpointer (cold tier "flash", keep_last=2) on the config's tiers and, for
step = FIRST_STEP, FIRST_STEP+1, ...: saves ``state(step)`` (a few MiB of deterministic
tensors, one larger than a checksum segment), then overwrites the same tensors in place
with ``state(step + 1)`` right away (the guard makes the overwrite wait for the
snapshot), waits until the checkpoint is durable and prints ``committed <step>``. The
test kills it at a random moment and checks that the last committed step loads bitwise.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tiered.checkpoint import LazyCheckpointer  # noqa: E402


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "big": torch.randn(9 << 18, generator=g),  # 9 MiB: two segments
        "w": torch.randint(-1000, 1000, (257, 129), generator=g, dtype=torch.int32),
        "h": torch.randn(3000, generator=g).to(torch.bfloat16),
        "meta": {"step": step, "lr": 0.5 / (step + 1)},
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    step = int(sys.argv[2])
    torch.set_num_threads(1)
    with LazyCheckpointer(cfg, cold_tier="flash", keep_last=2, cold_keep_last=2, host_buffer="16MiB") as ck:
        live = state(step)
        print("READY", flush=True)
        while True:
            h = ck.save(live, step)
            nxt = state(step + 1)
            tensors = [v for v in live.values() if isinstance(v, torch.Tensor)]
            ck.guard(tensors)  # what an attached optimizer's step hook does
            for k, v in nxt.items():
                if isinstance(v, torch.Tensor):
                    live[k].copy_(v)
                else:
                    live[k] = v
            h.wait(60)
            print(f"committed {step}", flush=True)
            step += 1


if __name__ == "__main__":
    main()
