"""Real servers on loopback for the tests: a recording next hop and the gateway.

Each runs its own asyncio loop in a background thread so that tests can use
blocking real clients (smtplib, swaks) against them.  Ports are ephemeral.
"""

from __future__ import annotations

import asyncio
import email.utils
import smtplib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from gateway.config import Config, parse_config


class LoopThread:
    """An asyncio loop in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    xforward: dict[str, str] = field(default_factory=dict)
    mail_options: list[str] = field(default_factory=list)


class _RecordingSMTP(AioSMTP):
    """aiosmtpd with XFORWARD support, for the next hop's side; counts its
    connections and QUITs, and keeps the live ones (see ``NextHop.drop``)."""

    def __init__(self, handler: _NextHopHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.nh = handler.nh

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.nh.connections += 1
        self.nh.live.add(self)
        self.nh.notify()

    def connection_lost(self, error: Exception | None) -> None:
        self.nh.live.discard(self)
        self.nh.notify()
        super().connection_lost(error)

    async def smtp_QUIT(self, arg: str) -> None:
        self.nh.quits += 1
        self.nh.notify()
        await super().smtp_QUIT(arg)

    async def smtp_XFORWARD(self, arg: str) -> None:
        xf = getattr(self.session, "xforward", {})
        for item in (arg or "").split():
            k, _, v = item.partition("=")
            xf[k.upper()] = v
        self.session.xforward = xf  # type: ignore[attr-defined]
        await self.push("250 2.0.0 Ok")


class NextHop:
    """A recording SMTP server: the next hop the gateway relays to.

    Failure injection: ``rcpt_replies`` (address -> reply), ``mail_reply``,
    ``data_reply`` (reply to the end of data), ``drop_on_data`` (close the
    connection instead of answering the end of data), ``delay`` (seconds before
    answering the end of data), ``hold`` (a :class:`threading.Event`: the end
    of data is answered only once the test sets it), ``xforward`` (advertise
    XFORWARD).

    Events a test can wait on instead of sleeping: ``data_started`` (an end of
    data arrived), :meth:`wait_for` (that many messages recorded) and
    :meth:`wait_answered` (that many ends of data answered, whatever the
    answer, after any delay or hold).
    """

    def __init__(self, *, xforward: bool = True, port: int = 0) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        #: the reply to the next MAIL only (then back to normal)
        self.mail_reply_once: str | None = None
        #: connections whose next MAIL gets a 421 and a close (see doom())
        self.doomed: set[_RecordingSMTP] = set()
        self.data_reply: str | None = None
        self.drop_on_data = False
        self.delay = 0.0
        self.hold: threading.Event | None = None
        self.advertise_xforward = xforward
        self.sessions = 0
        #: TCP connections accepted, QUITs received, connections open now
        self.connections = 0
        self.quits = 0
        self.live: set[_RecordingSMTP] = set()
        #: end-of-data received (before any delay/answer): a test can wait on it
        self.data_started = threading.Event()
        #: ends of data answered (or dropped), after any delay or hold
        self.answered = 0
        self._changed = threading.Condition()
        self._lt = LoopThread("next-hop")
        self._server: asyncio.base_events.Server | None = None
        self.host = "127.0.0.1"
        self.port = port
        self.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        async def go() -> int:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: _RecordingSMTP(
                    _NextHopHandler(self), decode_data=False, enable_SMTPUTF8=True,
                    hostname="nexthop.test", data_size_limit=None,
                ),
                host=self.host, port=self.port,
            )
            return self._server.sockets[0].getsockname()[1]

        self.port = self._lt.call(go())

    def stop_listening(self) -> None:
        """Next hop down: close the listener and every open connection (the
        port stays known)."""
        async def go() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None

        self._lt.call(go())
        self.drop()

    def drop(self) -> None:
        """Close every open connection from the next hop's side (a restart,
        an idle timeout), listener untouched; returns once they are closed."""
        async def go() -> None:
            for conn in list(self.live):
                if conn.transport is not None:
                    conn.transport.close()

        self._lt.call(go())
        self.wait_until(lambda: not self.live, "connections closed")

    def doom(self) -> None:
        """Every connection open now answers its next MAIL with 421 and
        closes (a next hop shutting down); new connections work."""
        self.doomed = set(self.live)

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Until ``predicate()`` holds (checked on every change); raises naming ``what``."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError(f"next hop: not {what} after {timeout} s")

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()  # release a held answer: its executor thread must end
        self.stop_listening()
        self._lt.close()

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 120) -> list[Received]:
        """Until ``count`` messages are recorded (or the timeout: the caller's
        assertion on the list then says what is missing)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.messages) >= count, timeout)
        return self.messages

    def wait_answered(self, count: int, timeout: float = 120) -> None:
        """Until ``count`` ends of data were answered; raises naming the wait."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.answered >= count, timeout):
                raise AssertionError(f"next hop: {self.answered} ends of data answered after"
                                     f" {timeout} s, waited for {count}")


class _NextHopHandler:
    def __init__(self, nh: NextHop) -> None:
        self.nh = nh

    async def handle_EHLO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.nh.sessions += 1
        if self.nh.advertise_xforward:
            responses.insert(-1, "250-XFORWARD NAME ADDR PROTO HELO SOURCE")
        return responses

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if server in self.nh.doomed:  # shutting down: 421 and close
            self.nh.doomed.discard(server)
            server.transport.close()
            return "421 4.3.2 service shutting down"
        if self.nh.mail_reply_once:
            reply, self.nh.mail_reply_once = self.nh.mail_reply_once, None
            return reply
        if self.nh.mail_reply:
            return self.nh.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.nh.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        try:
            return await self._answer_data(server, session, envelope)
        finally:
            self.nh.answered += 1
            self.nh.notify()

    async def _answer_data(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.nh.data_started.set()
        if self.nh.delay:
            await asyncio.sleep(self.nh.delay)
        hold = self.nh.hold
        if hold is not None and not hold.is_set():
            await asyncio.get_running_loop().run_in_executor(None, hold.wait, 600)
        if self.nh.drop_on_data:
            server.transport.close()
            return "421 dropped"
        if self.nh.data_reply:
            return self.nh.data_reply
        self.nh.messages.append(
            Received(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""),
                dict(getattr(session, "xforward", {})),
                list(envelope.mail_options),
            )
        )
        return f"250 2.0.0 Ok: queued as NH{len(self.nh.messages)}"


def test_config(
    tmp_path: Path,
    next_hop: str,
    *,
    chain: Iterable[str] = (),
    filters: Mapping[str, Mapping[str, Any]] | None = None,
    gateway: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = None,
    milter: Mapping[str, Any] | None = None,
) -> Config:
    """A Config for tests: port 0, temp store, the given chain."""
    data: dict[str, Any] = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "next_hop": next_hop,
            "hostname": "mailwarden.test",
            "internal_domains": ["example.com"],
            "next_hop_timeout": 30,
            "drain_timeout": 5,
            **(gateway or {}),
        },
        "store": {"path": str(tmp_path / "store"), "log_flush_interval": 0.05, **(store or {})},
        "filters": {"chain": list(chain), **{k: dict(v) for k, v in (filters or {}).items()}},
    }
    if milter is not None:
        data["milter"] = dict(milter)
    return parse_config(data, "test-config.toml")


class Recorder:
    """A pipeline observer that keeps (mail, result) for every finished message."""

    def __init__(self) -> None:
        self.results: list[tuple[Any, Any]] = []

    def message_done(self, mail: Any, result: Any) -> None:
        self.results.append((mail, result))


class Gateway:
    """The gateway, in-process, in its own loop thread, with a real store.

    ``results`` lists (Mail, pipeline Result) for every message finished.
    """

    def __init__(self, config: Config, *, dns_txt: Callable[..., Any] | None = None) -> None:
        from gateway.server import Gateway as GatewayServer
        from quarantine.store import open_store

        self.config = config
        self.store_path = Path(config.store.path)
        self._lt = LoopThread("gateway")
        self.recorder = Recorder()
        self.results = self.recorder.results

        async def go() -> tuple[Any, Any, tuple[str, int]]:
            store = await open_store(
                config.store, create=True, flush_interval=config.store.log_flush_interval
            )
            store.start_log_writer()
            gw = GatewayServer(config, store=store, dns_txt=dns_txt, observers=[self.recorder])
            addr = await gw.start()
            return gw, store, addr

        self.server, self.store, addr = self._lt.call(go())
        self.host, self.port = addr or ("", 0)  # no SMTP front end: milter only

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return self._lt.call(coro, timeout)

    def reload(self, config: Config) -> None:
        self.call(self.server.reload(config))
        self.config = config

    def flush_log(self) -> None:
        self.call(self.store.flush_log())

    def stop(self) -> None:
        if getattr(self, "_stopped", False):
            return
        self._stopped = True

        async def go() -> None:
            await self.server.stop()
            await self.store.close()

        try:
            self._lt.call(go())
        finally:
            self._lt.close()

    def smtp(self, timeout: float = 30) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=timeout)

    def send(
        self,
        raw: bytes,
        mail_from: str = "a@ext.test",
        rcpt_tos: Iterable[str] = ("b@example.com",),
        *,
        xforward: Mapping[str, str] | None = None,
        mail_options: Iterable[str] = (),
    ) -> tuple[int, str]:
        """Send one message; returns the reply to DATA (or the first failing reply)."""
        with self.smtp() as s:
            s.ehlo("client.test")
            if xforward:
                args = " ".join(f"{k}={v}" for k, v in xforward.items())
                code, msg = s.docmd("XFORWARD", args)
                if code != 250:
                    return code, msg.decode()
            code, msg = s.mail(mail_from, list(mail_options))
            if code != 250:
                return code, msg.decode()
            accepted = 0
            last = (0, b"")
            for r in rcpt_tos:
                last = s.rcpt(r)
                if last[0] in (250, 251):
                    accepted += 1
            if not accepted:
                return last[0], last[1].decode()
            code, msg = s.data(raw)
            return code, msg.decode()


def make_message(
    *,
    subject: str = "hello",
    body: str = "Hello,\nthis is a test message.\n",
    attachments: Iterable[tuple[str, str, bytes]] = (),
    from_: str = "Alice <a@ext.test>",
    to: str = "Bob <b@example.com>",
    headers: Mapping[str, str] | None = None,
    html: str | None = None,
) -> bytes:
    """A well-formed message with CRLF line endings."""
    attachments = list(attachments)
    text = MIMEText(body, "plain", "utf-8")
    if html is not None:
        alt = MIMEMultipart("alternative")
        alt.attach(text)
        alt.attach(MIMEText(html, "html", "utf-8"))
        text = alt
    if attachments:
        msg = MIMEMultipart("mixed")
        msg.attach(text)
        for name, ctype, data in attachments:
            maintype, _, subtype = ctype.partition("/")
            part = MIMEApplication(data, _subtype=subtype or "octet-stream")
            if maintype != "application":
                part.replace_header("Content-Type", ctype)
            part.add_header("Content-Disposition", "attachment", filename=name)
            msg.attach(part)
    else:
        msg = text
    msg["From"] = from_
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain="ext.test")
    for k, v in (headers or {}).items():
        msg[k] = v
    raw = msg.as_bytes()
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
