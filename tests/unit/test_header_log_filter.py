"""Unit tests for filters/header_log.py: the header-only record."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from filters.base import FilterContext, Verdict
from filters.header_log import HeaderLogFilter, Settings, bounded, clean_text
from gateway.config import build_settings
from gateway.message import Direction, Mail
from gateway.pipeline import Result
from quarantine.store import canonical, chain_hash, iso
from tests.support.harness import make_message

CANARY = "CANARY-7f3e9a1b-body-content"


@pytest.fixture
def ctx() -> Iterator[FilterContext]:
    pool = ThreadPoolExecutor(2)
    yield FilterContext(
        hostname="mw.test",
        internal_domains=("example.com",),
        executor=pool,
        clock=lambda: datetime.now(UTC),
        max_message_size=10_000_000,
    )
    pool.shutdown()


def make_mail(raw: bytes, **kw: object) -> Mail:
    args: dict = dict(
        queue_id="Q1",
        mail_from="Sender@Ext.Test",
        rcpt_tos=("b@example.com", "C@Example.com"),
        raw=raw,
        client_addr="192.0.2.7",
        direction=Direction.INBOUND,
        received=datetime(2026, 11, 1, 10, 30, 0, 123456, tzinfo=UTC),
    )
    args.update(kw)
    return Mail(**args)


def record_for(ctx: FilterContext, raw: bytes, settings: Settings | None = None,
               extra: tuple[Verdict, ...] = (), **result_kw: object) -> dict:
    f = HeaderLogFilter(settings or Settings(), ctx)
    m = make_mail(raw)
    own = asyncio.run(f.check(m))
    verdicts = [*extra, own]
    kw: dict = dict(disposition="relayed", reply="250 2.0.0 Ok: queued as X", verdicts=verdicts)
    kw.update(result_kw)
    return f.log_record(m, Result(**kw), own)


def test_record_fields(ctx: FilterContext) -> None:
    raw = make_message(
        subject="=?utf-8?q?caf=C3=A9?= report",
        body=CANARY,
        attachments=[("a.pdf", "application/pdf", b"%PDF-1.4 " + CANARY.encode())],
        to="Bob <b@example.com>",
        headers={"Cc": "Dee <dee@Example.com>"},
    )
    personal = Verdict.relay("personal", personal=True,
                             log_facts={"marked_by": "subject: [personal]"})
    clam = Verdict.quarantine("clamav", "Eicar-Test-Signature", virus="Eicar-Test-Signature")
    rec = record_for(ctx, raw, extra=(clam, personal), disposition="quarantined",
                     reply="250 2.7.0 held", quarantine_id="20261101-ABC", elapsed=0.0123,
                     filter_times={"clamav": 0.01})
    assert rec["time"] == "2026-11-01T10:30:00.123456Z"
    assert rec["time"] == iso(datetime(2026, 11, 1, 10, 30, 0, 123456, tzinfo=UTC))
    assert rec["queue_id"] == "Q1" and rec["direction"] == "inbound"
    assert rec["client_addr"] == "192.0.2.7"
    assert rec["mail_from"] == "Sender@Ext.Test"
    assert rec["rcpt_tos"] == ["b@example.com", "C@Example.com"]
    assert rec["subject"] == "café report"
    assert rec["from"] == "Alice <a@ext.test>"
    assert rec["cc"] == "Dee <dee@Example.com>"
    assert rec["message_id"].startswith("<") and rec["date"]
    assert rec["size"] == len(raw)
    (att,) = rec["attachments"]
    assert att["name"] == "a.pdf" and att["declared_type"] == "application/pdf"
    payload = b"%PDF-1.4 " + CANARY.encode()
    assert att["size"] == len(payload)
    assert att["sha256"] == hashlib.sha256(payload).hexdigest()
    assert rec["personal"] is True
    assert rec["disposition"] == "quarantined" and rec["quarantine_id"] == "20261101-ABC"
    assert rec["elapsed_ms"] == 12.3 and rec["filter_ms"] == {"clamav": 10.0}
    by = {v["filter"]: v for v in rec["verdicts"]}
    assert by["clamav"] == {"filter": "clamav", "outcome": "quarantine",
                            "detail": "Eicar-Test-Signature", "virus": "Eicar-Test-Signature"}
    assert by["personal"]["personal"] is True
    assert by["header_log"] == {"filter": "header_log", "outcome": "relay"}
    assert rec["addresses"] == ["a@ext.test", "b@example.com", "c@example.com",
                                "dee@example.com", "sender@ext.test"]
    text = canonical(rec)
    assert CANARY not in text
    chain_hash("0" * 64, text)  # hashable: valid UTF-8 throughout


def test_data_minimisation(ctx: FilterContext) -> None:
    s = build_settings(
        Settings,
        {"log_subject": False, "log_from": False, "log_to": False, "log_cc": False,
         "log_message_id": False, "log_date": False, "log_attachments": False,
         "log_client_addr": False},
        "filters.header_log",
    )
    raw = make_message(subject="secret subject", attachments=[("x.txt", "text/plain", b"x")])
    rec = record_for(ctx, raw, s)
    for key in ("subject", "from", "to", "cc", "message_id", "date", "attachments",
                "client_addr"):
        assert key not in rec
    assert "secret subject" not in canonical(rec)
    # header addresses that are not logged are not indexed either
    assert rec["addresses"] == ["b@example.com", "c@example.com", "sender@ext.test"]


def test_true_types_from_attachment_types(ctx: FilterContext) -> None:
    raw = make_message(attachments=[("invoice.pdf", "application/pdf", b"MZ\x90\x00evil"),
                                    ("b.txt", "text/plain", b"plain")])
    digest = hashlib.sha256(b"MZ\x90\x00evil").hexdigest()
    at = Verdict.quarantine(
        "attachment_types", "invoice.pdf: executable",
        attachments=[{"name": "invoice.pdf", "true_type": "application/x-dosexec",
                      "sha256": digest, "category": "executable"},
                     {"name": "b.txt", "type": "text/plain", "size": 5}],
        true_types=True,
    )
    rec = record_for(ctx, raw, extra=(at,))
    a, b = rec["attachments"]
    assert a["type"] == "application/x-dosexec" and a["category"] == "executable"
    assert a["declared_type"] == "application/pdf" and a["sha256"] == digest
    assert b["type"] == "text/plain" and b["size"] == 5
    # the attachments fact is logged once, not repeated in the verdicts
    assert all("attachments" not in v for v in rec["verdicts"])


def test_unparseable_and_8bit_headers(ctx: FilterContext, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = ("Subject: Gr\u00fc\u00dfe aus K\u00f6ln\r\nFrom: J\u00f6rg <j@ext.test>\r\n"
           "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n").encode("utf-8")
    raw += b"X-Junk: \xff\xfe\r\n\r\n--b--\r\n"
    rec = record_for(ctx, raw)
    assert rec["subject"] == "Grüße aus Köln"
    assert rec["from"] == "Jörg <j@ext.test>"
    canonical(rec).encode("utf-8")

    from gateway import message

    monkeypatch.setattr(message, "MAX_PARTS", 0)
    rec = record_for(ctx, make_message(attachments=[("a", "text/plain", b"x")]))
    assert rec["attachments"] == []
    assert rec["attachments_error"].startswith("unparseable")


def test_no_own_verdict_falls_back_and_timeout_does_not_parse(ctx: FilterContext) -> None:
    f = HeaderLogFilter(Settings(), ctx)
    m = make_mail(make_message(attachments=[("a.bin", "application/octet-stream", b"123")]))
    rec = f.build_record(m, Result("relayed", "250 ok", []))
    assert rec["attachments"][0]["sha256"] == hashlib.sha256(b"123").hexdigest()
    failed = Verdict.tempfail("header_log", "timed out")
    rec = f.log_record(m, Result("tempfailed", "451", [failed]), failed)
    assert rec["attachments"] == [] and "timed out" in rec["attachments_error"]


def test_bounded_facts_never_keep_content() -> None:
    assert bounded(b"secret bytes", 100) == "<12 bytes>"
    assert bounded("x" * 5000, 100) == "x" * 99 + "\u2026"
    deep = {"a": {"b": {"c": {"d": {"e": "f"}}}}}
    assert bounded(deep, 100) == {"a": {"b": {"c": {"d": "<dict>"}}}}
    assert len(bounded(list(range(5000)), 100)) == 1001
    assert bounded(object(), 100).startswith("<object")
    assert clean_text("a\udcff", 10) == "a\ufffd"
    json.dumps(bounded({"x": {1, 2}}, 10))


def test_check_always_relays(ctx: FilterContext) -> None:
    f = HeaderLogFilter(Settings(), ctx)
    v = asyncio.run(f.check(make_mail(make_message())))
    assert v.filter == "header_log" and v.outcome.name == "RELAY"
    assert v.attachments == ()
