"""The baseline: a bare aiosmtpd + aiosmtplib relay (optionally + one clamd scan).

What issue 2 and issue 10 compare mailwarden against: the least a Python
SMTP proxy must do.  Stock aiosmtpd (its own line-by-line DATA reader), one
aiosmtplib connection to the next hop per client session, opened at the first
MAIL; MAIL FROM and each RCPT TO forwarded live with the next hop's reply
mirrored; the whole message sent on at DATA and the next hop's reply passed
back.  With ``--clamd SOCKET`` the message is first streamed to clamd once
(INSTREAM over the unix socket); on FOUND the transaction is reset at the next
hop and the client gets a 554, so no virus reaches the sink.  No logging, no
store, no parsing.

    python bench/bare_relay.py --listen 127.0.0.1:PORT --next-hop 127.0.0.1:PORT
                               [--clamd /path/clamd.sock] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import struct
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

SCAN_CHUNK = 1 << 18


def hostport(value: str) -> tuple[str, int]:
    """``host:port`` -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host, int(port)


async def clamd_instream(socket_path: str, data: bytes) -> str:
    """Stream ``data`` to clamd (INSTREAM); return its answer, e.g. ``stream: OK``."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        writer.write(b"zINSTREAM\0")
        view = memoryview(data)
        for i in range(0, len(view), SCAN_CHUNK):
            chunk = view[i : i + SCAN_CHUNK]
            writer.write(struct.pack("!L", len(chunk)))
            writer.write(chunk)
            await writer.drain()
        writer.write(struct.pack("!L", 0))
        await writer.drain()
        answer = await reader.readuntil(b"\0")
        return answer[:-1].decode("ascii", "replace")
    finally:
        writer.close()


class BareSMTP(SMTP):
    """aiosmtpd's engine; closes the next-hop client when the session ends."""

    def connection_lost(self, error: Exception | None) -> None:
        client = getattr(self.session, "client", None)
        if client is not None and client.is_connected:
            client.close()
        super().connection_lost(error)


class RelayHandler:
    """Forward MAIL/RCPT live, DATA whole, mirroring the next hop's replies."""

    def __init__(self, next_hop: str, clamd: str | None) -> None:
        self.host, self.port = hostport(next_hop)
        self.clamd = clamd

    async def _client(self, session: Session) -> aiosmtplib.SMTP:
        client = getattr(session, "client", None)
        if client is None or not client.is_connected:
            client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=60,
                                     start_tls=False, local_hostname="bare-relay")
            await client.connect()
            session.client = client  # type: ignore[attr-defined]
        return client

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        try:
            client = await self._client(session)
            resp = await client.mail(address)
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError):
            return "451 4.4.1 next hop unavailable"
        envelope.mail_from = address
        return f"{resp.code} {resp.message}"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        try:
            resp = await session.client.rcpt(address)  # type: ignore[attr-defined]
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError, AttributeError):
            return "451 4.4.1 next hop unavailable"
        envelope.rcpt_tos.append(address)
        return f"{resp.code} {resp.message}"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client: Any = session.client  # type: ignore[attr-defined]
        content = envelope.original_content or b""
        if self.clamd:
            try:
                answer = await clamd_instream(self.clamd, content)
            except OSError:
                return "451 4.7.1 scanner unavailable"
            if answer.endswith("FOUND"):
                await client.rset()
                return "554 5.7.1 message refused: virus found"
            if not answer.endswith("OK"):
                return "451 4.7.1 scan failed"
        try:
            resp = await client.data(content)
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError):
            return "451 4.4.1 next hop unavailable"
        return f"{resp.code} {resp.message}"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = getattr(session, "client", None)
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
        return "221 Bye"


async def serve(listen: str, next_hop: str, clamd: str | None) -> None:
    """Serve until SIGTERM/SIGINT."""
    handler = RelayHandler(next_hop, clamd)
    host, port = hostport(listen)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: BareSMTP(handler, decode_data=False, data_size_limit=52428800,
                         hostname="bare-relay"),
        host=host, port=port, backlog=512,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--next-hop", required=True)
    parser.add_argument("--clamd", help="clamd unix socket: scan each message once")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    # Only trouble is logged (aiosmtpd logs every command at INFO).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.listen, args.next_hop, args.clamd))


if __name__ == "__main__":
    main()
