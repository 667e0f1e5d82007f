"""README.md's examples run as written, and its reference stays complete.

Every ```python block of README.md runs in a fresh directory of its own (TIERED_HOME set there),
as a script in a new process, after the files the README asks the reader to save (a ```toml block
preceded by ``<!-- file: NAME -->``) are written there. A block preceded by ``<!-- not run -->``
(one that needs a GPU or a real model download) is skipped. The configuration reference must name
every key the config validator accepts, and the user documentation must not use the
``past_key_values=`` spelling transformers deprecated, nor describe how the project was built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiered import config as tiered_config
from tiered import config_schema

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARK = re.compile(r"<!--\s*(not run|file:\s*([\w./-]+))\s*-->\s*$")


def blocks(text: str) -> list[dict]:
    """Fenced blocks with their language, code, line number and the HTML comment just before them."""
    out = []
    for m in _BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        out.append({"lang": m.group(1), "code": m.group(2), "line": text.count("\n", 0, m.start()) + 1,
                    "skip": bool(mark and mark.group(1) == "not run"),
                    "file": mark.group(2) if mark and mark.group(2) else None})
    return out


README_BLOCKS = blocks(README.read_text())
SNIPPETS = [b for b in README_BLOCKS if b["lang"] == "python" and not b["skip"]]
FILES = {b["file"]: b["code"] for b in README_BLOCKS if b["file"]}


def test_the_parser_finds_the_examples():
    assert len(SNIPPETS) >= 8, "README.md should show its examples as ```python blocks"
    assert "offload.toml" in FILES


@pytest.mark.timeout(300)
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"README.md:{b['line']}" for b in SNIPPETS])
def test_snippet_runs_as_written(snippet, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    script = tmp_path / "snippet.py"
    script.write_text(snippet["code"])
    env = {**os.environ, "TIERED_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, (f"README.md line {snippet['line']} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.mark.parametrize("block", [b for b in README_BLOCKS if b["lang"] == "toml"],
                         ids=lambda b: f"README.md:{b['line']}")
def test_toml_examples_are_valid_configs(block, tmp_path):
    """Every TOML example validates (absolute directories moved under a temporary one)."""
    text = re.sub(r'path = "/', f'path = "{tmp_path}/', block["code"])
    (tmp_path / "example.toml").write_text(text)
    tiered_config.load_config(tmp_path / "example.toml")


def test_the_configuration_reference_names_every_key():
    text = README.read_text()
    section = text[text.index("## Configuration reference"):]
    section = section[: section.index("\n## ", 4)]
    keys = {*config_schema._TOP_KEYS, *config_schema._ALL_TIER_KEYS, *config_schema._ENGINE_KEYS,
            *config_schema._POLICY_KEYS, *config_schema._OFFLOAD_KEYS}
    missing = sorted(k for k in keys if f"`{k}`" not in section and f"[{k}" not in section)
    assert not missing, f"README.md's configuration reference does not describe {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_docs_use_current_apis_and_describe_the_software(doc):
    text = doc.read_text()
    assert "past_key_values=" not in text, f"{doc.name}: generate takes cache=, not past_key_values="
    narration = re.compile(r"\b(sessions?|issues?|helpers?|we tried|run \d+|runs \d+)\b", re.I)
    found = sorted({m.group(0) for m in narration.finditer(text)})
    assert not found, f"{doc.name} narrates how it was built ({found}); say what the software does"
