"""The milter codec (gateway/milter/codec.py): round trips and stream splits.

Every packet type encodes and decodes back to itself; a concatenated stream
cut at arbitrary points decodes to the same packets; a truncated packet
waits for more; a length of 0, over the maximum or of 2**31 is refused
before anything is buffered; an unknown command is a ProtocolError.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.milter import codec as c

# NUL-terminated fields: any bytes but NUL, as str with surrogateescape.
cstr = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"x").decode("utf-8", "surrogateescape"))
cbytes = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"x"))
u32 = st.integers(0, 2**32 - 1)
stage = st.sampled_from([b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"E"])

commands = st.one_of(
    st.builds(c.OptNeg, u32, u32, u32),
    st.builds(c.Macro, stage, st.lists(st.tuples(cstr, cstr), max_size=4).map(tuple)),
    st.builds(c.Connect, cstr, st.just("U")),
    st.builds(c.Connect, cstr, st.sampled_from("46L"), st.integers(0, 65535), cstr),
    st.builds(c.Helo, cstr),
    st.builds(c.Mail, st.lists(cstr, min_size=1, max_size=3).map(tuple)),
    st.builds(c.Rcpt, st.lists(cstr, min_size=1, max_size=3).map(tuple)),
    st.builds(c.Header, cbytes, cbytes),
    st.builds(c.Body, st.binary(max_size=200)),
    st.builds(c.EndOfBody, st.binary(max_size=50)),
    st.builds(c.Unknown, cbytes),
    st.sampled_from([c.Data(), c.EndOfHeaders(), c.Abort(), c.Quit(), c.QuitNC()]),
)
responses = st.one_of(
    st.builds(c.OptNeg, u32, u32, u32,
              st.lists(st.tuples(st.integers(0, 6), cstr), max_size=3).map(tuple)),
    st.sampled_from([c.Continue(), c.Accept(), c.Discard(), c.Reject(), c.Tempfail(),
                     c.Progress()]),
    st.builds(c.ReplyCode, cstr),
    st.builds(c.AddHeader, cbytes, cbytes),
    st.builds(c.InsertHeader, u32, cbytes, cbytes),
    st.builds(c.ChangeHeader, u32, cbytes, cbytes),
    st.builds(c.ReplaceBody, st.binary(max_size=200)),
    st.builds(c.Quarantine, cstr),
)


def _decode_all(frames: list[tuple[bytes, bytes]], decode) -> list[object]:
    return [decode(code, data) for code, data in frames]


@settings(max_examples=300)
@given(commands)
def test_every_command_round_trips(pkt) -> None:
    frames = c.Decoder().feed(pkt.encode())
    assert _decode_all(frames, c.decode_command) == [pkt]
    assert type(_decode_all(frames, c.decode_command)[0]) is type(pkt)


@settings(max_examples=300)
@given(responses)
def test_every_response_round_trips(pkt) -> None:
    frames = c.Decoder().feed(pkt.encode())
    assert _decode_all(frames, c.decode_response) == [pkt]
    assert type(_decode_all(frames, c.decode_response)[0]) is type(pkt)


@settings(max_examples=200)
@given(st.lists(commands, min_size=1, max_size=12), st.data())
def test_arbitrary_splits_decode_to_the_same_packets(pkts, data) -> None:
    stream = b"".join(p.encode() for p in pkts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = c.Decoder()
    frames: list[tuple[bytes, bytes]] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        frames += dec.feed(stream[prev:cut])
        prev = cut
    assert _decode_all(frames, c.decode_command) == pkts
    assert dec.pending == 0


def test_a_truncated_packet_waits_for_more() -> None:
    raw = c.Header(b"Subject", b"hello").encode()
    dec = c.Decoder()
    assert dec.feed(raw[:-1]) == []
    assert dec.pending == len(raw) - 1
    assert dec.feed(raw[-1:]) == [(b"L", b"Subject\0hello\0")]


@pytest.mark.parametrize("length", [0, 2**31, c.DEFAULT_MAX_PACKET + 1])
def test_bad_lengths_are_refused_before_buffering(length: int) -> None:
    with pytest.raises(c.ProtocolError, match="packet length"):
        c.Decoder().feed(struct.pack("!I", length) + b"B")


def test_unknown_and_malformed_commands_are_protocol_errors() -> None:
    with pytest.raises(c.ProtocolError, match="unknown command"):
        c.decode_command(b"Z", b"")
    with pytest.raises(c.ProtocolError):
        c.decode_command(b"O", b"short")
    with pytest.raises(c.ProtocolError):
        c.decode_command(b"C", b"host-without-nul")


def test_replace_body_pieces_are_at_most_65535_bytes() -> None:
    body = bytes(range(256)) * 547  # 140,032 bytes
    pieces = c.replace_body(body)
    assert [len(p.chunk) for p in pieces] == [65535, 65535, 8962]
    assert b"".join(p.chunk for p in pieces) == body
    assert c.replace_body(b"") == [c.ReplaceBody(b"")]
