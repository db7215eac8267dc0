"""A loopback DNS server for tests: TXT records on demand, and failures on demand.

UDP and TCP on ``127.0.0.1`` on one ephemeral port, served by one background
thread (``selectors``); packets are parsed and built with dnslib.

* ``add_txt(name, text)`` serves a TXT record (long texts are split into
  255-byte character-strings, as a zone file would);
* ``set_timeout(name)`` never answers queries for ``name`` (a resolver times
  out);
* ``set_servfail(name)`` answers SERVFAIL; ``set_refused(name)`` REFUSED;
* any other name is NXDOMAIN; a known name asked for another type is NODATA.

UDP answers larger than the client's advertised size (512 without EDNS) are
truncated (TC bit), so clients retry over TCP, as with a real server.  Every
query is recorded in ``queries`` as ``(transport, name, type)``.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterable

from dnslib import QTYPE, RCODE, RR, TXT, DNSRecord

__all__ = ["LoopbackDNS"]


def _norm(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.lower().rstrip(".")


def _chunks(text: bytes) -> list[bytes]:
    return [text[i : i + 255] for i in range(0, len(text), 255)] or [b""]


class LoopbackDNS:
    """A tiny authoritative-ish DNS server on loopback (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.txt: dict[str, list[list[bytes]]] = {}
        self.timeouts: set[str] = set()
        self.servfail: set[str] = set()
        self.refused: set[str] = set()
        self.queries: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._udp, self._tcp = self._bind()
        self.port: int = self._udp.getsockname()[1]
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- public API

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``, as the ``nameservers`` setting takes it."""
        return f"{self.host}:{self.port}"

    def add_txt(self, name: str, text: str | bytes | Iterable[str | bytes]) -> None:
        """Serve ``text`` as a TXT record at ``name`` (call again for more records)."""
        if isinstance(text, str | bytes):
            texts = [text]
        else:
            texts = list(text)
        with self._lock:
            for t in texts:
                data = t.encode("utf-8") if isinstance(t, str) else bytes(t)
                self.txt.setdefault(_norm(name), []).append(_chunks(data))

    def set_timeout(self, name: str) -> None:
        """Never answer queries for ``name``."""
        with self._lock:
            self.timeouts.add(_norm(name))

    def set_servfail(self, name: str) -> None:
        """Answer SERVFAIL for ``name``."""
        with self._lock:
            self.servfail.add(_norm(name))

    def set_refused(self, name: str) -> None:
        """Answer REFUSED for ``name``."""
        with self._lock:
            self.refused.add(_norm(name))

    def start(self) -> LoopbackDNS:
        """Start serving in a background thread; returns self."""
        self._thread = threading.Thread(target=self._serve, name="loopback-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in (self._udp, self._tcp):
            sock.close()

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- internals

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same ephemeral port (retry on a clash)."""
        last: OSError | None = None
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
            except OSError as exc:
                last = exc
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError(f"could not bind UDP+TCP on one port: {last}")

    def answer(self, data: bytes, transport: str) -> bytes | None:
        """The reply to one query packet, or None for "never answer"."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        q = request.q
        name = _norm(str(q.qname))
        qtype = QTYPE.get(q.qtype, str(q.qtype))
        with self._lock:
            self.queries.append((transport, name, str(qtype)))
            if name in self.timeouts:
                return None
            reply = request.reply()
            if name in self.servfail:
                reply.header.rcode = RCODE.SERVFAIL
            elif name in self.refused:
                reply.header.rcode = RCODE.REFUSED
            elif name in self.txt:
                if q.qtype == QTYPE.TXT:
                    for strings in self.txt[name]:
                        reply.add_answer(RR(q.qname, QTYPE.TXT, rdata=TXT(strings), ttl=60))
            else:
                reply.header.rcode = RCODE.NXDOMAIN
        packed = reply.pack()
        if transport == "udp":
            limit = 512
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(512, rr.rclass)
            if len(packed) > limit:
                reply.rr = []
                reply.header.tc = 1
                packed = reply.pack()
        return packed

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        buffers: dict[socket.socket, bytes] = {}
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if key.data == "udp":
                        try:
                            data, peer = sock.recvfrom(65535)
                        except OSError:
                            continue
                        out = self.answer(data, "udp")
                        if out is not None:
                            try:
                                sock.sendto(out, peer)
                            except OSError:
                                pass
                    elif key.data == "listen":
                        try:
                            conn, _ = sock.accept()
                        except OSError:
                            continue
                        conn.setblocking(False)
                        buffers[conn] = b""
                        sel.register(conn, selectors.EVENT_READ, "tcp")
                    else:
                        self._tcp_read(sock, sel, buffers)
        finally:
            for conn in list(buffers):
                sel.unregister(conn)
                conn.close()
            sel.close()

    def _tcp_read(self, conn: socket.socket, sel: selectors.BaseSelector,
                  buffers: dict[socket.socket, bytes]) -> None:
        try:
            chunk = conn.recv(65535)
        except OSError:
            chunk = b""
        if not chunk:
            sel.unregister(conn)
            buffers.pop(conn, None)
            conn.close()
            return
        buf = buffers[conn] + chunk
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                break
            packet, buf = buf[2 : 2 + size], buf[2 + size :]
            out = self.answer(packet, "tcp")
            if out is not None:
                try:
                    conn.setblocking(True)
                    conn.sendall(len(out).to_bytes(2, "big") + out)
                    conn.setblocking(False)
                except OSError:
                    pass
        buffers[conn] = buf
