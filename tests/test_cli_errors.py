"""What a new user hits at the ``tiered`` command line: one ``error: ...`` line and a non-zero exit
instead of a traceback (a traceback only with ``--debug``), Ctrl-C as exit 130, machine-limit
warnings, and arguments checked where they are parsed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tiered.tools import demo as demo_mod
from tiered.tools import probe as probe_mod
from tiered.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "store_child.py"
DATA = ROOT / "traces" / "data"
KiB, MiB = 1 << 10, 1 << 20
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """The default store lives in the test's own directory, never in ~/.cache."""
    monkeypatch.setenv("TIERED_HOME", str(tmp_path / "home"))


@pytest.fixture
def small_demo(monkeypatch):
    """The demo's store round trip at a few MiB and no probe; the generation replaced by a recorder."""
    monkeypatch.setattr(demo_mod, "DEMO_OBJECTS", 4)
    monkeypatch.setattr(demo_mod, "DEMO_OBJECT_BYTES", 256 * KiB)
    monkeypatch.setattr(demo_mod, "DEMO_HOST_BUDGET", 1 * MiB)
    monkeypatch.setattr(probe_mod, "probe", lambda *a, **k: None)
    monkeypatch.setattr(probe_mod, "print_probe", lambda *a, **k: None)
    seen = []
    monkeypatch.setattr(demo_mod, "_generate", lambda demo_cfg, cfg, *a: seen.append(demo_cfg) or 0)
    return seen


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _toml(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "offload.toml"
    f.write_text(body)
    return f


def test_demo_with_a_bad_size_prints_one_line(tmp_path, capsys):
    f = _toml(tmp_path, f'[tiers.host]\ncapacity = "lots"\n[tiers.nvme]\npath = "{tmp_path / "n"}"\n'
                        'capacity = "1GiB"\n')
    assert main(["demo", "--config", str(f)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "tiers.host.capacity = 'lots'" in line and str(f) in line


def test_demo_with_a_missing_config_prints_one_line(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml not found" in _one_error_line(capsys.readouterr().err)


def test_demo_with_tiered_home_pointing_at_a_file(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("TIERED_HOME", str(blocker))
    assert main(["demo"]) == 2
    assert "is not a directory" in _one_error_line(capsys.readouterr().err)


def test_debug_flag_shows_the_traceback(tmp_path):
    from tiered.config import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        main(["--debug", "demo", "--config", str(tmp_path / "nope.toml")])


def test_demo_on_a_default_store_another_process_holds(tmp_path, small_demo, capsys):
    home = tmp_path / "home"
    cfg = {"tiers": {"host": {"capacity": "4MiB"}, "nvme": {"path": str(home), "capacity": "64MiB"}},
           "engine": {"workers": 1, "chunk": "1MiB"}}
    child = subprocess.Popen([sys.executable, str(CHILD), "ephemeral", json.dumps(cfg)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
        assert main(["demo"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(child.pid) in line and str(home) in line
    finally:
        child.kill()
        child.wait(30)


def test_storage_only_config_passes_check_and_runs_the_demo(tmp_path, small_demo, capsys):
    f = _toml(tmp_path, f'[tiers.nvme]\npath = "{tmp_path / "n"}"\ncapacity = "256MiB"\n'
                        '[engine]\nworkers = 1\nchunk = "1MiB"\n')
    assert main(["config", "check", str(f)]) == 0
    assert main(["demo", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "all 4 objects verified" in out and "host budget 1 MiB" in out
    [gen_cfg] = small_demo
    assert gen_cfg.host_tier.capacity == demo_mod.GEN_BUDGET
    assert [t.kind for t in gen_cfg.tiers] == ["host", "storage"]


def test_replay_plot_error_comes_after_the_results(tmp_path, capsys):
    trace = str(DATA / "store-roundtrip.trace")
    plot = tmp_path / "missing" / "x.png"
    assert main(["bench", "replay", trace, "--policy", "lru", "--json", "--plot", str(plot)]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["policy"] == "lru"
    assert str(plot) in _one_error_line(err)
    assert main(["bench", "replay", trace, "--policy", "lru", "--plot", str(plot)]) == 2
    out, err = capsys.readouterr()
    assert "lru" in out.splitlines()[-1]
    _one_error_line(err)


def _raise(exc):
    def run(*a, **k):
        raise exc
    return run


def _project_errors():
    from allocators.budget import OutOfBudget
    from io_engine.bench import BenchError
    from policies import PolicyError
    from tiered.checkpoint.format import CheckpointError
    from tiered.config import ConfigError
    from tiered.gnn.feature_store import FeatureStoreError
    from tiered.kv.cache import KVCacheError
    from tiered.offload import OffloadError
    from tiered.store import StoreError
    from traces import TraceFormatError

    return [ConfigError("c"), StoreError("s"), OffloadError("o"), TraceFormatError("t.trace", 3, "bad"),
            PolicyError("p"), FeatureStoreError("f"), KVCacheError("k"), CheckpointError("x"), BenchError("b"),
            OutOfBudget("tier host: 5 bytes over budget"), OSError(28, "No space left on device", "/x/y")]


def test_project_errors_are_one_line_from_any_command(monkeypatch, capsys):
    for exc in _project_errors():
        monkeypatch.setattr(demo_mod, "run_demo", _raise(exc))
        assert main(["demo"]) == 2, exc
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("error: ") and len(line) > len("error: "), line
    assert line == "error: /x/y: No space left on device"


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch):
    monkeypatch.setattr(demo_mod, "run_demo", _raise(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(["demo"])


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(demo_mod, "run_demo", _raise(KeyboardInterrupt()))
    assert main(["demo"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


def test_config_check_and_probe_warn_of_budgets_beyond_the_machine(tmp_path, capsys):
    ram = psutil.virtual_memory().total
    f = _toml(tmp_path, f'[tiers.host]\ncapacity = {2 * ram // MiB * MiB}\n'
                        f'[tiers.nvme]\npath = "{tmp_path / "n"}"\ncapacity = "1PiB"\n')
    assert main(["config", "check", str(f)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "tiers.host.capacity" in warnings[0] and "RAM" in warnings[0]
    assert "tiers.nvme.capacity" in warnings[1] and "free at" in warnings[1]
    assert main(["probe", "--config", str(f), "--no-measure"]) == 0
    out, err = capsys.readouterr()
    assert sum(line.startswith("warning: tiers.") for line in err.splitlines()) == 2
    assert main(["probe", "--config", str(f), "--no-measure", "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["warnings"]) == 2


def test_demo_on_a_budget_beyond_the_machine_names_the_key(tmp_path, small_demo, capsys):
    f = _toml(tmp_path, f'[tiers.nvme]\npath = "{tmp_path / "n"}"\ncapacity = "1PiB"\n')
    assert main(["demo", "--config", str(f)]) == 2
    assert "tiers.nvme.capacity = 1 PiB" in _one_error_line(capsys.readouterr().err)


def test_version(capsys):
    import tiered

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tiered {tiered.__version__}"


def test_config_check_without_a_file_prints_the_default(tmp_path, capsys):
    assert main(["config", "check"]) == 0
    out, err = capsys.readouterr()
    cfg = json.loads(out)
    assert cfg["tiers"]["nvme"]["path"] == str((tmp_path / "home").resolve())
    assert "default" in err and "no file given" in err


@pytest.mark.parametrize("argv, flag, value", [
    (["bench", "io", "--workers", "0"], "--workers", "0"),
    (["bench", "io", "--size", "0"], "--size", "0"),
    (["bench", "io", "--chunk", "lots"], "--chunk", "lots"),
    (["probe", "--size", "0"], "--size", "0"),
    (["probe", "--size", "100KiB"], "--size", "100KiB"),
    (["bench", "replay", "t", "--limit", "0"], "--limit", "0"),
])
def test_bad_numbers_are_refused_where_they_are_parsed(argv, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and repr(value) in err


def test_bench_io_on_a_missing_directory_is_an_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["bench", "io", "--dir", str(missing), "--size", "16MiB", "--no-fio"]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err)
    assert not missing.exists()


def test_replay_header_sizes_are_human(capsys):
    assert main(["bench", "replay", str(DATA / "store-roundtrip.trace"), "--policy", "lru"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "footprint" in header and " bytes" not in header and " B," not in header
    assert any(unit in header for unit in ("KiB", "MiB", "GiB"))


def test_replay_plot_without_matplotlib_is_said_before_replaying(tmp_path, monkeypatch, capsys):
    from tiered.tools.replay import command

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(command, "run_replay", _raise(AssertionError("replayed")))
    argv = ["bench", "replay", str(DATA / "store-roundtrip.trace"), "--plot", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert "--plot needs matplotlib" in _one_error_line(capsys.readouterr().err)


def test_an_engine_error_keeps_its_own_words(monkeypatch, capsys):
    from io_engine.errors import IOEngineError

    monkeypatch.setattr(demo_mod, "run_demo", _raise(IOEngineError("read", "/d/f", 4096, 8192, "EIO", 5)))
    assert main(["demo"]) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        "error: read of 8192 bytes at offset 4096 of /d/f failed: EIO"
