"""The MIME structure of a message, found at the byte level.

:attr:`gateway.message.Mail.attachments` used to come from the email
package's feed parser, which splits the *whole* message into lines and joins
them back per part: about 100 ms of CPU for a 6.7 MB message, most of the
gateway's cost on large mail.  This module finds the same structure with a
few ``bytes.find`` and one compiled boundary pattern per multipart, so a
part's body is never split into lines; only the header blocks (a few hundred
bytes each) go through the email package's header parser.

It follows the feed parser's rules, so that every filter sees what it saw
before (``tests/unit/test_mime.py`` compares the two on generated and corpus
messages):

* a header block ends at the first empty line (which is dropped) or at the
  first line that is neither a header (``name:``, ``From ``) nor a
  continuation; that line starts the body;
* a delimiter is ``--boundary`` at the start of a line, ``--`` after it for
  the close delimiter, then only spaces or tabs up to the line end; the CRLF
  before a delimiter belongs to it; consecutive delimiter lines make no empty
  parts; a multipart without a boundary parameter or without a first
  delimiter is a single part (its body is its content); without a close
  delimiter the last part runs to the end of the enclosing part;
* the body of a ``message/*`` part (but ``message/delivery-status``) is a
  message of its own, whatever its transfer encoding; in a
  ``multipart/digest`` a part without a Content-Type is ``message/rfc822``;
* the bounds (the ``MAX_*`` constants below, the one set of parser bounds
  for every path: this walk, the feed parser fallback in
  ``gateway.message``, :func:`param_header_too_complex` for every parameter
  header, and the banner) and the ambiguity checks are applied while walking.

Only CRLF-terminated messages are walked here (what the gateway's DATA reader
guarantees); the caller falls back to the feed parser for anything with a
bare CR or LF, whose line rules differ.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import quopri
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email._encoded_words import decode_b  # the email package's own lenient base64
from email.message import Message
from functools import lru_cache

import pybase64

CRLF = b"\r\n"

# ------------------------------------------------------------------ bounds
# The one set of parser bounds (docs/hostile-input.md has the table).  Every
# path imports them from here: this walk, the feed parser fallback and
# part_filename (gateway.message), and the banner (gateway.banner).  Bad input
# gets a clear answer, never a blow-up: each is enforced *while* parsing.

#: MIME entities in one message, all levels together.
MAX_PARTS = 5000
#: Levels of multipart / message/* nesting.
MAX_DEPTH = 100
#: Header lines (physical lines, folded continuations included): the server
#: refuses a message whose top-level header block has more (552, nothing
#: parsed); the parser stops at more in all parts together.
MAX_HEADER_LINES = 20000
#: A Content-Type or Content-Disposition value longer than this (characters)
#: or with more than MAX_PARAMS ``;`` is not parsed: the email package's
#: parameter splitter is quadratic in the number of quoted ``;``.
MAX_PARAM_HEADER = 16384
MAX_PARAMS = 100
#: A multipart boundary longer than this is no boundary (RFC 2046: 70).
MAX_BOUNDARY = 1000


def param_header_too_complex(value: str) -> bool:
    """True for a parameter header beyond MAX_PARAM_HEADER / MAX_PARAMS."""
    return len(value) > MAX_PARAM_HEADER or value.count(";") > MAX_PARAMS


#: The feed parser's test for a header line (email.feedparser.headerRE).
_HEADER_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")

_UU = ("x-uuencode", "uuencode", "uue", "x-uue")


class StructureError(Exception):
    """Past a bound or ambiguous; ``gateway.message`` turns it into ParseError."""


@dataclass(slots=True, eq=False)
class Node:
    """One MIME entity: its headers and its body ``raw[body_start:end]``.

    ``children`` is None for a leaf; for a multipart the body parts, for a
    ``message/*`` part the enclosed message (one child, or none for
    ``message/delivery-status``)."""

    headers: Message
    body_start: int
    end: int
    children: list[Node] | None
    #: ``raw[start:header_end]`` is the header block (with its final CRLF;
    #: empty for an entity without headers): what the banner rewrites when
    #: it changes Content-Transfer-Encoding.
    start: int = 0
    header_end: int = 0
    #: False when the header block is not ended by an empty line (the body
    #: starts with a line that is not a header, or there is no body at all).
    separated: bool = True
    #: What the banner decoded of this part (text parts only), kept so that
    #: the check before relaying and the edit decode it once.
    decoded: object = None

    def walk(self) -> Iterator[Node]:
        """This node and every node under it, depth first (email's walk order)."""
        yield self
        for child in self.children or ():
            yield from child.walk()


@lru_cache(maxsize=256)
def _delimiter(boundary: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|\Z)")


class _Walker:
    def __init__(
        self,
        raw: bytes,
        *,
        message_class: type[Message],
        max_parts: int,
        max_depth: int,
        max_header_lines: int,
        check: Callable[[Message], None],
    ) -> None:
        self.raw = raw
        self.parser = email.parser.BytesHeaderParser(
            _class=message_class, policy=email.policy.compat32
        )
        self.message_class = message_class
        self.max_parts = max_parts
        self.max_depth = max_depth
        self.max_header_lines = max_header_lines
        self.check = check
        self.parts = 0
        self.header_lines = 0

    def header_block(self, start: int, end: int) -> tuple[int, int]:
        """(end of the header block, start of the body) for an entity at ``start``."""
        raw = self.raw
        pos = start
        last = -1  # where the last header line starts
        while pos < end:
            nl = raw.find(CRLF, pos, end)
            line_end = end if nl < 0 else nl
            if line_end == pos:  # the empty line: dropped, the body follows
                if self._from_line(start, last, pos):
                    # The feed parser drops this empty line and makes the From
                    # line the body's first: a body that is not one stretch of
                    # the message, and that other readers see otherwise.
                    raise StructureError("a 'From ' line ends a header block: ambiguous")
                return pos, min(pos + 2, end)
            if not _HEADER_LINE.match(raw, pos, line_end):
                # not a header: the body starts with this line
                return self._from_line(start, last, pos) or (pos, pos)
            self.header_lines += 1
            if self.header_lines > self.max_header_lines:
                raise StructureError(f"more than {self.max_header_lines} header lines")
            last = pos
            if nl < 0:
                return self._from_line(start, last, end) or (end, end)
            pos = nl + 2
        return self._from_line(start, last, end) or (end, end)

    def _from_line(self, start: int, last: int, stop: int) -> tuple[int, int] | None:
        """The feed parser's rule for a ``From `` line that ends a header
        block (other than its first line): it is the body's first line, so
        the header block ends before it and the body starts with it (and
        with whatever ended the block)."""
        if last > start and self.raw.startswith(b"From ", last):
            return last, last
        return None

    def entity(self, start: int, end: int, level: int, default_type: str | None = None) -> Node:
        self.parts += 1
        if self.parts > self.max_parts:
            raise StructureError(f"more than {self.max_parts} MIME parts")
        if level > self.max_depth:
            raise StructureError(f"MIME nesting deeper than {self.max_depth}")
        header_end, body_start = self.header_block(start, end)
        if header_end > start:
            headers = self.parser.parsebytes(self.raw[start:header_end])
        else:
            headers = self.message_class()
        if default_type:
            headers.set_default_type(default_type)
        self.check(headers)
        node = Node(headers, body_start, end, None, start, header_end,
                    body_start > header_end)
        maintype, _, subtype = headers.get_content_type().partition("/")
        if maintype == "message":
            if subtype == "delivery-status":
                node.children = []  # header blocks: nothing a filter looks at
            else:
                node.children = [self.entity(body_start, end, level + 1)]
        elif maintype == "multipart":
            self.split(node, level, "message/rfc822" if subtype == "digest" else None,
                       header_end < end)
        return node

    def split(self, node: Node, level: int, child_type: str | None, body_end_line: bool
              ) -> None:
        """Find the body parts of a multipart.  ``body_end_line``: the CRLF after
        ``node.end`` ends a line of the body (not the header block)."""
        boundary = node.headers.get_boundary()
        raw, start, end = self.raw, node.body_start, node.end
        if body_end_line and raw.startswith(CRLF, end):
            # If this stays one part, its content keeps the line end before
            # the enclosing delimiter (the feed parser strips it from a
            # multipart's epilogue, and this one has none).
            node.end = end + 2
        if boundary is None or "\r" in boundary or "\n" in boundary:
            return  # no (usable) boundary: one part, the body is its content
        lines: list[tuple[int, int, bool]] = []  # (start, end, close) of delimiter lines
        for m in _delimiter(boundary.encode("utf-8", "surrogateescape")).finditer(raw, start, end):
            s = m.start()
            if s == start or (s - 2 >= start and raw[s - 2 : s] == CRLF):
                close = m.group(1) is not None
                adjacent = bool(lines) and lines[-1][1] == s
                lines.append((s, m.end(), close))
                if close and not adjacent:
                    break  # the close delimiter: the rest is epilogue
        if not lines:
            return
        if lines[0][2]:
            node.end = max(start, lines[0][0])  # only a close delimiter: one part
            return
        node.end = end
        children: list[Node] = []
        i = 0
        while i < len(lines):
            # Consecutive delimiter lines make no empty part (a close one among
            # them is swallowed too, as the feed parser does).
            while i + 1 < len(lines) and lines[i + 1][0] == lines[i][1]:
                i += 1
            part_start = lines[i][1]
            if i + 1 < len(lines):
                part_end = max(part_start, lines[i + 1][0] - 2)
            else:
                part_end = end
                if end == len(raw) and raw.endswith(CRLF) and end - 2 >= part_start:
                    part_end = end - 2  # the message's own last line end
            children.append(self.entity(part_start, part_end, level + 1, child_type))
            i += 1
            if i < len(lines) and lines[i][2]:
                break
        node.children = children


def parse_structure(
    raw: bytes,
    *,
    message_class: type[Message] = Message,
    max_parts: int = MAX_PARTS,
    max_depth: int = MAX_DEPTH,
    max_header_lines: int = MAX_HEADER_LINES,
    check: Callable[[Message], None] = lambda headers: None,
) -> Node:
    """The MIME tree of a CRLF-terminated message.  ``check`` is called with
    every entity's headers (it may raise); :class:`StructureError` past a bound.
    """
    walker = _Walker(
        raw,
        message_class=message_class,
        max_parts=max_parts,
        max_depth=max_depth,
        max_header_lines=max_header_lines,
        check=check,
    )
    return walker.entity(0, len(raw), 0)


def crlf_only(raw: bytes) -> bool:
    """True when every CR and every LF in ``raw`` is part of a CRLF pair."""
    pairs = raw.count(CRLF)
    return raw.count(b"\n") == pairs and raw.count(b"\r") == pairs


def decode_body(headers: Message, raw: bytes, start: int, end: int) -> bytes:
    """The transfer-decoded body ``raw[start:end]``, exactly as
    ``Message.get_payload(decode=True)`` gives it (lenient base64,
    quoted-printable, uuencode; anything else or undecodable as-is).

    Base64 is decoded straight from the message (the line ends are skipped),
    without copying the encoded text first, by pybase64 (SIMD), else binascii:
    the same bytes as the email package's ``decode_b`` wherever those succeed
    (``tests/unit/test_mime.py`` checks it), and ``decode_b`` itself
    otherwise."""
    cte = str(headers.get("content-transfer-encoding", "")).lower()
    if cte == "base64":
        view = memoryview(raw)[start:end]
        eq = raw.find(b"=", start, end)
        if eq < 0 or not raw[eq:end].strip(b"= \t\r\n"):
            # Padding only at the end: pybase64 (SIMD) decodes as binascii
            # does; it differs on data after padding, left to binascii.
            try:
                return pybase64.b64decode(view)
            except (binascii.Error, ValueError):
                pass
        try:
            return binascii.a2b_base64(view)
        except binascii.Error:
            value, _defects = decode_b(bytes(view).translate(None, CRLF))
            return value  # type: ignore[no-any-return]
    body = raw[start:end]
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    if cte in _UU:
        from email.message import _decode_uu  # type: ignore[attr-defined]

        try:
            return _decode_uu(body)  # type: ignore[no-any-return]
        except ValueError:
            return body
    return body
