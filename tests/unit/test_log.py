"""Unit tests for quarantine/log.py against a real store in a temp dir:
date parsing, chain verification (every kind of edit is caught, a purge
with the anchor is not a break), paging, csv/jsonl encoding, stats.  The
tests through the protocol (``any_store``) run on both backends; the tamper
tests edit SQLite's tables (PostgreSQL's: tests/unit/test_postgres_store.py)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from filters.header_log import address_digest
from quarantine import log as logmod
from quarantine.store import GENESIS, Store, erased_record


def rec(i: int, **kw: Any) -> dict[str, Any]:
    addrs = [f"u{i % 3}@example.com", "shared@example.com"]
    r = {
        "time": f"2026-0{1 + i % 3}-1{i % 10}T10:00:00.000000Z",
        "queue_id": f"Q{i}",
        "direction": ("inbound", "outbound", "internal")[i % 3],
        "mail_from": f"u{i % 3}@example.com",
        "rcpt_tos": ["shared@example.com"],
        "subject": f"subject {i}",
        "personal": i % 2 == 0,
        "verdicts": [{"filter": "personal", "outcome": "relay", "personal": i % 2 == 0}],
        "attachments": [{"name": "a.pdf", "type": "application/pdf", "size": 3,
                         "sha256": "ab" * 32}],
        "address_digest": address_digest(addrs),
        "addresses": addrs,
    }
    r.update(kw)
    return r


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = await Store.open(tmp_path / "store")
    await s.write_log_batch([rec(i) for i in range(1, 11)])
    yield s
    await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The same ten records on either backend (for the tests that read the
    log through the protocol only; the tamper tests edit SQLite's tables)."""
    if request.param == "sqlite":
        s = await Store.open(tmp_path / "store")
    else:
        from gateway.config import StoreSettings
        from quarantine.postgres import PostgresStore

        dsn = request.getfixturevalue("pg_server").new_database()
        s = await PostgresStore.open(StoreSettings(backend="postgresql", dsn=dsn,
                                                   instance="gw1", path=str(tmp_path / "gw1")),
                                     create=True)
    await s.write_log_batch([rec(i) for i in range(1, 11)])
    yield s
    await s.close()


async def sql(store: Store, statement: str, *params: Any) -> None:
    """A statement on either backend (``?`` placeholders)."""
    dsn = getattr(store, "dsn", "")
    if not dsn:
        await store.db.execute(statement, params)
        return
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]


def test_parse_when() -> None:
    p = logmod.parse_when
    assert p("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert p("2026-11-01", end=True) == datetime(2026, 11, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert p("2026-11-01T10:30") == datetime(2026, 11, 1, 10, 30, tzinfo=UTC)
    assert p("2026-11-01T10:30:00Z", end=True) == datetime(2026, 11, 1, 10, 30, tzinfo=UTC)
    assert p("2026-11-01 10:30+02:00") == datetime(2026, 11, 1, 8, 30, tzinfo=UTC)
    for bad in ("", "yesterday", "2026-13-01", "01/11/2026"):
        with pytest.raises(ValueError, match="date"):
            p(bad)


async def test_verify_intact_and_empty(store: Store, tmp_path: Path) -> None:
    ok, bad, msg = await logmod.verify(store)
    assert ok and bad is None and "10 records (seq 1..10) from genesis" in msg
    empty = await Store.open(tmp_path / "empty")
    try:
        assert (await logmod.verify(empty)).ok
        await empty.audit("log export", filters={"a": (1, 2)}, detail={"rows": 3})
        assert (await logmod.verify_audit(empty)).ok
    finally:
        await empty.close()


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ("UPDATE log SET record = replace(record, 'subject 4', 'subject X') WHERE seq = 4",
         "hash does not match"),
        ("UPDATE log SET hash = 'ff' || substr(hash, 3) WHERE seq = 4", "hash does not match"),
        ("UPDATE log SET time = '2025-01-01T00:00:00.000000Z' WHERE seq = 4", "time column"),
        ("UPDATE log SET direction = 'internal' WHERE seq = 4 AND direction != 'internal'",
         "direction column"),
        ("DELETE FROM log_address WHERE seq = 4 AND address = 'shared@example.com'",
         "address index"),
        ("INSERT INTO log_address (seq, address) VALUES (4, 'victim@example.com')",
         "address index"),
        ("UPDATE log SET record = 'not json' WHERE seq = 4", "not valid JSON"),
    ],
)
async def test_verify_names_the_edited_record(store: Store, edit: str, why: str) -> None:
    await sql(store, edit)
    ok, bad, msg = await logmod.verify(store)
    assert not ok and bad == 4, msg
    assert "seq 4 (queue id Q4, time" in msg and why in msg
    assert "1 of 10 records fail" in msg


async def test_deleting_records(store: Store) -> None:
    await sql(store, "DELETE FROM log WHERE seq = 5")
    ok, bad, msg = await logmod.verify(store)
    assert not ok and bad == 6, msg
    await sql(store, "DELETE FROM log WHERE seq <= 6")
    ok, bad, _ = await logmod.verify(store)
    assert not ok and bad == 7


async def test_purge_with_anchor_keeps_the_chain_verifiable(store: Store) -> None:
    async with store.db.execute("SELECT hash FROM log WHERE seq = 3") as cur:
        (anchor,) = await cur.fetchone()  # type: ignore[misc]
    await sql(store, "DELETE FROM log WHERE seq <= 3")
    await sql(store, "DELETE FROM log_address WHERE seq <= 3")
    await store.set_meta("log_anchor", anchor)
    ok, bad, msg = await logmod.verify(store)
    assert ok, msg
    assert "7 records (seq 4..10) from anchor" in msg
    # new records keep chaining after a purge
    await store.write_log_batch([rec(11)])
    assert (await logmod.verify(store)).ok
    await store.set_meta("log_anchor", GENESIS)
    assert (await logmod.verify(store)).first_bad == 4


async def test_erased_record_is_accepted_and_named(store: Store) -> None:
    async def tombstone(seq: int, audit_seq: int) -> None:
        await sql(store, "UPDATE log SET record = ?, queue_id = '', direction = ''"
                  " WHERE seq = ?", erased_record("2026-11-23T00:00:00.000000Z", audit_seq), seq)
        await sql(store, "DELETE FROM log_address WHERE seq = ?", seq)

    audit_seq = await store.audit("erase", targets=["u0@example.com"],
                                  detail={"log_seqs": [3, 6]})
    await tombstone(6, audit_seq)
    ok, _, msg = await logmod.verify(store)
    assert ok and f"erased records: 1 (seq 6; erase audit seq {audit_seq})" in msg, msg
    # a tombstone its erase command does not list, or without an erase command
    await tombstone(7, audit_seq)
    ok, bad, msg = await logmod.verify(store)
    assert not ok and bad == 7 and "is not an erase command listing it" in msg, msg
    assert "1 of 10 records fail" in msg
    await tombstone(7, audit_seq + 5)
    ok, bad, msg = await logmod.verify(store)
    assert not ok and bad == 7 and f"audit row {audit_seq + 5} is not an erase" in msg, msg
    # a "tombstone" that carries anything else is an edit, not an erasure
    await sql(store, "UPDATE log SET record = ? WHERE seq = 7",
              json.dumps({"erased": True, "subject": "x"}))
    ok, bad, msg = await logmod.verify(store)
    assert not ok and bad == 7 and "hash does not match" in msg, msg


async def test_verify_audit_detects_edits(any_store: Store) -> None:
    store = any_store
    for i in range(3):
        await store.audit("log export", targets=["a@example.com"], filters={"since": None},
                          reason="audit 2026", detail={"rows": i})
    assert (await logmod.verify_audit(store)).ok
    await sql(store, "UPDATE audit SET reason = 'nothing to see' WHERE seq = 2")
    ok, bad, msg = await logmod.verify_audit(store)
    assert not ok and bad == 2 and "command 'log export'" in msg


async def test_pages_and_filters(any_store: Store) -> None:
    store = any_store
    q = logmod.LogQuery()
    pages = [p async for p in logmod.iter_pages(store, q, page_size=3)]
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [r.seq for p in pages for r in p] == list(range(1, 11))
    q = logmod.LogQuery(address="U1@example.com", direction="outbound", up_to=7)
    seqs = [r.seq async for p in logmod.iter_pages(store, q, page_size=1) for r in p]
    assert seqs == [1, 4, 7]
    assert await logmod.count(store, q) == 3
    q = logmod.LogQuery(since=logmod.parse_when("2026-02-01"),
                        until=logmod.parse_when("2026-02-28", end=True))
    assert [r.queue_id async for p in logmod.iter_pages(store, q) for r in p] == [
        "Q1", "Q4", "Q7", "Q10"]
    # breaking out early cancels the prefetch cleanly
    async for _ in logmod.iter_pages(store, logmod.LogQuery(), page_size=2):
        break


async def test_export_csv_and_jsonl(any_store: Store) -> None:
    store = any_store
    await store.write_log_batch([rec(11, subject="=cmd|' /C calc'!A0", rcpt_tos=["a", "b"],
                                     reply="250 ok\r\nline two")])
    out = io.BytesIO()
    res = await logmod.export(store, logmod.LogQuery(), "csv", out, page_size=4)
    assert res.rows == 11 and res.bytes == len(out.getvalue())
    rows = list(csv.DictReader(io.StringIO(out.getvalue().decode(), newline="")))
    assert len(rows) == 11
    last = rows[-1]
    assert last["subject"] == "'=cmd|' /C calc'!A0"
    assert last["rcpt_tos"] == "a; b" and last["reply"] == "250 ok\r\nline two"
    assert last["attachment_names"] == "a.pdf" and last["attachment_types"] == "application/pdf"
    assert last["personal"] == "false" and last["verdicts"] == "personal:relay personal=false"
    out = io.BytesIO()
    seen: list[int] = []
    res = await logmod.export(store, logmod.LogQuery(up_to=5), "jsonl", out, seen.append, 2)
    objs = [json.loads(line) for line in out.getvalue().decode().splitlines()]
    assert [o["seq"] for o in objs] == [1, 2, 3, 4, 5] and seen == [2, 2, 1]
    assert objs[0]["queue_id"] == "Q1" and len(objs[0]["hash"]) == 64
    assert "addresses" not in objs[0]


def test_jsonl_line_and_cells() -> None:
    row = logmod.Row(1, "t", "q", "inbound", '{"a":1}', "h")
    assert json.loads(logmod.jsonl_line(row)) == {"seq": 1, "hash": "h", "a": 1}
    assert json.loads(logmod.jsonl_line(row._replace(record="{}"))) == {"seq": 1, "hash": "h"}
    assert logmod._cell("+1") == "'+1" and logmod._cell("@x") == "'@x"
    assert logmod._cell(None) == "" and logmod._cell(True) == "true" and logmod._cell(3) == "3"


async def test_stats(any_store: Store) -> None:
    store = any_store
    rows = await logmod.stats(store, logmod.LogQuery())
    shared = {r.month: (r.messages, r.personal) for r in rows if r.address == "shared@example.com"}
    assert shared == {"2026-01": (3, 1), "2026-02": (4, 2), "2026-03": (3, 2)}
    only = await logmod.stats(store, logmod.LogQuery(address="u0@example.com"))
    assert {r.address for r in only} == {"u0@example.com"}
    assert sum(r.messages for r in only) == 3


async def test_verify_after_the_real_retention_purge(any_store: Store, tmp_path: Path) -> None:
    store = any_store
    from quarantine.retention import purge
    from quarantine.store import iso
    from tests.support.harness import test_config as config_for

    now = iso(datetime.now(UTC))
    await store.write_log_batch([rec(i, time=now) for i in (11, 12, 13)])
    summary = await purge(store, config_for(tmp_path, "127.0.0.1:1"), dry_run=False,
                          command="purge")
    assert summary["log_records"] == 10
    ok, _, msg = await logmod.verify(store)
    assert ok and "3 records (seq 11..13)" in msg, msg
    assert "from anchor" in msg or "1 instance chains (gw1)" in msg, msg
    assert (await logmod.verify_audit(store)).ok
    await store.write_log_batch([rec(14, time=now)])
    assert (await logmod.verify(store)).ok
