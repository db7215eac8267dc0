"""A pure-Python MTA side of the milter protocol, for the tests (a second
opinion next to the real Postfix in tests/integration/test_milter_postfix.py).

It speaks what Postfix's milter8 client speaks: OPTNEG offering every action
and step, MACRO before each event, headers with folded lines joined by LF,
body chunks of at most 65,535 bytes, and it reads responses until the final
one (skipping PROGRESS, collecting modification requests).  ``apply_edits``
is a reference "MTA-side apply" with Postfix's header-index rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from gateway.milter import codec as c

ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF
FINAL = (c.Accept, c.Continue, c.Discard, c.Reject, c.Tempfail, c.ReplyCode)
#: the MTA's own first header, which the milter never sees
OWN_RECEIVED = (b"Received", b" by mta.test (Postfix) id 4ABC; Fri, 4 Dec 2026 21:00:00 +0000")


class MtaClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = c.Decoder()
        self.frames: list[tuple[bytes, bytes]] = []
        self.negotiated: c.OptNeg | None = None
        self.progress = 0

    @classmethod
    async def open(cls, address: tuple[str, int] | str) -> MtaClient:
        if isinstance(address, str):
            r, w = await asyncio.open_unix_connection(address)
        else:
            r, w = await asyncio.open_connection(*address)
        return cls(r, w)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def send(self, *pkts: object) -> None:
        self.writer.write(b"".join(p.encode() for p in pkts))  # type: ignore[attr-defined]
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self, timeout: float = 30) -> c.Response | None:
        """The next response, or None at EOF."""
        while not self.frames:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        code, payload = self.frames.pop(0)
        return c.decode_response(code, payload)

    async def closed(self, timeout: float = 30) -> bool:
        """True once the milter closed the connection (EOF, nothing more)."""
        try:
            pkt = await self.read(timeout)
        except ConnectionError:
            pkt = None
        if pkt is None:
            await self.close()
        return pkt is None

    async def final(self, timeout: float = 30) -> list[c.Response]:
        """Responses up to and including the final one (PROGRESS counted, not kept)."""
        out: list[c.Response] = []
        while True:
            pkt = await self.read(timeout)
            if pkt is None:
                raise ConnectionError(f"milter closed the connection after {out}")
            if type(pkt) is c.Progress:
                self.progress += 1
                continue
            out.append(pkt)
            if type(pkt) in FINAL:
                return out

    def answers(self, step: int) -> bool:
        """Does the milter answer events of this kind (no SMFIP_NR_* negotiated)?"""
        assert self.negotiated is not None
        return not self.negotiated.protocol & step

    def skips(self, step: int) -> bool:
        assert self.negotiated is not None
        return bool(self.negotiated.protocol & step)

    async def negotiate(self, actions: int = ALL_ACTIONS, steps: int = ALL_STEPS) -> c.OptNeg:
        await self.send(c.OptNeg(6, actions, steps))
        reply = await self.read()
        assert type(reply) is c.OptNeg, reply
        self.negotiated = reply
        return reply

    async def event(self, pkt: object, nr: int, no: int = 0,
                    macros: Sequence[tuple[str, str]] = ()) -> list[c.Response]:
        """Send MACRO (if any) and the event; read the reply unless not wanted."""
        code = pkt.code  # type: ignore[attr-defined]
        if macros:
            await self.send(c.Macro(code, tuple(macros)))
        if no and self.skips(no):
            return []
        await self.send(pkt)
        if nr and not self.answers(nr):
            return []
        return await self.final()

    async def connect(self, host: str = "client.test", addr: str = "192.0.2.7",
                      port: int = 40000, helo: str = "client.test",
                      macros: Sequence[tuple[str, str]] = ()) -> list[c.Response]:
        out = await self.event(c.Connect(host, "4", port, addr), c.SMFIP_NR_CONN,
                               c.SMFIP_NOCONNECT, macros or (
                                   ("j", "mta.test"), ("_", f"{host} [{addr}]"),
                                   ("{daemon_name}", "smtpd"), ("{client_addr}", addr)))
        out += await self.event(c.Helo(helo), c.SMFIP_NR_HELO, c.SMFIP_NOHELO)
        return out

    async def envelope(self, mail_from: str, rcpts: Iterable[str], *,
                       mail_args: Sequence[str] = (), auth: str = "") -> list[c.Response]:
        macros = (("{auth_authen}", auth),) if auth else (("{mail_addr}", mail_from),)
        out = await self.event(c.Mail((f"<{mail_from}>", *mail_args)), c.SMFIP_NR_MAIL,
                               c.SMFIP_NOMAIL, macros)
        for r in rcpts:
            out += await self.event(c.Rcpt((f"<{r}>",)), c.SMFIP_NR_RCPT, c.SMFIP_NORCPT)
        return out

    async def content(self, headers: Sequence[tuple[bytes, bytes]], body: bytes, *,
                      queue_id: str = "4ABC") -> list[c.Response]:
        """DATA, headers, EOH, body chunks, EOB; the responses to EOB (or an
        earlier refusal)."""
        out = await self.event(c.Data(), c.SMFIP_NR_DATA, c.SMFIP_NODATA)
        if out and type(out[-1]) is not c.Continue:
            return out
        for name, value in headers:
            out = await self.event(c.Header(name, value.replace(b"\r\n", b"\n")),
                                   c.SMFIP_NR_HDR, c.SMFIP_NOHDRS)
            if out and type(out[-1]) is not c.Continue:
                return out
        out = await self.event(c.EndOfHeaders(), c.SMFIP_NR_EOH, c.SMFIP_NOEOH)
        if out and type(out[-1]) is not c.Continue:
            return out
        for i in range(0, len(body), c.MAX_BODY_CHUNK):
            out = await self.event(c.Body(body[i : i + c.MAX_BODY_CHUNK]), c.SMFIP_NR_BODY,
                                   c.SMFIP_NOBODY)
            if out and type(out[-1]) is not c.Continue:
                return out
        await self.send(c.Macro(b"E", (("{i}", queue_id),)), c.EndOfBody())
        return await self.final()


# ------------------------------------------------------------ reference apply


def apply_edits(headers: list[tuple[bytes, bytes]], body: bytes,
                responses: Sequence[c.Response]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """What Postfix does with the modification requests (cleanup_milter.c),
    on the delivered header list (the MTA's own Received first, then what the
    milter saw).  Returns the delivered ``(headers, body)``; values in the
    milter's LF-folded form are turned back into CRLF."""
    q = [OWN_RECEIVED, *headers]

    def find(index: int, name: bytes | None, skip: int) -> int | None:
        """Position in q of the index-th (1-based) header [named ``name``]."""
        seen = 0
        for pos, (n, _v) in enumerate(q):
            if pos < skip:
                continue
            if name is None or n.lower() == name.lower():
                seen += 1
                if seen == index:
                    return pos
        return None

    new_body: bytes | None = None
    replbody_done = False
    for r in responses:
        t = type(r)
        if t is c.ReplaceBody:
            assert not replbody_done, "REPLBODY after another request (Postfix: 451 4.3.5)"
            new_body = (new_body or b"") + r.chunk
            continue
        if new_body is not None:
            replbody_done = True
        if t is c.AddHeader:
            q.append((r.name, r.value.replace(b"\n", b"\r\n")))
        elif t is c.InsertHeader:
            pos = find(r.index + 1, None, 0)
            entry = (r.name, r.value.replace(b"\n", b"\r\n"))
            if pos is None:
                q.append(entry)
            else:
                q.insert(pos, entry)
        elif t is c.ChangeHeader:
            pos = find(max(r.index, 1), r.name, 1)
            if r.value:
                entry = (r.name, r.value.replace(b"\n", b"\r\n"))
                if pos is None:
                    q.append(entry)
                else:
                    q[pos] = entry
            elif pos is not None:
                del q[pos]
        elif t in FINAL or t is c.Quarantine:
            continue
        else:
            raise AssertionError(f"unexpected response {r!r}")
    assert q[0] == OWN_RECEIVED, "the MTA's own Received header must stay first"
    return q[1:], body if new_body is None else new_body
