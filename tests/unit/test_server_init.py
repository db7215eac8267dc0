"""GatewaySMTP's per-connection setup: the fast path builds the same protocol
object as aiosmtpd's own ``__init__`` (same attributes, same method tables)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from gateway import server
from gateway.server import GatewaySMTP, Handler

KWARGS: dict[str, Any] = dict(
    data_size_limit=1000, enable_SMTPUTF8=True, decode_data=False, hostname="mx.test",
    ident="mailwarden ESMTP", tls_context=None, require_starttls=False, timeout=30,
)


class FakeGateway:
    pass


def _normal(handler: Handler) -> GatewaySMTP:
    """A protocol object built by aiosmtpd's own __init__ only."""
    obj = GatewaySMTP.__new__(GatewaySMTP)
    SMTP.__init__(obj, handler, **KWARGS)
    obj.gateway = handler.gateway  # what GatewaySMTP.__init__ adds after either path
    obj.data_lines = None
    obj._idle_deadline = 0.0
    obj._idle_armed = False
    return obj


def _comparable(obj: GatewaySMTP) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key in ("_stream_reader", "_stream_reader_wr", "_closed", "_loop",
                   "_over_ssl", "_strong_reader", "_reject_connection", "_task"):
            continue
        if isinstance(value, Mapping) and key in ("_auth_methods", "_handle_hooks",
                                                  "_smtp_methods"):
            value = {k: _unbound(v) for k, v in value.items()}
            value = (list(value), value)  # the order counts too (EHLO, HELP list them)
        elif isinstance(value, types.MethodType):
            value = _unbound(value)
        elif isinstance(value, Handler):
            value = type(value)
        out[key] = value
    return out


def _unbound(value: Any) -> Any:
    if isinstance(value, tuple):  # _AuthMechAttr(method, is_builtin)
        return (_unbound(value[0]), value[1])
    assert isinstance(value, types.MethodType)
    return (value.__func__, type(value.__self__))


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GatewaySMTP, "_tables", {})


async def test_fast_init_builds_what_aiosmtpd_builds() -> None:
    gw = FakeGateway()
    first = GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    second = GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    tables = GatewaySMTP._tables[Handler]
    assert tables is not None and tables.verified  # the second took the fast path
    reference = _normal(Handler(gw))  # type: ignore[arg-type]
    assert _comparable(second) == _comparable(reference) == _comparable(first)
    # Bound to their own objects, not to the first connection's.
    assert second._smtp_methods["DATA"].__self__ is second
    assert second._handle_hooks["DATA"].__self__ is second.event_handler
    assert second._handle_hooks["DATA"].__self__ is not first.event_handler
    assert {"DATA", "XFORWARD", "EHLO", "AUTH"} <= set(second._smtp_methods)
    assert {"DATA", "MAIL", "RCPT", "EHLO"} <= set(second._handle_hooks)
    assert set(second._auth_methods) == {"LOGIN", "PLAIN"}
    assert second.gateway is gw


async def test_unknown_release_takes_the_normal_path(monkeypatch: pytest.MonkeyPatch) -> None:
    gw = FakeGateway()
    GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    monkeypatch.setattr(aiosmtpd, "__version__", "9.9")
    calls = []
    real = SMTP.__init__

    def spy(self: Any, *args: Any, **kw: Any) -> None:
        calls.append(1)
        real(self, *args, **kw)

    monkeypatch.setattr(SMTP, "__init__", spy)
    GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    assert calls == [1]
    monkeypatch.setattr(aiosmtpd, "__version__", "1.4.6")
    GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    assert calls == [1]  # known release: fast
    GatewaySMTP(Handler(gw), auth_required=False, **KWARGS)  # type: ignore[arg-type]
    assert calls == [1, 1]  # an argument the fast path does not know: normal


async def test_a_mismatch_disables_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    gw = FakeGateway()
    GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    tables = GatewaySMTP._tables[Handler]
    assert tables is not None
    # As if aiosmtpd's __init__ had set an attribute the fast path does not.
    tables.attrs = tables.attrs | {"_new_in_some_release"}
    obj = GatewaySMTP(Handler(gw), **KWARGS)  # type: ignore[arg-type]
    assert GatewaySMTP._tables[Handler] is None
    assert obj._smtp_methods["DATA"].__self__ is obj
    assert server.FAST_INIT_VERSIONS  # the guard exists


ADDRESSES = [
    "", "<>", "<a@b.example>", "<a@b.example> SIZE=100", "a@b.example", "a@b.example BODY=8BITMIME",
    "  <a@b.example>", "<@relay.example:a@b.example>", "<\"quoted local\"@b.example>", "<a@[192.0.2.1]>",
    "<a@b.example", "a b c", "<" + "x" * 70 + "@b.example>", "<ü@b.example>", "<a@b..example>",
    "garbage<>", "<postmaster>", "<a@b.example> (comment)", "<a@b.example>  SIZE=1",
    "<a@b.example>SIZE=1", "<a@b.example> ", "<a@b.example>\t", "<a@b.example>\r\nX",
    "<a.b@c>", "<a..b@c>", "<.a@c>", "<a.@c>", "<a@c.>", "<a@-c>", "<A.Z@B.EXAMPLE>",
    "<a+tag=x@b-c.example> SMTPUTF8 BODY=8BITMIME", "<a@b@c>", "< a@b.example>",
    "<a@b.example >", "<{}~!#$%&'*+/=?^_`|-@x.y>", "<" + "l" * 65 + "@x.y>",
]


@pytest.mark.parametrize("arg", ADDRESSES)
async def test_getaddr_same_as_aiosmtpd(arg: str) -> None:
    obj = GatewaySMTP(Handler(FakeGateway()), **KWARGS)  # type: ignore[arg-type]
    assert obj._getaddr(arg) == SMTP._getaddr(obj, arg)
    obj.local_part_limit = 64
    assert obj._getaddr(arg) == SMTP._getaddr(obj, arg)


async def test_getaddr_same_as_aiosmtpd_random() -> None:
    import random

    rng = random.Random(18)
    alphabet = "ab.@<> =\"()[]:;,\\\t\r\n-+Z9ü"
    obj = GatewaySMTP(Handler(FakeGateway()), **KWARGS)  # type: ignore[arg-type]
    for _ in range(6000):
        arg = "<" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14)))
        if rng.random() < 0.5:
            arg = "<a@b.c>" + arg[1:]
        assert _outcome(obj._getaddr, arg) == _outcome(partial(SMTP._getaddr, obj), arg), arg


def _outcome(fn: Any, arg: str) -> Any:
    try:
        return fn(arg)
    except Exception as exc:  # the header parser has bugs of its own (IndexError)
        return type(exc)
