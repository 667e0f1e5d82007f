"""``[tiers.NAME] kind = "shared"``: its keys, their validation, and its place apart from the store's tiers."""

from __future__ import annotations

import pytest

from tiered.config import ConfigError, load_config


def config(tmp_path, **shared) -> dict:
    return {"tiers": {"nvme": {"path": str(tmp_path / "nvme"), "capacity": "8MiB"}, "shared": shared}}


def test_a_url_makes_a_shared_tier_apart_from_the_stores_tiers(tmp_path):
    cfg = load_config(config(tmp_path, url="redis://10.0.0.5:6380/3", capacity="2GiB", required=False, timeout=0.5))
    assert [t.name for t in cfg.tiers] == ["nvme"]
    (t,) = cfg.shared_tiers
    assert (t.kind, t.url, t.capacity, t.required, t.timeout, t.external) == (
        "shared", "redis://10.0.0.5:6380/3", 2 << 30, False, 0.5, True)
    assert not cfg.tiers[0].external
    assert cfg.to_dict()["tiers"]["shared"]["url"] == "redis://10.0.0.5:6380/3"


@pytest.mark.parametrize("url", ["unix:///run/redis.sock", "rediss://user:pw@cache.example:6379/0", "redis://h"])
def test_accepted_urls(tmp_path, url):
    assert load_config(config(tmp_path, url=url, capacity="1GiB")).shared_tiers[0].url == url


@pytest.mark.parametrize("body, match", [
    ({"url": "http://h:6379", "capacity": "1GiB"},
     r"tiers\.shared\.url = 'http://h:6379'.*schemes: redis, rediss, unix"),
    ({"url": "redis://h:port/0", "capacity": "1GiB"}, r"tiers\.shared\.url = 'redis://h:port/0'.*expected a URL"),
    ({"url": "redis://h/zero", "capacity": "1GiB"}, r"numeric port and database"),
    ({"url": "redis:///0", "capacity": "1GiB"}, r"with a host"),
    ({"url": 6379, "capacity": "1GiB"}, r"tiers\.shared\.url = 6379"),
    ({"url": "redis://h", "capacity": "1GiB", "required": "yes"}, r"tiers\.shared\.required = 'yes'.*true or false"),
    ({"url": "redis://h", "capacity": "1GiB", "timeout": -1}, r"tiers\.shared\.timeout = -1"),
    ({"url": "redis://h"}, r"missing required key tiers\.shared\.capacity"),
    ({"kind": "shared", "capacity": "1GiB"}, r"missing required key tiers\.shared\.url"),
    ({"url": "redis://h", "capacity": "1GiB", "path": "/x"}, r"tiers\.shared\.url.*not allowed in a storage tier"),
    ({"kind": "shared", "url": "redis://h", "capacity": "1GiB", "read_bandwidth": "1MB/s"},
     r"tiers\.shared\.read_bandwidth.*not allowed in a shared tier"),
    ({"url": "redis://h", "capacity": "1GiB", "urll": 1}, r"unknown key 'tiers\.shared\.urll'.*did you mean 'url'"),
])
def test_bad_shared_tiers_are_config_errors_naming_the_key(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        load_config(config(tmp_path, **body))


def test_at_most_one_shared_tier(tmp_path):
    cfg = config(tmp_path, url="redis://a", capacity="1GiB")
    cfg["tiers"]["other"] = {"url": "redis://b", "capacity": "1GiB"}
    with pytest.raises(ConfigError, match="at most one shared tier is allowed, found 'shared', 'other'"):
        load_config(cfg)


def test_owner_shares_cannot_name_the_shared_tier(tmp_path):
    cfg = config(tmp_path, url="redis://a", capacity="1GiB")
    cfg["owners"] = {"kv": {"shared": "10%"}}
    with pytest.raises(ConfigError, match=r"unknown key 'owners\.kv\.shared'"):
        load_config(cfg)
