"""Packaging: the repository's top-level folders install under the tiered namespace only, so no
other distribution's top-level package (PyPI has ``traces`` and ``policies``) can shadow ours or
be shadowed by it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"allocators": "tiered.allocators", "io_engine": "tiered.io_engine", "policies": "tiered.policies",
           "traces": "tiered.traces"}


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed_under_tiered():
    cfg = _config()
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    assert dirs == {f: n for f, n in FOLDERS.items()}
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        top = rel.parts[0]
        if top == "tiered":
            found.add(".".join(rel.parts))
        elif top in FOLDERS:
            found.add(".".join((FOLDERS[top], *rel.parts[1:])))
    assert found == set(cfg["packages"]), f"pyproject.toml's packages differ: {sorted(found ^ set(cfg['packages']))}"


def test_no_source_imports_a_top_level_name_of_ours():
    pattern = re.compile(r"^\s*(from|import)\s+(" + "|".join(FOLDERS) + r")\b", re.M)
    files = subprocess.check_output(["git", "ls-files", "*.py"], cwd=ROOT, text=True).split()
    bad = [f for f in files if pattern.search((ROOT / f).read_text())]
    assert not bad, f"import these as tiered.<name>: {bad}"


def test_the_installed_names_resolve_outside_the_checkout(tmp_path):
    code = ("import importlib.util as u, tiered.allocators, tiered.policies.rl, tiered.traces\n"
            "print([n for n in ('allocators', 'io_engine', 'policies', 'traces') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"top-level names of ours are importable: {out.stdout}"


def imports_outside(folder: str) -> set[str]:
    """The packages of ours that ``folder``'s sources import (relative imports leaving the
    folder, or absolute ``tiered...`` ones)."""
    ours = set(FOLDERS) | {"tiered"}
    pattern = re.compile(r"^\s*from\s+(\.+)(\w*)|^\s*(?:from|import)\s+(tiered)\b(?:\.(\w+))?", re.M)
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        depth = len(path.relative_to(ROOT / folder).parts)  # 1: a module of the package itself
        for m in pattern.finditer(path.read_text()):
            if m.group(1):
                if len(m.group(1)) <= depth:  # stays inside the folder
                    continue
                target = m.group(2)
            else:
                target = m.group(4) or "tiered"
            if target in ours:
                found.add(target)
    return found


def test_dependencies_point_down_the_layers():
    """allocators imports nothing of ours; io_engine only allocators; policies nothing of ours (so
    each policy runs in simulation and live alike); traces only policies."""
    assert imports_outside("allocators") == set()
    assert imports_outside("io_engine") <= {"allocators"}
    assert imports_outside("policies") == set()
    assert imports_outside("traces") <= {"policies"}
