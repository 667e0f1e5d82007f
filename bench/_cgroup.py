"""Run a command inside a cgroup v1 memory limit (page cache counts toward it).

    from bench._cgroup import MemoryCgroup, cgroup_v1_unavailable, drop_caches

    why = cgroup_v1_unavailable()            # None when the controller is usable
    with MemoryCgroup("bench-x", 1_300_000_000) as cg:
        rc = cg.run([sys.executable, "-c", "..."])   # subprocess.run kwargs pass through
        print(cg.usage())                    # max_usage_in_bytes, failcnt, oom_kills, cache...

The child joins the group before it execs (``preexec_fn`` writes its pid into
``cgroup.procs``), so everything it allocates, including the page cache it
faults in, is charged to the group from its first instruction. The group is
removed on exit (v1 moves the remaining page-cache charges to the parent).
Needs root and a mounted v1 memory hierarchy (``/sys/fs/cgroup/memory``).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

ROOT = "/sys/fs/cgroup/memory"


def cgroup_v1_unavailable(root: str = ROOT) -> str | None:
    """None when a v1 memory group can be created under ``root``, else why not."""
    if not os.path.isdir(root):
        return f"{root} does not exist (no cgroup v1 memory hierarchy mounted)"
    if not os.path.exists(os.path.join(root, "memory.limit_in_bytes")):
        return f"{root} is not a cgroup v1 memory hierarchy (no memory.limit_in_bytes)"
    probe = os.path.join(root, f"probe-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        os.mkdir(probe)
    except OSError as e:
        return f"cannot create a memory cgroup under {root}: {e.strerror or e}"
    try:
        with open(os.path.join(probe, "memory.limit_in_bytes"), "w") as f:
            f.write(str(256 << 20))
    except OSError as e:
        return f"cannot set memory.limit_in_bytes under {root}: {e.strerror or e}"
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass
    return None


def drop_caches() -> str | None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; None on success, else why it failed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot drop the page cache: {e.strerror or e}"
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class MemoryCgroup:
    """A v1 memory group with ``memory.limit_in_bytes = limit`` (see the module docstring)."""

    def __init__(self, name: str, limit: int, root: str = ROOT) -> None:
        self.path = os.path.join(root, f"{name}-{os.getpid()}")
        self.limit = int(limit)

    def __enter__(self) -> "MemoryCgroup":
        if os.path.isdir(self.path):
            os.rmdir(self.path)
        os.mkdir(self.path)
        self._write("memory.limit_in_bytes", self.limit)
        # the limit is what the kernel rounded it to (a page multiple)
        self.limit = int(_read(os.path.join(self.path, "memory.limit_in_bytes")) or self.limit)
        # no swap here, but where there is, keep it from stretching the limit
        if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
            try:
                self._write("memory.memsw.limit_in_bytes", self.limit)
            except OSError:
                pass
        try:
            self._write("memory.swappiness", 0)
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the last task may still be exiting
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(cmd)`` with the child inside this group from before its exec."""
        procs = os.path.join(self.path, "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return subprocess.run(cmd, preexec_fn=join, **kwargs)

    def usage(self) -> dict:
        """Peak charge, limit hits and OOM kills of the group so far."""
        stat = {}
        for line in (_read(os.path.join(self.path, "memory.stat")) or "").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                stat[k] = int(v)
        oom = {}
        for line in (_read(os.path.join(self.path, "memory.oom_control")) or "").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                oom[k] = int(v)

        def num(name: str) -> int | None:
            v = _read(os.path.join(self.path, name))
            return int(v) if v and v.strip().isdigit() else None

        return {
            "limit_bytes": self.limit,
            "max_usage_bytes": num("memory.max_usage_in_bytes"),
            "failcnt": num("memory.failcnt"),
            "oom_kills": oom.get("oom_kill"),
            "cache_bytes_at_exit": stat.get("total_cache", stat.get("cache")),
            "rss_bytes_at_exit": stat.get("total_rss", stat.get("rss")),
        }
