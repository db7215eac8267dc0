"""Property tests for the rewriter (issue 9): generated MIME trees and edits.

For arbitrary MIME trees (plain/HTML text in several charsets and transfer
encodings, attachments, inline parts, message/rfc822, multipart/mixed,
alternative, related and signed, nested, with preambles and epilogues) and
arbitrary edit lists, it shows:

* the output parses, into the same tree of content types;
* untouched parts keep their bytes: every byte outside the bannered parts --
  all headers, preambles, epilogues, delimiters, attachments, forwarded
  messages, signed content -- is in the output, in order, unchanged;
* the banner appears exactly once in every eligible part (decoded), the
  part's original text is intact around it, and nowhere else;
* applying the same edits twice changes nothing more.

Which parts are eligible is computed here from the tree model, independently
of the byte-level walker the banner uses (gateway/mime.py).
"""

from __future__ import annotations

import base64
import binascii
import email
import email.header
import email.policy
import itertools
from dataclasses import dataclass
from email.message import Message

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters.base import AddBanner, AddHeader, Edit, RemoveHeader, TagSubject
from gateway.banner import add_banner
from gateway.rewrite import apply_edits

TOKEN = "ZQXJ-WARN"
HOST = "mailwarden.test"
CRLF = b"\r\n"

PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------ the tree model

_ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()&/*+_#"
EXTRA = {
    "us-ascii": "",
    "utf-8": "äöüß€—…日本語😀Ņ",
    "iso-8859-1": "äöüßé©",
    "windows-1252": "äöüé€—…“”",
    "iso-2022-jp": "日本語テキスト、確認。",
    "utf-16": "äö€日本",
}


@dataclass
class Leaf:
    ctype: str
    charset: str | None = None
    cte: str = ""
    disposition: str | None = None
    filename: str | None = None
    text: str = ""
    data: bytes = b""

    @property
    def is_text(self) -> bool:
        return self.ctype in ("text/plain", "text/html")


@dataclass
class Forward:
    inner: Node


@dataclass
class Multi:
    subtype: str
    children: list[Node]
    preamble: bytes = b""
    epilogue: bytes = b""
    boundary: str = ""


Node = Leaf | Forward | Multi


def text_for(charset: str) -> st.SearchStrategy[str]:
    line = st.text(alphabet=_ASCII + EXTRA[charset], max_size=50)
    return st.lists(line, max_size=5).map("\r\n".join)


@st.composite
def text_leaf(draw: st.DrawFn) -> Leaf:
    ctype = draw(st.sampled_from(["text/plain", "text/html"]))
    charset = draw(st.sampled_from(list(EXTRA)))
    text = draw(text_for(charset))
    if draw(st.booleans()):
        text += "\r\n"
    if ctype == "text/html":
        shape = draw(st.sampled_from(["<html><body>{}</body></html>", "<p>{}</p>",
                                      "<html><head><title>t</title></head>{}</html>", "{}",
                                      '<body class="x">{}</body>']))
        text = shape.format(text)
    cte = draw(st.sampled_from(["", "7bit", "8bit", "quoted-printable", "base64"]))
    if charset == "utf-16":
        cte = "base64"
    elif cte in ("", "7bit") and not text.encode(charset).isascii():
        cte = "8bit"
    disposition = draw(st.sampled_from([None, None, None, "inline", "attachment"]))
    filename = draw(st.sampled_from([None, None, None, None, "notes.txt"]))
    return Leaf(ctype, charset, cte, disposition, filename, text=text)


@st.composite
def binary_leaf(draw: st.DrawFn) -> Leaf:
    kind = draw(st.sampled_from(["application/pdf", "image/png", "application/pkcs7-signature"]))
    data = draw(st.binary(max_size=80))
    if kind == "image/png":
        return Leaf(kind, cte="base64", disposition="inline", data=data)
    return Leaf(kind, cte="base64", disposition="attachment", filename="file.bin", data=data)


def trees() -> st.SearchStrategy[Node]:
    # Weighted so that most trees have something to banner, and alternatives
    # with several text parts are common.
    leaves = st.one_of(text_leaf(), text_leaf(), text_leaf(), binary_leaf())

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        multi = st.builds(
            Multi,
            st.sampled_from(["mixed", "mixed", "alternative", "alternative", "related", "signed"]),
            st.lists(children, min_size=1, max_size=3),
            st.sampled_from([b"", b"This is a multi-part message in MIME format."]),
            st.sampled_from([b"", b"epilogue text\r\n"]),
        )
        return st.one_of(multi, multi, multi, st.builds(Forward, children))

    # A forwarded message at the top becomes an attachment below a text body.
    return st.recursive(leaves, extend, max_leaves=8).map(
        lambda t: Multi("mixed", [Leaf("text/plain", "utf-8", text="see below\r\n"), t])
        if isinstance(t, Forward) else t
    )


# ------------------------------------------------------------ eligibility (model)


def eligible(node: Node, out: set[int]) -> bool:
    """Collect id()s of leaves that must get a banner; True when ``node`` is
    (or holds) the body.  The rule from gateway/banner.py's docstring."""
    if isinstance(node, Leaf):
        if node.is_text and node.disposition != "attachment" and not node.filename:
            out.add(id(node))
            return True
        return False
    if isinstance(node, Forward):
        return False
    if node.subtype == "signed":
        return True
    if node.subtype == "alternative":
        found = False
        for c in node.children:
            found = eligible(c, out) or found
        return found
    if node.subtype == "related":
        return eligible(node.children[0], out)
    return any(eligible(c, out) for c in node.children)


# ------------------------------------------------------------ serialisation


Segment = tuple[bytes, bool]  # (bytes, replaceable by the banner)


def _body(leaf: Leaf) -> bytes:
    payload = leaf.text.encode(leaf.charset) if leaf.is_text else leaf.data
    if leaf.cte == "base64":
        return base64.encodebytes(payload).replace(b"\n", CRLF)
    if leaf.cte == "quoted-printable":
        enc = binascii.b2a_qp(payload).replace(CRLF, b"\n").replace(b"\n", CRLF)
        assert binascii.a2b_qp(enc) == payload
        return enc
    return payload


def serialise(node: Node, ids: set[int], counter: itertools.count[int]) -> list[Segment]:
    if isinstance(node, Leaf):
        ctype = node.ctype + (f"; charset={node.charset}" if node.charset else "")
        if node.filename:
            ctype += f'; name="{node.filename}"'
        head = f"Content-Type: {ctype}\r\n"
        if node.cte:
            head += f"Content-Transfer-Encoding: {node.cte}\r\n"
        if node.disposition:
            head += f"Content-Disposition: {node.disposition}"
            head += f'; filename="{node.filename}"\r\n' if node.filename else "\r\n"
        data = head.encode() + CRLF + _body(node)
        return [(data, id(node) in ids)]
    if isinstance(node, Forward):
        inner = serialise(node.inner, set(), counter)  # nothing inside is eligible
        return [(b"Content-Type: message/rfc822\r\n\r\nSubject: forwarded\r\n", False), *inner]
    node.boundary = f"=_b{next(counter)}_mw"
    b = node.boundary.encode()
    ctype = f'multipart/{node.subtype}; boundary="{node.boundary}"'
    if node.subtype == "signed":
        ctype += '; protocol="application/pkcs7-signature"; micalg=sha-256'
    segs: list[Segment] = [(f"Content-Type: {ctype}\r\n\r\n".encode(), False)]
    if node.preamble:
        segs.append((node.preamble + CRLF, False))
    for child in node.children:
        segs.append((b"--" + b + CRLF, False))
        segs.extend(serialise(child, ids, counter))
        segs.append((CRLF, False))
    segs.append((b"--" + b + b"--\r\n" + node.epilogue, False))
    return segs


def build(tree: Node) -> tuple[bytes, list[Segment], set[int]]:
    ids: set[int] = set()
    eligible(tree, ids)
    head = b"From: a@ext.test\r\nTo: b@example.com\r\nSubject: hello\r\nMIME-Version: 1.0\r\n"
    segs = [(head, False), *serialise(tree, ids, itertools.count())]
    return b"".join(s for s, _ in segs), segs, ids


def leaves_in_order(node: Node) -> list[tuple[Leaf, bool]]:
    """(leaf, inside a forwarded message) in the order email.walk() meets them."""
    if isinstance(node, Leaf):
        return [(node, False)]
    if isinstance(node, Forward):
        return [(leaf, True) for leaf, _ in leaves_in_order(node.inner)]
    return [x for c in node.children for x in leaves_in_order(c)]


def parsed_leaves(raw: bytes) -> list[Message]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [p for p in msg.walk() if not p.is_multipart() and p.get_content_type() != "message/rfc822"]


# ------------------------------------------------------------ properties


def banner_texts() -> st.SearchStrategy[str]:
    words = st.text(alphabet=_ASCII.replace('"', "") + "äé—€<>&\"日", min_size=1, max_size=12)
    return st.lists(words, min_size=1, max_size=12).map(lambda ws: " ".join([*ws[:3], TOKEN, *ws[3:]]))


def assert_fixed_bytes_kept(out: bytes, segs: list[Segment]) -> None:
    """Every non-replaceable segment is in ``out``, in order, and nothing else
    changed except the replaceable (bannered) parts."""
    merged: list[tuple[bytes, bool]] = []
    for data, var in segs:
        if merged and merged[-1][1] == var and not var:
            merged[-1] = (merged[-1][0] + data, False)
        else:
            merged.append((data, var))
    pos = 0
    after_var = False
    for data, var in merged:
        if var:
            after_var = True
            continue
        if after_var:
            found = out.find(data, pos)
            assert found >= 0, data[:80]
            pos = found + len(data)
        else:
            assert out.startswith(data, pos), (data[:80], out[pos : pos + 80])
            pos += len(data)
        after_var = False
    assert pos == len(out) or after_var


def split_around(new: str, old: str) -> tuple[int, str]:
    """new == old[:i] + inserted + old[i:]: return (i, inserted)."""
    i = 0
    while i < min(len(new), len(old)) and new[i] == old[i]:
        i += 1
    j = 0
    while j < len(old) - i and new[len(new) - 1 - j] == old[len(old) - 1 - j]:
        j += 1
    assert i + j == len(old), "original text not intact around the banner"
    return i, new[i : len(new) - j]


@PROPS
@given(tree=trees(), text=banner_texts())
def test_banner_properties(tree: Node, text: str) -> None:
    raw, segs, ids = build(tree)
    banner = AddBanner(text)
    out = add_banner(raw, banner)

    # The output parses into the same tree.
    before = [p.get_content_type() for p in email.message_from_bytes(raw).walk()]
    after = [p.get_content_type() for p in email.message_from_bytes(out).walk()]
    assert before == after

    # Untouched parts (and everything around the bannered ones) keep their bytes.
    assert_fixed_bytes_kept(out, segs)
    if not ids:
        assert out == raw

    # The banner appears once in every eligible part, nowhere else.
    model = leaves_in_order(tree)
    parts = parsed_leaves(out)
    assert len(model) == len(parts)
    for (leaf, _forwarded), part in zip(model, parts, strict=True):
        if not leaf.is_text:
            continue
        new = part.get_payload(decode=True).decode(part.get_content_charset())
        if id(leaf) in ids:
            assert new.count(TOKEN) == 1
            _i, inserted = split_around(new, leaf.text)
            assert TOKEN in inserted  # (old has no "-", so TOKEN cannot hide in it)
            if leaf.ctype == "text/plain":  # at the very top
                assert new.endswith(leaf.text) and TOKEN in new[: len(new) - len(leaf.text)]
        else:
            assert TOKEN not in new
            assert new == leaf.text

    # Twice is once.
    assert add_banner(out, banner) == out


@st.composite
def edit_lists(draw: st.DrawFn) -> list[Edit]:
    edits: list[Edit] = []
    if draw(st.booleans()):
        word = draw(st.sampled_from(["pass", "fail", "none", "temperror"]))
        edits += [RemoveHeader("Authentication-Results", first_token=HOST),
                  AddHeader("Authentication-Results", f"{HOST}; dkim={word} header.d=ext.test")]
    for name in draw(st.lists(st.sampled_from(["X-Mailwarden-External", "X-Other"]), unique=True)):
        value = draw(st.text(alphabet=_ASCII + "é—", min_size=1, max_size=120))
        edits += [RemoveHeader(name), AddHeader(name, value)]
    if draw(st.booleans()):
        edits.append(TagSubject(draw(st.sampled_from(["[EXTERNAL]", "[EXT]", "[Extern—]"]))))
    if draw(st.booleans()):
        edits.append(AddBanner(draw(banner_texts())))
    return draw(st.permutations(edits))


@PROPS
@given(tree=trees(), edits=edit_lists(),
       forged=st.sampled_from([b"", f"Authentication-Results: {HOST}; dkim=pass\r\n".encode(),
                               f"Authentication-Results: (c) {HOST.upper()} 1; dkim=pass\r\n".encode()]))
def test_apply_edits_twice_changes_nothing_more(tree: Node, edits: list[Edit], forged: bytes) -> None:
    raw, _segs, _ids = build(tree)
    raw = forged + raw
    once = apply_edits(raw, edits)
    assert apply_edits(once, edits) == once
    msg = email.message_from_bytes(once)
    before = [p.get_content_type() for p in email.message_from_bytes(raw).walk()]
    assert [p.get_content_type() for p in msg.walk()] == before
    added = [e for e in edits if isinstance(e, AddHeader)]
    for e in added:
        assert len(msg.get_all(e.name) or []) == 1
    if any(isinstance(e, RemoveHeader) and e.first_token for e in edits):
        ars = msg.get_all("Authentication-Results") or []
        assert all(v.startswith(HOST) and "header.d=ext.test" in v for v in ars)
    for e in edits:
        if isinstance(e, TagSubject):
            subject = str(email.header.make_header(email.header.decode_header(msg["Subject"])))
            assert subject.count(e.tag) == 1


# ------------------------------------------------------------ one join, checked pieces

def _sequential(raw: bytes, edits: list[Edit]) -> bytes:
    """The edits applied one function at a time (the reference for the
    one-join :func:`edit_pieces`)."""
    from gateway.rewrite import add_header, remove_header, tag_subject

    out = raw
    for e in edits:
        if isinstance(e, RemoveHeader):
            out = remove_header(out, e.name, e.contains, e.first_token)
    for e in edits:
        if isinstance(e, TagSubject):
            out = tag_subject(out, e.tag)
    for e in edits:
        if isinstance(e, AddBanner):
            out = add_banner(out, e)
    for e in reversed([e for e in edits if isinstance(e, AddHeader)]):
        out = add_header(out, e.name, e.value)
    return out


@PROPS
@given(tree=trees(), edits=edit_lists(),
       forged=st.sampled_from([b"", f"Authentication-Results: {HOST}; dkim=pass\r\n".encode()]))
def test_edit_pieces_join_to_the_sequential_result(tree: Node, edits: list[Edit],
                                                   forged: bytes) -> None:
    from gateway.rewrite import crlf_clean, edit_pieces

    raw = forged + build(tree)[0]
    pieces = edit_pieces(raw, edits)
    assert b"".join(pieces) == _sequential(raw, edits) == apply_edits(raw, edits)
    # untouched stretches are views, not copies (of the message itself unless
    # a banner goes into a message whose header block changed first)
    if not any(isinstance(e, AddBanner) for e in edits):
        assert all(p.obj is raw for p in pieces if isinstance(p, memoryview))
    assert crlf_clean(pieces, raw)


def test_crlf_clean_looks_at_new_bytes_and_at_cuts() -> None:
    from gateway.rewrite import crlf_clean

    raw = b"A: b\r\n\r\nline one\r\nline two\r\n"
    view = memoryview(raw)
    assert crlf_clean([b"X: 1\r\n", view[:6], view[6:]], raw)
    assert not crlf_clean([b"X: 1\n", view], raw)  # new bytes: all of them
    assert not crlf_clean([view[:5], b"y", view[5:]], raw)  # a cut inside a CRLF pair
    assert not crlf_clean([view[:6], b"z", view[7:]], raw)
    # without the promise that raw is clean, its stretches are read in full
    dirty = b"A: b\r\n\r\nbare\nline\r\n"
    assert crlf_clean([memoryview(dirty)], dirty)  # trusted as promised
    assert not crlf_clean([memoryview(dirty)], None)
