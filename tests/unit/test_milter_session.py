"""gateway/milter/session.py + server.py against the pure-Python MTA side.

Negotiation, the message as the handler sees it, edits and verdicts as
responses, PROGRESS while the handler runs, ABORT / QUIT_NC / several
messages per connection, the size bound, TEMPFAIL when mailwarden's side
fails, hostile MTA input (a log line and a close; the listener keeps
serving), the unix socket, the connection bound and a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.milter import actions as a
from gateway.milter import codec as c
from gateway.milter import session as s
from gateway.milter.api import MilterAnswer, MilterMessage
from gateway.milter.server import MilterServer, start_milter
from tests.support.milter_client import ALL_STEPS, MtaClient, apply_edits

HEADERS = [(b"From", b" Alice <alice@ext.test>"), (b"To", b" bob@example.com"),
           (b"Subject", b" quarterly\r\n figures")]
BODY = b"hello\r\n" * 3
RAW = a.join_message(HEADERS, BODY)


class Recorder:
    """A handler that records messages and answers with ``answer(msg)``."""

    def __init__(self, answer: Callable[[MilterMessage], MilterAnswer] | None = None) -> None:
        self.messages: list[MilterMessage] = []
        self.answer = answer or (lambda m: MilterAnswer.accept())
        self.release: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, msg: MilterMessage) -> MilterAnswer:
        self.messages.append(msg)
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        return self.answer(msg)


@pytest.fixture
async def served() -> AsyncIterator[Callable[..., object]]:
    servers: list[MilterServer] = []

    async def start(handler: object, **kw: object) -> MilterServer:
        kw.setdefault("quarantine_mode", "own")
        kw.setdefault("progress_interval", 10.0)
        kw.setdefault("max_message_size", 1 << 20)
        srv = await start_milter(kw.pop("listen", "127.0.0.1:0"), handler, **kw)  # type: ignore[arg-type]
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()


async def _client(srv: MilterServer, **neg: int) -> MtaClient:
    cl = await MtaClient.open(srv.address)
    await cl.negotiate(**neg)
    return cl


async def _message(cl: MtaClient, raw_headers=HEADERS, body=BODY, **kw) -> list[c.Response]:
    await cl.envelope("alice@ext.test", ["bob@example.com", "carol@example.com"],
                      mail_args=("BODY=8BITMIME",), **kw)
    return await cl.content(raw_headers, body)


async def test_negotiation_asks_only_for_what_mailwarden_needs(served) -> None:
    srv = await served(Recorder())
    cl = await MtaClient.open(srv.address)
    reply = await cl.negotiate()
    assert reply.version == 6
    assert reply.actions == (c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_CHGBODY
                             | c.SMFIF_QUARANTINE | c.SMFIF_SETSYMLIST)
    assert reply.protocol == s.WANTED_PROTOCOL
    # body chunks go unanswered (one round trip per 64 KB less); the size
    # bound answers at the end of the body then (see the 552 tests)
    assert reply.protocol & c.SMFIP_NR_BODY
    assert dict(reply.symlists) == {
        c.SMFIM_CONNECT: "j _ {daemon_name} {client_addr}",
        c.SMFIM_ENVFROM: "{auth_authen}", c.SMFIM_EOM: "{i}"}
    await cl.close()
    # an MTA that offers fewer steps gets only those
    cl = await MtaClient.open(srv.address)
    reply = await cl.negotiate(steps=c.SMFIP_NR_HDR)
    assert reply.protocol == c.SMFIP_NR_HDR
    await cl.close()


async def test_a_message_as_the_handler_sees_it_and_a_plain_accept(served) -> None:
    rec = Recorder()
    srv = await served(rec)
    cl = await _client(srv)
    assert await cl.connect() == []                  # no replies negotiated
    assert await _message(cl, auth="carol") == [c.Accept()]
    (msg,) = rec.messages
    assert msg.raw == RAW
    assert msg.mail_from == "alice@ext.test"
    assert msg.rcpts == ("bob@example.com", "carol@example.com")
    assert msg.mail_args == ("BODY=8BITMIME",)
    assert (msg.helo, msg.client_name, msg.client_addr, msg.client_port) == (
        "client.test", "client.test", "192.0.2.7", 40000)
    assert (msg.queue_id, msg.auth_authen) == ("4ABC", "carol")
    assert msg.macros["j"] == "mta.test" and msg.macros["daemon_name"] == "smtpd"
    await cl.close()


async def test_edits_are_header_requests_then_replbody_pieces_then_accept(served) -> None:
    big = b"x" * 100 + b"\r\n"
    body = big * 1500                                  # 153,000 bytes
    edited_body = b"BANNER\r\n" + body

    def edit(msg: MilterMessage) -> MilterAnswer:
        hs, _ = a.split_message(msg.raw)
        hs = [(b"X-Mailwarden-Scan", b" clean")] + [
            (n, b" [EXTERNAL] quarterly\r\n figures") if n == b"Subject" else (n, v)
            for n, v in hs]
        return MilterAnswer.accept(msg.raw, a.join_message(hs, edited_body))

    srv = await served(Recorder(edit))
    cl = await _client(srv)
    await cl.connect()
    out = await _message(cl, body=body)
    assert out[:2] == [c.InsertHeader(1, b"X-Mailwarden-Scan", b" clean"),
                       c.ChangeHeader(1, b"Subject", b" [EXTERNAL] quarterly\n figures")]
    assert [type(p) for p in out[2:-1]] == [c.ReplaceBody] * 3
    assert type(out[-1]) is c.Accept
    got_h, got_b = apply_edits(HEADERS, body, out)
    assert got_b == edited_body
    assert got_h[0] == (b"X-Mailwarden-Scan", b" clean")
    await cl.close()


@pytest.mark.parametrize(("mode", "expect"), [
    ("own", [c.Discard()]),
    ("hold", [c.Quarantine("virus found (Eicar-Signature)"), c.Accept()]),
])
async def test_quarantine_modes(served, mode: str, expect: list) -> None:
    srv = await served(Recorder(lambda m: MilterAnswer.quarantine("virus found (Eicar-Signature)")),
                       quarantine_mode=mode)
    cl = await _client(srv)
    await cl.connect()
    assert await _message(cl) == expect
    await cl.close()


async def test_reject_and_tempfail_are_replycodes(served) -> None:
    answers = iter([MilterAnswer.reject("554 5.7.1 message refused: attachment type not allowed (a.exe)"),
                    MilterAnswer.tempfail("451 4.7.1 virus scanner unavailable, try again later")])
    srv = await served(Recorder(lambda m: next(answers)))
    cl = await _client(srv)
    await cl.connect()
    assert await _message(cl) == [
        c.ReplyCode("554 5.7.1 message refused: attachment type not allowed (a.exe)")]
    await cl.send(c.Abort())
    assert await _message(cl) == [
        c.ReplyCode("451 4.7.1 virus scanner unavailable, try again later")]
    await cl.close()


@pytest.mark.parametrize("broken", ["raises", "bad_accept", "timeout"])
async def test_whatever_breaks_on_mailwardens_side_is_tempfail_never_accept(
        served, broken: str, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(msg: MilterMessage) -> MilterAnswer:
        if broken == "raises":
            raise RuntimeError("store exploded")
        if broken == "timeout":
            await asyncio.Event().wait()
        return MilterAnswer.accept(b"not the message", b"other")

    srv = await served(handler, handler_timeout=0.2 if broken == "timeout" else None)
    cl = await _client(srv)
    await cl.connect()
    with caplog.at_level(logging.ERROR, "mailwarden.milter"):
        out = await _message(cl)
    assert out == [c.ReplyCode("451 4.3.0 local error in processing, try again later")]
    assert any("answering TEMPFAIL" in r.getMessage() for r in caplog.records)
    # the connection goes on
    await cl.send(c.Abort())
    assert await _message(cl) == out
    await cl.close()


async def test_progress_while_the_handler_runs(served) -> None:
    rec = Recorder()
    rec.release = asyncio.Event()
    srv = await served(rec, progress_interval=0.05)
    cl = await _client(srv)
    await cl.connect()
    await cl.envelope("a@ext.test", ["b@example.com"])
    await cl.send(*(c.Header(n, v.replace(b"\r\n", b"\n")) for n, v in HEADERS))
    await cl.send(c.Body(BODY))  # no reply: SMFIP_NR_BODY
    await cl.send(c.EndOfBody())
    for _ in range(3):                        # three PROGRESS before any answer
        assert await cl.read() == c.Progress()
    rec.release.set()
    while (pkt := await cl.read()) == c.Progress():
        pass
    assert pkt == c.Accept()
    await cl.close()


async def test_abort_resets_the_message_and_keeps_the_connection(served) -> None:
    rec = Recorder()
    srv = await served(rec)
    cl = await _client(srv)
    await cl.connect()
    # first transaction aborted mid-body (RSET)
    await cl.envelope("first@ext.test", ["x@example.com"], auth="old")
    await cl.send(c.Header(b"Subject", b" aborted"))
    await cl.send(c.Body(b"partial\r\n"))  # no reply: SMFIP_NR_BODY
    await cl.send(c.Abort())
    # then two messages on the same connection
    assert await _message(cl) == [c.Accept()]
    await cl.send(c.Abort())
    await cl.envelope("third@ext.test", ["y@example.com"])
    assert await cl.content([(b"Subject", b" three")], b"3\r\n") == [c.Accept()]
    m2, m3 = rec.messages
    assert m2.raw == RAW and m2.mail_from == "alice@ext.test" and m2.auth_authen == ""
    assert m2.rcpts == ("bob@example.com", "carol@example.com")
    assert m3.raw == b"Subject: three\r\n\r\n3\r\n" and m3.rcpts == ("y@example.com",)
    assert m3.client_addr == "192.0.2.7" and m3.helo == "client.test"  # connection state kept
    await cl.close()


async def test_quit_nc_reuses_the_socket_for_a_new_smtp_connection(served) -> None:
    rec = Recorder()
    srv = await served(rec)
    cl = await _client(srv)
    await cl.connect(addr="192.0.2.1", helo="one.test")
    assert await _message(cl) == [c.Accept()]
    await cl.send(c.QuitNC())
    await cl.connect(host="two.test", addr="198.51.100.2", helo="two.test",
                     macros=(("{client_addr}", "198.51.100.2"),))
    assert await _message(cl) == [c.Accept()]
    one, two = rec.messages
    assert (one.client_addr, one.helo) == ("192.0.2.1", "one.test")
    assert (two.client_addr, two.helo, two.client_name) == ("198.51.100.2", "two.test", "two.test")
    assert "daemon_name" not in two.macros                  # connection macros were reset
    # after QUIT_NC the MTA may also negotiate again
    await cl.send(c.QuitNC())
    await cl.negotiate()
    await cl.connect()
    assert await _message(cl) == [c.Accept()]
    await cl.send(c.Quit())
    assert await cl.closed()


@pytest.mark.parametrize("body_replies", [False, True])
async def test_over_the_size_bound_is_552(served, body_replies: bool) -> None:
    """At the end of the body (body chunks unanswered, SMFIP_NR_BODY), or at
    the chunk that crosses the bound when the MTA wants every chunk answered."""
    rec = Recorder()
    srv = await served(rec, max_message_size=100_000)
    cl = await _client(srv, steps=ALL_STEPS & ~c.SMFIP_NR_BODY if body_replies else ALL_STEPS)
    await cl.connect()
    body = b"y" * 98 + b"\r\n" * 1 + b"z" * 150_000
    out = await _message(cl, body=body)
    assert out == [c.ReplyCode("552 5.3.4 message size exceeds fixed limit (100000 bytes)")]
    assert rec.messages == []
    await cl.send(c.Abort())
    assert await _message(cl) == [c.Accept()]            # the next message is fine
    await cl.close()


async def test_an_mta_without_no_reply_steps_gets_a_continue_for_every_event(served) -> None:
    srv = await served(Recorder())
    cl = await _client(srv, steps=0)
    assert await cl.connect() == [c.Continue(), c.Continue()]
    await cl.envelope("a@ext.test", ["b@example.com"])
    assert await cl.content(HEADERS, BODY) == [c.Accept()]
    await cl.close()


@pytest.mark.parametrize(("name", "data"), [
    ("unknown command", c.frame(b"Z", b"")),
    ("length 2**31", struct.pack("!I", 2**31) + b"B"),
    ("length 0", struct.pack("!I", 0)),
    ("body before MAIL", c.Body(b"x").encode()),
    ("header after the body", c.Mail(("<a@b>",)).encode() + c.Body(b"x").encode()
     + c.Header(b"S", b"x").encode()),
    ("rcpt before mail", c.Rcpt(("<a@b>",)).encode()),
    ("second optneg", c.OptNeg(6, 0x1FF, 0x1FFFFF).encode()),
    ("truncated packet", c.Header(b"Subject", b"x").encode()[:-2]),
    ("malformed connect", c.frame(b"C", b"host-without-nul")),
])
async def test_hostile_mta_input_is_a_log_line_and_a_close(
        served, caplog: pytest.LogCaptureFixture, name: str, data: bytes) -> None:
    srv = await served(Recorder())
    cl = await _client(srv)
    with caplog.at_level(logging.INFO, "mailwarden.milter"):
        await cl.send_raw(data)
        if name == "truncated packet":
            cl.writer.write_eof()
        while (pkt := await cl.read()) is not None:
            assert type(pkt) is c.Continue, pkt      # never an accept
        await cl.close()
    assert [r for r in caplog.records if "protocol error" in r.getMessage()], name
    # the listener keeps serving
    cl2 = await _client(srv)
    await cl2.connect()
    assert await _message(cl2) == [c.Accept()]
    await cl2.close()


async def test_a_connection_that_never_sends_optneg_is_closed(
        served, caplog: pytest.LogCaptureFixture) -> None:
    srv = await served(Recorder(), negotiate_timeout=0.2)
    cl = await MtaClient.open(srv.address)
    with caplog.at_level(logging.WARNING, "mailwarden.milter"):
        assert await cl.closed()
    assert any("no OPTNEG timeout" in r.getMessage() for r in caplog.records)


async def test_an_mta_that_cannot_change_the_body_is_refused_at_negotiation(served) -> None:
    srv = await served(Recorder())
    cl = await MtaClient.open(srv.address)
    await cl.send(c.OptNeg(6, c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS, 0x1FFFFF))
    assert await cl.closed()


async def test_unix_socket_mode_0660_stale_socket_replaced_other_files_kept(
        served, tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                         # a stale socket file is left
    srv = await served(Recorder(), listen=f"unix:{path}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert srv.listen_text == f"unix:{path}"
    cl = await _client(srv)
    await cl.connect()
    assert await _message(cl) == [c.Accept()]
    await cl.close()
    with pytest.raises(OSError, match="another process is listening"):
        await start_milter(f"unix:{path}", Recorder(), quarantine_mode="own",
                           progress_interval=10, max_message_size=1000)
    other = tmp_path / "file"
    other.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        await start_milter(f"unix:{other}", Recorder(), quarantine_mode="own",
                           progress_interval=10, max_message_size=1000)
    assert other.read_text() == "keep me"


async def test_connection_bound(served) -> None:
    srv = await served(Recorder(), max_connections=1)
    cl = await _client(srv)
    cl2 = await MtaClient.open(srv.address)
    await cl2.send(c.OptNeg(6, 0x1FF, 0x1FFFFF))
    assert await cl2.closed()
    assert srv.refused == 1
    await cl.connect()
    assert await _message(cl) == [c.Accept()]
    await cl.close()


async def test_graceful_stop_finishes_the_message_in_flight(served) -> None:
    rec = Recorder()
    rec.release = asyncio.Event()
    srv = await served(rec)
    busy = await _client(srv)
    idle = await _client(srv)
    await busy.connect()
    await idle.connect()
    await busy.envelope("a@ext.test", ["b@example.com"])
    await busy.send(c.Header(b"Subject", b" x"), c.EndOfBody())
    await rec.entered.wait()
    srv.close()
    assert await idle.closed()                          # idle: closed at once
    closing = asyncio.ensure_future(srv.wait_closed())
    rec.release.set()
    assert await busy.final() == [c.Accept()]            # the message in flight is answered
    assert await busy.closed()
    await closing
    with pytest.raises(OSError):
        await MtaClient.open(srv.address)


async def test_drain_timeout_cancels_without_answering(served) -> None:
    rec = Recorder()
    rec.release = asyncio.Event()                        # never set
    srv = await served(rec, drain_timeout=0.2)
    cl = await _client(srv)
    await cl.connect()
    await cl.envelope("a@ext.test", ["b@example.com"])
    await cl.send(c.Header(b"Subject", b" x"), c.EndOfBody())
    await rec.entered.wait()
    srv.close()
    await srv.wait_closed()
    assert await cl.closed()                             # no ACCEPT: the MTA's default applies
