"""The offload config: sizes, the TOML schema, strict errors and the default."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tiered.config import (
    Config,
    ConfigError,
    EngineSpec,
    TierSpec,
    check_config,
    default_config,
    load_config,
)
from tiered.sizes import SizeError, format_size, parse_rate, parse_size

GiB = 1 << 30


def write(tmp_path: Path, text: str, name: str = "offload.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def storage(tmp_path: Path, name: str = "nvme", extra: str = "") -> str:
    """A minimal valid storage tier table, for tests about other sections."""
    return f'[tiers.{name}]\npath = "{tmp_path / name}"\ncapacity = "1GiB"\n{extra}'


def load_error(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    return str(info.value)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("500MB", 500_000_000),
        ("4 KiB", 4096),
        ("1.5GiB", 3 * GiB // 2),
        ("123", 123),
        ("64k", 65536),
        ("2 tb", 2 * 10**12),
        (4096, 4096),
        (0, 0),
        (1e9, 10**9),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text, where="x") == expected


@pytest.mark.parametrize("bad", ["8 gigs", "-1", -1, "1.5B", True, False, "", "1.2.3", "GiB", 1.5, None, [1]])
def test_parse_size_rejects(bad):
    with pytest.raises(SizeError) as info:
        parse_size(bad, where="tiers.host.capacity")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"tiers.host.capacity = {bad!r}: ")


def test_parse_rate():
    assert parse_rate("400MB/s", where="r") == 400_000_000
    assert parse_rate("1GiB/s", where="r") == GiB
    assert parse_rate("1 GiB / s", where="r") == GiB
    assert parse_rate(1000, where="r") == 1000
    for bad in ("0MB/s", 0, "fast", "400MB/h"):
        with pytest.raises(SizeError):
            parse_rate(bad, where="r")


def test_format_size():
    assert format_size(8 * GiB) == "8 GiB"
    assert format_size(1500) == "1.46 KiB"
    assert format_size(512) == "512 B"
    assert format_size((1 << 20) - 1) == "1 MiB"


# --------------------------------------------------------------------------- the example


def test_issue_example_parses(tmp_path):
    p = write(
        tmp_path,
        f"""
[tiers.host]
capacity = "8GiB"
[tiers.nvme]
path = "{tmp_path / 'nvme'}"
capacity = "200GiB"
[tiers.flash]
path = "{tmp_path / 'sata'}"
capacity = "1TiB"
read_bandwidth = "400MB/s"   # optional throttle
[engine]
backend = "threads"          # threads | kvikio | aiofiles | auto
workers = 4
queue_depth = 32
chunk = "8MiB"
[policy]
eviction = "lru"
""",
    )
    cfg = load_config(p)
    assert cfg.source == str(p.resolve())
    assert [t.name for t in cfg.tiers] == ["host", "nvme", "flash"]
    assert cfg.host_tier == TierSpec("host", "host", 8 * GiB)
    assert cfg.device_tiers == ()
    nvme, flash = cfg.storage_tiers
    assert nvme == TierSpec("nvme", "storage", 200 * GiB, path=(tmp_path / "nvme").resolve())
    assert flash.capacity == 1 << 40
    assert flash.read_bandwidth == 400_000_000
    assert flash.write_bandwidth is None
    assert flash.path.is_dir()
    assert cfg.engine == EngineSpec(backend="threads", workers=4, queue_depth=32, chunk=8 << 20, direct=True)
    assert cfg.policy.eviction == "lru" and cfg.policy.placement == "auto" and cfg.policy.migration == "auto"
    assert cfg.tier("flash") is flash
    with pytest.raises(KeyError, match="'host', 'nvme', 'flash'"):
        cfg.tier("ssd")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["tiers"]["flash"]["capacity_human"] == "1 TiB"
    assert d["tiers"]["flash"]["read_bandwidth"] == 400_000_000
    assert check_config(p) == cfg
    assert load_config(cfg) is cfg


def test_tiers_ordered_fastest_first(tmp_path):
    cfg = load_config(
        {
            "tiers": {
                "slow": {"path": str(tmp_path / "s"), "capacity": "1GiB"},
                "host": {"capacity": "1GiB"},
                "fast": {"path": str(tmp_path / "f"), "capacity": "1GiB"},
                "gpu": {"capacity": "1GiB"},
            }
        }
    )
    assert [t.name for t in cfg.tiers] == ["gpu", "host", "slow", "fast"]
    assert cfg.tier("gpu").device == "cuda:0"
    assert cfg.source == "<dict>"
    assert cfg.engine == EngineSpec()


def test_explicit_kind(tmp_path):
    cfg = load_config(
        {
            "tiers": {
                "ram": {"kind": "host", "capacity": 4096},
                "accel": {"kind": "device", "device": "cuda:1", "capacity": "2GiB"},
                "disk": {"kind": "storage", "path": str(tmp_path / "d"), "capacity": "1GiB"},
            }
        }
    )
    assert cfg.host_tier.name == "ram"
    assert cfg.device_tiers[0].device == "cuda:1"


# --------------------------------------------------------------------------- errors


def test_unknown_top_level_key_did_you_mean(tmp_path):
    msg = load_error(tmp_path, storage(tmp_path) + "[engin]\nworkers = 2\n")
    assert msg == "unknown key 'engin' in " + str(tmp_path / "offload.toml") + "; did you mean 'engine'?"


def test_misspelled_tier_key(tmp_path):
    msg = load_error(tmp_path, f'[tiers.nvme]\npath = "{tmp_path / "n"}"\ncapacty = "1GiB"\n')
    assert "offload.toml" in msg
    assert "'tiers.nvme.capacty'" in msg
    assert "did you mean 'capacity'?" in msg


def test_misspelled_path_reported_before_kind_inference(tmp_path):
    msg = load_error(tmp_path, f'[tiers.nvme]\npth = "{tmp_path / "n"}"\ncapacity = "1GiB"\n')
    assert "tiers.nvme.pth" in msg and "did you mean 'path'?" in msg


def test_kind_cannot_be_inferred(tmp_path):
    msg = load_error(tmp_path, storage(tmp_path) + '[tiers.ram]\ncapacity = "1GiB"\n')
    assert "cannot infer the kind of tier 'tiers.ram'" in msg
    assert "'device', 'host', 'storage'" in msg


def test_bad_backend_did_you_mean(tmp_path):
    msg = load_error(tmp_path, storage(tmp_path) + '[engine]\nbackend = "kvicio"\n')
    assert "engine.backend = 'kvicio' in" in msg
    assert "offload.toml" in msg
    assert "did you mean 'kvikio'?" in msg


def test_missing_storage_path(tmp_path):
    msg = load_error(tmp_path, '[tiers.flash]\nkind = "storage"\ncapacity = "1GiB"\n')
    assert "tiers.flash.path" in msg and "offload.toml" in msg


def test_no_storage_tier(tmp_path):
    msg = load_error(tmp_path, '[tiers.host]\ncapacity = "1GiB"\n')
    assert "at least one storage tier" in msg


def test_missing_tiers_table(tmp_path):
    msg = load_error(tmp_path, "[engine]\nworkers = 2\n")
    assert "'tiers'" in msg and "offload.toml" in msg


def test_path_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    msg = load_error(tmp_path, f'[tiers.nvme]\npath = "{tmp_path / "afile"}"\ncapacity = "1GiB"\n')
    assert "tiers.nvme.path" in msg and "offload.toml" in msg
    assert "not a directory" in msg


def test_path_cannot_be_created(tmp_path):
    # Root ignores permission bits, so make a parent a file instead of chmod.
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    msg = load_error(tmp_path, f'[tiers.nvme]\npath = "{target}"\ncapacity = "1GiB"\n')
    assert f"tiers.nvme.path = '{target}'" in msg
    assert "cannot create directory" in msg


def test_path_forbidden_on_host(tmp_path):
    msg = load_error(tmp_path, storage(tmp_path) + f'[tiers.host]\npath = "{tmp_path}"\ncapacity = "1GiB"\n')
    assert "tiers.host.path" in msg and "not allowed in a host tier" in msg


def test_two_host_tiers(tmp_path):
    msg = load_error(
        tmp_path, storage(tmp_path) + '[tiers.host]\ncapacity = 4096\n[tiers.ram]\nkind = "host"\ncapacity = 4096\n'
    )
    assert "at most one host tier" in msg


def test_relative_path_resolved_against_config_dir(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = write(conf_dir, '[tiers.nvme]\npath = "data/nvme"\ncapacity = "1GiB"\n')
    cfg = load_config(p)
    assert cfg.tier("nvme").path == (conf_dir / "data" / "nvme").resolve()
    assert cfg.tier("nvme").path.is_dir()
    assert not (elsewhere / "data").exists()


def test_created_dirs_are_private(tmp_path):
    cfg = load_config({"tiers": {"nvme": {"path": str(tmp_path / "a" / "b"), "capacity": "1GiB"}}})
    for p in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    assert list(cfg.tier("nvme").path.iterdir()) == []  # the write probe is cleaned up


def test_duplicate_storage_path(tmp_path):
    msg = load_error(
        tmp_path,
        f'[tiers.a]\npath = "{tmp_path / "x"}"\ncapacity = "1GiB"\n'
        f'[tiers.b]\npath = "{tmp_path / "y" / ".." / "x"}"\ncapacity = "1GiB"\n',
    )
    assert "tiers.b.path" in msg and "tiers.a.path" in msg


@pytest.mark.parametrize("chunk", ['"5000"', '"0"', '"2GiB"', "4095"])
def test_chunk_must_be_aligned(tmp_path, chunk):
    msg = load_error(tmp_path, storage(tmp_path) + f"[engine]\nchunk = {chunk}\n")
    assert "engine.chunk" in msg and "multiple of 4096" in msg


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("workers = true", "engine.workers = True"),
        ("workers = '4'", "engine.workers = '4'"),
        ("workers = 0", "engine.workers = 0"),
        ("workers = 257", "engine.workers = 257"),
        ("queue_depth = 1.5", "engine.queue_depth = 1.5"),
        ("direct = 1", "engine.direct = 1"),
    ],
)
def test_engine_type_errors(tmp_path, line, key):
    msg = load_error(tmp_path, storage(tmp_path) + f"[engine]\n{line}\n")
    assert msg.startswith(f"{key} in {tmp_path / 'offload.toml'}: expected ")


def test_workers_message_names_range(tmp_path):
    msg = load_error(tmp_path, storage(tmp_path) + "[engine]\nworkers = '4'\n")
    assert msg.endswith("expected an integer from 1 to 256")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[tiers.host]\ncapacity = "8 gigs"\n', "tiers.host.capacity = '8 gigs'"),
        ('[tiers.host]\ncapacity = "0"\n', "tiers.host.capacity = '0'"),
        ("[tiers.host]\ncapacity = true\n", "tiers.host.capacity = True"),
        ('[tiers.host]\ncapacity = "1.5B"\n', "tiers.host.capacity = '1.5B'"),
        ('[tiers.gpu]\ncapacity = "1GiB"\ndevice = "gpu zero"\n', "tiers.gpu.device = 'gpu zero'"),
        ('[tiers.nvme2]\npath = "{d}"\ncapacity = 4096\nread_bandwidth = "fast"\n', "tiers.nvme2.read_bandwidth = 'fast'"),
        ('[tiers.nvme2]\nkind = "disk"\npath = "{d}"\ncapacity = 4096\n', "tiers.nvme2.kind = 'disk'"),
        ('[policy]\neviction = "lfuu"\n', "policy.eviction = 'lfuu'"),
        ('[policy]\nplacement = "lfu"\n', "policy.placement = 'lfu'"),
        ('[policy]\nplacement = "best"\n', "policy.placement = 'best'"),
        ("[engine]\nbackend = 3\n", "engine.backend = 3"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path, text, key):
    text = text.replace("{d}", str(tmp_path / "n2"))
    msg = load_error(tmp_path, storage(tmp_path) + text)
    assert msg.startswith(f"{key} in {tmp_path / 'offload.toml'}: ")


def test_section_must_be_a_table(tmp_path):
    msg = load_error(tmp_path, "policy = 3\n" + storage(tmp_path))
    assert msg.startswith(f"policy = 3 in {tmp_path / 'offload.toml'}: expected a table")


def test_bad_tier_name(tmp_path):
    msg = load_error(tmp_path, storage(tmp_path) + '[tiers."9lives"]\ncapacity = 1\n')
    assert "invalid tier name '9lives'" in msg and "offload.toml" in msg


def test_eviction_policies_extensible(tmp_path):
    data = {"tiers": {"n": {"path": str(tmp_path / "n"), "capacity": 4096}}, "policy": {"eviction": "cost"}}
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(data, eviction_policies=("lru", "costs"))
    assert load_config(data, eviction_policies=("lru", "cost")).policy.eviction == "cost"


def test_an_eviction_ranking_given_as_placement_says_where_it_belongs(tmp_path):
    data = {"tiers": {"n": {"path": str(tmp_path / "n"), "capacity": 4096}}, "policy": {"placement": "arc"}}
    with pytest.raises(ConfigError, match=r'\[policy\] eviction = "arc"'):
        load_config(data)
    data["policy"]["placement"] = "first-fit"
    assert load_config(data).policy.placement == "first-fit"


# --------------------------------------------------------------------------- files


def test_invalid_toml_names_file_and_line(tmp_path):
    msg = load_error(tmp_path, '[tiers.host]\ncapacity = "8GiB\n')
    assert str(tmp_path / "offload.toml") in msg
    assert "line 2" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml not found"):
        load_config(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- default


def test_default_config(tmp_path, monkeypatch):
    home = tmp_path / "home" / "tiered"
    monkeypatch.setenv("TIERED_HOME", str(home))
    cfg = load_config(None)
    assert cfg.source == "<default>"
    assert home.is_dir()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    nvme = cfg.tier("nvme")
    assert nvme.path == home.resolve()
    host = cfg.host_tier
    assert host is not None and host.capacity > 0 and host.capacity % (1 << 20) == 0
    assert nvme.capacity > 0 and nvme.capacity % (1 << 20) == 0
    assert isinstance(cfg, Config) and cfg.engine == EngineSpec()


def test_default_home_falls_back_to_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("TIERED_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = default_config()
    assert cfg.tier("nvme").path == (tmp_path / "cache" / "tiered").resolve()


@pytest.mark.parametrize("name", ["lfu", "arc", "s3fifo"])
def test_eviction_accepts_every_registered_eviction_policy(tmp_path, name):
    cfg = load_config({"tiers": {"nvme": {"path": str(tmp_path), "capacity": "1MiB"}}, "policy": {"eviction": name}})
    assert cfg.policy.eviction == name


def test_a_newly_registered_backend_is_accepted(tmp_path, monkeypatch):
    from tiered.io_engine.backends import base

    monkeypatch.setitem(base._REGISTRY, "uring-test", base._Entry(lambda: None, ""))
    cfg = load_config(write(tmp_path, storage(tmp_path) + '\n[engine]\nbackend = "uring-test"\n'))
    assert cfg.engine.backend == "uring-test"
    assert "uring-test" in load_error(tmp_path, storage(tmp_path) + '\n[engine]\nbackend = "nope"\n')


def test_owner_shares_as_sizes_or_percentages(tmp_path):
    cfg = load_config(write(tmp_path, '[tiers.host]\ncapacity = "1GiB"\n' + storage(tmp_path) +
                            '\n[owners.kv]\nhost = "25%"\nnvme = "100MiB"\n[owners.gnn]\nhost = "512MiB"\n'))
    assert cfg.share("kv", "host") == GiB // 4 and cfg.share("kv", "nvme") == 100 << 20
    assert cfg.share("gnn", "host") == GiB // 2 and cfg.share("optim", "host") is None
    assert cfg.share("kv/replica-1", "host") == GiB // 4  # an instance falls back to its kind's table
    assert cfg.to_dict()["owners"]["kv"] == {"host": GiB // 4, "nvme": 100 << 20}


@pytest.mark.parametrize("owners,match", [
    ('[owners.kv]\nhots = "1GiB"\n', "unknown key 'owners.kv.hots'.*did you mean 'host'"),
    ('[owners.kv]\nhost = "120%"\n', "owners.kv.host = '120%'.*percentage"),
    ('[owners.kv]\nhost = "lots"\n', "owners.kv.host = 'lots'"),
    ('[owners.kv]\nhost = "60%"\n[owners.gnn]\nhost = "50%"\n', "shares of tier 'host' .*kv.*gnn.* more than its capacity"),
    ('[owners."9x"]\nhost = "1GiB"\n', "invalid owner name '9x'"),
])
def test_bad_owner_shares_name_the_key(tmp_path, owners, match):
    msg = load_error(tmp_path, '[tiers.host]\ncapacity = "1GiB"\n' + storage(tmp_path) + "\n" + owners)
    import re

    assert re.search(match, msg), msg


def test_budgets_larger_than_the_machine_are_named(tmp_path):
    from tiered.config import machine_warnings
    from tiered.store import StoreError, TieredStore

    text = '[tiers.host]\ncapacity = "100TiB"\n' + storage(tmp_path).replace('"1GiB"', '"500PiB"')
    cfg = load_config(write(tmp_path, text))
    warnings = machine_warnings(cfg)
    assert any("tiers.host.capacity = 100 TiB" in w and "RAM" in w for w in warnings), warnings
    assert any("tiers.nvme.capacity" in w and "free at" in w for w in warnings), warnings
    with pytest.raises(StoreError, match=r"tiers.host.capacity = 100 TiB .* more than this machine's RAM"):
        TieredStore(cfg).open()
    ok = load_config(write(tmp_path, '[tiers.host]\ncapacity = "64MiB"\n' + storage(tmp_path), "ok.toml"))
    assert machine_warnings(ok) == []
