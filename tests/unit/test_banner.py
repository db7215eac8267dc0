"""gateway.banner: where the warning goes, how parts are re-encoded, what is never touched.

Proves, on hand-built messages: plain only, HTML only, multipart/alternative,
mixed with nested alternative, related, quoted-printable and base64 bodies,
windows-1252 / iso-2022-jp / utf-16 charsets (the banner reads right, the
original text is intact), 7bit parts switched to quoted-printable only when
the banner needs it, HTML without <body>, message/rfc822 attachments,
multipart/signed, S/MIME and inline PGP (untouched), undecodable parts
(untouched), malformed MIME (never raises), idempotence and the marker that
cannot be planted; and over the shared MIME corpus, that add_banner never
raises, its output parses and a second pass changes nothing.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
from email.message import Message
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from filters.base import AddBanner
from gateway.banner import add_banner, ascii_fallback, html_block, plain_block, qp_encode

TEXT = "CAUTION: external mail with attachments <check> & \"think\"."
BANNER = AddBanner(TEXT)
HEAD = b"From: a@ext.test\r\nTo: b@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"


def parts(raw: bytes) -> list[Message]:
    return [p for p in email.message_from_bytes(raw).walk() if not p.is_multipart()]


def decoded(part: Message) -> str:
    return part.get_payload(decode=True).decode(part.get_content_charset() or "us-ascii")


def flat(text: str) -> str:
    return " ".join(text.split())


def banner_count(text: str) -> int:
    return flat(text).count(flat(ascii_fallback(TEXT))) + flat(text).count(
        flat("CAUTION: external mail with attachments &lt;check&gt; &amp; &quot;think&quot;.")
    )


def check_idempotent(out: bytes) -> None:
    assert add_banner(out, BANNER) == out


# ------------------------------------------------------------ simple bodies


def test_plain_only() -> None:
    raw = HEAD + b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello Bob,\r\nsee attached.\r\n"
    out = add_banner(raw, BANNER)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head + b"\r\n\r\n" == raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"  # headers untouched
    assert body == plain_block(TEXT).encode() + b"Hello Bob,\r\nsee attached.\r\n"
    check_idempotent(out)


def test_message_without_content_type_is_plain() -> None:
    raw = b"From: a@ext.test\r\nSubject: s\r\n\r\nHi\r\n"
    out = add_banner(raw, BANNER)
    assert out.endswith(b"-\r\n\r\nHi\r\n") and out.count(b"CAUTION") == 1


def test_html_only_after_body_tag_escaped_and_styled() -> None:
    html = b'<html><head><title>t</title></head><body style="x">\r\n<p>Hi</p>\r\n</body></html>\r\n'
    raw = HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html
    out = add_banner(raw, BANNER)
    body = out.partition(b"\r\n\r\n")[2].decode()
    start = body.index('<body style="x">') + len('<body style="x">')
    assert body[start:].startswith("<!-- mailwarden-banner -->\r\n<div data-mailwarden-banner=\"1\" style=\"")
    assert "&lt;check&gt; &amp; &quot;think&quot;" in body
    assert "<check>" not in body
    assert "border:2px solid" in body
    assert body.endswith("<p>Hi</p>\r\n</body></html>\r\n")
    assert body.replace(html_block(TEXT), "") == html.decode()
    check_idempotent(out)


@pytest.mark.parametrize(
    ("html", "expect_after"),
    [
        ("<p>no body tag</p>", ""),
        ("<html><head><title>x</title></head><p>x</p></html>", "</head>"),
        ("<html lang=en><p>x</p></html>", "<html lang=en>"),
        ("<!DOCTYPE html><p>x</p>", "<!DOCTYPE html>"),
    ],
)
def test_html_without_body_tag(html: str, expect_after: str) -> None:
    raw = HEAD + b"Content-Type: text/html\r\n\r\n" + html.encode()
    out = add_banner(raw, BANNER)
    body = out.partition(b"\r\n\r\n")[2].decode()
    assert body.index("<!-- mailwarden-banner -->") == (
        body.index(expect_after) + len(expect_after) if expect_after else 0
    )
    assert body.replace(html_block(TEXT), "") == html
    check_idempotent(out)


# ------------------------------------------------------------ structure


def alternative(boundary: str = "alt") -> bytes:
    b = boundary.encode()
    return (
        b"Content-Type: multipart/alternative; boundary=\"" + b + b"\"\r\n\r\n"
        b"alt preamble\r\n--" + b + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe, Bob =E2=82=AC\r\n"
        b"--" + b + b"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes("<html><body><p>Grüße €</p></body></html>".encode()).replace(b"\n", b"\r\n")
        + b"--" + b + b"--\r\nalt epilogue\r\n"
    )


def test_multipart_alternative_both_parts() -> None:
    raw = HEAD + alternative()
    out = add_banner(raw, BANNER)
    plain, html = parts(out)
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert html["Content-Transfer-Encoding"] == "base64"
    assert decoded(plain) == plain_block(TEXT) + "Grüße, Bob €"  # the CRLF is the delimiter's
    assert decoded(html) == "<html><body>" + html_block(TEXT) + "<p>Grüße €</p></body></html>"
    assert b"alt preamble\r\n--alt\r\n" in out and out.endswith(b"--alt--\r\nalt epilogue\r\n")
    # QP lines stay within 76 columns.
    qp = out.split(b"quoted-printable\r\n\r\n")[1].split(b"\r\n--alt")[0]
    assert max(len(line) for line in qp.split(b"\r\n")) <= 76
    check_idempotent(out)


PDF_PART = (
    b"Content-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n"
)
TXT_ATTACHMENT = (
    b"Content-Type: text/plain; name=\"notes.txt\"\r\nContent-Disposition: attachment; filename=\"notes.txt\"\r\n\r\n"
    b"attached notes\r\n"
)


def test_mixed_with_nested_alternative_and_attachments() -> None:
    raw = (
        HEAD + b"Content-Type: multipart/mixed; boundary=\"mix\"\r\n\r\nThis is MIME.\r\n--mix\r\n"
        + alternative() + b"\r\n--mix\r\n" + PDF_PART + b"--mix\r\n" + TXT_ATTACHMENT + b"--mix--\r\n"
    )
    out = add_banner(raw, BANNER)
    ps = parts(out)
    assert [p.get_content_type() for p in ps] == ["text/plain", "text/html", "application/pdf", "text/plain"]
    assert banner_count(decoded(ps[0])) == 1 and banner_count(decoded(ps[1])) == 1
    assert decoded(ps[3]) == "attached notes"
    assert PDF_PART in out and TXT_ATTACHMENT in out
    assert out.startswith(HEAD + b"Content-Type: multipart/mixed; boundary=\"mix\"\r\n\r\nThis is MIME.\r\n--mix\r\n")
    check_idempotent(out)


def test_mixed_later_text_fragments_are_not_bannered() -> None:
    raw = (
        HEAD + b"Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\nContent-Type: image/png\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--m\r\nContent-Type: text/plain\r\n\r\n"
        b"first text\r\n--m\r\n" + PDF_PART + b"--m\r\nContent-Type: text/plain\r\n\r\nsecond text\r\n--m--\r\n"
    )
    out = add_banner(raw, BANNER)
    texts = [decoded(p) for p in parts(out) if p.get_content_type() == "text/plain"]
    assert banner_count(texts[0]) == 1 and texts[1] == "second text"


def test_related_only_root() -> None:
    raw = (
        HEAD + b"Content-Type: multipart/related; boundary=r\r\n\r\n--r\r\nContent-Type: text/html\r\n\r\n"
        b"<body>root</body>\r\n--r\r\nContent-Type: text/html\r\nContent-ID: <x>\r\n\r\n<body>frame</body>\r\n--r--\r\n"
    )
    out = add_banner(raw, BANNER)
    root, frame = parts(out)
    assert banner_count(decoded(root)) == 1 and decoded(frame) == "<body>frame</body>"


def test_message_rfc822_attachment_not_bannered_inside() -> None:
    inner = b"From: x@y.test\r\nSubject: fwd\r\nContent-Type: text/plain\r\n\r\ninner text\r\n"
    raw = (
        HEAD + b"Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\n"
        b"outer text\r\n--m\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--m--\r\n"
    )
    out = add_banner(raw, BANNER)
    assert out.count(b"CAUTION") == 1
    assert b"message/rfc822\r\n\r\n" + inner + b"--m--\r\n" in out


def test_forwarded_message_only_body_is_message() -> None:
    raw = HEAD + b"Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\ninner\r\n"
    assert add_banner(raw, BANNER) == raw


# ------------------------------------------------------------ never touched


SIGNED = (
    HEAD + b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256; boundary=s\r\n\r\n"
    b"--s\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n--s\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHAqCAMIACAQEx\r\n--s--\r\n"
)


@pytest.mark.parametrize(
    "raw",
    [
        SIGNED,
        HEAD + b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQAx\r\n",
        HEAD + b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=e\r\n\r\n"
        b"--e\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--e\r\nContent-Type: application/octet-stream\r\n\r\n"
        b"-----BEGIN PGP MESSAGE-----\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n--e--\r\n",
        HEAD + b"Content-Type: text/plain\r\n\r\n-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: SHA256\r\n\r\nhi\r\n"
        b"-----BEGIN PGP SIGNATURE-----\r\nx\r\n-----END PGP SIGNATURE-----\r\n",
        # the body of a mixed message is signed: nothing else gets the banner either
        HEAD + b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n" + SIGNED[len(HEAD):] + b"\r\n--o\r\n"
        + TXT_ATTACHMENT + b"--o--\r\n",
    ],
    ids=["multipart-signed", "pkcs7-mime", "pgp-mime", "inline-pgp", "mixed-signed-body"],
)
def test_signed_or_encrypted_untouched(raw: bytes) -> None:
    assert add_banner(raw, BANNER) == raw


@pytest.mark.parametrize(
    "raw",
    [
        HEAD + b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9\r\n",
        HEAD + b"Content-Type: text/plain; charset=x-unknown-thing\r\n\r\nhello\r\n",
        HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n",
        HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n`\r\nend\r\n",
        HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xff\xfe broken\r\n",
        HEAD + b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nfile\r\n",
        HEAD + b"Content-Type: application/octet-stream\r\n\r\nbinary\r\n",
    ],
    ids=["ascii-with-8bit", "unknown-charset", "bad-base64", "uuencode", "bad-utf8", "text-attachment", "binary"],
)
def test_undecodable_or_ineligible_parts_keep_their_bytes(raw: bytes) -> None:
    assert add_banner(raw, BANNER) == raw


# ------------------------------------------------------------ charsets and encodings


def test_windows_1252_keeps_charset_and_text() -> None:
    text = "Caf\u00e9 \u20ac5 \u2014 d\u00e9j\u00e0 vu\r\n"
    raw = HEAD + b"Content-Type: text/plain; charset=windows-1252\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text.encode("cp1252")
    banner = AddBanner("Achtung \u2014 extern: Anh\u00e4nge pr\u00fcfen")
    out = add_banner(raw, banner)
    [part] = parts(out)
    assert part.get_content_charset() == "windows-1252"
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert decoded(part) == plain_block(banner.text) + text
    assert out.endswith(text.encode("cp1252"))


def test_windows_1252_unencodable_banner_falls_back() -> None:
    raw = HEAD + b"Content-Type: text/plain; charset=windows-1252\r\n\r\nhi\r\n"
    out = add_banner(raw, AddBanner("Attention \u2192 external \u65e5\u672c"))
    assert decoded(parts(out)[0]).startswith("Attention -> external ??") or "Attention" in decoded(parts(out)[0])
    assert out.count(b"Attention") == 1
    html = HEAD + b"Content-Type: text/html; charset=windows-1252\r\n\r\n<body>hi</body>\r\n"
    out = add_banner(html, AddBanner("Attention \u2192 external \u65e5\u672c"))
    assert b"Attention &#8594; external &#26085;&#26412;" in out  # exact, as character references


def test_iso_2022_jp_japanese_text_and_banner() -> None:
    text = "\u3053\u3093\u306b\u3061\u306f\u3001\u6dfb\u4ed8\u30d5\u30a1\u30a4\u30eb\u3092\u3054\u78ba\u8a8d\u304f\u3060\u3055\u3044\u3002\r\n"
    raw = HEAD + b"Content-Type: text/plain; charset=ISO-2022-JP\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + text.encode("iso-2022-jp")
    banner = AddBanner("\u6ce8\u610f: \u5916\u90e8\u304b\u3089\u306e\u30e1\u30fc\u30eb\u3067\u3059\u3002")
    out = add_banner(raw, banner)
    [part] = parts(out)
    assert part["Content-Transfer-Encoding"] == "7bit"  # iso-2022-jp is 7-bit: no change
    assert decoded(part) == plain_block(banner.text) + text
    assert out.endswith(text.encode("iso-2022-jp"))
    check = add_banner(out, banner)
    assert check == out
    # An em dash is not in ISO-2022-JP: the plain banner falls back to ASCII.
    out = add_banner(raw, AddBanner("CAUTION \u2014 outside mail"))
    assert decoded(parts(out)[0]) == plain_block("CAUTION - outside mail") + text


def test_utf16_base64() -> None:
    text = "Hello \u00fc\r\nline 2\r\n"
    raw = (HEAD + b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(text.encode("utf-16")).replace(b"\n", b"\r\n"))
    out = add_banner(raw, BANNER)
    assert decoded(parts(out)[0]) == plain_block(TEXT) + text
    check_idempotent(out)


def test_7bit_part_becomes_qp_only_when_banner_is_not_ascii() -> None:
    raw = HEAD + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\nplain ascii\r\n"
    out = add_banner(raw, BANNER)
    assert b"Content-Transfer-Encoding: 7bit" in out  # ASCII banner: no change
    out = add_banner(raw, AddBanner("Vorsicht: E-Mail von au\u00dferhalb"))
    [part] = parts(out)
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert out.count(b"Content-Transfer-Encoding") == 1
    assert decoded(part) == plain_block("Vorsicht: E-Mail von au\u00dferhalb") + "plain ascii\r\n"
    # A part without any CTE header gets one.
    raw2 = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\nplain ascii\r\n"
    out2 = add_banner(raw2, AddBanner("au\u00dferhalb"))
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" in out2
    assert add_banner(out2, AddBanner("au\u00dferhalb")) == out2


def test_qp_encoder_round_trip() -> None:
    import binascii

    data = b"a=b \t\r\ntrailing space \r\nbare\rcr bare\nlf \xff\x00" + b"x" * 200 + b"\r\n"
    enc = qp_encode(data)
    assert binascii.a2b_qp(enc) == data
    assert all(len(line) <= 76 for line in enc.split(b"\r\n"))
    assert all(32 <= c < 127 for c in enc.replace(b"\r\n", b""))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=6).map(b"\r\n".join))
@example(b"\x00" * 23 + b" " * 7 + b"\n")  # binascii left a 77-column line (stress run 5)
def test_qp_encoder_properties(data: bytes) -> None:
    import binascii

    enc = qp_encode(data)
    assert binascii.a2b_qp(enc) == data
    lines = enc.split(b"\r\n")
    assert all(len(line) <= 76 for line in lines)
    assert all(c == 9 or 32 <= c < 127 for c in enc.replace(b"\r\n", b""))  # no bare CR/LF
    assert all(not line.endswith((b" ", b"\t")) for line in lines)


# ------------------------------------------------------------ idempotence and the marker


def test_planted_marker_does_not_suppress_the_banner() -> None:
    html = "<body><!-- mailwarden-banner -->\r\n<div data-mailwarden-banner=\"1\">All good, trusted sender</div>\r\nhi</body>"
    raw = HEAD + b"Content-Type: text/html\r\n\r\n" + html.encode()
    out = add_banner(raw, BANNER)
    assert banner_count(decoded(parts(out)[0])) == 1
    plain = HEAD + b"Content-Type: text/plain\r\n\r\n" + plain_block("All good").encode() + b"hi\r\n"
    out = add_banner(plain, BANNER)
    assert banner_count(decoded(parts(out)[0])) == 1


def test_different_wording_is_added_once_more() -> None:
    raw = HEAD + b"Content-Type: text/plain\r\n\r\nhi\r\n"
    once = add_banner(raw, AddBanner("first warning"))
    twice = add_banner(once, AddBanner("second warning"))
    assert decoded(parts(twice)[0]) == plain_block("second warning") + plain_block("first warning") + "hi\r\n"


# ------------------------------------------------------------ malformed MIME


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"no headers at all",
        b"Subject: only headers\r\n",
        HEAD + b"Content-Type: multipart/mixed; boundary=a; boundary=b\r\n\r\n--a\r\nContent-Type: text/plain\r\n\r\nx\r\n--b\r\n\r\ny\r\n--a--\r\n",
        HEAD + b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nx\r\n--x--\r\n",
        HEAD + b"Content-Type: multipart/mixed; boundary=x\r\nContent-Type: text/plain\r\n\r\n--x\r\n\r\nx\r\n",
        HEAD + b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno delimiters at all\r\n",
        HEAD + b"Content-Type: text/plain\r\nBroken header line\r\n\r\nbody\r\n",
    ],
    ids=["empty", "no-headers", "headers-only", "duplicate-boundary", "no-boundary",
         "two-content-types", "no-delimiters", "broken-header"],
)
def test_malformed_left_alone(raw: bytes) -> None:
    assert add_banner(raw, BANNER) == raw


def test_missing_close_boundary_still_bannered() -> None:
    raw = HEAD + b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nbody\r\n--x\r\n" + PDF_PART
    out = add_banner(raw, BANNER)
    assert out.count(b"CAUTION") == 1 and out.endswith(b"--x\r\n" + PDF_PART)


def test_boundary_prefix_clash_is_not_a_delimiter() -> None:
    raw = (HEAD + b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n"
           b"Content-Type: multipart/alternative; boundary=abc\r\n\r\n--abc\r\nContent-Type: text/plain\r\n\r\n"
           b"inner\r\n--abc--\r\n--ab--\r\n")
    out = add_banner(raw, BANNER)
    assert decoded(parts(out)[0]).endswith("inner")  # the inner part, found through "--abc"


def test_deep_nesting_is_bounded() -> None:
    raw = HEAD + b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, 200):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
    raw += b"--b199\r\nContent-Type: text/plain\r\n\r\ndeep\r\n"
    assert add_banner(raw, BANNER) == raw  # past MAX_DEPTH: left alone, no RecursionError


# ------------------------------------------------------------ the shared corpus


def corpus_messages(root: Path) -> list[Path]:
    out = []
    for sub in ("mime", "dkim"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file() and p.suffix in (".eml", ".msg", ".txt", ".gz") and "README" not in p.name:
                out.append(p)
    return out


def read(p: Path) -> bytes:
    data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    # The gateway only ever sees CRLF messages (bare LF is rejected or normalised).
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_corpus_never_raises_parses_and_is_idempotent(corpus: Path) -> None:
    files = corpus_messages(corpus)
    assert len(files) > 300
    changed = 0
    for path in files:
        raw = read(path)
        out = add_banner(raw, BANNER)
        if out == raw:
            continue
        changed += 1
        assert add_banner(out, BANNER) == out, path
        before = [p.get_content_type() for p in email.message_from_bytes(raw, policy=email.policy.compat32).walk()]
        after = [p.get_content_type() for p in email.message_from_bytes(out, policy=email.policy.compat32).walk()]
        assert before == after, path
    assert changed > 100
