"""A next hop that misbehaves at the SMTP level, on a loopback TCP port.

It speaks just enough SMTP (greeting, EHLO, MAIL, RCPT, DATA, RSET, QUIT) to
reach the point named by ``mode``, then breaks:

``greeting-garbage``  the greeting is not an SMTP reply
``close-after-greeting``  ``220`` then the connection is closed
``ehlo-garbage``      EHLO is answered with 8-bit garbage
``mail-garbage``      MAIL FROM is answered with a line that is no reply
``data-garbage``      the end of data is answered with ``hello, world``
``data-bad-code``     the end of data is answered ``999 what?``
``data-endless``      the end of data is answered with 2 MB without a newline
``data-close``        the connection is closed at the end of data

``data_seen`` counts the messages whose data were completely received.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
from typing import Any

MODES = (
    "greeting-garbage", "close-after-greeting", "ehlo-garbage", "mail-garbage",
    "data-garbage", "data-bad-code", "data-endless", "data-close",
)


class _Handler(socketserver.StreamRequestHandler):
    server: Any
    timeout = 30

    def _say(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def handle(self) -> None:
        bad: BadNextHop = self.server.bad
        mode = bad.mode
        with contextlib.suppress(OSError):
            if mode == "greeting-garbage":
                self._say(b"hello, I am not an SMTP server\r\n")
                self.rfile.readline(1000)
                return
            self._say(b"220 bad.test ESMTP\r\n")
            if mode == "close-after-greeting":
                return
            while True:
                line = self.rfile.readline(4096)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    self._say(b"\xff\xfe\x80 garbage\r\n" if mode == "ehlo-garbage"
                              else b"250-bad.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    self._say(b"yes, sure\r\n" if mode == "mail-garbage" else b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    self._say(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    self._say(b"354 go ahead\r\n")
                    while True:
                        chunk = self.rfile.readline(1 << 20)
                        if not chunk:
                            return
                        if chunk == b".\r\n":
                            break
                    with bad._lock:
                        bad.data_seen += 1
                    if mode == "data-garbage":
                        self._say(b"hello, world\r\n")
                    elif mode == "data-bad-code":
                        self._say(b"999 what?\r\n")
                    elif mode == "data-endless":
                        self._say(b"2" * (2 << 20))
                        return
                    elif mode == "data-close":
                        return
                    else:
                        self._say(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    self._say(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    self._say(b"250 2.0.0 Ok\r\n")


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class BadNextHop:
    """The misbehaving next hop in a background thread; ``address`` for config."""

    def __init__(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.data_seen = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.bad = self  # type: ignore[attr-defined]
        host, port = self._server.server_address[:2]
        self.address = f"{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"bad-next-hop-{mode}",
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> BadNextHop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
