"""The SMTP proxy against a real client and a real next hop on loopback (issue 2)."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.harness import make_message


def _raw_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    _read_reply(s)
    return s


def _read_reply(s: socket.socket) -> bytes:
    """Read one (possibly multi-line) SMTP reply."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        complete = [ln for ln in lines[:-1]]
        if complete and len(complete[-1]) >= 4 and complete[-1][3:4] == b" ":
            return data


def _cmd(s: socket.socket, line: bytes) -> bytes:
    s.sendall(line + b"\r\n")
    return _read_reply(s)


# ------------------------------------------------------------------------ relaying


def test_relay_keeps_original_bytes_and_envelope(make_gateway, next_hop):
    gw = make_gateway()
    raw = make_message(subject="bytes intact", body="line one\n.leading dot\n..two dots\n")
    code, text = gw.send(raw, "sender@example.com", ["x@example.com", "y@other.test"])
    assert code == 250 and "queued as NH1" in text
    got = next_hop.messages[0]
    assert got.data == raw
    assert got.mail_from == "sender@example.com"
    assert got.rcpt_tos == ["x@example.com", "y@other.test"]


def test_empty_chain_is_pure_relay_for_odd_bytes(make_gateway, next_hop):
    """chain = []: output is exactly the input, including a first-line dot and 8-bit bytes."""
    gw = make_gateway()
    raw = b".starts with a dot\r\nSubject: \xe9t\xe9\r\n\r\n\xff\xfe body\r\n.\r\n..\r\nend\r\n"
    with gw.smtp() as s:
        s.ehlo("c.test")
        s.mail("a@ext.test", ["BODY=8BITMIME"])
        s.rcpt("b@example.com")
        # smtplib dot-stuffs for us; the gateway must unstuff exactly once.
        code, _ = s.data(raw)
    assert code == 250
    assert next_hop.messages[0].data == raw


def test_empty_message(make_gateway, next_hop):
    gw = make_gateway()
    s = _raw_session(gw.port)
    _cmd(s, b"EHLO c.test")
    assert _cmd(s, b"MAIL FROM:<a@ext.test>").startswith(b"250")
    assert _cmd(s, b"RCPT TO:<b@example.com>").startswith(b"250")
    assert _cmd(s, b"DATA").startswith(b"354")
    assert _cmd(s, b".").startswith(b"250")
    _cmd(s, b"QUIT")
    s.close()
    assert next_hop.messages[0].data == b""


def test_swaks_client(make_gateway, next_hop):
    gw = make_gateway()
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{gw.port}", "--from", "s@ext.test", "--to",
         "r@example.com", "--header", "Subject: via swaks", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as NH1" in out.stdout
    assert b"Subject: via swaks" in next_hop.messages[0].data


def test_pipelined_commands_after_end_of_data(make_gateway, next_hop):
    """Bytes after <CRLF>.<CRLF> in the same packet are the next commands."""
    gw = make_gateway()
    s = _raw_session(gw.port)
    _cmd(s, b"EHLO c.test")
    s.sendall(b"MAIL FROM:<a@ext.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    buf = b""
    while buf.count(b"\r\n") < 3:
        buf += s.recv(4096)
    assert b"354" in buf
    s.sendall(b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<c@ext.test>\r\n"
              b"RCPT TO:<d@example.com>\r\nDATA\r\n")
    buf = b""
    while buf.count(b"\r\n") < 4:
        buf += s.recv(4096)
    assert buf.split(b"\r\n")[0].startswith(b"250"), buf
    assert b"354" in buf
    assert _cmd(s, b"Subject: two\r\n\r\nsecond\r\n.").startswith(b"250")
    _cmd(s, b"QUIT")
    s.close()
    assert [m.mail_from for m in next_hop.messages] == ["a@ext.test", "c@ext.test"]
    assert next_hop.messages[1].data == b"Subject: two\r\n\r\nsecond\r\n"


# --------------------------------------------------------------- recipients, sizes


def test_rcpt_refusal_mirrored_and_mixed_recipients(make_gateway, next_hop):
    next_hop.rcpt_replies["nobody@example.com"] = "550 5.1.1 <nobody@example.com>: unknown user"
    gw = make_gateway()
    with gw.smtp() as s:
        s.ehlo("c.test")
        s.mail("a@ext.test")
        assert s.rcpt("b@example.com")[0] == 250
        code, msg = s.rcpt("nobody@example.com")
        assert code == 550 and b"5.1.1" in msg and b"unknown user" in msg
        assert s.rcpt("c@example.com")[0] == 250
        code, _ = s.data(make_message())
        assert code == 250
    assert next_hop.messages[0].rcpt_tos == ["b@example.com", "c@example.com"]


def test_all_recipients_refused_means_no_data(make_gateway, next_hop):
    next_hop.rcpt_replies["nobody@example.com"] = "550 5.1.1 unknown user"
    gw = make_gateway()
    with gw.smtp() as s:
        s.ehlo("c.test")
        s.mail("a@ext.test")
        assert s.rcpt("nobody@example.com")[0] == 550
        code, _ = s.docmd("DATA")
        assert code == 503
    assert next_hop.messages == []


def test_oversize_gets_552(make_gateway, next_hop):
    gw = make_gateway(gateway={"max_message_size": 20000})
    big = make_message(body=("z" * 76 + "\n") * 400)  # ~31 KB
    code, text = gw.send(big)
    assert code == 552 and "5.3.4" in text
    # The session is still usable and the next message goes through.
    code, _ = gw.send(make_message(body="small"))
    assert code == 250
    assert len(next_hop.messages) == 1


def test_size_parameter_over_limit_refused_at_mail(make_gateway, next_hop):
    gw = make_gateway(gateway={"max_message_size": 20000})
    with gw.smtp() as s:
        s.ehlo("c.test")
        assert s.has_extn("size") and s.esmtp_features["size"] == "20000"
        code, _ = s.mail("a@ext.test", ["SIZE=50000"])
        assert code == 552


# --------------------------------------------------------------- next hop trouble


def test_next_hop_down_then_back(make_gateway, next_hop):
    gw = make_gateway()
    next_hop.stop_listening()
    code, text = gw.send(make_message())
    assert code == 451 and "4.4.1" in text
    next_hop.start()
    code, _ = gw.send(make_message(subject="after"))
    assert code == 250
    assert len(next_hop.messages) == 1


def test_next_hop_drops_mid_data(make_gateway, next_hop):
    gw = make_gateway()
    next_hop.drop_on_data = True
    code, text = gw.send(make_message(subject="dropped"))
    assert code == 451, text
    assert next_hop.messages == []
    next_hop.drop_on_data = False
    code, _ = gw.send(make_message(subject="retry"))
    assert code == 250
    assert len(next_hop.messages) == 1  # no duplicate, no loss


def test_next_hop_slow_past_timeout(make_gateway, next_hop):
    gw = make_gateway(gateway={"next_hop_timeout": 3})
    # Slower than any timeout: the next hop answers the end of data only when
    # the test lets it (after the gateway has given up).
    next_hop.hold = threading.Event()
    try:
        code, text = gw.send(make_message())
        assert code == 451 and "4.4.2" in text
    finally:
        next_hop.hold.set()
    next_hop.wait_answered(1)  # the slow transaction has finished at the next hop side
    next_hop.hold = None
    code, _ = gw.send(make_message())
    assert code == 250


def test_next_hop_data_refusal_passed_through(make_gateway, next_hop):
    gw = make_gateway()
    next_hop.data_reply = "554 5.7.1 content rejected downstream"
    code, text = gw.send(make_message())
    assert code == 554 and "content rejected downstream" in text
    next_hop.data_reply = "452 4.3.1 insufficient storage"
    code, text = gw.send(make_message())
    assert code == 452


def test_next_hop_refuses_mail_from(make_gateway, next_hop):
    next_hop.mail_reply = "553 5.7.1 sender not allowed"
    gw = make_gateway()
    with gw.smtp() as s:
        s.ehlo("c.test")
        code, msg = s.mail("a@ext.test")
    assert code == 553 and b"sender not allowed" in msg


# ---------------------------------------------------------------- sessions, limits


def test_max_sessions_gets_421(make_gateway, next_hop):
    gw = make_gateway(gateway={"max_sessions": 2})
    held = [_raw_session(gw.port) for _ in range(2)]
    extra = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    reply = _read_reply(extra)
    assert reply.startswith(b"421 4.7.0"), reply
    extra.close()
    for s in held:
        s.close()
    _wait_greeted(gw.port)  # the gateway has seen the held sessions go
    code, _ = gw.send(make_message())
    assert code == 250


def _wait_greeted(port: int, timeout: float = 120) -> None:
    """Until a new session is greeted with 220 instead of 421."""
    deadline = time.monotonic() + timeout
    reply = b""
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            reply = _read_reply(s)
            if reply.startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                _read_reply(s)
                return
        time.sleep(0.02)  # poll interval of the wait
    raise AssertionError(f"no 220 greeting within {timeout} s after the sessions closed: {reply!r}")


# ------------------------------------------------------------------------ XFORWARD


def test_xforward_from_trusted_peer(make_gateway, next_hop):
    gw = make_gateway()
    with gw.smtp() as s:
        s.ehlo("postfix.example.com")
        assert s.has_extn("xforward")
        code, _ = s.docmd("XFORWARD", "NAME=mx.ext.test ADDR=203.0.113.9 PROTO=ESMTP HELO=mx.ext.test")
        assert code == 250
        s.sendmail("a@ext.test", ["b@example.com"], make_message())
    mail, result = gw.results[0]
    assert mail.client_addr == "203.0.113.9"
    assert mail.direction == "inbound"
    assert result.disposition == "relayed"
    xf = next_hop.messages[0].xforward
    assert xf["ADDR"] == "203.0.113.9" and xf["NAME"] == "mx.ext.test"


def test_no_xforward_means_peer_address_and_outbound(make_gateway, next_hop):
    gw = make_gateway()
    gw.send(make_message(), "a@example.com", ["x@other.test"])
    gw.send(make_message(), "a@example.com", ["x@example.com", "y@sub.example.com"])
    assert gw.results[0][0].client_addr == "127.0.0.1"
    assert gw.results[0][0].direction == "outbound"
    assert gw.results[1][0].direction == "internal"


def test_xforward_refused_from_untrusted_peer(make_gateway, next_hop):
    gw = make_gateway(gateway={"trusted_networks": ["10.255.255.0/24"]})
    with gw.smtp() as s:
        s.ehlo("c.test")
        assert not s.has_extn("xforward")
        code, _ = s.docmd("XFORWARD", "ADDR=10.255.255.1")
        assert code == 550
        s.sendmail("a@example.com", ["b@example.com"], make_message())
    mail, _ = gw.results[0]
    assert mail.client_addr == "127.0.0.1"
    assert mail.direction == "inbound"


# ---------------------------------------------------------------- STARTTLS, UTF-8


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=mailwarden.test"],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


def test_starttls(make_gateway, next_hop, certificate):
    cert, key = certificate
    gw = make_gateway(gateway={"tls_cert": cert, "tls_key": key})
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with gw.smtp() as s:
        s.ehlo("c.test")
        assert s.has_extn("starttls")
        s.starttls(context=ctx)
        s.ehlo("c.test")
        assert not s.has_extn("starttls")
        assert not s.has_extn("auth")
        s.sendmail("a@ext.test", ["b@example.com"], make_message(subject="over tls"))
    assert b"over tls" in next_hop.messages[0].data


def test_smtputf8_addresses(make_gateway, next_hop):
    gw = make_gateway()
    with gw.smtp() as s:
        s.ehlo("c.test")
        assert s.has_extn("smtputf8") and s.has_extn("8bitmime")
        assert s.has_extn("pipelining") and s.has_extn("enhancedstatuscodes")
        raw = "From: ålice@exämple.test\r\nSubject: ünïcode\r\n\r\nbody\r\n".encode()
        s.sendmail("ålice@exämple.test", ["bøb@example.com"], raw,
                   mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    got = next_hop.messages[0]
    assert got.mail_from == "ålice@exämple.test"
    assert got.rcpt_tos == ["bøb@example.com"]
    assert "SMTPUTF8" in got.mail_options


# ------------------------------------------------------------------ smuggling rules


def _send_stream(port: int, stream: bytes) -> tuple[bytes, bytes]:
    s = _raw_session(port)
    _cmd(s, b"EHLO c.test")
    assert _cmd(s, b"MAIL FROM:<a@ext.test>").startswith(b"250")
    assert _cmd(s, b"RCPT TO:<b@example.com>").startswith(b"250")
    assert _cmd(s, b"DATA").startswith(b"354")
    s.sendall(stream)
    reply = _read_reply(s)
    after = _cmd(s, b"NOOP")
    s.close()
    return reply, after


def _assert_clean(data: bytes) -> None:
    crlf = data.count(b"\r\n")
    assert data.count(b"\n") == crlf and data.count(b"\r") == crlf, "bare CR/LF passed on"


def test_bare_lf_smuggling_rejected(make_gateway, next_hop):
    gw = make_gateway()
    stream = (b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@ext.test>\r\nRCPT TO:<v@example.com>"
              b"\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    reply, after = _send_stream(gw.port, stream)
    assert reply.startswith(b"550 5.5.2"), reply
    assert after.startswith(b"250")
    assert next_hop.messages == []


def test_bare_newlines_normalised_never_passed_on(make_gateway, next_hop):
    gw = make_gateway(gateway={"bare_newlines": "normalize"})
    stream = b"Subject: s\r\n\r\nhello\n.\nsmuggled?\rmore\r\n.\r\n"
    reply, _ = _send_stream(gw.port, stream)
    assert reply.startswith(b"250"), reply
    assert len(next_hop.messages) == 1
    data = next_hop.messages[0].data
    _assert_clean(data)
    assert b"smuggled?" in data


def _smuggling_streams(corpus: Path) -> list[Path]:
    return sorted((corpus / "smtp-smuggling" / "data-streams").glob("*.bin"))


@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_corpus_smuggling_streams(make_gateway, next_hop, corpus, mode):
    gw = make_gateway(gateway={"bare_newlines": mode})
    streams = _smuggling_streams(corpus)
    assert streams
    for path in streams:
        before = len(next_hop.messages)
        stream = path.read_bytes()
        reply, after = _send_stream(gw.port, stream)
        assert reply[:1] in (b"2", b"5"), (path.name, reply)
        assert after.startswith(b"250"), (path.name, after)  # still serving
        new = next_hop.messages[before:]
        # "pipelining-after-data" really is two transactions; every other
        # stream is one DATA and must give at most one message.
        limit = 2 if "pipelining" in path.name else 1
        assert len(new) <= limit, path.name
        if mode == "normalize" and "pipelining" not in path.name:
            assert len(new) == 1, path.name
        for m in new:
            _assert_clean(m.data)
            assert b"\0" not in m.data
            assert m.mail_from == "a@ext.test" or "pipelining" in path.name


# --------------------------------------------------------------- reload and drain


def test_reload_swaps_config(make_gateway, next_hop, tmp_path):
    from tests.support.harness import test_config

    gw = make_gateway()
    new = test_config(tmp_path, next_hop.address, gateway={"max_message_size": 1000})
    gw.reload(new)
    code, _ = gw.send(make_message(body="x" * 5000))
    assert code == 552


def test_concurrent_sessions(make_gateway, next_hop):
    gw = make_gateway()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                code, _ = gw.send(make_message(subject=f"c{i}-{j}"))
                assert code == 250
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(next_hop.messages) == 40


def test_client_disconnect_after_data_still_completes(make_gateway, next_hop):
    """Once the data is in, the transaction finishes even if the client vanishes."""
    gw = make_gateway()
    next_hop.delay = 0.5
    s = _raw_session(gw.port)
    _cmd(s, b"EHLO c.test")
    _cmd(s, b"MAIL FROM:<a@ext.test>")
    _cmd(s, b"RCPT TO:<b@example.com>")
    _cmd(s, b"DATA")
    s.sendall(b"Subject: vanish\r\n\r\nbye\r\n.\r\n")
    s.close()
    next_hop.wait_for(1)
    assert len(next_hop.messages) == 1


def test_smtplib_rejects_are_exceptions_not_hangs(make_gateway, next_hop):
    gw = make_gateway()
    next_hop.rcpt_replies["x@example.com"] = "550 5.1.1 no"
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        with gw.smtp() as s:
            s.sendmail("a@ext.test", ["x@example.com"], make_message())
