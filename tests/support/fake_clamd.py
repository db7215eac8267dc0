"""A misbehaving clamd on a unix socket (or loopback TCP), for failure tests.

It speaks just enough of clamd's protocol (``nPING``, ``nVERSION``,
``nINSTREAM`` with its length-prefixed chunks) to reach the point where a
real clamd would answer, then answers according to ``mode``:

``ok``          ``stream: OK`` (control case)
``garbage``     a line that is not a clamd answer
``silent``      reads the whole stream, never answers (until stopped)
``close``       reads the whole stream, closes without answering
``size_limit``  after the first chunk: ``INSTREAM size limit exceeded. ERROR``, close
``error``       ``stream: Can't allocate memory ERROR``
``limits``      ``stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND``
``encrypted``   ``stream: Heuristics.Encrypted.Zip FOUND``
``binary``      non-ASCII bytes and a newline

PING is answered with PONG (``garbage`` mode: with garbage) and VERSION with
:data:`VERSION`, so health checks can be exercised too.
"""

from __future__ import annotations

import contextlib
import os
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

VERSION = b"ClamAV 1.4.6/27400/Mon Nov 23 09:00:00 2026\n"

ANSWERS = {
    "ok": b"stream: OK\n",
    "garbage": b"hello, I am not clamd\n",
    "error": b"stream: Can't allocate memory ERROR\n",
    "limits": b"stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND\n",
    "encrypted": b"stream: Heuristics.Encrypted.Zip FOUND\n",
    "binary": b"stream: \xff\xfe FOUND\n",
}


class _Handler(socketserver.StreamRequestHandler):
    server: Any

    def handle(self) -> None:
        fake: FakeClamd = self.server.fake
        with fake._lock:
            fake.connections += 1
        try:
            command = self.rfile.readline(64).strip()
            if command in (b"nPING", b"zPING\0"):
                self.wfile.write(b"what?\n" if fake.mode == "garbage" else b"PONG\n")
            elif command.startswith((b"nVERSION", b"zVERSION")):
                self.wfile.write(VERSION)
            elif command == b"nINSTREAM":
                with fake._lock:
                    fake._active += 1
                    fake.max_concurrent = max(fake.max_concurrent, fake._active)
                try:
                    self._instream(fake)
                finally:
                    with fake._lock:
                        fake._active -= 1
        except OSError:
            pass

    def _instream(self, fake: FakeClamd) -> None:
        received = 0
        while True:
            header = self.rfile.read(4)
            if len(header) < 4:
                return
            (size,) = struct.unpack("!L", header)
            if fake.mode == "size_limit":
                self.wfile.write(b"INSTREAM size limit exceeded. ERROR\n")
                return
            if size == 0:
                break
            received += len(self.rfile.read(size))
        fake.bytes_received += received
        if fake.mode == "silent":
            # Hold the connection until the client gives up (EOF) or we stop.
            self.connection.settimeout(0.05)
            while not fake._stop.is_set():
                try:
                    if not self.connection.recv(1):
                        return
                except TimeoutError:
                    continue
            return
        if fake.mode == "close":
            return
        self.wfile.write(ANSWERS[fake.mode])


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = True


class FakeClamd:
    """A fake clamd in a background thread; ``address`` is what the filter uses."""

    #: ``max_concurrent``: most INSTREAM sessions open at the same time.

    def __init__(self, mode: str, *, tcp: bool = False) -> None:
        if mode not in (*ANSWERS, "silent", "close", "size_limit"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.connections = 0
        self.max_concurrent = 0
        self.bytes_received = 0
        self._active = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dir = tempfile.mkdtemp(prefix="mw-fakeclamd-")
        server: socketserver.BaseServer
        if tcp:
            server = _TCPServer(("127.0.0.1", 0), _Handler)
            host, port = server.server_address[:2]
            self.address = f"{host}:{port}"
        else:
            path = os.path.join(self._dir, "clamd.sock")
            server = _UnixServer(path, _Handler)
            self.address = path
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"fake-clamd-{mode}",
        )
        self._thread.start()

    def stop(self) -> None:
        """Release silent handlers, stop serving, remove the socket."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            for p in Path(self._dir).iterdir():
                p.unlink()
            os.rmdir(self._dir)

    def __enter__(self) -> FakeClamd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
