"""Helper process for tests/test_store_*.py: does one thing to a store, prints READY, waits to be killed.

Usage::

    python store_child.py ephemeral CONFIG_JSON
        Put a durable object "keep" and an ephemeral one "scratch" (1 MiB each), print READY, sleep.

    python store_child.py orphan CONFIG_JSON
        Put a durable object "keep", then make every manifest write block forever and put
        "lost" (1 MiB): its bytes land in the data file, the manifest never names them.
        Prints READY once the bytes are written, then sleeps.

    python store_child.py shared CONFIG_JSON
        Open the store with TieredStore.shared(), fork; the child opens TieredStore.shared()
        on the same config and prints "CHILD OPENED" or "CHILD ERROR <message>"; then READY.
"""

from __future__ import annotations

import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import tiered.store as store_mod  # noqa: E402
from tiered.store import StoreError, TieredStore  # noqa: E402

MiB = 1 << 20


def ephemeral(cfg: dict) -> None:
    store = TieredStore(cfg).open()
    store.put("keep", torch.full((MiB,), 1, dtype=torch.uint8)).result(30)
    store.put("scratch", torch.full((MiB,), 2, dtype=torch.uint8), ephemeral=True).result(30)
    print("READY", flush=True)
    threading.Event().wait(120)


def orphan(cfg: dict) -> None:
    store = TieredStore(cfg).open()
    store.put("keep", torch.full((MiB,), 1, dtype=torch.uint8)).result(30)
    written = threading.Event()

    def blocked_manifest_write(path, obj):
        written.set()
        threading.Event().wait(120)

    store_mod.write_json_atomic = blocked_manifest_write
    store.put("lost", torch.full((MiB,), 3, dtype=torch.uint8))
    written.wait(30)
    print("READY", flush=True)
    threading.Event().wait(120)


def shared(cfg: dict) -> None:
    store = TieredStore.shared(cfg)
    pid = os.fork()
    if pid == 0:
        try:
            TieredStore.shared(cfg)
        except StoreError as e:
            print(f"CHILD ERROR {e}", flush=True)
        else:
            print("CHILD OPENED", flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    store.close()
    print("READY", flush=True)


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    {"ephemeral": ephemeral, "orphan": orphan, "shared": shared}[mode](cfg)


if __name__ == "__main__":
    main()
