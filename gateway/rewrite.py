"""Apply filters' edits to the raw message, bytes to bytes.

The rule (DESIGN.md, rule 3): change the message as little as possible.
Headers are added by prepending raw header lines; a removed header takes only
its own lines with it; the Subject tag is inserted in place; only the body
parts that get a banner are re-encoded (see :mod:`gateway.banner`), and every
other byte goes out as it came.

Every function here is pure: ``bytes -> bytes``.
"""

from __future__ import annotations

import email.header
import re
from collections.abc import Iterable

from filters.base import AddBanner, AddHeader, Edit, RemoveHeader, TagSubject
from gateway.message import header_block
from gateway.mime import Node

CRLF = b"\r\n"


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """Split into (header block including its final CRLF, rest from the blank line).

    ``header + rest == raw`` always holds.
    """
    head = header_block(raw)
    return head, raw[len(head) :]


def header_fields(block: bytes) -> list[bytes]:
    """Split a header block into fields, each with its continuation lines and CRLFs."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(raw_field: bytes) -> bytes:
    return raw_field.split(b":", 1)[0].strip().lower()


def _unfold_value(raw_field: bytes) -> str:
    value = raw_field.split(b":", 1)[1] if b":" in raw_field else b""
    return " ".join(value.decode("utf-8", "replace").split())


def fold_header(name: str, value: str, width: int = 78) -> bytes:
    """``Name: value`` folded at whitespace to about ``width`` columns, CRLF-ended.

    Non-ASCII values are RFC 2047 encoded (UTF-8)."""
    if any(ord(c) > 127 for c in value):
        value = email.header.Header(value, "utf-8", header_name=name).encode()
    value = " ".join(value.replace("\r", " ").replace("\n", " ").split())
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > width and current.strip() != f"{name}:":
            lines.append(current)
            current = "\t" + word
        else:
            current += " " + word
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def add_header(raw: bytes, name: str, value: str) -> bytes:
    """Prepend a header field."""
    return fold_header(name, value) + raw


def _strip_comments(value: str) -> str:
    """Drop leading CFWS comments ``(...)`` (nested, with quoted-pairs)."""
    value = value.lstrip()
    while value.startswith("("):
        depth = 0
        i = 0
        while i < len(value):
            ch = value[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        value = value[i + 1 :].lstrip()
    return value


def first_token(value: str) -> str:
    """The first token of a header value: after leading comments, up to ";",
    whitespace or "(" (an Authentication-Results authserv-id, RFC 8601)."""
    rest = _strip_comments(value)
    m = re.match(r"[^;\s(]*", rest)
    return m.group(0) if m else ""


def remove_header(
    raw: bytes, name: str, contains: str | None = None, token: str | None = None
) -> bytes:
    """Remove ``name`` fields (optionally only those whose value contains
    ``contains``, or whose first token is ``token``; both case-insensitive)."""
    head, rest = split_message(raw)
    new = _remove_fields(head, name, contains, token)
    return raw if new is head else new + rest


def _remove_fields(
    head: bytes, name: str, contains: str | None = None, token: str | None = None
) -> bytes:
    """:func:`remove_header` on a header block alone (``head`` itself when unchanged)."""
    lname = name.lower().encode()
    needle = contains.lower() if contains else None
    wanted = token.lower().rstrip(".") if token else None
    kept: list[bytes] = []
    changed = False
    for f in header_fields(head):
        if field_name(f) == lname:
            value = _unfold_value(f)
            if (needle is None or needle in value.lower()) and (
                wanted is None or first_token(value).lower().rstrip(".") == wanted
            ):
                changed = True
                continue
        kept.append(f)
    if not changed:
        return head
    return b"".join(kept)


def _decoded(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


def _tag_bytes(tag: str) -> bytes:
    """The tag as header bytes: RFC 2047 encoded when it is not ASCII."""
    tag = " ".join(tag.split())
    if tag.isascii():
        return tag.encode("ascii")
    return email.header.Header(tag, "utf-8").encode().encode("ascii")


def tag_subject(raw: bytes, tag: str) -> bytes:
    """Prefix the first Subject with ``tag``, once; add a Subject if there is none.

    The tag goes right after the colon; the old value (with its folding) follows,
    so a subject whose first line is empty keeps its continuation lines."""
    head, rest = split_message(raw)
    new = _tag_fields(head, tag)
    return raw if new is head else new + rest


def _tag_fields(head: bytes, tag: str) -> bytes:
    """:func:`tag_subject` on a header block alone (``head`` itself when unchanged)."""
    fields = header_fields(head)
    tag_b = _tag_bytes(tag)
    for i, f in enumerate(fields):
        if field_name(f) != b"subject":
            continue
        if " ".join(tag.split()).lower() in _decoded(_unfold_value(f)).lower():
            return head
        colon = f.index(b":")
        value = f[colon + 1 :]
        stripped = value.lstrip(b" \t")
        if not stripped.strip():
            fields[i] = f[: colon + 1] + b" " + tag_b + CRLF
        elif stripped.startswith(CRLF):
            fields[i] = f[: colon + 1] + b" " + tag_b + stripped
        else:
            fields[i] = f[: colon + 1] + b" " + tag_b + b" " + stripped
        return b"".join(fields)
    return fold_header("Subject", tag) + head


def apply_edits(raw: bytes, edits: Iterable[Edit]) -> bytes:
    """Apply edits in order: removals, subject tag, banners, then added headers.

    Added headers are prepended last, in the given order (so the first edit's
    header ends up on top), which keeps them outside any re-encoded part.
    """
    pieces = edit_pieces(raw, edits)
    if len(pieces) == 1 and pieces[0] is raw:
        return raw
    return b"".join(pieces)


Piece = bytes | memoryview


def edit_pieces(raw: bytes, edits: Iterable[Edit], structure: Node | None = None
                ) -> list[Piece]:
    """:func:`apply_edits` as the pieces that join to its result: new bytes
    (``bytes``) and untouched stretches of ``raw`` (``memoryview``), so that a
    large message is copied once, by the final join, whatever the edits.

    ``structure``: ``raw``'s MIME tree (``Mail.structure``) when the caller
    has it, so that a banner does not walk the message a second time."""
    edits = list(edits)
    head = header_block(raw)
    new_head = head
    for e in edits:
        if isinstance(e, RemoveHeader):
            new_head = _remove_fields(new_head, e.name, e.contains, e.first_token)
    for e in edits:
        if isinstance(e, TagSubject):
            new_head = _tag_fields(new_head, e.tag)
    added = [fold_header(e.name, e.value) for e in edits if isinstance(e, AddHeader)]
    banners = [e for e in edits if isinstance(e, AddBanner)]
    view = memoryview(raw)
    if banners:
        from gateway.banner import add_banner, banner_edits, banner_pieces, splice

        if len(banners) == 1 and not any(
            isinstance(e, RemoveHeader) and e.name.lower().startswith("content-") for e in edits
        ):
            # The header edits leave every MIME header as it is, so the banner
            # goes where it would go in the edited message: splice both into
            # ``raw`` at once, unless the banner changes the top-level header
            # block itself (a single-part text body becoming quoted-printable).
            b_edits = banner_edits(raw, banners[0], structure)
            if all(start >= len(head) for start, _end, _data in b_edits):
                return [*added, new_head, *splice(raw, len(head), b_edits)]
        msg = raw if new_head is head else new_head + view[len(head) :]
        for b in banners[:-1]:
            msg = add_banner(msg, b)
        return [*added, *banner_pieces(msg, banners[-1])]
    if new_head is head and not added:
        return [raw]
    return [*added, new_head, view[len(head) :]]


def crlf_clean(pieces: Iterable[Piece], clean_raw: bytes | None = None) -> bool:
    """True when the joined ``pieces`` have no bare CR or LF.  Untouched
    stretches of ``clean_raw`` (a message known to have CRLF line ends only)
    are checked at their ends only (a cut inside a CRLF pair); everything
    else entirely."""
    for p in pieces:
        if not p:
            continue
        if clean_raw is not None and (p is clean_raw or (
                isinstance(p, memoryview) and p.obj is clean_raw)):
            if p[0] == 10 or p[-1] == 13:
                return False
            continue
        b = bytes(p)
        pairs = b.count(CRLF)
        if b.count(b"\n") != pairs or b.count(b"\r") != pairs:
            return False
    return True
