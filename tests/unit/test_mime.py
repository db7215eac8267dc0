"""The byte-level MIME walker (gateway/mime.py) against the email package.

``Mail.attachments`` comes from :mod:`gateway.mime` for CRLF mail; the email
package's feed parser is kept for mail with bare line ends
(``Mail._attachments_from_parsed``).  Filters must see the same attachments
either way, so these tests compare the two on:

* generated MIME trees (hypothesis), well-formed and broken in the ways real
  mail is broken: no close delimiter, doubled delimiters, transport padding,
  preambles and epilogues that look like delimiters, a part without its
  empty line, a header block cut by a non-header line, boundaries that are
  prefixes of each other, digests, message/rfc822, every transfer encoding;
* every message of ``../shared/corpus`` (skipped with a reason without it);
* the bounds (parts, depth, header lines, parameter headers) and the
  ambiguity checks, which must fail both ways alike.

Compared per attachment: file name, declared type, inline flag, depth and the
decoded payload -- except for ``message/*`` parts, whose payload is now the
enclosed message's own bytes (the feed parser path re-serialised it).
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters.base import AddBanner
from gateway import mime
from gateway.banner import banner_edits
from gateway.message import MAX_DEPTH, MAX_PARTS, Direction, Mail, ParseError
from gateway.rewrite import edit_pieces

CRLF = b"\r\n"
PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def mail(raw: bytes) -> Mail:
    return Mail(queue_id="Q1", mail_from="a@example.net", rcpt_tos=("b@example.com",),
                raw=raw, client_addr="192.0.2.1", direction=Direction.INBOUND,
                received=datetime.now(UTC))


def both(raw: bytes) -> tuple[object, object]:
    """(walker result, feed parser result): a list of attachment keys or the
    ParseError text."""

    def keys(m: Mail, walker: bool) -> object:
        try:
            if walker:
                assert mime.crlf_only(m.raw)
                found = m.attachments
            else:
                found = () if m._single_text_body() else m._attachments_from_parsed()
        except ParseError as exc:
            return ("ParseError", str(exc))
        return [(a.filename, a.declared_type, a.inline, a.depth, a.index,
                 None if a.declared_type.startswith("message/") else a.payload)
                for a in found]

    return keys(mail(raw), True), keys(mail(raw), False)


def same(raw: bytes) -> None:
    new, old = both(raw)
    if new == ("ParseError", "a 'From ' line ends a header block: ambiguous"):
        # Stricter than the feed parser on purpose (held as unparseable).
        assert b"\r\nFrom " in raw, raw[:3000]
        return
    assert new == old, raw[:3000]


# ------------------------------------------------------------ generated trees

_TEXT = st.text(alphabet="abcdefgh -_.:=!\u00e9\u20ac", min_size=0, max_size=60)
_BOUNDARIES = st.sampled_from(["b1", "b1x", "b", "=_Part_0", "--inner", "a b", "B1"])
_CTES = st.sampled_from(["", "7bit", "8bit", "base64", "quoted-printable", "BASE64",
                         "base64 ", "x-uuencode", "binary", "bogus"])


def _encode(data: bytes, cte: str) -> bytes:
    c = cte.strip().lower()
    if c == "base64":
        return base64.encodebytes(data).replace(b"\n", CRLF).rstrip(CRLF)
    if c == "quoted-printable":
        return quopri.encodestring(data).replace(b"\n", CRLF)
    if c == "x-uuencode" and data:
        return b"begin 644 f.bin\r\n" + binascii.b2a_uu(data[:45]).replace(b"\n", CRLF) + b"end"
    return data.replace(b"\r", b"").replace(b"\n", CRLF)


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/pdf",
                                  "application/octet-stream", "image/png", None]))
    cte = draw(_CTES)
    headers = []
    if ctype:
        params = ""
        if draw(st.booleans()):
            params = f'; name="{draw(st.sampled_from(["a.pdf", "x.exe", "=?utf-8?q?r=C3=A9sum=C3=A9?="]))}"'
        headers.append(f"Content-Type: {ctype}{params}")
    if cte:
        headers.append(f"Content-Transfer-Encoding: {cte}")
    disp = draw(st.sampled_from([None, "attachment", "inline", 'attachment; filename="f.txt"']))
    if disp:
        headers.append(f"Content-Disposition: {disp}")
    body = draw(st.binary(max_size=200)) if draw(st.booleans()) else draw(_TEXT).encode()
    encoded = _encode(body, cte)
    if draw(st.integers(0, 9)) == 0:
        encoded += b"\r\n\r\n"  # trailing empty lines
    head = CRLF.join(h.encode() for h in headers)
    sep = draw(st.sampled_from([CRLF + CRLF, CRLF + CRLF, CRLF + CRLF, CRLF]))
    if not headers:
        return (CRLF + encoded) if draw(st.booleans()) else encoded
    return head + sep + encoded


def _multipart(draw: st.DrawFn, children: list[bytes]) -> bytes:
    sub = draw(st.sampled_from(["mixed", "alternative", "related", "digest", "signed"]))
    boundary = draw(_BOUNDARIES)
    quoted = f'"{boundary}"' if " " in boundary or draw(st.booleans()) else boundary
    head = f"Content-Type: multipart/{sub}; boundary={quoted}".encode()
    d = b"--" + boundary.encode()
    out = [head, CRLF, CRLF]
    preamble = draw(st.sampled_from([b"", b"preamble\r\n", b"--other\r\n", d + b"x\r\n"]))
    out.append(preamble)
    for i, child in enumerate(children):
        pad = draw(st.sampled_from([b"", b"", b" ", b"\t "]))
        out.append(d + pad + CRLF)
        if draw(st.integers(0, 12)) == 0:
            out.append(d + CRLF)  # doubled delimiter
        out.append(child)
        if i + 1 < len(children) or draw(st.integers(0, 5)):
            out.append(CRLF)
    ending = draw(st.integers(0, 9))
    if ending:
        out.append(d + b"--" + (b" " if ending == 1 else b""))
        out.append(draw(st.sampled_from([b"", CRLF, CRLF + b"epilogue" + CRLF,
                                         CRLF + d + CRLF + b"after close"])))
    # else: no close delimiter at all
    return b"".join(out)


@st.composite
def entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(st.sampled_from(["leaf", "leaf", "multi", "rfc822"] if depth < 4 else ["leaf"]))
    if kind == "leaf":
        return draw(leaf())
    if kind == "rfc822":
        inner = draw(entity(depth + 1))
        return (b"Content-Type: message/rfc822\r\n\r\nSubject: fwd\r\n" + inner)
    n = draw(st.integers(0, 4))
    return _multipart(draw, [draw(entity(depth + 1)) for _ in range(n)])


@st.composite
def message(draw: st.DrawFn) -> bytes:
    body = draw(entity())
    raw = b"From: a@example.net\r\nSubject: t\r\nMIME-Version: 1.0\r\n" + body
    if not raw.endswith(CRLF):
        raw += CRLF
    # What the DATA reader hands over: CRLF line ends only (quopri may leave a CR).
    return re.sub(rb"\r\n|\r|\n", CRLF, raw)


@PROPS
@given(message())
def test_walker_matches_the_feed_parser(raw: bytes) -> None:
    same(raw)


# ------------------------------------------------------------ chosen cases

def _msg(body: str) -> bytes:
    return ("From: a@example.net\r\nMIME-Version: 1.0\r\n" + body).encode()


def test_from_line_ending_a_header_block() -> None:
    """The feed parser makes a ``From `` line that ends a header block the
    body's first line: matched when the body follows at once; refused as
    ambiguous when an empty line follows (the feed parser drops it, so that
    body is not one stretch of the message)."""
    head = b"From: a@example.net\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
    disposition = b"Content-Disposition: attachment\r\n"
    same(head + disposition + b"From x\r\nbody\r\n")
    new, _old = both(head + disposition + b"From x\r\n\r\nbody\r\n")
    assert new == ("ParseError", "a 'From ' line ends a header block: ambiguous")
    same(b"From x\r\n" + head + disposition + b"\r\nbody\r\n")  # first line: unixfrom


CASES = {
    "plain multipart": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nhi\r\n--b\r\n'
        'Content-Type: application/pdf; name="a.pdf"\r\nContent-Transfer-Encoding: base64'
        "\r\n\r\nJVBERi0=\r\n--b--\r\n"),
    "no close delimiter": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nhi\r\n--b\r\n'
        "Content-Type: image/png\r\n\r\nPNG\r\n\r\n"),
    "only a close delimiter": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\npre\r\n--b--\r\nafter\r\n'),
    "no boundary parameter": _msg("Content-Type: multipart/mixed\r\n\r\n--b\r\nx\r\n"),
    "boundary with a line break": _msg(
        'Content-Type: multipart/mixed; boundary="a\r\n b"\r\n\r\n--a\r\n b\r\n\r\nx\r\n'),
    "doubled delimiters": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\n'
        "Content-Type: image/gif\r\n\r\nGIF\r\n--b\r\n--b--\r\nContent-Type: image/png\r\n"
        "\r\nPNG\r\n--b--\r\n"),
    "inner multipart unclosed": _msg(
        'Content-Type: multipart/mixed; boundary="A"\r\n\r\n--A\r\n'
        'Content-Type: multipart/alternative; boundary="B"\r\n\r\n--B\r\n'
        "Content-Type: image/png\r\n\r\nPNG\r\n\r\n--A--\r\n"),
    "inner multipart without delimiters": _msg(
        'Content-Type: multipart/mixed; boundary="A"\r\n\r\n--A\r\n'
        'Content-Type: multipart/alternative; boundary="B"\r\n\r\nAAA\r\n\r\n--A--\r\n'),
    "nested same boundary": _msg(
        'Content-Type: multipart/mixed; boundary="A"\r\n\r\n--A\r\n'
        'Content-Type: multipart/mixed; boundary="A"\r\n\r\n--A\r\n'
        "Content-Type: image/png\r\n\r\nPNG\r\n--A--\r\n--A--\r\n"),
    "header block cut by a non-header line": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: image/png\r\nthis is not a header\r\nPNG\r\n--b--\r\n"),
    "headers only": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: image/png\r\n--b\r\nContent-Type: image/gif\r\n\r\n\r\n--b--\r\n"),
    "digest": _msg(
        'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
        "Subject: one\r\nContent-Type: application/zip; name=x.zip\r\n\r\nPK\r\n--d--\r\n"),
    "rfc822 base64 (parsed raw anyway)": _msg(
        "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        "U3ViamVjdDogeA0KDQp5DQo=\r\n"),
    "delivery-status": _msg(
        'Content-Type: multipart/report; boundary="r"\r\n\r\n--r\r\n\r\nbounce\r\n--r\r\n'
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
        "Final-Recipient: rfc822; a@b\r\n--r--\r\n"),
    "top-level rfc822": _msg(
        "Content-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: image/png"
        "\r\n\r\nPNG\r\n"),
    "bad base64": _msg(
        "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        "\r\n!!!!\r\nQUJD\r\nQQ\r\n"),
    "uuencode": _msg(
        "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: x-uuencode\r\n"
        "\r\nbegin 644 a.bin\r\n#86)C\r\n`\r\nend\r\n"),
    "transport padding": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b \t\r\n'
        "Content-Type: image/png\r\n\r\nPNG\r\n--b-- \r\n"),
    # compat32 gives a Header object, not a str, for a value with 8-bit bytes
    "8-bit folded disposition": _msg(
        "Content-Type: application/pdf\r\nContent-Disposition: attachment\r\n \u00e9\r\n"
        "\r\nx\r\n"),
    "delimiter-like lines": _msg(
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        "Content-Type: text/x\r\n\r\n--bb\r\nx--b\r\n --b\r\n--b--x\r\n--b--\r\n"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chosen_cases_match_the_feed_parser(name: str) -> None:
    same(CASES[name])


def test_results_of_the_walk() -> None:
    m = mail(CASES["plain multipart"])
    [pdf] = m.attachments
    assert (pdf.filename, pdf.declared_type, pdf.payload, pdf.inline) == (
        "a.pdf", "application/pdf", b"%PDF-", True)
    m = mail(CASES["top-level rfc822"])
    fwd, png = m.attachments
    assert fwd.payload == b"Subject: inner\r\nContent-Type: image/png\r\n\r\nPNG\r\n"
    assert (png.declared_type, png.depth, png.payload) == ("image/png", 1, b"PNG\r\n")
    assert [h.get_content_type() for h in mail(CASES["digest"]).part_headers] == [
        "multipart/digest", "message/rfc822", "application/zip"]


def test_bare_line_ends_use_the_feed_parser() -> None:
    raw = CASES["plain multipart"].replace(b"\r\n", b"\n")
    m = mail(raw)
    assert m.structure is None
    assert [a.filename for a in m.attachments] == ["a.pdf"]
    assert mime.crlf_only(CASES["plain multipart"])
    assert not mime.crlf_only(b"a\r\nb\rc\r\n")
    assert not mime.crlf_only(b"a\r\nb\nc\r\n")


# ------------------------------------------------------------ bounds, both ways


def _nested(levels: int) -> bytes:
    head, tail = [], []
    for i in range(levels):
        head.append(f'Content-Type: multipart/mixed; boundary="n{i}"\r\n\r\n--n{i}\r\n')
        tail.insert(0, f"\r\n--n{i}--")
    return _msg("".join(head) + "Content-Type: image/png\r\n\r\nx" + "".join(tail) + "\r\n")


@pytest.mark.parametrize(("raw", "reason"), [
    (_nested(MAX_DEPTH + 2), "nesting deeper"),
    (_msg('Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
          + "--b\r\n\r\nx\r\n" * (MAX_PARTS + 1) + "--b--\r\n"), "MIME parts"),
    (_msg("X-A: 1\r\n" * 20001 + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
          "--b\r\n\r\nx\r\n--b--\r\n"), "header lines"),
    (_msg('Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
          'Content-Type: application/pdf; name="a.pdf"; name="b.exe"\r\n\r\nx\r\n--b--\r\n'),
     "ambiguous"),
    (_msg("Content-Type: multipart/mixed; boundary=b" + ";x=y" * 200 + "\r\n\r\n--b\r\n"),
     "too many parameters"),
])
def test_bounds_and_ambiguity_fail_both_ways(raw: bytes, reason: str) -> None:
    new, old = both(raw)
    assert isinstance(new, tuple) and new[0] == "ParseError" and reason in str(new[1])
    assert isinstance(old, tuple) and old[0] == "ParseError"


def test_depth_just_inside_the_bound_parses() -> None:
    new, old = both(_nested(MAX_DEPTH - 1))
    assert new == old and isinstance(new, list) and len(new) == 1


# ------------------------------------------------------------ the shared corpus


def _corpus_messages(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.stat().st_size < 4 << 20:
            head = p.read_bytes()[:2000]
            if b"\n" in head and re.match(rb"[\x21-\x39\x3b-\x7e]+:", head):
                out.append(p)
    return out


def test_corpus_matches_the_feed_parser(corpus: Path) -> None:
    checked = 0
    mismatches = []
    for path in _corpus_messages(corpus):
        raw = re.sub(rb"\r?\n|\r", CRLF, path.read_bytes())
        if not raw.endswith(CRLF):
            raw += CRLF
        new, old = both(raw)
        checked += 1
        if new != old:
            mismatches.append(str(path.relative_to(corpus)))
    assert checked > 300
    assert mismatches == []


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    st.text(alphabet="ABCDabcd0189+/=\r\n !*-", max_size=40),
    st.binary(max_size=60).map(lambda b: base64.encodebytes(b).decode()),
    st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode().rstrip("=")),
).map(lambda s: s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")))
def test_base64_decoding_matches_the_email_package(text: str) -> None:
    from email.message import Message

    headers = Message()
    headers["Content-Transfer-Encoding"] = "base64"
    part = Message()
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(text)
    raw = b"xx" + text.encode() + b"yy"
    assert mime.decode_body(headers, raw, 2, len(raw) - 2) == part.get_payload(decode=True)


def test_many_parts_are_parsed_off_the_loop() -> None:
    """The pipeline parses small messages on the event loop, but not a small
    message with thousands of parts or lines (~0.2 s of parsing)."""
    from gateway.pipeline import _few_parts

    assert _few_parts(mail(CASES["plain multipart"]))
    many_parts = _msg('Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
                      + "--b\r\nContent-Type: image/png\r\n\r\nx\r\n" * 500 + "--b--\r\n")
    many_lines = _msg("Content-Type: text/plain\r\n\r\n" + "x\r\n" * 5000)
    assert len(many_parts) < 256 * 1024 and not _few_parts(mail(many_parts))
    assert not _few_parts(mail(many_lines))
    # the line count a front end gives is the one used (the DATA reader's)
    assert not _few_parts(Mail(queue_id="Q1", mail_from="", rcpt_tos=(), raw=CASES["plain multipart"],
                               client_addr="", direction=Direction.INBOUND,
                               received=datetime.now(UTC), crlf_only=True, lines=10**6))


def test_mail_counts_lines_and_checks_crlf_in_one_scan() -> None:
    m = mail(b"Subject: x\r\n\r\nbody\r\nmore\r\n")
    assert (m.crlf_checked, m.lines, m.crlf_only, m.crlf_checked) == (False, 4, True, True)
    bare = mail(b"Subject: x\r\n\r\nbody\nmore\r\n")
    assert (bare.crlf_only, bare.lines, bare.crlf_checked) == (False, 4, False)
    assert bare.structure is None  # the feed parser's line rules apply


# ------------------------------------------------------------ the banner uses the model

_BANNER = AddBanner("CAUTION: external mail")


@PROPS
@given(message())
def test_banner_edits_exactly_the_text_body_parts_the_model_reports(raw: bytes) -> None:
    m = mail(raw)
    try:
        parts = m.banner_parts
    except ParseError:
        return  # held by the pipeline when a banner is due: never relayed without it
    edits = banner_edits(raw, _BANNER, m.structure)
    assert banner_edits(raw, _BANNER) == edits  # the same walk, given or not
    bodies = {(p.body_start, p.end) for p in parts}
    edited = set()
    for start, end, _data in edits:
        owner = [p for p in parts if p.start <= start and end <= p.end]
        assert owner, (start, end, raw[:2000])
        if start >= owner[0].body_start:
            edited.add((owner[0].body_start, owner[0].end))
    assert edited == bodies, raw[:2000]
    assert (b"".join(edit_pieces(raw, [_BANNER], m.structure))
            == b"".join(edit_pieces(raw, [_BANNER])))


_B64_BAD = (b"From: a@example.net\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"!!!not base64!!!\r\n--b\r\nContent-Type: application/pdf\r\n\r\n%PDF\r\n--b--\r\n")


@pytest.mark.parametrize("raw", [
    _B64_BAD,
    _B64_BAD.replace(b"base64", b"x-bogus"),
    _B64_BAD.replace(b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!",
                     b"Content-Transfer-Encoding: 7bit\r\nno header line here\r\n\r\nbody"),
    _B64_BAD.replace(b"Content-Type: text/plain\r\n", b"Content-Type: text/plain; charset=nope\r\n")
            .replace(b"base64", b"7bit"),
    _B64_BAD.replace(b"\r\n", b"\n"),
    _B64_BAD.replace(b"boundary=b", b"boundary=b; boundary=c"),
], ids=["bad-base64", "unknown-cte", "broken-header-block", "unknown-charset", "bare-lf",
        "ambiguous"])
def test_a_message_the_banner_cannot_handle_raises_from_the_accessor(raw: bytes) -> None:
    with pytest.raises(ParseError):
        mail(raw).banner_parts  # noqa: B018


def test_signed_content_is_not_an_error_and_gets_no_banner() -> None:
    raw = (b"From: a@example.net\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/signed; boundary=s; protocol=\"application/pgp-signature\"\r\n\r\n"
           b"--s\r\nContent-Type: text/plain\r\n\r\nsigned\r\n--s\r\n"
           b"Content-Type: application/pgp-signature\r\n\r\nSIG\r\n--s--\r\n")
    assert mail(raw).banner_parts == ()
    assert banner_edits(raw, _BANNER) == []
