"""The next hop: one aiosmtplib connection per client session.

MAIL FROM and each RCPT TO are forwarded live and the next hop's replies are
mirrored to the client; DATA is sent only after the filter chain has decided
to relay.  Every failure to talk to the next hop (refused connection, timeout,
connection lost, garbage) becomes a 451 for the client: the sender keeps the
message.  A 5xx from the next hop is passed through; a 421 becomes a 451 so the
client's session survives it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping

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


class Relay:
    """A session's connection to the next hop.  Not safe for concurrent use."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float,
        helo_name: str,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = parse_hostport(address)
        self.timeout = timeout
        self.helo_name = helo_name
        self.tls_context = tls_context
        self._client: aiosmtplib.SMTP | None = None
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    async def _connect(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
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
        """Open the transaction at the next hop; returns the reply to mirror."""
        client = await self._connect()
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
        return await self._command(b"MAIL", *args)

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
        return self._mirror(resp.code, resp.message)

    async def rset(self) -> None:
        """Abort the next hop's transaction (best effort: on failure, drop the connection)."""
        if not self.connected:
            return
        try:
            await self._command(b"RSET")
        except NextHopFailure:
            self.close()

    async def quit(self) -> None:
        client, self._client = self._client, None
        if client is None or not client.is_connected:
            return
        try:
            await client.quit()
        except (TimeoutError, SMTPException, OSError):
            client.close()

    def close(self) -> None:
        client, self._client = self._client, None
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
