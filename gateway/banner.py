"""Insert the external-attachment warning banner into body parts, bytes to bytes.

Policy clause: "extreme care with attachments from third parties, especially
unidentified ones" -- the warning has to be visible where the reader looks, at
the top of the message text.  DESIGN.md rule 3 (change the message as little
as possible) decides *how*:

* The message is never re-serialised.  The MIME tree is walked at the byte
  level (our own boundary scan, RFC 2046 section 5.1.1), and only the byte
  ranges of the parts that get a banner are replaced.  Every header, the
  preamble and epilogue of every multipart, and every other part keep their
  exact bytes.

* Which parts get a banner -- the *body* parts a mail client shows as the
  message text:

  - a top-level ``text/plain`` or ``text/html`` body;
  - in ``multipart/alternative``, every alternative (each is the top of the
    message in some client);
  - in ``multipart/related``, the root (first) part;
  - in ``multipart/mixed`` and every other multipart, the first child that is
    a body (a text part or a nested multipart); later text fragments (below
    attachments) are not bannered, so the reader sees the warning once;
  - never an attachment (``Content-Disposition: attachment`` or a file name),
    never anything inside ``message/*`` (forwarded mail is an attachment) or
    ``multipart/digest``, and never inside cryptographically signed or
    encrypted content (``multipart/signed``, ``multipart/encrypted``,
    ``application/pkcs7-mime``) or an inline-PGP text part: those are left
    byte-for-byte alone and the warning is given by subject and header only.

* A bannered part keeps its charset and its Content-Transfer-Encoding: it is
  transfer-decoded, decoded with its charset (strictly), the banner is
  spliced in, and it is encoded back the same way.  The only header a part
  ever gets changed is Content-Transfer-Encoding, from 7bit (or none) to
  quoted-printable, when the banner adds non-ASCII bytes to a 7bit part.
  When the banner text cannot be written in the part's charset (say an em
  dash in an ``iso-2022-jp`` part): HTML uses numeric character references
  (exact), plain text uses an ASCII transliteration of the banner.
* A part that cannot be decoded (unknown transfer encoding, bad base64, an
  unknown charset, bytes that are not valid in the declared charset) keeps
  its bytes.
* HTML: the banner goes right after ``<body ...>`` (else after ``</head>``,
  else after ``<html ...>``, else at the top), HTML-escaped and styled inline.
  It starts with the invisible marker ``<!-- mailwarden-banner -->`` and the
  ``div`` carries a ``data-mailwarden-banner`` attribute.
* Idempotence: a part whose text at the insertion point already starts with
  exactly the banner block we would insert is left alone, so a re-scanned or
  looping message does not get a second banner.  Exact match (not just the
  marker) means a sender cannot suppress the warning by planting the marker:
  what is at the top is then our exact warning, or ours is added above.
  Plain text carries no invisible marker (none survives every charset); its
  exact block -- the wrapped text and a dashed rule -- is the marker.
* The MIME structure is gateway.mime's (the tree ``Mail.structure`` gives
  the filters: one walker, one set of bounds, the same ambiguity checks).
  :func:`add_banner` never raises: a message the model does not parse, or
  with bare line ends, comes back unchanged, and a body part that cannot be
  read is left alone.  The gateway does not rely on that: before relaying a
  message that is due a banner it reads ``Mail.banner_parts``
  (:func:`placeable_parts`), which raises ParseError in exactly those cases,
  and the message is held instead of relayed without its warning.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import logging
import re
import textwrap
import unicodedata
from email.message import Message

from filters.base import AddBanner
from gateway import mime
from gateway.message import BoundedMessage, check_unambiguous, part_filename

log = logging.getLogger("mailwarden.banner")

CRLF = b"\r\n"

#: Bounds: the one set of parser bounds, enforced by gateway.mime's walk.
MAX_DEPTH = mime.MAX_DEPTH
MAX_PARTS = mime.MAX_PARTS

#: Content that is cryptographically signed or encrypted: never altered.
PROTECTED_TYPES = frozenset(
    {
        "multipart/signed",
        "multipart/encrypted",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "application/pkcs7-signature",
        "application/x-pkcs7-signature",
        "application/pgp-encrypted",
        "application/pgp-signature",
    }
)

#: Inline PGP inside a text part (clear-signed or encrypted): never altered.
_INLINE_PGP = ("-----BEGIN PGP SIGNED MESSAGE-----", "-----BEGIN PGP MESSAGE-----")

#: Inline style of the HTML banner: mail clients drop <style> blocks, not these.
HTML_STYLE = (
    "margin:0 0 16px 0;padding:10px 14px;border:2px solid #c0392b;"
    "background-color:#fdecea;color:#1a1a1a;font-family:Arial,Helvetica,sans-serif;"
    "font-size:14px;line-height:1.4;font-weight:bold;"
)

_BODY_TAG = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_HEAD_END = re.compile(r"</head\s*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<html\b[^>]*>", re.IGNORECASE)
_DOCTYPE = re.compile(r"\A\ufeff?\s*<!doctype[^>]*>", re.IGNORECASE)

_ASCII_PUNCTUATION = {
    "\u2010": "-",
    "\u2011": "-",
    "\u2012": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u2015": "-",
    "\u2018": "'",
    "\u2019": "'",
    "\u201a": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u2026": "...",
    "\u00a0": " ",
    "\u00ab": '"',
    "\u00bb": '"',
    "\u00df": "ss",
}


class _Unexpected(ValueError):
    """The walk met something it will not guess about: leave the message alone."""


def _untouchable(node: mime.Node) -> bool:
    """A part whose header block is not ended by an empty line: a body that
    starts with a non-header line is not ours to guess about."""
    return not node.separated and node.body_start < node.end


def _no_body(node: mime.Node) -> bool:
    return not node.separated and node.body_start >= node.end


class _Walk:
    """Banner targets in the MIME tree of :mod:`gateway.mime` (the same tree
    ``Mail`` gives the filters: one model, one set of bounds)."""

    def __init__(self, strict: bool = False) -> None:
        self.targets: list[mime.Node] = []
        #: Raise instead of leaving a body part we cannot read alone.
        self.strict = strict

    def visit(self, ent: mime.Node, depth: int) -> bool:
        """Collect banner targets under ``ent``; True when ``ent`` is (or holds)
        the message body, which ends the search in a multipart/mixed."""
        if _untouchable(ent):
            if self.strict:
                raise _Unexpected("a part's header block is not ended by an empty line")
            return True  # unknown content: treat as a body we must not touch
        ctype = ent.headers.get_content_type()
        if ctype in PROTECTED_TYPES:
            if ctype.startswith("multipart/") or depth == 0:
                return True  # the body, but signed/encrypted: no banner at all
            # A signature or encrypted blob among other parts is left alone,
            # but it is not the body: the search for the body goes on.
            return False
        maintype, _, subtype = ctype.partition("/")
        if maintype == "multipart":
            if _is_attachment(ent.headers) or subtype == "digest":
                return False
            kids = [c for c in ent.children or () if not _no_body(c)]
            if subtype == "alternative":
                found = False
                for child in kids:
                    found = self.visit(child, depth + 1) or found
                return found
            if subtype == "related":
                return bool(kids) and self.visit(kids[0], depth + 1)
            for child in kids:
                if self.visit(child, depth + 1):
                    return True
            return False
        if ctype in ("text/plain", "text/html") and not _is_attachment(ent.headers):
            if not _no_body(ent):
                self.targets.append(ent)
            return True
        return False


def _is_attachment(headers: Message) -> bool:
    disposition = str(headers.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disposition == "attachment" or part_filename(headers) is not None


# ------------------------------------------------------------------ transfer codings


def _transfer_decode(body: bytes, cte: str) -> tuple[bytes, bytes] | None:
    """(payload, trailing bytes to keep after the re-encoded body) or None."""
    if cte in ("", "7bit", "8bit", "binary"):
        return body, b""
    if cte == "quoted-printable":
        return binascii.a2b_qp(body), b""
    if cte == "base64":
        stripped = re.sub(rb"[ \t\r\n]+", b"", body)
        try:
            payload = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            return None
        core = body.rstrip(b" \t\r\n")
        return payload, body[len(core) :]
    return None


def qp_encode(data: bytes) -> bytes:
    """Quoted-printable (RFC 2045 6.7) with CRLF hard breaks and 76-column lines.

    Only CRLF is a line break: a bare CR or LF is encoded (=0D, =0A), so the
    decoded bytes come back exactly.  Each line is encoded by binascii in
    binary mode (line ends and trailing white space encoded, soft breaks as
    ``=`` LF, turned into ``=`` CRLF here: no other LF can be in its output).
    """
    return CRLF.join(
        CRLF.join(_fit(out) for out in binascii.b2a_qp(
            line, quotetabs=False, istext=False, header=False).split(b"\n"))
        for line in data.split(CRLF)
    )


def _fit(line: bytes, width: int = 76) -> bytes:
    """One encoded line within ``width`` columns: binascii's soft breaks can
    leave 77 (an escape run followed by white space); split such a line again
    with soft breaks, never inside an ``=XX`` escape."""
    if len(line) <= width:
        return line
    out: list[bytes] = []
    while len(line) > width:
        cut = width - 1  # room for the soft break's "="
        # Do not split an escape: back up to its "=" if one starts in the last two bytes.
        for back in (1, 2):
            if line[cut - back : cut - back + 1] == b"=":
                cut -= back
                break
        out.append(line[:cut] + b"=")
        line = line[cut:]
    out.append(line)
    return CRLF.join(out)


def b64_encode(data: bytes) -> bytes:
    """Base64 in 76-column CRLF lines (no trailing line break)."""
    encoded = base64.b64encode(data)
    return CRLF.join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _transfer_encode(payload: bytes, cte: str) -> bytes:
    if cte == "quoted-printable":
        return qp_encode(payload)
    if cte == "base64":
        return b64_encode(payload)
    return payload


# ------------------------------------------------------------------ banner blocks


def ascii_fallback(text: str) -> str:
    """A plain-ASCII rendering of ``text`` (used when a charset cannot carry it)."""
    text = "".join(_ASCII_PUNCTUATION.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.encode("ascii", "replace").decode("ascii")


def _lines(text: str) -> list[str]:
    return textwrap.wrap(
        " ".join(text.split()), 76, break_long_words=False, break_on_hyphens=False
    ) or [""]


def plain_block(text: str, nl: str = "\r\n") -> str:
    """The text/plain banner: the wrapped warning, a dashed rule, a blank line."""
    lines = _lines(text)
    rule = "-" * min(76, max(20, max(len(x) for x in lines)))
    return nl.join([*lines, rule, "", ""])


def html_block(text: str, marker: str = "mailwarden-banner", nl: str = "\r\n") -> str:
    """The text/html banner: marker comment plus an inline-styled, escaped div."""
    safe_marker = re.sub(r"[^A-Za-z0-9_.-]", "", marker) or "mailwarden-banner"
    body = nl.join(html.escape(line, quote=True) for line in _lines(text))
    return (
        f"<!-- {safe_marker} -->{nl}"
        f'<div data-{safe_marker}="1" style="{HTML_STYLE}">{nl}{body}{nl}</div>{nl}'
    )


def _html_insert_at(text: str) -> int:
    for pattern in (_BODY_TAG, _HEAD_END, _HTML_TAG, _DOCTYPE):
        m = pattern.search(text)
        if m:
            return m.end()
    return 1 if text.startswith("\ufeff") else 0


def _newline(text: str) -> str:
    if "\r\n" in text:
        return "\r\n"
    if "\n" in text:
        return "\n"
    return "\r\n"


_BOM_CODECS = frozenset({"utf-16", "utf-32", "utf-8-sig"})


def _replace_cte(header_block: bytes, new_cte: bytes) -> bytes:
    """The header block with Content-Transfer-Encoding set to ``new_cte``."""
    fields: list[bytes] = []
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    new_field = b"Content-Transfer-Encoding: " + new_cte + CRLF
    out: list[bytes] = []
    done = False
    for f in fields:
        if f.split(b":", 1)[0].strip().lower() == b"content-transfer-encoding":
            if not done:
                out.append(new_field)
                done = True
            continue
        out.append(f)
    if not done:
        out.append(new_field)
    return b"".join(out)


def placeable_parts(raw: bytes, tree: mime.Node) -> list[mime.Node]:
    """The text body parts the banner edits in ``tree`` (``Mail.structure``),
    or raise ValueError when a body part the banner needs cannot be handled
    (a broken header block, an unknown or ambiguous transfer encoding, bad
    base64, an unknown charset or bytes not valid in it): the caller holds
    such a message rather than relay it without its warning.  Signed or
    encrypted content (and inline PGP) is not an error: it is never bannered
    by design, the warning goes in the subject and header."""
    walk = _Walk(strict=True)
    walk.visit(tree, 0)
    for ent in walk.targets:
        if _decode_text(raw, ent) is None:
            raise _Unexpected(f"body part at byte {ent.start} cannot be decoded")
    return walk.targets


def _decode_text(raw: bytes, ent: mime.Node) -> tuple[str, bytes, bytes, str, str] | None:
    """(text, payload, trailing bytes, codec, transfer encoding) of a text
    part, or None when it cannot be decoded."""
    if ent.decoded is not None:
        return ent.decoded or None  # type: ignore[return-value]
    result = _decode_text_now(raw, ent)
    ent.decoded = result or ()
    return result


def _decode_text_now(raw: bytes, ent: mime.Node) -> tuple[str, bytes, bytes, str, str] | None:
    headers = ent.headers
    ctes = headers.get_all("Content-Transfer-Encoding") or []
    if len({str(v).strip().lower() for v in ctes}) > 1:
        return None
    cte = str(ctes[0]).strip().lower() if ctes else ""
    decoded = _transfer_decode(raw[ent.body_start : ent.end], cte)
    if decoded is None:
        return None
    payload, tail = decoded
    charset = headers.get_content_charset() or "us-ascii"
    try:
        codec = codecs.lookup(charset).name
        text = payload.decode(codec)
    except (LookupError, UnicodeError, ValueError):
        return None
    return text, payload, tail, codec, cte


def banner_part(raw: bytes, ent: mime.Node, banner: AddBanner) -> list[tuple[int, int, bytes]] | None:
    """Replacements ``(start, end, bytes)`` that banner one text part.

    ``[]`` when the part already starts with this banner; None when the part
    cannot (or must not) be bannered, in which case it keeps its bytes.
    """
    decoded = _decode_text(raw, ent)
    if decoded is None:
        return None
    text, payload, tail, codec, cte = decoded
    if any(marker in text for marker in _INLINE_PGP):
        return None
    nl = _newline(text)
    if ent.headers.get_content_type() == "text/html":
        pos = _html_insert_at(text)
        block = html_block(banner.text, banner.marker, nl)
        block_bytes = block.encode(codec, "xmlcharrefreplace")
    else:
        pos = 1 if text.startswith("\ufeff") else 0
        block = plain_block(banner.text, nl)
        try:
            block_bytes = block.encode(codec)
        except UnicodeEncodeError:
            block_bytes = plain_block(ascii_fallback(banner.text), nl).encode(codec, "replace")
    if codec in _BOM_CODECS:
        # A BOM codec would put a second BOM in front of the block: re-encode.
        block_text = block_bytes.decode(codec)
        if text[pos:].startswith(block_text):
            return []
        new_payload = (text[:pos] + block_text + text[pos:]).encode(codec)
    else:
        block_text = block_bytes.decode(codec)
        if text[pos:].startswith(block_text):
            return []
        prefix = text[:pos].encode(codec)
        if payload.startswith(prefix):
            new_payload = prefix + block_bytes + payload[len(prefix) :]
        else:
            new_payload = (text[:pos] + block_text + text[pos:]).encode(codec)
    new_cte = cte
    edits: list[tuple[int, int, bytes]] = []
    if cte in ("", "7bit") and not block_bytes.isascii():
        new_cte = "quoted-printable"
        header_block = raw[ent.start : ent.header_end]
        edits.append((ent.start, ent.header_end, _replace_cte(header_block, b"quoted-printable")))
    edits.append((ent.body_start, ent.end, _transfer_encode(new_payload, new_cte) + tail))
    return edits


# ------------------------------------------------------------------ entry point


def structure(raw: bytes) -> mime.Node:
    """The MIME tree of a CRLF message as ``Mail.structure`` finds it (same
    walker, bounds and ambiguity checks); raises on anything else."""
    if not mime.crlf_only(raw):
        raise _Unexpected("bare CR or LF")
    return mime.parse_structure(raw, message_class=BoundedMessage, check=check_unambiguous)


def banner_targets(raw: bytes, tree: mime.Node | None = None) -> list[mime.Node]:
    """The body parts of ``raw`` that get a banner (see the module docstring),
    found in ``tree`` (``Mail.structure``; walked here when not given).

    Raises on malformed input; :func:`add_banner` turns that into "unchanged".
    """
    if not raw:
        return []
    walk = _Walk()
    walk.visit(structure(raw) if tree is None else tree, 0)
    return walk.targets


def add_banner(raw: bytes, banner: AddBanner) -> bytes:
    """Insert ``banner`` at the top of every body text part of ``raw``.

    Never raises: on anything unexpected the message comes back unchanged.
    """
    pieces = banner_pieces(raw, banner)
    if len(pieces) == 1 and pieces[0] is raw:
        return raw
    return b"".join(pieces)


def banner_pieces(raw: bytes, banner: AddBanner, tree: mime.Node | None = None
                  ) -> list[bytes | memoryview]:
    """:func:`add_banner` as pieces that join to its result: the replaced
    parts (``bytes``) and the untouched stretches of ``raw`` between them
    (``memoryview``: not copied until the caller's one join).  ``[raw]``
    when nothing changes."""
    edits = banner_edits(raw, banner, tree)
    if not edits:
        return [raw]
    return splice(raw, 0, edits)


def splice(raw: bytes, cursor: int, edits: list[tuple[int, int, bytes]]
           ) -> list[bytes | memoryview]:
    """``raw[cursor:]`` with sorted, non-overlapping ``edits`` applied, as pieces."""
    view = memoryview(raw)
    out: list[bytes | memoryview] = []
    for start, end, data in edits:
        out.append(view[cursor:start])
        out.append(data)
        cursor = end
    out.append(view[cursor:])
    return out


def banner_edits(raw: bytes, banner: AddBanner, tree: mime.Node | None = None
                 ) -> list[tuple[int, int, bytes]]:
    """The replacements ``(start, end, bytes)`` that banner ``raw``, sorted and
    non-overlapping; ``[]`` when nothing changes.  Never raises.  ``tree``:
    the message's structure when the caller has it (``Mail.structure``), so
    that the message is walked once."""
    try:
        targets = banner_targets(raw, tree)
        edits: list[tuple[int, int, bytes]] = []
        for ent in targets:
            try:
                part_edits = banner_part(raw, ent, banner)
            except Exception as exc:  # one odd part must not cost the others
                log.debug("banner: part at %d left alone: %r", ent.start, exc)
                part_edits = None
            if part_edits:
                edits.extend(part_edits)
        edits.sort()
        cursor = 0
        for start, end, _data in edits:
            if start < cursor:
                raise _Unexpected("overlapping part ranges")
            cursor = end
        return edits
    except Exception as exc:
        log.info("banner: message left unchanged: %r", exc)
        return []
