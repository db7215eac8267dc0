"""The ``Mail`` object every filter sees.

A ``Mail`` holds the envelope (sender, recipients, original client address,
HELO, direction, received time, queue id) and the raw bytes exactly as they
arrived.  The parsed message and the attachment list are computed lazily, once,
and shared by all filters.  Nothing here mutates the message.
"""

from __future__ import annotations

import email
import email.header
import email.parser
import email.policy
import email.utils
import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from functools import cached_property

log = logging.getLogger("mailwarden.message")

#: Parsing bounds (bad input gets a clear answer, never a blow-up).
MAX_PARTS = 5000
MAX_DEPTH = 100


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"


class ParseError(Exception):
    """The message's MIME structure could not be parsed within our bounds."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment (or non-body inline part) as the sender declared it.

    ``filename`` is decoded (RFC 2231 and RFC 2047) but otherwise exactly what
    the sender claims; never use it to build a path.  ``payload`` is the
    content-transfer-decoded body of the part.  ``depth`` counts enclosing
    message/rfc822 parts (0 = top-level message).
    """

    filename: str | None
    declared_type: str
    payload: bytes
    index: int
    inline: bool
    depth: int = 0

    @property
    def size(self) -> int:
        return len(self.payload)


def decode_header_value(value: str | None) -> str | None:
    """Decode RFC 2047 encoded words; never raises (bad input is kept as-is)."""
    if value is None:
        return None
    try:
        text = str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        text = str(value)
    # Unfold and drop control characters that would corrupt one-line logs.
    text = " ".join(text.split())
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)


def part_filename(part: Message) -> str | None:
    """The decoded filename of a part (Content-Disposition, then Content-Type name)."""
    try:
        name = part.get_filename()
        if name is None:
            name = part.get_param("name", header="content-type")
            if isinstance(name, tuple):
                name = email.utils.collapse_rfc2231_value(name)
    except Exception:
        return None
    if name is None:
        return None
    return decode_header_value(str(name))


def _is_body_text(part: Message) -> bool:
    ctype = part.get_content_type()
    if ctype not in ("text/plain", "text/html"):
        return False
    disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disposition != "attachment" and part_filename(part) is None


class Mail:
    """One message and its envelope, as received."""

    __slots__ = (
        "queue_id",
        "mail_from",
        "rcpt_tos",
        "raw",
        "client_addr",
        "client_name",
        "helo",
        "direction",
        "received",
        "mail_options",
        "__dict__",
    )

    def __init__(
        self,
        *,
        queue_id: str,
        mail_from: str,
        rcpt_tos: tuple[str, ...],
        raw: bytes,
        client_addr: str,
        direction: Direction,
        received: datetime,
        client_name: str = "",
        helo: str = "",
        mail_options: tuple[str, ...] = (),
    ) -> None:
        self.queue_id = queue_id
        self.mail_from = mail_from
        self.rcpt_tos = tuple(rcpt_tos)
        self.raw = raw
        self.client_addr = client_addr
        self.client_name = client_name
        self.helo = helo
        self.direction = direction
        self.received = received
        self.mail_options = tuple(mail_options)

    def __repr__(self) -> str:
        return f"<Mail {self.queue_id} {self.direction} {len(self.raw)} bytes>"

    @property
    def size(self) -> int:
        return len(self.raw)

    # ------------------------------------------------------------------ headers

    @cached_property
    def header_bytes(self) -> bytes:
        """The raw header block, up to (not including) the blank line."""
        raw = self.raw
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return raw
        return raw[: end + 2]

    @cached_property
    def headers(self) -> Message:
        """Headers only, parsed without the body (cheap, never raises)."""
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        try:
            return parser.parsebytes(self.header_bytes)
        except Exception:  # pragma: no cover - compat32 header parsing is lenient
            return Message()

    def header(self, name: str) -> str | None:
        """The first ``name`` header, RFC 2047 decoded, unfolded."""
        return decode_header_value(self.headers.get(name))

    def header_all(self, name: str) -> list[str]:
        return [decode_header_value(v) or "" for v in self.headers.get_all(name) or []]

    @property
    def subject(self) -> str | None:
        return self.header("Subject")

    @cached_property
    def from_domain(self) -> str | None:
        """Domain of the header From address (the first one), lower-case."""
        addrs = email.utils.getaddresses(self.headers.get_all("From") or [])
        for _, addr in addrs:
            if "@" in addr:
                return addr.rsplit("@", 1)[1].strip().lower().rstrip(".") or None
        return None

    # ------------------------------------------------------------------ parsing

    @cached_property
    def parsed(self) -> Message:
        """The parsed message (email package, compat32, once).  May raise
        :class:`ParseError` when the structure is beyond our bounds."""
        try:
            msg = email.message_from_bytes(self.raw, policy=email.policy.compat32)
        except Exception as exc:  # pragma: no cover - the parser is lenient
            raise ParseError(f"unparseable message: {exc.__class__.__name__}") from exc
        count = 0
        stack: list[tuple[Message, int]] = [(msg, 0)]
        while stack:
            part, depth = stack.pop()
            count += 1
            if count > MAX_PARTS:
                raise ParseError(f"more than {MAX_PARTS} MIME parts")
            if depth > MAX_DEPTH:
                raise ParseError(f"MIME nesting deeper than {MAX_DEPTH}")
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((p, depth + 1) for p in payload if isinstance(p, Message))
        return msg

    @cached_property
    def attachments(self) -> tuple[Attachment, ...]:
        """Every attachment and every inline part that is not a text body.

        message/rfc822 parts are listed themselves (payload = the enclosed
        message's bytes) and their own attachments follow with ``depth + 1``.
        """
        out: list[Attachment] = []
        index = 0

        def visit(part: Message, depth: int, top: bool) -> None:
            nonlocal index
            ctype = part.get_content_type()
            if part.is_multipart():
                if ctype == "message/rfc822" or (
                    part.get_content_maintype() == "message" and not top
                ):
                    inner = part.get_payload()
                    data = b""
                    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                        try:
                            data = inner[0].as_bytes()
                        except Exception:
                            data = b""
                    out.append(
                        Attachment(part_filename(part), ctype, data, index, False, depth)
                    )
                    index += 1
                    for sub in inner if isinstance(inner, list) else ():
                        visit(sub, depth + 1, True)
                    return
                for sub in part.get_payload():
                    if isinstance(sub, Message):
                        visit(sub, depth, False)
                return
            if not top and _is_body_text(part):
                return
            if top and ctype in ("text/plain", "text/html") and _is_body_text(part):
                # A single-part message whose body is text: not an attachment.
                return
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:
                payload = part.get_payload() or b""
                if isinstance(payload, str):
                    payload = payload.encode("utf-8", "surrogateescape")
            disposition = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
            out.append(
                Attachment(
                    part_filename(part),
                    ctype,
                    bytes(payload),
                    index,
                    disposition != "attachment",
                    depth,
                )
            )
            index += 1

        visit(self.parsed, 0, True)
        return tuple(out)
