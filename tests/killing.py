"""Test helper: run a child process, let it work for a while, SIGKILL it, keep what it printed.

The crash-consistency tests (checkpoints, GNN row updates) share this harness: the child
prints ``READY`` once set up, then one line per durable step; the test kills it at a random
moment and checks that the state on disk matches the last step it reported (or a later one).
"""

from __future__ import annotations

import signal
import subprocess
import threading

T = 30.0


def run_and_kill(argv: list[str], delay: float, *, cwd=None, timeout: float = T) -> list[str]:
    """Start ``argv``, wait for its ``READY`` line, SIGKILL it ``delay`` s later; its later lines."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=cwd)
    lines: list[str] = []
    try:
        first = proc.stdout.readline().strip()
        assert first == "READY", f"child {argv[1]} printed {first!r} before READY (exit code {proc.poll()})"
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        threading.Event().wait(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)
        reader.join(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout)
    return lines
