"""pytest fixture ``dns_server``: a started :class:`tests.support.dns.LoopbackDNS`.

Function-scoped (it starts in well under a millisecond), stopped after the test.
Wired in through ``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dns import LoopbackDNS


@pytest.fixture
def dns_server() -> Iterator[LoopbackDNS]:
    """A loopback DNS server: ``.address``, ``.add_txt``, ``.set_timeout``, ``.set_servfail``."""
    server = LoopbackDNS().start()
    try:
        yield server
    finally:
        server.stop()
