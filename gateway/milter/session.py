"""One milter connection: the protocol v6 state machine on asyncio streams.

The MTA drives: OPTNEG, then per SMTP connection CONNECT and HELO, per
message MAIL, RCPT..., (DATA), HEADER..., (EOH), BODY..., BODYEOB; MACRO
before any command; ABORT ends a message (the connection state stays), QUIT
ends the connection, QUIT_NC ends the SMTP connection but keeps the socket
for the next one.  At BODYEOB the session builds a :class:`MilterMessage`,
awaits the injected handler and writes the answer (``actions.py``), with
SMFIR_PROGRESS every ``progress_interval`` seconds while the handler runs.

Negotiation asks only for what mailwarden needs and only what the MTA offers:
the actions ADDHDRS, CHGHDRS, CHGBODY, QUARANTINE, SETSYMLIST; no DATA, EOH or
UNKNOWN events; no replies to CONNECT, HELO, MAIL, RCPT or per header; header
values with their leading space; and the macros ``j _ {daemon_name}
{client_addr}`` at CONNECT, ``{auth_authen}`` at MAIL, ``{i}`` at the end of
the message.  Body chunks are answered (so an over-size message is refused at
the chunk that crosses ``max_message_size``).

Failure rules: anything that goes wrong on mailwarden's side while answering
a message (the handler raises or times out, an edit cannot be expressed) is
REPLYCODE 451, never ACCEPT; a protocol error from the MTA (bad framing, an
unknown command, a command out of order, no OPTNEG within
``negotiate_timeout``) is one log line and the connection is closed (the MTA
then applies its ``milter_default_action``).  Memory per connection is bound
by ``max_message_size`` and the codec's packet bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway import replies
from gateway.milter import actions
from gateway.milter import codec as c
from gateway.milter.api import Handler, MilterMessage

log = logging.getLogger("mailwarden.milter")

#: The actions mailwarden requests (and needs: without the first three an
#: edit cannot be applied, so negotiation fails).
WANTED_ACTIONS = (c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_CHGBODY | c.SMFIF_QUARANTINE
                  | c.SMFIF_SETSYMLIST)
REQUIRED_ACTIONS = c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_CHGBODY
#: Protocol steps mailwarden skips or does not answer, where the MTA allows.
WANTED_PROTOCOL = (c.SMFIP_NODATA | c.SMFIP_NOEOH | c.SMFIP_NOUNKNOWN
                   | c.SMFIP_NR_CONN | c.SMFIP_NR_HELO | c.SMFIP_NR_MAIL | c.SMFIP_NR_RCPT
                   | c.SMFIP_NR_DATA | c.SMFIP_NR_EOH | c.SMFIP_NR_UNKN | c.SMFIP_NR_HDR | c.SMFIP_NR_BODY
                   | c.SMFIP_HDR_LEADSPC)
#: The macros mailwarden uses, per stage (SETSYMLIST).
SYMLISTS: tuple[tuple[int, str], ...] = (
    (c.SMFIM_CONNECT, "j _ {daemon_name} {client_addr}"),
    (c.SMFIM_ENVFROM, "{auth_authen}"),
    (c.SMFIM_EOM, "{i}"),
)

#: event packet type -> the SMFIP_NR_* bit that lets us not answer it
_NO_REPLY: dict[type, int] = {
    c.Connect: c.SMFIP_NR_CONN, c.Helo: c.SMFIP_NR_HELO, c.Mail: c.SMFIP_NR_MAIL,
    c.Rcpt: c.SMFIP_NR_RCPT, c.Data: c.SMFIP_NR_DATA, c.Header: c.SMFIP_NR_HDR,
    c.EndOfHeaders: c.SMFIP_NR_EOH, c.Body: c.SMFIP_NR_BODY, c.Unknown: c.SMFIP_NR_UNKN,
}
#: MACRO stages that belong to the connection (kept across messages)
_CONN_STAGES = (b"C", b"H")

_READ_SIZE = 256 * 1024
_CONTINUE = c.Continue().encode()
_PROGRESS = c.Progress().encode()


class _Close(Exception):
    """End the connection (QUIT, EOF, or after a logged protocol error)."""


def _path(arg: str) -> str:
    """``<a@b>`` -> ``a@b`` (an envelope address without its brackets)."""
    arg = arg.strip()
    if arg.startswith("<") and arg.endswith(">"):
        return arg[1:-1]
    return arg


def _macro_name(name: str) -> str:
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


class MilterSession:
    """One MTA connection.  ``await run()`` serves it until QUIT, EOF, a
    protocol error or :meth:`request_stop`; it never raises (except on
    cancellation, when nothing is answered and the MTA applies its default)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        *,
        max_message_size: int,
        quarantine_mode: actions.QuarantineMode = "own",
        progress_interval: float = 10.0,
        max_packet: int = c.DEFAULT_MAX_PACKET,
        negotiate_timeout: float = 30.0,
        idle_timeout: float = 1800.0,
        handler_timeout: float | None = None,
        peer: str = "",
    ) -> None:
        if quarantine_mode not in ("own", "hold"):
            raise ValueError(f"bad quarantine mode {quarantine_mode!r}")
        if progress_interval <= 0:
            raise ValueError("progress_interval must be greater than 0")
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.max_message_size = max_message_size
        self.quarantine_mode = quarantine_mode
        self.progress_interval = progress_interval
        self.negotiate_timeout = negotiate_timeout
        self.idle_timeout = idle_timeout
        self.handler_timeout = handler_timeout
        self.peer = peer or _peer_name(writer)
        self.decoder = c.Decoder(max_packet)
        #: negotiated masks (0 until OPTNEG)
        self.actions = 0
        self.protocol = 0
        self.negotiated = False
        #: messages answered on this connection (tests, metrics)
        self.messages = 0
        self._stop = False
        self._busy = False            # inside a transaction (MAIL .. end of message)
        self._reused = False          # after QUIT_NC: the MTA may negotiate again
        self._dispatch: dict[type, Callable[[Any], Any]] = {
            c.OptNeg: self._optneg, c.Macro: self._macro, c.Connect: self._connect,
            c.Helo: self._helo, c.Mail: self._mail, c.Rcpt: self._rcpt, c.Data: self._data,
            c.Header: self._header, c.EndOfHeaders: self._eoh, c.Body: self._body,
            c.EndOfBody: self._eob, c.Abort: self._abort, c.Quit: self._quit,
            c.QuitNC: self._quit_nc, c.Unknown: self._unknown,
        }
        self._reset_connection()

    # ------------------------------------------------------------ state

    def _reset_connection(self) -> None:
        self._conn_macros: dict[str, str] = {}
        self._connected: c.Connect | None = None
        self._helo_name = ""
        self._reset_message()

    def _reset_message(self) -> None:
        self._busy = False
        self._msg_macros: dict[str, str] = {}
        self._mail_macros: dict[str, str] = {}    # MACRO M, taken over by the next MAIL
        self._mail: c.Mail | None = None
        self._rcpts: list[str] = []
        self._parts: list[bytes] = []             # header lines, then CRLF, then body chunks
        self._in_body = False
        self._size = 0
        self._refusal: str | None = None          # a reply owed at the next answerable event
        self._refused = False                     # answered with a refusal: ignore the rest

    @property
    def idle(self) -> bool:
        """No message in flight (a stop may close the connection now)."""
        return not self._busy

    def request_stop(self) -> None:
        """Finish the message in flight, then close; close now if idle."""
        self._stop = True
        if not self._busy:
            self.writer.close()

    # ------------------------------------------------------------ I/O loop

    async def run(self) -> None:
        try:
            await self._serve()
        except _Close:
            pass
        except c.ProtocolError as exc:
            log.warning("milter %s: protocol error: %s; closing", self.peer, exc)
        except TimeoutError:
            what = "no OPTNEG" if not self.negotiated else "idle"
            log.warning("milter %s: %s timeout; closing", self.peer, what)
        except (ConnectionError, OSError) as exc:
            log.info("milter %s: connection lost: %s", self.peer, exc)
        except Exception as exc:  # a bug here must not kill the listener
            log.error("milter %s: internal error: %r; closing", self.peer, exc)
        finally:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _serve(self) -> None:
        while True:
            timeout = self.idle_timeout if self.negotiated else self.negotiate_timeout
            async with asyncio.timeout(timeout):
                data = await self.reader.read(_READ_SIZE)
            if not data:
                if self.decoder.pending:
                    raise c.ProtocolError(
                        f"connection closed inside a packet ({self.decoder.pending} bytes)")
                raise _Close
            for code, payload in self.decoder.feed(data):
                pkt = c.decode_command(code, payload)
                if not self.negotiated and type(pkt) is not c.OptNeg:
                    raise c.ProtocolError(f"{type(pkt).__name__} before OPTNEG")
                await self._dispatch[type(pkt)](pkt)
            if self._stop and not self._busy:
                raise _Close

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.idle_timeout):
            await self.writer.drain()

    async def _reply(self, pkt: object) -> None:
        """Answer an event unless negotiated as no-reply (owed refusals first)."""
        if self.protocol & _NO_REPLY[type(pkt)]:
            return
        if self._refusal is not None and self._mail is not None and not self._refused:
            await self._refuse()
            return
        await self._send(_CONTINUE)

    async def _refuse(self) -> None:
        assert self._refusal is not None
        self._refused = True
        self._parts = []
        await self._send(c.ReplyCode(actions.milter_reply(self._refusal)).encode())

    # ------------------------------------------------------------ commands

    async def _optneg(self, pkt: c.OptNeg) -> None:
        if self.negotiated and not self._reused:
            raise c.ProtocolError("OPTNEG after negotiation")
        self._reused = False
        if pkt.version < c.VERSION:
            raise c.ProtocolError(f"MTA speaks milter protocol {pkt.version}, need {c.VERSION}")
        missing = REQUIRED_ACTIONS & ~pkt.actions
        if self.quarantine_mode == "hold":
            missing |= c.SMFIF_QUARANTINE & ~pkt.actions
        if missing:
            raise c.ProtocolError(f"MTA does not allow the actions 0x{missing:x}")
        self.actions = WANTED_ACTIONS & pkt.actions
        self.protocol = WANTED_PROTOCOL & pkt.protocol
        symlists = SYMLISTS if self.actions & c.SMFIF_SETSYMLIST else ()
        self.negotiated = True
        log.debug("milter %s: negotiated version %d, actions 0x%x, steps 0x%x (MTA offered"
                  " 0x%x, 0x%x)", self.peer, c.VERSION, self.actions, self.protocol,
                  pkt.actions, pkt.protocol)
        await self._send(c.OptNeg(c.VERSION, self.actions, self.protocol, symlists).encode())

    async def _macro(self, pkt: c.Macro) -> None:
        values = {_macro_name(k): v for k, v in pkt.macros}
        if pkt.stage in _CONN_STAGES:
            self._conn_macros.update(values)
        elif pkt.stage == c.Mail.code:
            self._mail_macros = values
        else:
            self._msg_macros.update(values)

    async def _connect(self, pkt: c.Connect) -> None:
        if self._busy:
            raise c.ProtocolError("CONNECT inside a message")
        self._reused = False
        self._connected = pkt
        await self._reply(pkt)

    async def _helo(self, pkt: c.Helo) -> None:
        if self._busy:
            raise c.ProtocolError("HELO inside a message")
        self._helo_name = pkt.name
        await self._reply(pkt)

    async def _mail(self, pkt: c.Mail) -> None:
        mail_macros = self._mail_macros
        self._reset_message()          # a MAIL without ABORT starts over
        self._msg_macros.update(mail_macros)
        if not pkt.args:
            raise c.ProtocolError("MAIL without a sender")
        self._mail = pkt
        self._busy = True
        await self._reply(pkt)

    def _need_mail(self, what: str) -> None:
        if self._mail is None:
            raise c.ProtocolError(f"{what} before MAIL")

    async def _rcpt(self, pkt: c.Rcpt) -> None:
        self._need_mail("RCPT")
        if self._in_body or self._parts:
            raise c.ProtocolError("RCPT after the message content")
        if not pkt.args:
            raise c.ProtocolError("RCPT without a recipient")
        self._rcpts.append(_path(pkt.args[0]))
        await self._reply(pkt)

    async def _data(self, pkt: c.Data) -> None:
        self._need_mail("DATA")
        await self._reply(pkt)

    def _count(self, n: int) -> bool:
        """Account ``n`` more bytes; False once over the size bound."""
        self._size += n
        if self._size > self.max_message_size:
            if self._refusal is None:
                self._refusal = replies.MESSAGE_TOO_BIG.format(self.max_message_size)
                self._parts = []
            return False
        return self._refusal is None

    async def _header(self, pkt: c.Header) -> None:
        self._need_mail("HEADER")
        if self._in_body:
            raise c.ProtocolError("HEADER after the body")
        if not self._refused:
            # value as received: folded lines come with a bare LF between them
            line = pkt.name + b":" + pkt.value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            if self._count(len(line) + 2):
                self._parts.append(line)
                self._parts.append(b"\r\n")
        await self._reply(pkt)

    def _end_headers(self) -> None:
        if not self._in_body:
            self._in_body = True
            if self._count(2):
                self._parts.append(b"\r\n")

    async def _eoh(self, pkt: c.EndOfHeaders) -> None:
        self._need_mail("EOH")
        self._end_headers()
        await self._reply(pkt)

    async def _body(self, pkt: c.Body) -> None:
        self._need_mail("BODY")
        if self._refused:
            return
        self._end_headers()
        if pkt.chunk and self._count(len(pkt.chunk)):
            self._parts.append(pkt.chunk)
        await self._reply(pkt)

    async def _eob(self, pkt: c.EndOfBody) -> None:
        self._need_mail("BODYEOB")
        self._end_headers()
        if pkt.chunk and not self._refused and self._count(len(pkt.chunk)):
            self._parts.append(pkt.chunk)
        try:
            if self._refusal is not None:
                await self._refuse()
            else:
                await self._answer()
        finally:
            self.messages += 1
            self._reset_message()

    async def _abort(self, pkt: c.Abort) -> None:
        self._reset_message()

    async def _quit(self, pkt: c.Quit) -> None:
        raise _Close

    async def _quit_nc(self, pkt: c.QuitNC) -> None:
        self._reset_connection()
        self._reused = True

    async def _unknown(self, pkt: c.Unknown) -> None:
        await self._reply(pkt)

    # ------------------------------------------------------------ the message

    def message(self) -> MilterMessage:
        """The message collected so far (at BODYEOB: the whole message)."""
        assert self._mail is not None
        macros = {**self._conn_macros, **self._msg_macros}
        conn = self._connected
        return MilterMessage(
            raw=b"".join(self._parts),
            mail_from=_path(self._mail.args[0]),
            rcpts=tuple(self._rcpts),
            helo=self._helo_name,
            client_name=conn.hostname if conn else "",
            client_addr=macros.get("client_addr") or (conn.address if conn else ""),
            client_port=conn.port if conn else 0,
            queue_id=macros.get("i", ""),
            auth_authen=macros.get("auth_authen", ""),
            mail_args=tuple(self._mail.args[1:]),
            macros=macros,
        )

    async def _answer(self) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        queue_id = "-"

        def progress() -> None:
            nonlocal timer
            if not self.writer.is_closing():
                self.writer.write(_PROGRESS)
                timer = loop.call_later(self.progress_interval, progress)

        started = time.monotonic()
        try:
            msg = self.message()
            self._parts = []
            queue_id = msg.queue_id or "-"
            timer = loop.call_later(self.progress_interval, progress)
            try:
                if self.handler_timeout is None:
                    answer = await self.handler(msg)
                else:
                    async with asyncio.timeout(self.handler_timeout):
                        answer = await self.handler(msg)
            finally:
                timer.cancel()
            out = actions.encode(
                actions.answer_packets(answer, msg.raw, quarantine_mode=self.quarantine_mode))
        except Exception as exc:
            log.error("milter %s: message %s: no answer after %.1f s: %r; answering TEMPFAIL",
                      self.peer, queue_id, time.monotonic() - started, exc)
            out = c.ReplyCode(actions.milter_reply(replies.LOCAL_ERROR)).encode()
        await self._send(out)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "unix")
