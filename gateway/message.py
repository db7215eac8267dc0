"""The ``Mail`` object every filter sees.

A ``Mail`` holds the envelope (sender, recipients, original client address,
HELO, direction, received time, queue id) and the raw bytes exactly as they
arrived.  The parsed message and the attachment list are computed lazily, once,
and shared by all filters.  Nothing here mutates the message.
"""

from __future__ import annotations

import email
import email.feedparser
import email.header
import email.parser
import email.policy
import email.utils
import enum
import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from functools import cached_property
from typing import Any, Generic, TypeVar

from gateway import mime

log = logging.getLogger("mailwarden.message")

#: Parsing bounds: one set, defined in gateway.mime (the table is in
#: docs/hostile-input.md), re-exported here under their old names.
from gateway.mime import (  # noqa: E402
    MAX_DEPTH,
    MAX_HEADER_LINES,
    MAX_PARAM_HEADER,
    MAX_PARAMS,
    MAX_PARTS,
)

#: Headers and parameters that must not be given twice with different values
#: in one part: a filter and a mail client could pick different ones and see
#: different parts or names (the CVE-2024-28054 class).
#: Bytes fed to the parser at a time.
FEED_CHUNK = 64 * 1024
SINGLE_HEADERS = ("content-type", "content-disposition", "content-transfer-encoding")
SINGLE_PARAMS = (("content-type", "boundary"), ("content-type", "name"),
                 ("content-disposition", "filename"))


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"


class ParseError(Exception):
    """The message's MIME structure could not be parsed within our bounds."""


#: One test for every parameter header, whoever parsed it (gateway.mime).
param_header_too_complex = _too_complex = mime.param_header_too_complex


class BoundedMessage(Message):
    """compat32 Message that refuses pathological parameter headers (see
    :data:`MAX_PARAM_HEADER`) before the quadratic parameter splitter runs."""

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        value = self.get(header)
        if value is not None:
            if _too_complex(str(value)):
                raise ParseError(
                    f"{header} header too long or with too many parameters"
                    f" (limits {MAX_PARAM_HEADER} characters, {MAX_PARAMS} parameters)"
                )
        return super()._get_params_preserve(failobj, header)  # type: ignore[misc]


class _BoundedParser(email.feedparser.BytesFeedParser):
    """The email package's parser, stopped as soon as the part count or the
    nesting depth passes our bounds (``_new_message`` is where it opens every
    part; ``_msgstack`` holds the parts enclosing it)."""

    def __init__(self) -> None:
        super().__init__(BoundedMessage, policy=email.policy.compat32)
        self.parts = 0
        self.header_lines = 0

    def _parse_headers(self, lines: list[str]) -> None:
        self.header_lines += len(lines)
        if self.header_lines > MAX_HEADER_LINES:
            raise ParseError(f"more than {MAX_HEADER_LINES} header lines")
        super()._parse_headers(lines)  # type: ignore[misc]

    def _new_message(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ParseError(f"more than {MAX_PARTS} MIME parts")
        if len(self._msgstack) > MAX_DEPTH:  # type: ignore[attr-defined]
            raise ParseError(f"MIME nesting deeper than {MAX_DEPTH}")
        super()._new_message()  # type: ignore[misc]


def header_block(raw: bytes) -> bytes:
    """The top-level header block of a CRLF message with its final CRLF,
    copied alone (never the body): ``b""`` when the message starts with the
    empty line, all of ``raw`` when it has none."""
    if raw.startswith(b"\r\n"):
        return b""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def header_lines(raw: bytes, limit: int = MAX_HEADER_LINES) -> int:
    """Physical lines in the top-level header block of ``raw`` (CRLF line
    ends), counted up to ``limit + 1`` at most: cheap on any input."""
    pos = count = 0
    end = len(raw)
    while pos < end and count <= limit:
        nl = raw.find(b"\r\n", pos)
        if nl == pos:  # the blank line: the body starts
            break
        count += 1
        if nl < 0:
            break
        pos = nl + 2
    return count


def _param_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = email.utils.collapse_rfc2231_value(value)
    return decode_header_value(email.utils.unquote(str(value))) or ""


def check_unambiguous(part: Message) -> None:
    """Raise :class:`ParseError` when ``part`` gives a MIME header or a
    boundary/name/filename parameter twice with different values."""
    for name in SINGLE_HEADERS:
        values = part.get_all(name) or []
        if len({" ".join(str(v).split()).lower() for v in values}) > 1:
            raise ParseError(f"ambiguous MIME part: {len(values)} different {name} headers")
    for header, param in SINGLE_PARAMS:
        value = part.get(header)
        if value is None or str(value).lower().count(param) < 2:
            continue  # the parameter is given once at most: nothing to compare
        try:
            params = part.get_params(header=header) or []
        except ParseError:
            raise
        except Exception:
            continue
        found = {_param_value(v) for k, v in params[1:] if k.strip().lower() == param}
        if len(found) > 1:
            raise ParseError(f"ambiguous MIME part: {header} has {len(found)} different"
                             f" {param} parameters")


_T = TypeVar("_T")


class _Failed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _once(Generic[_T]):  # noqa: N801 - used like functools.cached_property
    """Like ``functools.cached_property``, for the expensive MIME results.

    The lock is the instance's own: Python 3.11's ``cached_property`` holds
    one lock for *all* instances, so one slow parse in a worker thread would
    stall every other message's access, the event loop's included.  A
    :class:`ParseError` is remembered too, so that a message that cannot be
    parsed is tried once, not once per filter.
    """

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.key = "_once_" + func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        cache = instance.__dict__
        value = cache.get(self.key, _Failed)
        if value is _Failed:
            with instance._lock:
                value = cache.get(self.key, _Failed)
                if value is _Failed:
                    try:
                        value = self.func(instance)
                    except ParseError as exc:
                        value = _Failed(str(exc))
                    cache[self.key] = value
        if isinstance(value, _Failed):
            raise ParseError(value.reason)
        return value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment (or non-body inline part) as the sender declared it.

    ``filename`` is decoded (RFC 2231 and RFC 2047) but otherwise exactly what
    the sender claims; never use it to build a path.  ``payload`` is the
    content-transfer-decoded body of the part.  ``depth`` counts enclosing
    message/rfc822 parts (0 = top-level message).  ``sha256`` (hex) is
    computed once here, so that every filter and the log share it.
    """

    filename: str | None
    declared_type: str
    payload: bytes
    index: int
    inline: bool
    depth: int = 0
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", hashlib.sha256(self.payload).hexdigest())

    @property
    def size(self) -> int:
        return len(self.payload)


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*"
#: ``local@domain`` or ``Display Name <local@domain>`` with plain atoms only
_SIMPLE_ADDRESS = re.compile(rf"({_DOT_ATOM_ADDR})|(?:{_ATOM}(?: {_ATOM})* )?<({_DOT_ATOM_ADDR})>")


def simple_address(value: str) -> str | None:
    """The one address of a plain address value (``a@b.example``, ``Name
    <a@b.example>``, atoms only): what ``email.utils.getaddresses([value])``
    finds, without its parser (~20 us).  None for anything else (the caller
    then parses)."""
    m = _SIMPLE_ADDRESS.fullmatch(value)
    if m is None:
        return None
    return m.group(1) or m.group(2)


def decode_header_value(value: str | None) -> str | None:
    """Decode RFC 2047 encoded words; never raises (bad input is kept as-is)."""
    if value is None:
        return None
    text = str(value)
    if "=?" in text:  # without an encoded word the email package returns it as is
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:
            pass
    # Unfold and drop control characters that would corrupt one-line logs.
    text = " ".join(text.split())
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)


def part_filename(part: Message) -> str | None:
    """The decoded filename of a part (Content-Disposition, then Content-Type name).

    None as well for a parameter header beyond :data:`MAX_PARAM_HEADER` /
    :data:`MAX_PARAMS` (whoever parsed ``part``: the email package's
    parameter splitter is quadratic)."""
    for header in ("content-disposition", "content-type"):
        value = part.get(header)
        if value is not None and _too_complex(str(value)):
            return None
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
    disposition = str(part.get("Content-Disposition") or "").split(";")[0].strip().lower()
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
        crlf_only: bool | None = None,
        lines: int | None = None,
    ) -> None:
        """``crlf_only``: True when the caller has checked that every CR and
        LF of ``raw`` is a CRLF pair (the DATA reader has); None: check when
        it matters.  ``lines``: the number of LF in ``raw``, when the caller
        counted them anyway (None: counted when asked, see :attr:`lines`)."""
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
        self._crlf_only = crlf_only
        self._lines = lines
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<Mail {self.queue_id} {self.direction} {len(self.raw)} bytes>"

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def crlf_checked(self) -> bool:
        """True when ``raw`` is known to have CRLF line ends only: whoever
        made this Mail checked (the DATA reader does), or :attr:`crlf_only`
        found it."""
        return bool(self._crlf_only)

    @property
    def crlf_only(self) -> bool:
        """Whether every CR and LF of ``raw`` is a CRLF pair (one scan of the
        message, at most; it also counts the lines)."""
        if self._crlf_only is None:
            raw = self.raw
            pairs = raw.count(b"\r\n")
            lines = raw.count(b"\n")
            self._lines = lines
            self._crlf_only = lines == pairs and raw.count(b"\r") == pairs
        return self._crlf_only

    @property
    def lines(self) -> int:
        """The number of LF in ``raw`` (counted once)."""
        if self._lines is None:
            if self._crlf_only is None:
                self.crlf_only  # noqa: B018 - counts the lines on the way
            else:
                self._lines = self.raw.count(b"\n")
        assert self._lines is not None
        return self._lines

    # ------------------------------------------------------------------ headers

    @cached_property
    def header_bytes(self) -> bytes:
        """The raw header block, up to (not including) the blank line."""
        return header_block(self.raw)

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

    @_once
    def parsed(self) -> Message:
        """The parsed message (email package, compat32, once).  Raises
        :class:`ParseError` when the structure is beyond our bounds
        (:data:`MAX_PARTS`, :data:`MAX_DEPTH`, :data:`MAX_PARAM_HEADER`) or
        ambiguous (:func:`check_unambiguous`)."""
        parser = _BoundedParser()
        raw = self.raw
        try:
            # In chunks, as email.parser does: the bounds then trip before
            # the whole message has been split into lines.
            for start in range(0, len(raw), FEED_CHUNK):
                parser.feed(raw[start : start + FEED_CHUNK])
            msg = parser.close()
        except ParseError:
            raise
        except Exception as exc:  # RecursionError, MemoryError, parser bugs
            raise ParseError(f"unparseable message: {exc.__class__.__name__}") from exc
        for part in msg.walk():
            check_unambiguous(part)
        return msg

    @property
    def needs_parsing(self) -> bool:
        """False for a single-part text message (no MIME parse needed)."""
        return not self._single_text_body()

    @property
    def prepared(self) -> bool:
        """True once :attr:`attachments` is known (or known to fail): reading
        it then costs nothing."""
        return "_once_attachments" in self.__dict__ or not self.needs_parsing

    def prepare(self) -> None:
        """Parse and decode now (blocking: off the event loop for a large message), so the
        filters find the work done.  A parse failure is remembered and raised
        to the filters that ask, as if they had parsed themselves."""
        try:
            self.attachments  # noqa: B018 - computed once and cached
        except Exception:
            pass

    def _single_text_body(self) -> bool:
        return self._single_text

    @cached_property
    def _single_text(self) -> bool:
        headers = self.headers
        ctypes = headers.get_all("Content-Type") or []
        if len(ctypes) > 1 or len(headers.get_all("Content-Disposition") or []) > 1:
            return False
        if ctypes and _too_complex(str(ctypes[0])):
            return False
        if headers.get_content_type() not in ("text/plain", "text/html"):
            return False
        return _is_body_text(headers)

    @_once
    def structure(self) -> mime.Node | None:
        """The MIME tree found at the byte level (:mod:`gateway.mime`), or
        None for a message with a bare CR or LF (the feed parser's line rules
        apply to those: see :attr:`parsed`).  Raises :class:`ParseError` like
        :attr:`parsed`."""
        raw = self.raw
        if not self.crlf_only:
            return None
        try:
            return mime.parse_structure(
                raw,
                message_class=BoundedMessage,
                max_parts=MAX_PARTS,
                max_depth=MAX_DEPTH,
                max_header_lines=MAX_HEADER_LINES,
                check=check_unambiguous,
            )
        except mime.StructureError as exc:
            raise ParseError(str(exc)) from None
        except ParseError:
            raise
        except Exception as exc:  # RecursionError, MemoryError, header parser bugs
            raise ParseError(f"unparseable message: {exc.__class__.__name__}") from exc

    @_once
    def part_headers(self) -> tuple[Message, ...]:
        """The headers of every MIME entity, in walk order (the top level first)."""
        tree = self.structure
        if tree is None:
            return tuple(self.parsed.walk())
        return tuple(node.headers for node in tree.walk())

    @property
    def known_structure(self) -> mime.Node | None:
        """:attr:`structure` if it has been walked already (never walks):
        what the pipeline hands ``rewrite.edit_pieces`` so that the banner
        does not walk the message a second time."""
        value = self.__dict__.get("_once_structure")
        return value if isinstance(value, mime.Node) else None

    @_once
    def banner_parts(self) -> tuple[mime.Node, ...]:
        """The text body parts the banner edits (nodes of :attr:`structure`).

        The accessor to check before relaying a message that is due a
        banner: raises :class:`ParseError` when the structure does not parse
        within the bounds, is ambiguous, or has a body part the banner cannot
        handle (a broken header block, an undecodable part), and for a
        message with bare line ends (the banner edits CRLF messages only):
        such a message is held, never relayed without its warning."""
        from gateway import banner  # banner imports this module

        tree = self.structure
        if tree is None:
            raise ParseError("bare CR or LF: the banner cannot be placed")
        try:
            return tuple(banner.placeable_parts(self.raw, tree))
        except ValueError as exc:
            raise ParseError(f"banner cannot be placed: {exc}") from None

    @_once
    def attachments(self) -> tuple[Attachment, ...]:
        """Every attachment and every inline part that is not a text body.

        message/rfc822 parts are listed themselves (payload = the enclosed
        message's bytes) and their own attachments follow with ``depth + 1``.

        A single-part text message (one unambiguous text/plain or text/html
        Content-Type, not an attachment) has none, which is known from its
        headers alone: most mail is answered without running the MIME parser.
        """
        if self._single_text_body():
            return ()
        tree = self.structure
        if tree is None:
            return self._attachments_from_parsed()
        raw = self.raw
        out: list[Attachment] = []

        def visit(node: mime.Node, depth: int, top: bool) -> None:
            headers = node.headers
            ctype = headers.get_content_type()
            if node.children is not None:
                if ctype == "message/rfc822" or (ctype.startswith("message/") and not top):
                    out.append(Attachment(part_filename(headers), ctype,
                                          raw[node.body_start : node.end], len(out), False,
                                          depth))
                    for sub in node.children:
                        visit(sub, depth + 1, True)
                    return
                for sub in node.children:
                    visit(sub, depth, False)
                return
            if ctype in ("text/plain", "text/html") and _is_body_text(headers):
                return  # a text body, not an attachment
            disposition = str(headers.get("Content-Disposition") or "").split(";")[0]
            out.append(
                Attachment(
                    part_filename(headers),
                    ctype,
                    mime.decode_body(headers, raw, node.body_start, node.end),
                    len(out),
                    disposition.strip().lower() != "attachment",
                    depth,
                )
            )

        visit(tree, 0, True)
        return tuple(out)

    def _attachments_from_parsed(self) -> tuple[Attachment, ...]:
        """:attr:`attachments` from the email package's parse (messages with
        a bare CR or LF)."""
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
            disposition = str(part.get("Content-Disposition") or "").split(";")[0].strip().lower()
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


#: Old name.
_BoundedMessage = BoundedMessage
