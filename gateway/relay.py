"""The next hop: one aiosmtplib connection per client session at a time.

MAIL FROM and each RCPT TO are forwarded live and the next hop's replies are
mirrored to the client; DATA is sent only after the filter chain has decided
to relay.  Every failure to talk to the next hop (refused connection, timeout,
connection lost, garbage) becomes a 451 for the client: the sender keeps the
message.  A 5xx from the next hop is passed through; a 421 becomes a 451 so the
client's session survives it.

When a client session ends with no transaction open at the next hop, its
connection goes to the :class:`ConnectionCache` (``gateway.next_hop_cache_time``
seconds idle at most, like Postfix's SMTP connection cache) and the next
session starts on it: no TCP connect, greeting, EHLO and QUIT per session.  A
cached connection the next hop has closed meanwhile is retried once on a new
connection before the client hears of it (only the first command of a
session, before anything of the transaction was accepted).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from gateway import replies
from gateway.config import parse_hostport

log = logging.getLogger("mailwarden.relay")


def format_reply(code: int, message: str) -> str:
    """An SMTP reply (possibly multi-line) from a code and its text lines."""
    lines = [replies.safe_text(line, 500) for line in (message or "").splitlines()] or [""]
    out = [f"{code}-{line}" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}".rstrip())
    return "\r\n".join(out)


class NextHopFailure(Exception):
    """The next hop could not be used; ``reply`` is the 451 for the client."""

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


#: A connection older than this (seconds since it was opened) is not reused
#: (Postfix's ``smtp_connection_reuse_time_limit``).
CACHE_MAX_AGE = 300.0
#: Idle connections kept per next hop at most; more are closed.
CACHE_MAX_IDLE = 64


class ConnectionCache:
    """Idle next-hop connections, kept between client sessions.

    Keyed by (host, port, HELO name), so a reload that changes the next hop
    never reuses a connection to the old one.  A connection is kept only when
    it has no transaction open; an idle one is closed (QUIT) after
    ``idle_time`` seconds, or when the next hop closes it.  ``idle_time`` 0:
    nothing is kept."""

    def __init__(self, idle_time: float, *, clock: Callable[[], float] = time.monotonic,
                 max_idle: int = CACHE_MAX_IDLE, max_age: float = CACHE_MAX_AGE) -> None:
        self.idle_time = idle_time
        self.clock = clock
        self.max_idle = max_idle
        self.max_age = max_age
        #: key -> [(client, opened, idle since)], the most recently idle last
        self._idle: dict[tuple[str, int, str], list[tuple[aiosmtplib.SMTP, float, float]]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.reused = 0  # connections taken from the cache (for tests and metrics)
        self.closed = False

    def take(self, key: tuple[str, int, str]) -> tuple[aiosmtplib.SMTP, float] | None:
        """A live idle connection to ``key`` and when it was opened, or None."""
        idle = self._idle.get(key)
        now = self.clock()
        if self.idle_time <= 0:  # turned off by a reload: none is reused
            idle = self._idle.pop(key, None)
            for client, _opened, _since in idle or ():
                _quit(client)
            return None
        while idle:
            client, opened, _since = idle.pop()
            if client.is_connected and now - opened < self.max_age:
                self.reused += 1
                return client, opened
            _quit(client)
        return None

    def give(self, key: tuple[str, int, str], client: aiosmtplib.SMTP, opened: float) -> None:
        """Keep ``client`` (no transaction open) for the next session, or close it."""
        now = self.clock()
        if (self.closed or self.idle_time <= 0 or not client.is_connected
                or now - opened >= self.max_age):
            _quit(client)
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            _quit(client)
            return
        idle.append((client, opened, now))
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.idle_time, self._expire)

    def _expire(self) -> None:
        self._sweep = None
        now = self.clock()
        first: float | None = None
        for key, idle in list(self._idle.items()):
            keep = []
            for entry in idle:
                client, _opened, since = entry
                if now - since >= self.idle_time or not client.is_connected:
                    _quit(client)
                else:
                    keep.append(entry)
                    first = since if first is None else min(first, since)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if first is not None:
            delay = max(0.0, first + self.idle_time - now)
            self._sweep = asyncio.get_running_loop().call_later(delay, self._expire)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Close every idle connection (QUIT); keep none from now on."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for client, _opened, _since in idle:
                _quit(client)
        self._idle.clear()


def _quit(client: aiosmtplib.SMTP) -> None:
    """Say QUIT and close, without waiting for the 221 (the transport sends
    what is buffered before it closes)."""
    protocol = client.protocol
    if client.is_connected and protocol is not None:
        try:
            protocol.write(b"QUIT\r\n")
        except Exception:
            pass
    client.close()


class Relay:
    """A session's connection to the next hop.  Not safe for concurrent use."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float,
        helo_name: str,
        tls_context: ssl.SSLContext | None = None,
        cache: ConnectionCache | None = None,
    ) -> None:
        self.host, self.port = parse_hostport(address)
        self.timeout = timeout
        self.helo_name = helo_name
        self.tls_context = tls_context
        self.cache = cache
        self._client: aiosmtplib.SMTP | None = None
        self._opened = 0.0
        #: a connection from the cache, not yet used for a command that worked
        self._reused = False
        #: a transaction is open at the next hop (MAIL sent, not yet ended)
        self._open = False
        self.last_error: str | None = None

    @property
    def _key(self) -> tuple[str, int, str]:
        return self.host, self.port, self.helo_name

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    async def _connect(self, *, fresh: bool = False) -> aiosmtplib.SMTP:
        """The session's connection: its own, else a cached one (unless
        ``fresh``), else a new one."""
        if self._client is not None and self._client.is_connected:
            return self._client
        if self.cache is not None and not fresh:
            cached = self.cache.take(self._key)
            if cached is not None:
                self._client, self._opened = cached
                self._reused = True
                return self._client
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            local_hostname=self.helo_name,
            start_tls=False,
            use_tls=False,
        )
        try:
            await client.connect()
            await client.ehlo()
        except SMTPResponseException as exc:
            client.close()
            raise NextHopFailure(replies.NEXT_HOP_UNAVAILABLE, f"next hop refused: {exc.code} {exc.message}") from None
        except (SMTPConnectError, SMTPTimeoutError, SMTPServerDisconnected, OSError) as exc:
            client.close()
            raise NextHopFailure(replies.NEXT_HOP_UNAVAILABLE, f"next hop unreachable: {exc}") from None
        self._client = client
        self._opened = time.monotonic() if self.cache is None else self.cache.clock()
        self._reused = False
        return client

    def _fail(self, exc: BaseException) -> NextHopFailure:
        self.close()
        if isinstance(exc, SMTPTimeoutError | asyncio.TimeoutError):
            return NextHopFailure(replies.NEXT_HOP_TIMEOUT, "next hop timed out")
        if isinstance(exc, SMTPServerDisconnected | ConnectionError):
            return NextHopFailure(replies.NEXT_HOP_LOST, f"next hop connection lost: {exc}")
        return NextHopFailure(replies.NEXT_HOP_BAD_REPLY, f"next hop error: {exc!r}")

    async def _command(self, *args: bytes) -> str:
        client = self._client
        assert client is not None
        try:
            resp = await client.execute_command(*args)
        except ValueError as exc:  # control characters in an argument
            raise NextHopFailure("501 5.5.4 invalid characters in command", str(exc)) from None
        except (TimeoutError, SMTPException, OSError) as exc:
            raise self._fail(exc) from None
        return self._mirror(resp.code, resp.message)

    def _mirror(self, code: int, message: str) -> str:
        if code == 421 or not 200 <= code < 600:
            self.close()
            raise NextHopFailure(replies.NEXT_HOP_UNAVAILABLE, f"next hop said {code} {message}")
        return format_reply(code, message)

    def supports(self, extension: str) -> bool:
        return bool(self._client and self._client.supports_extension(extension))

    async def mail(
        self,
        sender: str,
        options: list[str],
        xforward: Mapping[str, str] | None = None,
    ) -> str:
        """Open the transaction at the next hop; returns the reply to mirror.

        On a connection from the cache that turns out to be gone (closed by
        the next hop while idle, or a 421), once more on a new connection."""
        try:
            return await self._mail(sender, options, xforward)
        except NextHopFailure as exc:
            # Only a connection that is gone is retried (not a timeout: that
            # would double the wait; not a refusal on a live connection).
            if not self._reused or self.connected or exc.reply == replies.NEXT_HOP_TIMEOUT:
                raise
            log.info("cached next-hop connection unusable (%s); opening a new one", exc.reason)
            self.close()
            return await self._mail(sender, options, xforward, fresh=True)

    async def _mail(
        self, sender: str, options: list[str], xforward: Mapping[str, str] | None,
        *, fresh: bool = False,
    ) -> str:
        client = await self._connect(fresh=fresh)
        if xforward and client.supports_extension("xforward"):
            offered = set((client.esmtp_extensions.get("xforward") or "").upper().split())
            attrs = [
                f"{k}={_xtext(v)}".encode()
                for k, v in xforward.items()
                if v and (not offered or k.upper() in offered)
            ]
            if attrs:
                reply = await self._command(b"XFORWARD", *attrs)
                if not reply.startswith("2"):
                    log.warning("next hop refused XFORWARD: %s", reply)
        args = [b"FROM:<" + sender.encode("utf-8") + b">"]
        args += [o.encode("utf-8") for o in options]
        self._open = True
        reply = await self._command(b"MAIL", *args)
        self._reused = False
        if not reply.startswith("2"):
            self._open = False
        return reply

    async def rcpt(self, recipient: str, options: list[str]) -> str:
        if not self.connected:
            raise NextHopFailure(replies.NEXT_HOP_LOST, "next hop connection lost before RCPT")
        args = [b"TO:<" + recipient.encode("utf-8") + b">"]
        args += [o.encode("utf-8") for o in options]
        return await self._command(b"RCPT", *args)

    async def data(self, content: bytes) -> str:
        """Send the message; returns the next hop's reply to pass back.

        ``content`` must use CRLF line ends only (the DATA reader and the
        rewriter guarantee it).  Dot-stuffing is one C-level ``replace`` here
        instead of aiosmtplib's line-ending and period regexes, which cost
        ~80 ms of CPU on a 6.7 MB message.
        """
        client = self._client
        if client is None or not client.is_connected or client.protocol is None:
            raise NextHopFailure(replies.NEXT_HOP_LOST, "next hop connection lost before DATA")
        protocol = client.protocol
        payload, end = stuff(content)
        try:
            # No await between a write and read_response(), which marks the
            # reply as expected, so a reply cannot be mistaken for unsolicited.
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=self.timeout)
            if start.code != 354:
                return self._mirror(start.code, start.message)
            protocol.write(payload)
            protocol.write(end)  # not appended: that would copy the message once more
            del payload
            resp = await protocol.read_response(timeout=self.timeout)
        except (TimeoutError, SMTPException, OSError) as exc:
            raise self._fail(exc) from None
        self._open = False  # answered: the transaction is over, whatever the answer
        return self._mirror(resp.code, resp.message)

    async def rset(self) -> None:
        """Abort the next hop's transaction (best effort: on failure, drop the connection)."""
        if not self.connected:
            return
        try:
            reply = await self._command(b"RSET")
        except NextHopFailure:
            self.close()
            return
        if reply.startswith("2"):
            self._open = False

    async def quit(self) -> None:
        """The client session is over: the connection goes to the cache when
        there is one and no transaction is open, else QUIT."""
        if self.release():
            return
        client, self._client = self._client, None
        if client is None or not client.is_connected:
            return
        try:
            await client.quit()
        except (TimeoutError, SMTPException, OSError):
            client.close()

    def release(self) -> bool:
        """Hand the connection to the cache if it can be reused (no
        transaction open); whether it was."""
        client = self._client
        if self.cache is None or client is None or self._open or not client.is_connected:
            return False
        self._client = None
        self.cache.give(self._key, client, self._opened)
        return True

    def close(self) -> None:
        client, self._client = self._client, None
        self._open = False
        if client is not None:
            client.close()


def stuff(content: bytes) -> tuple[bytes, bytes]:
    """Dot-stuff a CRLF message: (stuffed content, end-of-data line to send
    after it).  Two pieces, not one: appending would copy the message again."""
    # find() first: three times cheaper than a replace() that finds nothing.
    out = content.replace(b"\r\n.", b"\r\n..") if content.find(b"\r\n.") >= 0 else content
    if out.startswith(b"."):
        out = b"." + out
    return out, (b".\r\n" if not out or out.endswith(b"\r\n") else b"\r\n.\r\n")


def _xtext(value: str) -> str:
    """RFC 1891 xtext encoding for XFORWARD attribute values."""
    out = []
    for ch in value:
        o = ord(ch)
        if 33 <= o <= 126 and ch not in "+=":
            out.append(ch)
        else:
            out.append(f"+{o:02X}" if o < 256 else "+3F")
    return "".join(out)


async def send_message(
    address: str,
    sender: str,
    recipients: list[str],
    content: bytes,
    *,
    timeout: float,
    helo_name: str,
) -> tuple[bool, str, dict[str, str]]:
    """One whole transaction on a fresh connection (release, notifications).

    Returns (accepted, data reply or failure reason, refused recipients).
    """
    relay = Relay(address, timeout=timeout, helo_name=helo_name)
    refused: dict[str, str] = {}
    try:
        reply = await relay.mail(sender, [])
        if not reply.startswith("2"):
            return False, reply, refused
        accepted = 0
        for r in recipients:
            reply = await relay.rcpt(r, [])
            if reply.startswith("2"):
                accepted += 1
            else:
                refused[r] = reply
        if not accepted:
            await relay.rset()
            return False, "no recipient accepted", refused
        reply = await relay.data(content)
        return reply.startswith("2"), reply, refused
    except NextHopFailure as exc:
        return False, exc.reason, refused
    finally:
        await relay.quit()
