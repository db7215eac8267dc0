"""The filter registry's names, and config without the filters (issue 14).

Proves: ``filters.FILTERS`` (chain name -> ``module:Class``, what config
checks names against without importing a filter) and ``filters.REGISTRY``
(the classes, built from it on first use) agree, name for name and in
order; ``load_config(with_filters=False)`` refuses the same unknown chain
names and sections with the same messages as the full load, and builds no
filter settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import filters
from gateway.config import ConfigError, load_config


def test_the_names_match_the_classes() -> None:
    assert list(filters.REGISTRY) == list(filters.FILTERS)
    for name, cls in filters.REGISTRY.items():
        assert cls.name == name
        module, attr = filters.FILTERS[name].split(":")
        assert (cls.__module__, cls.__name__) == (module, attr)


def _config(tmp_path: Path, filters_toml: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[gateway]\ninternal_domains = ["example.com"]\n'
                    f'[store]\npath = "{tmp_path / "store"}"\n[filters]\n{filters_toml}')
    return path


@pytest.mark.parametrize(("toml", "message"), [
    ('chain = ["clamav", "nosuch"]', "filters.chain: unknown filter 'nosuch' (known: "),
    ('chain = ["clamav", "clamav"]', "filters.chain: filter 'clamav' listed twice"),
    ('chain = []\n[filters.nosuch]\nx = 1', "filters.nosuch: unknown key"),
])
def test_names_are_checked_without_the_filters(tmp_path: Path, toml: str, message: str) -> None:
    path = _config(tmp_path, toml)
    errors = []
    for with_filters in (True, False):
        with pytest.raises(ConfigError) as info:
            load_config(path, with_filters=with_filters)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert message in errors[0] and str(path) in errors[0]


def test_without_the_filters_no_settings_are_built(tmp_path: Path) -> None:
    path = _config(tmp_path, 'chain = ["clamav", "header_log"]\n[filters.clamav]\n')
    light = load_config(path, with_filters=False)
    full = load_config(path)
    assert light.chain == full.chain == ("clamav", "header_log")
    assert dict(light.filters) == {}
    assert set(full.filters) == set(filters.FILTERS)
    assert light.store == full.store and light.gateway == full.gateway
