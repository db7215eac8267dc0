"""Unit tests for filters/personal.py: what counts as personal mail."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from filters.base import AddHeader, FilterContext, Outcome, RemoveHeader
from filters.personal import PersonalFilter, Settings, strip_reply_prefixes
from gateway.config import ConfigError, build_settings
from gateway.message import Direction, Mail
from gateway.rewrite import apply_edits


def ctx() -> FilterContext:
    return FilterContext(
        hostname="mw.test",
        internal_domains=("example.com",),
        executor=ThreadPoolExecutor(1),
        clock=lambda: datetime.now(UTC),
        max_message_size=10_000_000,
    )


def mail(headers: str, body: str = "hello\r\n") -> Mail:
    raw = ("From: a@ext.test\r\nTo: b@example.com\r\n" + headers + "\r\n" + body).encode(
        "utf-8"
    )
    return Mail(
        queue_id="Q1",
        mail_from="a@ext.test",
        rcpt_tos=("b@example.com",),
        raw=raw,
        client_addr="192.0.2.1",
        direction=Direction.INBOUND,
        received=datetime.now(UTC),
    )


def check(headers: str, settings: Settings | None = None):
    f = PersonalFilter(settings or Settings(), ctx())
    return asyncio.run(f.check(mail(headers)))


@pytest.mark.parametrize(
    "headers",
    [
        "Sensitivity: Personal\r\n",
        "Sensitivity: private\r\n",
        "Sensitivity:   PRIVATE  \r\n",
        "X-Classification: Personal\r\n",
        "Classification: private; scope=me\r\n",
        "Subject: [Personal] dinner\r\n",
        "Subject: personal: dinner\r\n",
        "Subject: Private: doctor\r\n",
        "Subject: Re: [personal] dinner\r\n",
        "Subject: RE: Fwd: AW: WG: Fw: private: x\r\n",
        "Subject: Re[2]: Re:Private: x\r\n",
        "Subject: =?utf-8?q?Re=3A_=5BPersonal=5D_d=C3=AEner?=\r\n",
        "Subject: =?utf-8?b?UHJpdmF0ZTogYmlsbA==?=\r\n",
        "Subject: Re:\r\n =?utf-8?q?personal=3A?= folded\r\n",
    ],
)
def test_personal_markings(headers: str) -> None:
    v = check(headers)
    assert v.outcome is Outcome.RELAY
    assert v.facts["personal"] is True
    assert v.facts["marked_by"]
    assert v.edits == (AddHeader("X-Mailwarden-Personal", "yes"),)


@pytest.mark.parametrize(
    "headers",
    [
        "",
        "Subject: hello\r\n",
        "Subject: Personally speaking\r\n",
        "Subject: my personal: notes\r\n",  # marker not at the start
        "Subject: Re: the [personal] question\r\n",
        "Sensitivity: Company-Confidential\r\n",
        "Sensitivity: Normal\r\n",
        "X-Classification: Internal\r\n",
        "Importance: private\r\n",
    ],
)
def test_not_personal(headers: str) -> None:
    v = check(headers)
    assert v.outcome is Outcome.RELAY
    assert v.facts["personal"] is False
    assert v.edits == ()


def test_forged_header_is_removed_and_never_a_marking() -> None:
    v = check("X-Mailwarden-Personal: yes\r\nSubject: hi\r\n")
    assert v.facts["personal"] is False
    assert v.edits == (RemoveHeader("X-Mailwarden-Personal"),)
    m = mail("X-Mailwarden-Personal: yes\r\nSubject: hi\r\n")
    assert b"X-Mailwarden-Personal" not in apply_edits(m.raw, v.edits)

    v = check("X-Mailwarden-Personal: no\r\nSensitivity: Private\r\n")
    out = apply_edits(mail("X-Mailwarden-Personal: no\r\nSensitivity: Private\r\n").raw, v.edits)
    assert out.count(b"X-Mailwarden-Personal") == 1
    assert out.startswith(b"X-Mailwarden-Personal: yes\r\n")


def test_configured_values() -> None:
    s = build_settings(
        Settings,
        {
            "subject_markers": ["PRIVAT:"],
            "sensitivity_values": ["Confidential"],
            "classification_values": ["staff-only"],
        },
        "filters.personal",
    )
    assert check("Subject: Re: privat: x\r\n", s).facts["personal"] is True
    assert check("Subject: [personal] x\r\n", s).facts["personal"] is False
    assert check("Sensitivity: confidential\r\n", s).facts["personal"] is True
    assert check("X-Classification: Staff-Only\r\n", s).facts["personal"] is True


def test_empty_marker_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="filters.personal.subject_markers"):
        build_settings(Settings, {"subject_markers": ["  "]}, "filters.personal")


def test_strip_reply_prefixes() -> None:
    assert strip_reply_prefixes("Re: Fwd:  RE[3]: Hi") == "Hi"
    assert strip_reply_prefixes("Reply: x") == "Reply: x"
    assert strip_reply_prefixes("") == ""
