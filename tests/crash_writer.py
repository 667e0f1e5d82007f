"""Helper process for tests/test_store.py (crash-safety and cross-process locking tests).

Usage::

    python crash_writer.py writer CONFIG_JSON BASE NKEYS
        Open the store, print "READY", then loop forever: for every key
        "k<i>" put an int64 tensor whose element 0 is the key id and whose
        other elements are the version (BASE, BASE+1, ...), all keys'
        puts in flight at once; after each future resolves print
        "k<i> <version>" (flushed). The test SIGKILLs it at a random moment.

    python crash_writer.py hold CONFIG_JSON
        Open the store, print "OPEN", then wait until stdin closes (or the
        test kills it).

    python crash_writer.py probe CONFIG_JSON
        Try to open the store; print "OPENED" or "ERROR <message>".
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tiered.store import StoreError, TieredStore  # noqa: E402


def encoded(key_id: int, version: int, n: int) -> torch.Tensor:
    t = torch.full((n,), version, dtype=torch.int64)
    t[0] = key_id
    return t


def size_for(key_id: int, version: int) -> int:
    # Sizes vary with the version so that freed extents get reused by other objects.
    return 700 + (key_id * 7919 + version * 104729) % 40000


def writer(cfg: dict, base: int, nkeys: int) -> None:
    store = TieredStore(cfg, host_wait=10.0).open()
    print("READY", flush=True)
    version = base
    while True:
        futs = []
        for i in range(nkeys):
            futs.append((i, store.put(f"k{i}", encoded(i, version, size_for(i, version)))))
        for i, f in futs:
            f.result(30)
            print(f"k{i} {version}", flush=True)
        version += 1


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    if mode == "writer":
        writer(cfg, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "hold":
        store = TieredStore(cfg).open()
        print("OPEN", flush=True)
        sys.stdin.read()
        store.close()
    elif mode == "probe":
        try:
            store = TieredStore(cfg).open()
        except StoreError as e:
            print(f"ERROR {e}", flush=True)
        else:
            print("OPENED", flush=True)
            store.close()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
