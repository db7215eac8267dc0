"""gateway/milter/actions.py: answers as milter responses, edits as requests.

The property: applying the computed header requests and REPLBODY pieces to
the original, the way Postfix applies them (tests/support/milter_client.py:
``apply_edits``, with the MTA's own Received header first and the index
rules of cleanup_milter.c), yields exactly the edited message; the REPLBODY
pieces are at most 65,535 bytes, come after every header request with
nothing in between, and ACCEPT comes last.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.milter import actions as a
from gateway.milter import codec as c
from gateway.milter.api import MilterAnswer
from tests.support.milter_client import apply_edits

names = st.sampled_from([b"Subject", b"subject", b"X-A", b"x-a", b"Received", b"To",
                         b"X-Mailwarden-Scan", b"DKIM-Signature"])
values = st.one_of(
    st.sampled_from([b" hello", b" [EXTERNAL] hello", b" a\r\n\tfolded", b"", b" x", b"\tt"]),
    st.binary(max_size=12).map(
        lambda b: b" " + b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
)
header = st.tuples(names, values)
headers = st.lists(header, max_size=10)
bodies = st.one_of(st.just(b""), st.just(b"line\r\n"), st.binary(max_size=300),
                   st.just(b"x" * 140_000))


@st.composite
def edited_headers(draw: st.DrawFn, original: list[tuple[bytes, bytes]]) -> list:
    out = list(original)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["ins", "del", "chg", "top", "end"]))
        if op == "top":
            out.insert(0, draw(header))
        elif op == "end":
            out.append(draw(header))
        elif op == "ins":
            out.insert(draw(st.integers(0, len(out))), draw(header))
        elif out and op == "del":
            del out[draw(st.integers(0, len(out) - 1))]
        elif out and op == "chg":
            i = draw(st.integers(0, len(out) - 1))
            out[i] = (out[i][0], draw(values))
    return out


def _check(original: bytes, edited: bytes) -> list[c.Response]:
    packets = a.answer_packets(MilterAnswer.accept(original, edited), original,
                               quarantine_mode="own")
    assert type(packets[-1]) is c.Accept
    kinds = [type(p) for p in packets[:-1]]
    if c.ReplaceBody in kinds:
        first = kinds.index(c.ReplaceBody)
        assert all(k is c.ReplaceBody for k in kinds[first:]), kinds  # back to back, last
    assert all(len(p.chunk) <= c.MAX_BODY_CHUNK for p in packets if type(p) is c.ReplaceBody)
    for p in packets:  # every request encodes (no NUL, valid framing)
        assert c.decode_response(p.encode()[4:5], p.encode()[5:]) == p
    o_headers, o_body = a.split_message(original)
    got_headers, got_body = apply_edits(o_headers, o_body, packets)
    assert a.join_message(got_headers, got_body) == edited
    return packets


@settings(max_examples=400, deadline=None)
@given(headers, bodies, st.data())
def test_applying_the_requests_to_the_original_yields_the_edited_message(
        hs: list, body: bytes, data: st.DataObject) -> None:
    original = a.join_message(hs, body)
    e_headers = data.draw(edited_headers(hs))
    e_body = data.draw(st.one_of(st.just(body), bodies))
    _check(original, a.join_message(e_headers, e_body))


def test_mailwarden_style_edit_prepends_changes_subject_and_banners_a_big_body() -> None:
    body = b"hello\r\n" * 20_000                        # 140,000 bytes
    original = a.join_message([(b"From", b" a@ext.test"), (b"Subject", b" figures"),
                               (b"To", b" b@example.com")], body)
    edited = a.join_message([(b"X-Mailwarden-Scan", b" clean"),
                             (b"X-Mailwarden-External", b" attachments;\r\n sender=unidentified"),
                             (b"From", b" a@ext.test"), (b"Subject", b" [EXTERNAL] figures"),
                             (b"To", b" b@example.com")], b"BANNER\r\n" + body)
    packets = _check(original, edited)
    assert packets[:3] == [
        c.InsertHeader(1, b"X-Mailwarden-Scan", b" clean"),
        c.InsertHeader(2, b"X-Mailwarden-External", b" attachments;\n sender=unidentified"),
        c.ChangeHeader(1, b"Subject", b" [EXTERNAL] figures"),
    ]
    assert [len(p.chunk) for p in packets[3:-1]] == [65535, 65535, 140_008 - 131_070]


def test_unchanged_message_is_a_bare_accept_and_change_index_counts_per_name() -> None:
    raw = a.join_message([(b"Received", b" one"), (b"Received", b" two")], b"b\r\n")
    assert a.answer_packets(MilterAnswer.accept(raw, raw), raw, quarantine_mode="own") == [
        c.Accept()]
    assert a.answer_packets(MilterAnswer.accept(), raw, quarantine_mode="own") == [c.Accept()]
    edited = a.join_message([(b"Received", b" one"), (b"Received", b" 2")], b"b\r\n")
    assert _check(raw, edited)[0] == c.ChangeHeader(2, b"Received", b" 2")


def test_an_empty_value_cannot_be_a_change_so_it_is_delete_then_insert() -> None:
    raw = a.join_message([(b"X-A", b" v"), (b"To", b" t")], b"")
    edited = a.join_message([(b"X-A", b""), (b"To", b" t")], b"")
    assert _check(raw, edited)[:2] == [c.ChangeHeader(1, b"X-A", b""),
                                       c.InsertHeader(1, b"X-A", b"")]


def test_verdicts_map_to_their_responses() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    own = {"quarantine_mode": "own"}
    assert a.answer_packets(MilterAnswer.reject("554 5.7.1 message refused: virus found (E%)"),
                            raw, **own) == [c.ReplyCode("554 5.7.1 message refused: virus found (E%%)")]
    assert a.answer_packets(MilterAnswer.tempfail(), raw, **own) == [
        c.ReplyCode("451 4.3.0 temporary failure, try again later")]
    assert a.answer_packets(MilterAnswer.discard(), raw, **own) == [c.Discard()]
    assert a.answer_packets(MilterAnswer.quarantine("virus"), raw, **own) == [c.Discard()]
    assert a.answer_packets(MilterAnswer.quarantine("virus\r\n"), raw,
                            quarantine_mode="hold") == [c.Quarantine("virus??"), c.Accept()]
    assert a.answer_packets(MilterAnswer.quarantine(""), raw, quarantine_mode="hold") == [
        c.Quarantine(a.DEFAULT_HOLD_REASON), c.Accept()]


def test_an_accept_of_some_other_message_or_a_bad_edit_is_an_error() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    with pytest.raises(a.EditError):
        a.answer_packets(MilterAnswer.accept(b"other", b"other2"), raw, quarantine_mode="own")
    with pytest.raises(a.EditError):
        a.answer_packets(MilterAnswer.accept(raw, b"no colon here\r\n\r\n"), raw,
                         quarantine_mode="own")
    with pytest.raises(ValueError):
        a.answer_packets(MilterAnswer.accept(raw, b"X: a\0b\r\n\r\n"), raw,
                         quarantine_mode="own")


def test_split_message_round_trips_and_keeps_folding() -> None:
    raw = b"A: 1\r\nB: two\r\n  lines\r\nC:\r\n\r\nbody\r\n\r\nmore"
    hs, body = a.split_message(raw)
    assert hs == [(b"A", b" 1"), (b"B", b" two\r\n  lines"), (b"C", b"")]
    assert body == b"body\r\n\r\nmore"
    assert a.join_message(hs, body) == raw
    assert a.split_message(b"\r\nbody") == ([], b"body")
