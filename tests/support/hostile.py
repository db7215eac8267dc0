"""Abusive messages, generated at run time (none is stored in the repository).

Each :class:`Case` is one kind of parser abuse from issue 9 (duplicated
``boundary=`` parameters, 10,000 headers, a 1 MB header line, 200-level
nesting, 5,000 parts, broken base64/QP, NUL bytes, 8-bit header garbage,
RFC 2231 filenames with ``../`` and NUL, empty and header-only messages, and a
few more found while testing) with the outcomes the gateway may give it:

``relayed``   250 and the message is at the next hop
``held``      250 held for review, the message in the quarantine
``refused``   a 5xx with a reason
``tempfail``  a 4xx (never expected for these: nothing here is transient)

Every message uses CRLF line ends only (a bare CR or LF is its own case, the
smuggling rules in ``test_proxy.py``) and carries a unique Message-ID.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.eicar import eicar

HEAD = (
    b"From: Mallory <mallory@ext.test>\r\n"
    b"To: Bob <b@example.com>\r\n"
    b"Date: Mon, 23 Nov 2026 09:00:00 +0000\r\n"
)


def _head(subject: str | bytes, extra: bytes = b"") -> bytes:
    mid = f"<{uuid.uuid4().hex}@ext.test>".encode()
    subj = subject if isinstance(subject, bytes) else subject.encode()
    return HEAD + b"Subject: " + subj + b"\r\nMessage-ID: " + mid + b"\r\n" + extra


def tiny_pe() -> bytes:
    """A minimal Windows PE header (libmagic: "PE32 executable"); not runnable."""
    mz = bytearray(0x80)
    mz[0:2] = b"MZ"
    struct.pack_into("<I", mz, 0x3C, 0x80)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x14C, 1, 0, 0, 0, 0xE0, 0x102)
    optional = struct.pack("<H", 0x10B) + bytes(0xE0 - 2)
    return bytes(mz) + coff + optional + bytes(512)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _exe_part(boundary: bytes, name: bytes = b"setup.exe") -> bytes:
    return (
        b"--" + boundary + b"\r\n"
        b"Content-Type: application/octet-stream; name=\"" + name + b"\"\r\n"
        b"Content-Disposition: attachment; filename=\"" + name + b"\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(tiny_pe())
    )


def _text_part(boundary: bytes, text: bytes = b"Nothing to see here.") -> bytes:
    return (
        b"--" + boundary + b"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + text + b"\r\n"
    )


# ------------------------------------------------------------------ generators


def duplicate_boundary() -> bytes:
    """CVE-2024-28054 class: two boundary parameters; under the first one a
    harmless text, under the second an executable.  A parser that takes the
    first sees no attachment; a mail client that takes the last sees setup.exe."""
    return (
        _head("duplicate boundary",
              b"MIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=\"AAA\"; boundary=\"BBB\"\r\n\r\n")
        + _text_part(b"AAA") + b"--AAA--\r\n"
        + _text_part(b"BBB") + _exe_part(b"BBB") + b"--BBB--\r\n"
    )


def duplicate_boundary_rfc2231() -> bytes:
    """The same, with the second boundary in RFC 2231 form (``boundary*=``)."""
    return (
        _head("duplicate boundary (RFC 2231)",
              b"MIME-Version: 1.0\r\n"
              b"Content-Type: multipart/mixed; boundary=\"AAA\"; boundary*=us-ascii''BBB\r\n\r\n")
        + _text_part(b"AAA") + b"--AAA--\r\n"
        + _text_part(b"BBB") + _exe_part(b"BBB") + b"--BBB--\r\n"
    )


def duplicate_content_type() -> bytes:
    """Two Content-Type headers: text/plain first, the multipart carrying the
    executable second."""
    return (
        _head("duplicate content-type",
              b"MIME-Version: 1.0\r\n"
              b"Content-Type: text/plain; charset=us-ascii\r\n"
              b"Content-Type: multipart/mixed; boundary=\"BBB\"\r\n\r\n")
        + _text_part(b"BBB") + _exe_part(b"BBB") + b"--BBB--\r\n"
    )


def duplicate_filename() -> bytes:
    """One attachment, two different filename parameters (.pdf and .exe)."""
    return (
        _head("duplicate filename",
              b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"BBB\"\r\n\r\n")
        + _text_part(b"BBB")
        + b"--BBB\r\nContent-Type: application/pdf\r\n"
          b"Content-Disposition: attachment; filename=\"invoice.pdf\"; filename=\"invoice.exe\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(b"%PDF-1.4\n%fine\n")
        + b"--BBB--\r\n"
    )


def many_headers(count: int = 10_000) -> bytes:
    return _head(f"{count} headers") + b"".join(
        b"X-Filler-%d: value %d\r\n" % (i, i) for i in range(count)
    ) + b"\r\nbody\r\n"


def long_header_line(size: int = 1 << 20) -> bytes:
    """One unfolded header line of ``size`` bytes (and a long Subject)."""
    return (
        _head("long header line " + "s" * 5000)
        + b"X-Long: " + b"a" * size + b"\r\n\r\nbody\r\n"
    )


def param_bomb(size: int = 1 << 20) -> bytes:
    """A ``size``-byte Content-Type whose quoted parameter is all ``;``: the
    email package's parameter splitter is quadratic in those."""
    return (
        _head("parameter bomb",
              b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"; x=\""
              + b";" * size + b"\"\r\n\r\n")
        + _text_part(b"B") + b"--B--\r\n"
    )


def deep_nesting(levels: int = 200) -> bytes:
    out = _head(f"{levels} levels of multipart", b"MIME-Version: 1.0\r\n")
    for i in range(levels):
        out += b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i)
    out += b"Content-Type: text/plain\r\n\r\ndeep inside\r\n"
    for i in reversed(range(levels)):
        out += b"--b%d--\r\n" % i
    return out


def deep_rfc822(levels: int = 200) -> bytes:
    """message/rfc822 inside message/rfc822, ``levels`` deep."""
    out = _head(f"{levels} forwarded messages", b"MIME-Version: 1.0\r\n")
    for i in range(levels):
        out += b"Content-Type: message/rfc822\r\n\r\nSubject: level %d\r\n" % i
    return out + b"Content-Type: text/plain\r\n\r\nthe bottom\r\n"


def many_parts(count: int = 5000, payload: bytes = b"x") -> bytes:
    out = _head(f"{count} parts",
                b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"P\"\r\n\r\n")
    out += b"".join(
        b"--P\r\nContent-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n"
        for _ in range(count)
    )
    return out + b"--P--\r\n"


def params_in_every_part(count: int = 1500) -> bytes:
    """Every part with a Content-Type just under the parameter limits (long,
    and ``;`` inside quotes): the quadratic splitter at its allowed worst."""
    ctype = b"application/octet-stream; x=\"" + b";" * 99 + b"a" * 16000 + b"\""
    out = _head(f"{count} parts with long parameters",
                b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"P\"\r\n\r\n")
    out += b"".join(b"--P\r\nContent-Type: " + ctype + b"\r\n\r\nx\r\n" for _ in range(count))
    return out + b"--P--\r\n"


def part_header_flood(lines: int = 30_000) -> bytes:
    """A small top-level header, but one part with ``lines`` header lines."""
    return (
        _head("part header flood",
              b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"P\"\r\n\r\n")
        + b"--P\r\nContent-Type: text/plain\r\n"
        + b"".join(b"X-P%d: v\r\n" % i for i in range(lines))
        + b"\r\nbody\r\n--P--\r\n"
    )


def tiny_parts_flood(count: int = 1_000_000) -> bytes:
    """Delimiter lines only: ``count`` empty parts in a few MB."""
    return _head("part flood",
                 b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"P\"\r\n\r\n"
                 ) + b"--P\r\n\r\n" * count + b"--P--\r\n"


def invalid_base64() -> bytes:
    return (
        _head("invalid base64",
              b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n")
        + _text_part(b"B")
        + b"--B\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
          b"Content-Disposition: attachment; filename=\"data.bin\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n\r\n"
          b"TWFu!!!@@@###\r\nQQ=\r\n===\r\n\xc3\xa9\xff\r\nYW55IGNhcm5hbCBwbGVhc3VyZS4\r\n"
        + b"--B--\r\n"
    )


def invalid_qp() -> bytes:
    return (
        _head("invalid quoted-printable",
              b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
        + b"=ZZ =4 =\r\n=E9=\r\n" + (b"=" * 900 + b"\r\n") * 50 + b"=0D=0A.=0D=0A\r\n=00=00 end\r\n"
    )


def nul_bytes() -> bytes:
    return _head("nul bytes") + b"\r\nbefore\0after\r\n\0\0\0\r\n"


def eight_bit_headers() -> bytes:
    """Undeclared 8-bit bytes and broken UTF-8 in Subject, From and others."""
    return (
        _head(b"8-bit \xe9\xff\xfe garbage \xe2\x82")
        + b"X-Garbage: \xff\xfe\xfd\x80\x81\xc3\x28\xa0\xa1\r\n"
        + b"Sensitivity: \xff\xfe\r\n"
        + b"Reply-To: \xc0\xaf@ext.test, \"\xff\" <x@\xfe.test>\r\n"
        + b"\r\nbody \xff\r\n"
    )


def traversal_filename() -> bytes:
    """RFC 2231 filename with ``../`` and a NUL byte (and a 2047 one with ``/``)."""
    return (
        _head("path traversal",
              b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n")
        + _text_part(b"B")
        + b"--B\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Disposition: attachment;"
          b" filename*=utf-8''..%2F..%2F..%2Fetc%2Fpasswd%00.txt\r\n"
          b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(b"root:x:0:0\n")
        + b"--B\r\nContent-Type: application/octet-stream;"
          b" name=\"=?utf-8?q?=2E=2E=2F=2E=2E=2Fboot=2Fvmlinuz?=\"\r\n"
          b"Content-Disposition: attachment; filename*0=\"../../\"; filename*1=\"x.txt\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(b"hello\n")
        + b"--B--\r\n"
    )


def empty_message() -> bytes:
    return b""


def headers_only() -> bytes:
    """Headers and nothing else: no blank line, no body."""
    return _head("headers only")


def eicar_plain() -> bytes:
    """Control: a real finding, so the outcome columns are not all one kind."""
    return (
        _head("eicar", b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n")
        + _text_part(b"B")
        + b"--B\r\nContent-Type: application/octet-stream; name=\"e.com\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(eicar())
        + b"--B--\r\n"
    )


@dataclass(frozen=True)
class Case:
    """One abusive message and what the gateway may answer to it."""

    name: str
    build: Callable[[], bytes]
    allowed: frozenset[str]
    why: str


def _c(name: str, build: Callable[[], bytes], allowed: str, why: str) -> Case:
    return Case(name, build, frozenset(allowed.split()), why)


CASES: tuple[Case, ...] = (
    _c("duplicate-boundary", duplicate_boundary, "held refused",
       "ambiguous: the parts depend on which boundary a reader takes"),
    _c("duplicate-boundary-2231", duplicate_boundary_rfc2231, "held refused",
       "ambiguous (plain and RFC 2231 boundary)"),
    _c("duplicate-content-type", duplicate_content_type, "held refused",
       "ambiguous: two different Content-Type headers"),
    _c("duplicate-filename", duplicate_filename, "held refused",
       "ambiguous: .pdf or .exe depending on the reader"),
    _c("10k-headers", many_headers, "relayed", "within MAX_HEADER_LINES"),
    _c("100k-headers", lambda: many_headers(100_000), "refused",
       "over MAX_HEADER_LINES: 552 before any parsing"),
    _c("1mb-header-line", long_header_line, "relayed", "one long line is cheap to parse"),
    _c("param-bomb", param_bomb, "held", "Content-Type over MAX_PARAM_HEADER"),
    _c("200-level-nesting", deep_nesting, "held tempfail",
       "over MAX_DEPTH: held as unparseable; 451 when clamd reports"
       " Heuristics.Limits.Exceeded (AlertExceedsMax) and clamav.on_error = tempfail"),
    _c("200-level-rfc822", deep_rfc822, "held tempfail", "as 200-level-nesting"),
    _c("5000-parts", many_parts, "held", "over MAX_PARTS (5,000 parts + the container)"),
    _c("4000-parts", lambda: many_parts(4000), "relayed held",
       "within MAX_PARTS: every part checked"),
    _c("long-params-1500-parts", params_in_every_part, "relayed held",
       "every Content-Type at the parameter limits"),
    _c("part-header-flood", part_header_flood, "held", "over MAX_HEADER_LINES inside a part"),
    _c("1m-empty-parts", tiny_parts_flood, "held", "over MAX_PARTS, stopped while parsing"),
    _c("invalid-base64", invalid_base64, "relayed held", "decoded leniently"),
    _c("invalid-qp", invalid_qp, "relayed", "decoded leniently"),
    _c("nul-bytes", nul_bytes, "refused", "550 5.6.0 (gateway.bare_newlines = reject)"),
    _c("8bit-headers", eight_bit_headers, "relayed", "kept as bytes, logged as U+FFFD"),
    _c("traversal-filename", traversal_filename, "relayed held",
       "a filename is never a path"),
    _c("empty", empty_message, "relayed", "an empty message is a message"),
    _c("headers-only", headers_only, "relayed", "no body is fine"),
    _c("eicar-control", eicar_plain, "held", "control: a virus is held"),
)
