"""The [milter] section of config.toml (gateway/config.py: MilterSettings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, MilterSettings, load_config, parse_config

BASE = {"gateway": {"internal_domains": ["example.com"]}}


def test_defaults_off_own_ten_seconds() -> None:
    cfg = parse_config(BASE)
    assert cfg.milter == MilterSettings(listen="", quarantine="own", progress_interval=10.0)


@pytest.mark.parametrize("listen", ["127.0.0.1:8891", "[::1]:8891", "unix:/run/mailwarden/milter.sock"])
def test_listen_forms(listen: str) -> None:
    cfg = parse_config({**BASE, "milter": {"listen": listen, "quarantine": "hold",
                                           "progress_interval": 5}})
    assert (cfg.milter.listen, cfg.milter.quarantine, cfg.milter.progress_interval) == (
        listen, "hold", 5.0)


@pytest.mark.parametrize(("milter", "error"), [
    ({"listen_adress": "x"}, "config.toml: milter.listen_adress: unknown key"),
    ({"listen": "nope"}, "config.toml: milter.listen: bad address"),
    ({"listen": "unix:milter.sock"}, "config.toml: milter.listen: bad address"),
    ({"listen": "127.0.0.1:70000"}, "config.toml: milter.listen: port out of range"),
    ({"quarantine": "drop"}, "config.toml: milter.quarantine: must be one of 'own', 'hold'"),
    ({"progress_interval": 0}, "config.toml: milter.progress_interval: must be greater than 0"),
    ({"progress_interval": 300}, "config.toml: milter.progress_interval: must be below 300"),
    ({"progress_interval": "10s"}, "config.toml: milter.progress_interval: expected a number"),
])
def test_bad_values_are_one_line_naming_the_key(milter: dict, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "milter": milter})
    assert str(info.value).startswith(error)
    assert "\n" not in str(info.value)


def test_the_shipped_config_has_the_section_with_its_defaults() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "config.toml")
    assert cfg.milter == MilterSettings()


def test_the_smtp_proxy_may_be_off_when_the_milter_listens() -> None:
    cfg = parse_config({"gateway": {"internal_domains": ["example.com"], "listen": ""},
                        "milter": {"listen": "unix:/run/mailwarden/milter.sock"}})
    assert cfg.gateway.listen == "" and cfg.milter.listen.startswith("unix:")


def test_nothing_listening_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {"internal_domains": ["example.com"], "listen": ""}})
    assert str(info.value).startswith("config.toml: gateway.listen: ")
    assert "milter.listen" in str(info.value) and "\n" not in str(info.value)
