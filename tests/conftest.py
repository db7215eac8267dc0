"""Shared fixtures: a recording next hop, a gateway factory, real clamd and DNS."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import Gateway, NextHop, test_config
from tests.support.otheruser import PortableInstall, portable_install
from tests.support.postgres import PgMissing, PgServer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPUS = SHARED / "corpus"

pytest_plugins = [
    name
    for name in ("tests.support.fx_clamd", "tests.support.fx_dns")
    if importlib.util.find_spec(name) is not None
]


@pytest.fixture
def corpus() -> Path:
    """../shared/corpus, or a visible skip where it is absent (a user's fresh clone)."""
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not present at {CORPUS} (only in the project's CI)")
    return CORPUS


@pytest.fixture(scope="session")
def other_user_install() -> Iterator[PortableInstall]:
    """mailwarden and its dependencies where any user can run them (issue 19):
    for tests that run the CLI as another Unix user; see tests/support/otheruser.py."""
    install = portable_install(REPO)
    yield install
    install.remove()


def _pg_server() -> Iterator[PgServer]:
    """A private PostgreSQL (Unix socket only).  Without PostgreSQL installed:
    a failure in CI (``CI=true``), a visible skip elsewhere."""
    try:
        server = PgServer.create()
    except PgMissing as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One server for the whole session; each test takes a fresh database
    with ``pg_server.new_database()`` (issue 16)."""
    yield from _pg_server()


@pytest.fixture(scope="module")
def own_pg_server() -> Iterator[PgServer]:
    """A server of the module's own: its outage tests stop and start it."""
    yield from _pg_server()


@pytest.fixture
def next_hop() -> Iterator[NextHop]:
    nh = NextHop()
    yield nh
    nh.stop()


@pytest.fixture
def make_gateway(tmp_path: Path, next_hop: NextHop) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def factory(
        chain: list[str] | tuple[str, ...] = (),
        filters: dict[str, dict[str, Any]] | None = None,
        gateway: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
        dns_txt: Any = None,
        next_hop_address: str | None = None,
        milter: dict[str, Any] | None = None,
    ) -> Gateway:
        cfg = test_config(
            tmp_path, next_hop_address or next_hop.address, chain=chain, filters=filters,
            gateway=gateway, store=store, milter=milter,
        )
        gw = Gateway(cfg, dns_txt=dns_txt)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        gw.stop()
