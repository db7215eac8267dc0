"""The SMTP side: an aiosmtpd server that proxies each session to the next hop.

* MAIL FROM and each RCPT TO are forwarded live (``relay.py``) and the next
  hop's replies mirrored, so a refused recipient is refused at RCPT time.
* DATA is read in large chunks (not line by line), with exact dot-unstuffing,
  the size limit (552) and the smuggling rules: only ``<CRLF>.<CRLF>`` ends the
  data, and data containing a bare CR or LF is refused (or normalised, per
  ``gateway.bare_newlines``), so mailwarden never passes one on.
* The message then goes through the pipeline; the client's reply to DATA is
  the next hop's reply (relayed), 250 held (quarantined, after it is durable),
  a 5xx refusal, or a 451.  Once the data is in, processing is shielded from
  the client going away, so a transaction is never half done.
* XFORWARD is accepted from ``trusted_networks`` peers only; ``max_sessions``
  is enforced with a 421; STARTTLS when a certificate is configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import time
import types
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

import aiosmtpd
import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from filters.base import FilterContext, Outcome
from gateway import replies
from gateway.config import Config, parse_hostport
from gateway.message import MAX_HEADER_LINES, Direction, Mail, header_lines
from gateway.pipeline import HoldFailed, Pipeline, Result, build_chain
from gateway.relay import ConnectionCache, NextHopFailure, Relay

log = logging.getLogger("mailwarden.server")

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
READ_CHUNK = 1 << 20
END_OF_DATA = b"\r\n.\r\n"


#: A MAIL/RCPT path the fast way: ``<local@domain>``, both dot-atoms of
#: RFC 5322 atext, then nothing or blanks and the parameters (anything else,
#: comments included: the header parser).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>(?:\Z|[ \t]+([^ \t(\r\n].*)\Z)", re.S)


def new_queue_id() -> str:
    return secrets.token_hex(5).upper()


def _xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


class GatewaySession(Session):
    """Per-session state: the next-hop connection and XFORWARD attributes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.relay: Relay | None = None
        self.xforward: dict[str, str] = {}
        self.trusted_peer = False
        self.peer_addr = ""
        self.in_transaction = False
        self.over_limit = False
        self.processing: asyncio.Future[Any] | None = None


class State:
    """What a reload swaps as a whole: the config and the chain built from it."""

    def __init__(self, config: Config, pipeline: Pipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.networks = [
            ipaddress.ip_network(n, strict=False) for n in config.gateway.trusted_networks
        ]
        self._trusted: dict[str, bool] = {}

    def trusted(self, addr: str) -> bool:
        """Whether ``addr`` is in ``trusted_networks`` (remembered per address:
        the same few MTAs connect all day)."""
        known = self._trusted.get(addr)
        if known is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            known = self._trusted[addr] = self._is_trusted(addr)
        return known

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.networks)

    def is_internal(self, address: str) -> bool:
        domain = address.rsplit("@", 1)[1].lower().rstrip(".") if "@" in address else ""
        return any(
            domain == d or domain.endswith("." + d) for d in self.config.gateway.internal_domains
        )

    def direction(self, client_addr: str, rcpt_tos: list[str]) -> Direction:
        if not self.trusted(client_addr):
            return Direction.INBOUND
        if rcpt_tos and all(self.is_internal(r) for r in rcpt_tos):
            return Direction.INTERNAL
        return Direction.OUTBOUND


#: aiosmtpd releases whose ``SMTP.__init__`` ``GatewaySMTP._fast_init`` reproduces.
FAST_INIT_VERSIONS = frozenset({"1.4.6"})
#: The keyword arguments the fast path knows (``Gateway._factory`` passes these).
_FAST_INIT_KWARGS = frozenset({
    "data_size_limit", "enable_SMTPUTF8", "decode_data", "hostname", "ident",
    "tls_context", "require_starttls", "timeout",
})


class _Tables:
    """What aiosmtpd's ``__init__`` finds by ``inspect.getmembers``/``dir()`` on
    every connection, found once per (protocol class, handler class): for each
    table entry the key, the function and which object it is bound to."""

    def __init__(self, server: SMTP, handler: Any, attrs: frozenset[str]) -> None:
        self.attrs = attrs  # the instance attributes the normal __init__ sets
        self.auth: list[tuple[str, Any, bool]] = []
        self.hooks: list[tuple[str, Any]] = []
        self.smtp: list[tuple[str, Any]] = []
        self.ehlo_hook_ver = server._ehlo_hook_ver
        self.usable = True
        self.verified = False
        for name, attr in server._auth_methods.items():
            owner = server if attr.is_builtin else handler
            self.auth.append((name, self._func(attr.method, owner), attr.is_builtin))
        for name, hook in server._handle_hooks.items():
            self.hooks.append((name, self._func(hook, handler)))
        for name, method in server._smtp_methods.items():
            self.smtp.append((name, self._func(method, server)))
        self.hooks_by_name = dict(self.hooks)
        self.smtp_by_name = dict(self.smtp)

    def _func(self, value: Any, owner: Any) -> Any:
        # Only methods bound to the instance can be re-bound to the next one.
        if not isinstance(value, types.MethodType) or value.__self__ is not owner:
            self.usable = False
            return None
        return value.__func__


class _Bound(Mapping[str, Any]):
    """A name -> method table bound to ``obj`` on lookup: aiosmtpd's
    ``_smtp_methods``/``_handle_hooks`` without binding some thirty methods
    per connection of which a session calls five (same keys, same order)."""

    __slots__ = ("_funcs", "_obj")

    def __init__(self, funcs: dict[str, Any], obj: Any) -> None:
        self._funcs = funcs
        self._obj = obj

    def __getitem__(self, name: str) -> Any:
        return types.MethodType(self._funcs[name], self._obj)

    def get(self, name: str, default: Any = None) -> Any:
        func = self._funcs.get(name)
        return default if func is None else types.MethodType(func, self._obj)

    def __contains__(self, name: object) -> bool:
        return name in self._funcs

    def __iter__(self) -> Iterator[str]:
        return iter(self._funcs)

    def __len__(self) -> int:
        return len(self._funcs)


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol engine with mailwarden's DATA reader, XFORWARD and limits."""

    #: per handler class: the tables of the first connection (None: never fast)
    _tables: dict[type, _Tables | None] = {}

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        # aiosmtpd's __init__ walks dir() of the protocol and the handler on
        # every connection (~8 % of the loop at one connection per message).
        # The first connection of a class pair takes the normal path and
        # records the tables; later ones re-bind them (same entries, same
        # order), unless the aiosmtpd release or the arguments are unknown.
        tables = type(self)._tables.get(type(handler), False)
        if (tables is False or tables is None or not kwargs.keys() <= _FAST_INIT_KWARGS
                or aiosmtpd.__version__ not in FAST_INIT_VERSIONS):
            super().__init__(handler, **kwargs)
            if tables is False:
                found = _Tables(self, handler, frozenset(vars(self)))
                type(self)._tables[type(handler)] = found if found.usable else None
        else:
            self._fast_init(handler, tables, **kwargs)
            if not tables.verified:
                # The first fast instance must have what the normal path set.
                if frozenset(vars(self)) != tables.attrs:
                    type(self)._tables[type(handler)] = None
                    super().__init__(handler, **kwargs)
                tables.verified = True
        self.gateway = handler.gateway
        self.data_lines: int | None = None  # LFs in the last DATA (set by _read_data)
        self._idle_deadline = 0.0
        self._idle_armed = False

    def _fast_init(
        self, handler: Any, tables: _Tables, *, data_size_limit: int | None = aiosmtpd_smtp.DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False, decode_data: bool = False, hostname: str | None = None,
        ident: str | None = None, tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False, timeout: float = 300,
    ) -> None:
        """aiosmtpd 1.4.6's ``SMTP.__init__`` for the arguments mailwarden
        passes (no AUTH options, no PROXY protocol, no call limits), with the
        method tables from ``tables``."""
        self.__ident__ = ident or aiosmtpd_smtp.__ident__
        self.loop = aiosmtpd_smtp.make_loop()
        super(SMTP, self).__init__(
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop)
        self.event_handler = handler
        assert data_size_limit is None or isinstance(data_size_limit, int)
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname or socket.getfqdn()
        self.tls_context = tls_context
        if tls_context:
            if tls_context.verify_mode not in {ssl.CERT_NONE, ssl.CERT_OPTIONAL}:
                aiosmtpd_smtp.log.warning(
                    "tls_context.verify_mode not in {CERT_NONE, CERT_OPTIONAL}; "
                    "this might cause client connection problems")
            elif tls_context.check_hostname:
                aiosmtpd_smtp.log.warning("tls_context.check_hostname == True; "
                                          "this might cause client connection problems")
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._auth_callback = aiosmtpd_smtp.login_always_fail
        self._authenticator = None
        self._auth_required = False
        self._auth_methods = {
            name: aiosmtpd_smtp._AuthMechAttr(
                types.MethodType(func, self if builtin else handler), builtin)
            for name, func, builtin in tables.auth
        }
        if aiosmtpd_smtp.log.isEnabledFor(logging.INFO):
            aiosmtpd_smtp.log.info("Available AUTH mechanisms: " + " ".join(
                m + "(builtin)" if impl.is_builtin else m
                for m, impl in sorted(self._auth_methods.items())))
        self._handle_hooks = _Bound(tables.hooks_by_name, handler)
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = _Bound(tables.smtp_by_name, self)
        self._enforce_call_limit = False

    def _create_session(self) -> Session:
        return GatewaySession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if not first:
            return  # STARTTLS re-handshake on the same session
        session = self.session
        assert isinstance(session, GatewaySession)
        peer = transport.get_extra_info("peername")
        session.peer_addr = peer[0] if isinstance(peer, tuple) else ""
        state = self.gateway.state
        session.trusted_peer = state.trusted(session.peer_addr)
        self.gateway.sessions.add(self)
        if len(self.gateway.sessions) > state.config.gateway.max_sessions:
            session.over_limit = True

    def connection_lost(self, error: Exception | None) -> None:
        session = self.session
        if isinstance(session, GatewaySession) and session.relay is not None:
            relay = session.relay
            if session.processing is not None and not session.processing.done():
                # The message is being finished on the client's behalf: let the
                # next-hop connection go only once that transaction is complete.
                session.processing.add_done_callback(lambda _f: _let_go(relay))
            else:
                _let_go(relay)
        self.gateway.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        session = self.session
        assert isinstance(session, GatewaySession)
        if session.over_limit or self.gateway.closing:
            hostname = self.hostname
            msg = (
                replies.SHUTTING_DOWN if self.gateway.closing else replies.TOO_MANY_SESSIONS
            ).format(hostname)
            log.warning("%s refused: %s", session.peer_addr, msg)
            try:
                await self.push(msg)
            finally:
                if self.transport is not None:
                    self.transport.close()
            return
        await super()._handle_client()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's ``SMTP._getaddr`` (MAIL and RCPT addresses) without the
        ``typing.Protocol`` class it defines on every call (~40 us each);
        aiosmtpd's own for a release this was not checked against."""
        if aiosmtpd.__version__ not in FAST_INIT_VERSIONS:
            return super()._getaddr(arg)
        if not arg:
            return "", ""
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            # <dot-atom@dot-atom>: what the header parser returns, ~20x faster
            addr, rest = simple.group(1), simple.group(2) or ""
            if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
                return None, None
            return addr, rest
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
        except HeaderParseError:
            return None, None
        addr = address.addr_spec
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd restarts the idle timer on every command (a TimerHandle
        made and one cancelled each time); here the deadline moves and the
        one timer, when it fires early, waits out the rest.  Same expiry."""
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is not None and self._idle_armed and handle.when() <= deadline:
            return  # fires no later than the new deadline and re-arms then
        if handle is not None:
            handle.cancel()
        self._timeout_handle = loop.call_at(deadline, self._idle_check)
        self._idle_armed = True

    def _idle_check(self) -> None:
        self._idle_armed = False
        if self._idle_deadline > self.loop.time():
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
            self._idle_armed = True
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # An idle session is told why before it is closed.
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(replies.SESSION_TIMEOUT.format(self.hostname).encode() + b"\r\n")
            except Exception:
                pass
        super()._timeout_cb()

    # ---------------------------------------------------------------- XFORWARD

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        session = self.session
        assert isinstance(session, GatewaySession)
        if not session.trusted_peer:
            await self.push(replies.XFORWARD_NOT_PERMITTED)
            return
        if session.in_transaction:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            await self.push(replies.XFORWARD_SYNTAX)
            return
        attrs: dict[str, str] = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            name = name.upper()
            if not sep or name not in XFORWARD_ATTRS:
                await self.push(replies.XFORWARD_SYNTAX)
                return
            value = _xtext_decode(value)
            if value.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                continue
            if name == "ADDR" and value.upper().startswith("IPV6:"):
                value = value[5:]
            attrs[name] = value
        session.xforward.update(attrs)
        await self.push(replies.XFORWARD_OK)

    # -------------------------------------------------------------------- DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, problem = await self._read_data()
        if problem is not None:
            self._set_post_data_state()
            await self._abort_transaction()
            await self.push(problem)
            return
        self.envelope.content = content
        self.envelope.original_content = content
        # Processing may take as long as the chain and the next hop allow;
        # the idle timer must not close the session meanwhile.
        cfg = self.gateway.state.config.gateway
        self._reset_timeout(cfg.filter_timeout + 2 * cfg.next_hop_timeout + 30)
        try:
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            self._reset_timeout()
            await self.push(status)
        finally:
            session = self.session
            assert isinstance(session, GatewaySession)
            session.in_transaction = False

    async def _abort_transaction(self) -> None:
        session = self.session
        assert isinstance(session, GatewaySession)
        session.in_transaction = False
        session.xforward.clear()
        if session.relay is not None:
            await session.relay.rset()

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read DATA up to ``<CRLF>.<CRLF>`` in large chunks.

        Returns (unstuffed content, None) or (b"", reply) for data that is
        refused.  The search keeps a virtual CRLF in front so that an empty
        message (``.`` on the first line) and a stuffed first line are handled
        like any other line.  Bytes after the terminator (a pipelined next
        command) are handed back to the reader.
        """
        reader = self._reader
        limit = self.data_size_limit or 0
        buf = bytearray(b"\r\n")
        start = 0
        discarding = False
        while True:
            idx = buf.find(END_OF_DATA, start)
            if idx >= 0:
                break
            if limit and not discarding and len(buf) > limit + 8:
                discarding = True  # too big whatever comes: keep only a tail
            if discarding:
                del buf[:-4]
            start = max(0, len(buf) - 4)
            # read() takes everything buffered (the transport pauses long
            # before the buffer reaches READ_CHUNK), so the reader is empty
            # afterwards and leftovers can be fed back below in order.
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            buf += chunk
            self._reset_timeout()
        leftover = bytes(buf[idx + 5 :])
        if leftover:
            reader.feed_data(leftover)
        if discarding:
            return b"", replies.MESSAGE_TOO_BIG.format(limit)
        del buf[idx + 2 :]
        # Unstuff (one C-level replace), only when a line starts with a dot.
        data = buf.replace(b"\r\n.", b"\r\n") if buf.find(b"\r\n.") >= 0 else buf
        del buf
        del data[:2]
        if limit and len(data) > limit:
            return b"", replies.MESSAGE_TOO_BIG.format(limit)
        crlf = data.count(b"\r\n")
        bare = data.count(b"\n") != crlf or data.count(b"\r") != crlf
        nul = b"\0" in data
        self.data_lines = None if bare else crlf  # for Mail.lines
        if bare or nul:
            if self.gateway.state.config.gateway.bare_newlines == "reject":
                log.warning("%s refused DATA with %s", self.session.peer_addr,
                            "a bare CR/LF" if bare else "a NUL byte")
                return b"", replies.BARE_NEWLINE if bare else replies.NUL_IN_DATA
            # normalize: every line ending becomes CRLF, NULs are dropped.
            data = bytearray(re.sub(rb"\r\n|\r|\n", b"\r\n", data).replace(b"\0", b""))
        if header_lines(data) > MAX_HEADER_LINES:
            # Refused before anything parses it: header parsing is the
            # per-line cost that message size alone does not bound.
            log.warning("%s refused DATA with more than %d header lines",
                        self.session.peer_addr, MAX_HEADER_LINES)
            return b"", replies.HEADER_TOO_BIG.format(MAX_HEADER_LINES)
        return bytes(data), None


class Handler:
    """aiosmtpd hooks: the per-session proxy logic."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def handle_EHLO(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope,
        hostname: str, responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        await self._end_transaction(session)
        lines = [r[4:] for r in responses if not r[4:].upper().startswith(("AUTH", "HELP"))]
        lines += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        if session.trusted_peer:
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRS))
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_HELO(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        await self._end_transaction(session)
        return f"250 {server.hostname}"

    async def _end_transaction(self, session: GatewaySession) -> None:
        if session.in_transaction and session.relay is not None:
            await session.relay.rset()
        session.in_transaction = False

    def _relay(self, session: GatewaySession) -> Relay:
        if session.relay is None:
            cfg = self.gateway.state.config.gateway
            session.relay = Relay(
                cfg.next_hop, timeout=cfg.next_hop_timeout, helo_name=cfg.hostname,
                cache=self.gateway.next_hop_cache,
            )
        return session.relay

    def client_addr(self, session: GatewaySession) -> str:
        if session.trusted_peer and session.xforward.get("ADDR"):
            return session.xforward["ADDR"]
        return session.peer_addr

    async def handle_MAIL(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope,
        address: str, mail_options: list[str],
    ) -> str:
        relay = self._relay(session)
        xf = {
            "ADDR": self.client_addr(session),
            "NAME": session.xforward.get("NAME", ""),
            "HELO": session.xforward.get("HELO", session.host_name or ""),
            "PROTO": session.xforward.get("PROTO", "ESMTP" if session.extended_smtp else "SMTP"),
            "SOURCE": session.xforward.get("SOURCE", ""),
        }
        options = self._mail_options(relay, mail_options)
        try:
            reply = await relay.mail(address, options, xf)
        except NextHopFailure as exc:
            log.warning("MAIL from %s: %s", session.peer_addr, exc.reason)
            return exc.reply
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            envelope.smtp_utf8 = "SMTPUTF8" in (o.upper() for o in mail_options)
            session.in_transaction = True
        return reply

    @staticmethod
    def _mail_options(relay: Relay, options: list[str]) -> list[str]:
        out = []
        for opt in options:
            key = opt.split("=", 1)[0].upper()
            if key == "SIZE" and not relay.supports("size"):
                continue
            if key == "BODY" and not relay.supports("8bitmime"):
                continue
            out.append(opt)
        return out

    async def handle_RCPT(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope,
        address: str, rcpt_options: list[str],
    ) -> str:
        relay = self._relay(session)
        try:
            reply = await relay.rcpt(address, rcpt_options)
        except NextHopFailure as exc:
            log.warning("RCPT from %s: %s", session.peer_addr, exc.reason)
            return exc.reply
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_RSET(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope
    ) -> str:
        await self._end_transaction(session)
        session.xforward.clear()
        return "250 2.0.0 Ok"

    async def handle_NOOP(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope, arg: str
    ) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope
    ) -> str:
        if session.relay is not None:
            await session.relay.quit()
        return "221 2.0.0 Bye"

    async def handle_DATA(
        self, server: GatewaySMTP, session: GatewaySession, envelope: Envelope
    ) -> str:
        state = self.gateway.state
        content = envelope.content
        assert isinstance(content, bytes)
        client_addr = self.client_addr(session)
        mail = Mail(
            queue_id=new_queue_id(),
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=content,
            client_addr=client_addr,
            client_name=session.xforward.get("NAME", ""),
            helo=session.xforward.get("HELO", session.host_name or ""),
            direction=state.direction(client_addr, envelope.rcpt_tos),
            received=self.gateway.clock(),
            mail_options=tuple(envelope.mail_options),
            crlf_only=True,  # the DATA reader refused or normalised bare CR/LF
            lines=server.data_lines,
        )
        relay = self._relay(session)
        session.xforward.clear()
        # Once the data is in, finish the transaction even if the client goes
        # away: a half-done transaction is how messages get lost or doubled.
        task = asyncio.ensure_future(proxy_message(state.pipeline, mail, relay))
        session.processing = task
        self.gateway.in_flight.add(task)
        task.add_done_callback(self.gateway.in_flight.discard)
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The client is gone; the transaction still completes: log it then.
            task.add_done_callback(_finish_done)
            raise
        # The log record and line once the reply is written (this step goes
        # on to push it; the callback runs in the loop's next round).
        asyncio.get_running_loop().call_soon(result.finish)
        return result.reply

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session error: %s", error)
        return replies.LOCAL_ERROR


async def proxy_message(pipeline: Pipeline, mail: Mail, relay: Relay) -> Result:
    """The SMTP proxy's side of one message: decide, then carry the
    Decision out over SMTP -- relay and pass the next hop's reply back;
    quarantine (durable first) and answer 250; refuse with the 5xx; 451."""
    decision = await pipeline.decide(mail)
    qid: str | None = None
    outcome = decision.outcome
    if outcome is Outcome.TEMPFAIL:
        disposition, reply = "tempfailed", decision.reply()
    elif outcome is Outcome.REJECT:
        disposition, reply = "rejected", decision.reply()
    elif outcome is Outcome.QUARANTINE:
        try:
            qid = await pipeline.hold(mail, decision)
            disposition, reply = "quarantined", replies.QUARANTINED.format(qid)
        except HoldFailed:
            disposition, reply = "tempfailed", replies.STORE_UNAVAILABLE
    else:
        content = await pipeline.apply(mail, decision)
        try:
            reply = await relay.data(content)
        except NextHopFailure as exc:
            log.warning("%s: %s", mail.queue_id, exc.reason)
            reply = exc.reply
        disposition = "relayed" if reply.startswith("2") else (
            "next-hop-refused" if reply.startswith("5") else "tempfailed"
        )
    if outcome is not Outcome.RELAY:
        await relay.rset()
    return pipeline.done(mail, decision, disposition, reply, qid)


def _let_go(relay: Relay) -> None:
    """A session's next-hop connection when the session is gone: to the
    cache when no transaction is open there, else closed."""
    if not relay.release():
        relay.close()


def _finish_done(task: asyncio.Future[Any]) -> None:
    """Done-callback: the pending bookkeeping of a processing task whose
    session ended before it did."""
    if not task.cancelled() and task.exception() is None:
        task.result().finish()


class Gateway:
    """The running gateway: listener, sessions, chain, store, reload and drain."""

    def __init__(
        self,
        config: Config,
        *,
        store: Any = None,
        clock: Callable[[], datetime] | None = None,
        dns_txt: Callable[..., Any] | None = None,
        observers: list[Any] | None = None,
    ) -> None:
        self.clock = clock or (lambda: datetime.now(UTC))
        self.store = store
        self.dns_txt = dns_txt
        self.observers = observers or []
        self.executor = ThreadPoolExecutor(
            max_workers=config.gateway.workers, thread_name_prefix="mailwarden-worker"
        )
        self.sessions: set[GatewaySMTP] = set()
        self.in_flight: set[asyncio.Future[Any]] = set()
        self.closing = False
        self.server: asyncio.base_events.Server | None = None
        self.milter: Any = None  # gateway.milter.server.MilterServer when [milter] listen is set
        #: idle next-hop connections, reused by the next session (gateway/relay.py)
        self.next_hop_cache = ConnectionCache(config.gateway.next_hop_cache_time)
        self.state = State(config, self._pipeline(config))
        self.started = time.time()

    def _pipeline(self, config: Config) -> Pipeline:
        ctx = FilterContext(
            hostname=config.gateway.hostname,
            internal_domains=config.gateway.internal_domains,
            executor=self.executor,
            clock=self.clock,
            max_message_size=config.gateway.max_message_size,
            dns_txt=self.dns_txt,
        )
        return Pipeline(
            config, build_chain(config, ctx), store=self.store, executor=self.executor,
            clock=self.clock, observers=self.observers,
        )

    @property
    def config(self) -> Config:
        return self.state.config

    def _tls_context(self) -> ssl.SSLContext | None:
        gw = self.config.gateway
        if not gw.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(gw.tls_cert, gw.tls_key)
        return ctx

    def _factory(self) -> GatewaySMTP:
        gw = self.config.gateway
        return GatewaySMTP(
            Handler(self),
            data_size_limit=gw.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=gw.hostname,
            ident="mailwarden ESMTP",
            tls_context=self._tls,
            require_starttls=False,
            timeout=gw.session_timeout,
        )

    async def start(self) -> tuple[str, int] | None:
        """Start the front ends that are configured: the SMTP proxy
        (``gateway.listen``; its bound address is returned, None when off)
        and the milter listener (``milter.listen``).  OSError (naming the
        key) when one cannot listen; nothing is left listening then."""
        self._tls = self._tls_context()
        addr: tuple[str, int] | None = None
        if self.config.gateway.listen:
            host, port = parse_hostport(self.config.gateway.listen)
            loop = asyncio.get_running_loop()
            try:
                self.server = await loop.create_server(self._factory, host=host, port=port,
                                                       backlog=512)
            except OSError as exc:
                raise OSError(exc.errno, f"gateway.listen {self.config.gateway.listen}: "
                                         f"{exc.strerror or exc}") from exc
            sock = self.server.sockets[0].getsockname()
            addr = (sock[0], sock[1])
            log.info("listening on %s:%s, next hop %s, chain %s", sock[0], sock[1],
                     self.config.gateway.next_hop, ",".join(self.config.chain) or "(empty)")
        if self.config.milter.listen:
            try:
                await self._start_milter()
            except OSError:
                if self.server is not None:
                    self.server.close()
                raise
        return addr

    async def _start_milter(self) -> None:
        from gateway.milter.frontend import milter_handler
        from gateway.milter.server import start_milter

        m, gw = self.config.milter, self.config.gateway
        decide = milter_handler(lambda: self.state, self.clock, new_queue_id)
        loop = asyncio.get_running_loop()

        async def handle(msg: Any) -> Any:
            # In flight like an SMTP transaction: a reload or stop waits for it.
            done: asyncio.Future[None] = loop.create_future()
            self.in_flight.add(done)
            try:
                return await decide(msg)
            finally:
                done.set_result(None)
                self.in_flight.discard(done)

        try:
            self.milter = await start_milter(
                m.listen, handle, quarantine_mode=m.quarantine,
                progress_interval=m.progress_interval, max_message_size=gw.max_message_size,
                max_connections=gw.max_sessions, drain_timeout=gw.drain_timeout,
                handler_timeout=gw.filter_timeout + 2 * gw.next_hop_timeout + 30,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"milter.listen {m.listen}: {exc.strerror or exc}") from exc
        log.info("milter listening on %s (quarantine=%s), chain %s", self.milter.listen_text,
                 m.quarantine, ",".join(self.config.chain) or "(empty)")

    async def reload(self, config: Config) -> None:
        """Swap in a new config and chain; sessions in flight keep the old one."""
        old = self.state
        if config.gateway.listen != old.config.gateway.listen:
            log.warning("gateway.listen changed: takes effect on restart only")
        if config.milter != old.config.milter:
            log.warning("[milter] changed: takes effect on restart only")
        self.state = State(config, self._pipeline(config))
        self._tls = self._tls_context()
        self.next_hop_cache.idle_time = config.gateway.next_hop_cache_time
        log.info("configuration reloaded; chain %s", ",".join(config.chain) or "(empty)")
        # Let messages in flight finish on the old chain before closing it.
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=config.gateway.drain_timeout)
        await old.pipeline.aclose()

    async def stop(self) -> None:
        """Stop accepting, let transactions in flight finish (bounded), close."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        if self.milter is not None:
            self.milter.close()  # finishes the messages in flight (drain_timeout)
        deadline = asyncio.get_running_loop().time() + self.config.gateway.drain_timeout
        # Idle sessions (no transaction under way) are told and closed now;
        # sessions in a transaction get until the drain deadline.
        while True:
            busy = [s for s in self.sessions if _busy(s)]
            for s in list(self.sessions):
                if not _busy(s) and s.transport is not None and not s.transport.is_closing():
                    try:
                        s.transport.write(
                            replies.SHUTTING_DOWN.format(s.hostname).encode() + b"\r\n"
                        )
                    except Exception:
                        pass
                    s.transport.close()
            if not busy and not self.in_flight:
                break
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("drain timeout: closing %d sessions in flight", len(busy))
                break
            await asyncio.sleep(0.05)
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=5)
        for s in list(self.sessions):
            if s.transport is not None:
                s.transport.close()
        if self.server is not None:
            await self.server.wait_closed()
        if self.milter is not None:
            await self.milter.wait_closed()
        self.next_hop_cache.close()
        await self.state.pipeline.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _busy(s: GatewaySMTP) -> bool:
    session = s.session
    return isinstance(session, GatewaySession) and session.in_transaction
