"""gateway.message.simple_address: the plain address values it takes give
the address email.utils.getaddresses finds; anything else is left to it."""

from __future__ import annotations

import email.utils
import random

import pytest

from filters.header_log import addresses
from gateway.message import simple_address
from quarantine.store import addresses_of


@pytest.mark.parametrize("value", [
    "a@b.example", "Bob Example <bob@example.com>", "<x@y.z>", "first.last+tag@sub.example.org",
    "A B C <a.b@c.d>", "o'neil@example.ie", "x=y@z.example",
])
def test_plain_values(value: str) -> None:
    found = email.utils.getaddresses([value])
    assert simple_address(value) == found[0][1] and len(found) == 1


@pytest.mark.parametrize("value", [
    "", "a@b, c@d", '"Quoted, Name" <a@b.example>', "a@b.example (comment)", "Name<a@b.c>",
    "a..b@c.d", "a@[192.0.2.1]", "<a@b.c> x", "  a@b.c", "a@b.c ", "group: a@b.c;", "ü@b.c",
])
def test_the_rest_is_left_to_the_parser(value: str) -> None:
    assert simple_address(value) is None


def test_random_values_agree_with_getaddresses() -> None:
    rng = random.Random(18)
    alphabet = "ab.@-+=#'!~Z9 <>\"(),:;[]\\\t"
    hits = 0
    for _ in range(100000):
        v = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 18)))
        r = rng.random()
        if r < 0.3:
            v = "Al ic <" + v
        elif r < 0.5:
            v = v + " <a@b.c>"
        a = simple_address(v)
        if a is not None:
            hits += 1
            found = email.utils.getaddresses([v])
            assert len(found) == 1 and found[0][1] == a, v
    assert hits > 100


def test_the_two_address_indexes_unchanged() -> None:
    values = ["Sender@Example.COM", "Alice Partner <alice@partner.example>", None,
              '"B, C" <b@c.example>, d@e.example', "Bob <bob@example.com>"]
    expected = set()
    for v in values:
        for _, addr in email.utils.getaddresses([v] if v else []):
            if addr.strip():
                expected.add(addr.strip().lower())
    assert addresses_of(values) == expected
    assert addresses(values) == sorted(expected)
