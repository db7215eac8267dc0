"""The SMTP session's idle timeout (gateway.session_timeout) with the lazily
moved timer (GatewaySMTP._reset_timeout): an idle session is told (421) and
closed after the timeout; commands keep a session alive past it, and the
timeout counts from the last one; a long DATA processing is not cut off."""

from __future__ import annotations

import socket
import time

from tests.support.harness import make_message

TIMEOUT = 2.0


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    assert _reply(s).startswith(b"220")
    return s


def _reply(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or (len(data) >= 4 and data.split(b"\r\n")[-2][3:4] == b"-"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes; when it closed."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data, time.monotonic()


def test_an_idle_session_is_told_and_closed(make_gateway) -> None:
    gw = make_gateway(gateway={"session_timeout": TIMEOUT})
    s = _connect(gw.port)
    try:
        s.sendall(b"EHLO client.example\r\n")
        assert _reply(s).startswith(b"250")
        last = time.monotonic()
        data, closed = _until_closed(s)
    finally:
        s.close()
    assert b"421 4.4.2" in data and b"idle timeout" in data, data
    assert closed - last >= TIMEOUT - 0.05  # not before the timeout


def test_commands_keep_the_session_alive(make_gateway) -> None:
    gw = make_gateway(gateway={"session_timeout": TIMEOUT})
    s = _connect(gw.port)
    try:
        s.sendall(b"EHLO client.example\r\n")
        assert _reply(s).startswith(b"250")
        start = time.monotonic()
        # Busy for twice the timeout, a command every 0.2 s (pacing, not a wait
        # for an event): the session stays open throughout.
        while time.monotonic() - start < 2 * TIMEOUT:
            s.sendall(b"NOOP\r\n")
            assert _reply(s).startswith(b"250"), "closed while busy"
            last = time.monotonic()
            time.sleep(0.2)
        data, closed = _until_closed(s)  # then idle: closed, timed from the last command
    finally:
        s.close()
    assert b"idle timeout" in data
    assert closed - last >= TIMEOUT - 0.05


def test_a_message_then_idle(make_gateway, next_hop) -> None:
    """The DATA step lengthens the timer and the reply shortens it again."""
    gw = make_gateway(gateway={"session_timeout": TIMEOUT})
    s = _connect(gw.port)
    try:
        for line in (b"EHLO client.example", b"MAIL FROM:<a@ext.example>",
                     b"RCPT TO:<b@example.com>"):
            s.sendall(line + b"\r\n")
            assert _reply(s).startswith(b"250"), line
        s.sendall(b"DATA\r\n")
        assert _reply(s).startswith(b"354")
        s.sendall(make_message(subject="idle after") + b"\r\n.\r\n")
        assert _reply(s).startswith(b"250")
        last = time.monotonic()
        data, closed = _until_closed(s)
    finally:
        s.close()
    assert b"idle timeout" in data
    assert closed - last >= TIMEOUT - 0.05
    assert len(next_hop.messages) == 1
