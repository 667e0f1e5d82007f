"""A shared tier's URL may carry a password: it never reaches logs, errors, printed configs or reprs."""

from __future__ import annotations

import logging
import socket

import pytest

from tiered.config import ConfigError, load_config, redact_url
from tiered.kv.shared import SharedTier, SharedTierError

SECRET = "S3CRET"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, shown", [
    ("redis://user:S3CRET@h:6379/0", "redis://user:***@h:6379/0"),
    ("redis://:S3CRET@h/0", "redis://:***@h/0"),
    ("rediss://S3CRET@h/0", "rediss://***@h/0"),
    ("redis://h:1/0?password=S3CRET&db=1", "redis://h:1/0?password=***&db=1"),
    ("unix:///run/r.sock?db=0&password=S3CRET", "unix:///run/r.sock?db=0&password=***"),
    ("redis://10.0.0.5:6380/3", "redis://10.0.0.5:6380/3"),
])
def test_redact_url_hides_passwords_only(url, shown):
    assert redact_url(url) == shown


def test_a_password_is_in_no_config_error_dict_or_repr(tmp_path):
    def cfg(url):
        return {"tiers": {"nvme": {"path": str(tmp_path / "nv"), "capacity": "8MiB"},
                          "shared": {"url": url, "capacity": "1GiB"}}}
    with pytest.raises(ConfigError) as e:
        load_config(cfg(f"redis://:{SECRET}@h/zero"))
    assert SECRET not in str(e.value) and "redis://:***@h/zero" in str(e.value)
    c = load_config(cfg(f"redis://:{SECRET}@h/0?password={SECRET}"))
    assert c.shared_tiers[0].url == f"redis://:{SECRET}@h/0?password={SECRET}"  # still used to connect
    assert SECRET not in str(c.to_dict()) and SECRET not in repr(c.shared_tiers[0]) and SECRET not in repr(c)
    assert c.to_dict()["tiers"]["shared"]["url"] == "redis://:***@h/0?password=***"


@pytest.mark.parametrize("url", [f"redis://user:{SECRET}@127.0.0.1:{{port}}/0",
                                 f"redis://127.0.0.1:{{port}}/0?password={SECRET}"])
def test_a_password_is_in_no_open_error_or_warning(url, caplog):
    url = url.format(port=_dead_port())
    with pytest.raises(SharedTierError) as e:
        SharedTier(url, 1 << 20, timeout=0.5).open()
    assert SECRET not in str(e.value) and redact_url(url) in str(e.value)
    with caplog.at_level(logging.WARNING, logger="tiered.kv"):
        tier = SharedTier(url, 1 << 20, timeout=0.5, required=False).open()
        tier.close()
    assert redact_url(url) in caplog.text and SECRET not in caplog.text
    with pytest.raises(SharedTierError) as e:
        SharedTier(url, 0)
    assert SECRET not in str(e.value)
