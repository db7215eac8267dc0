"""pytest plugin: the session-scoped ``clamd`` fixture (a real clamd).

Wired in by ``tests/conftest.py`` (``pytest_plugins``).  When clamd is not
installed the fixture *fails* (it does not skip): the virus-scanning tests are
part of what the suite proves.  Install with
``apt-get install -y clamav-daemon clamav-testfiles`` (the README's test
command does this).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clamd import (
    CLAMD_PACKAGE,
    TESTFILES,
    TESTFILES_PACKAGE,
    Clamd,
    find_clamd,
)


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    """A running clamd on a unix socket in a temp dir (``.socket``), also on
    loopback TCP (``.tcp_address``); ``.stop()``/``.start()``/``.stopped()``
    take it down and bring it back (always restart it for the next test)."""
    if find_clamd() is None:
        pytest.fail(
            f"clamd is not installed: run `apt-get install -y {CLAMD_PACKAGE} "
            f"{TESTFILES_PACKAGE}` (the README's test command does this)",
            pytrace=False,
        )
    if not TESTFILES.is_dir():
        pytest.fail(
            f"{TESTFILES} is missing: run `apt-get install -y {TESTFILES_PACKAGE}`",
            pytrace=False,
        )
    server = Clamd(tcp=True)
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        pytest.fail(f"could not start clamd: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()
