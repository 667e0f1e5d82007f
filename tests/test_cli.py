"""The tooling's wing: the ``tiered`` console script, where the tools live, what they may build,
and that what they hold in a store is charged to owner "tools"."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KiB = 1 << 10
pytestmark = pytest.mark.timeout(120)


def test_console_script_runs_the_tools_cli(tmp_path, capsys):
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["tiered"]
    assert target == "tiered.tools.cli:main"
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    cfg = tmp_path / "offload.toml"
    cfg.write_text(f'[tiers.nvme]\npath = "{tmp_path / "nvme"}"\ncapacity = "1GiB"\n')
    assert main(["config", "check", str(cfg)]) == 0
    assert '"nvme"' in capsys.readouterr().out
    from tiered.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"demo", "probe", "config", "bench", "store"} <= set(sub.choices)


def test_old_import_paths_are_the_moved_modules():
    import tiered.bench_io
    import tiered.cli
    import tiered.demo
    import tiered.probe
    import tiered.tools.bench_io
    import tiered.tools.cli
    import tiered.tools.demo
    import tiered.tools.probe

    assert tiered.cli is tiered.tools.cli and tiered.demo is tiered.tools.demo
    assert tiered.probe is tiered.tools.probe and tiered.bench_io is tiered.tools.bench_io


def test_the_engine_benchmark_imports_only_the_engine_and_allocators():
    """Its sources name nothing of tiered's other modules (tests/test_packaging.py checks every
    layer the same way)."""
    import re

    for path in sorted((ROOT / "io_engine" / "bench").rglob("*.py")):
        for m in re.finditer(r"^\s*from\s+(\.*)([\w.]*)\s+import", path.read_text(), re.M):
            dots, name = m.groups()
            assert not name.startswith("tiered") and not (len(dots) >= 3 and name.split(".")[0] not in
                                                           ("allocators",)), f"{path.name} imports {dots}{name}"


def test_no_arena_or_engine_outside_the_store_and_their_own_packages():
    """Host/device memory and the engine belong to the store (io_engine.bench measures the engine
    itself): nothing else in tiered/ or bench/ constructs them."""
    paths = [p for p in (ROOT / "tiered").rglob("*.py") if "store" not in p.relative_to(ROOT / "tiered").parts]
    for path in sorted(paths + list((ROOT / "bench").rglob("*.py"))):
        text = path.read_text()
        for name in ("HostArena(", "DeviceArena(", "IOEngine("):
            assert name not in text, f"{path.relative_to(ROOT)} constructs {name[:-1]}"


def test_demo_round_trip_is_charged_to_owner_tools(tmp_path, monkeypatch, capsys):
    from tiered.tools import demo, probe

    cfg = {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": str(tmp_path / "nvme"), "capacity": "64MiB"}},
           "engine": {"workers": 2, "chunk": "1MiB"}}
    monkeypatch.setattr(demo, "DEMO_OBJECTS", 8)
    monkeypatch.setattr(demo, "DEMO_OBJECT_BYTES", 256 * KiB)
    monkeypatch.setattr(demo, "DEMO_HOST_BUDGET", 1 << 20)
    monkeypatch.setattr(probe, "probe", lambda *a, **k: None)
    monkeypatch.setattr(probe, "print_probe", lambda *a, **k: None)
    assert demo.run_store_demo(cfg) == 0
    owners = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("owner ")]
    assert [line.split(":")[0].split()[-1] for line in owners] == ["tools"]
    assert "host peak 0 B" not in owners[0] and "nvme peak" in owners[0]
