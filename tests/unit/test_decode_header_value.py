"""gateway.message.decode_header_value: the shortcuts (no encoded word: no
email.header round trip; printable: no per-character pass) give exactly what
the full decoding gives."""

from __future__ import annotations

import email.header
import random

import pytest

from gateway.message import decode_header_value


def reference(value: str | None) -> str | None:
    """The decoding without shortcuts."""
    if value is None:
        return None
    try:
        text = str(email.header.make_header(email.header.decode_header(str(value))))
    except Exception:
        text = str(value)
    text = " ".join(text.split())
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)


@pytest.mark.parametrize("value", [
    None, "", "plain subject", "  folded\r\n\tsubject  ", "=?utf-8?q?caf=C3=A9?=",
    "=?iso-8859-1?b?Y2Fm6Q==?= and more", "=?bogus?x?zz?=", "a =? b", "tab\there",
    "bell\x07and nul\x00", "surrogate \udce9 byte", "Ünïcödé", "\u2028line sep",
    "=?utf-8?q?bad_=FF?=", "\"Name\" <a@b.example>, c@d.example",
])
def test_same_as_the_full_decoding(value: str | None) -> None:
    assert decode_header_value(value) == reference(value)


def test_same_as_the_full_decoding_random() -> None:
    rng = random.Random(18)
    alphabet = "ab =?qQbB\t\r\n\"(),:;<>@._ü\udce9é\x00\x7f\u00a0"
    for _ in range(20000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24)))
        assert decode_header_value(value) == reference(value), repr(value)
