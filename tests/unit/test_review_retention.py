"""quarantine/review.py and quarantine/retention.py against a real store in a
temp dir, with an injected clock (no subprocesses: the CLI itself is covered
by tests/integration/test_quarantine_review.py).

Proves: list filters, paging and newest-first order; the release rules
(original recipients only, clamav needs force); delete leaves a tombstone
without anything personal and no file; retention removes expired items,
files and log/audit prefixes (moving the chain anchors, so both chains still
verify), keeps held items, stops the log prefix at a newer record, sweeps
orphan files, and leaves no trace of purged data in the database or WAL
files; erasure turns log records into tombstones that ``log verify``
accepts.  The tests that go through the protocol (``any_store``) run on both
backends; the ones that look at SQLite's files, meta table and WAL run on
SQLite (their PostgreSQL counterparts: tests/unit/test_postgres_store.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from quarantine import files, retention, review
from quarantine.log import verify, verify_audit
from quarantine.store import DB_NAME, GENESIS, Store, iso

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = await Store.open(tmp_path / "store", clock=clock)
    yield s
    await s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Any:
    """A store of either backend (for tests that go through the protocol only)."""
    if request.param == "sqlite":
        s = await Store.open(tmp_path / "store", clock=clock)
    else:
        from gateway.config import StoreSettings
        from quarantine.postgres import PostgresStore

        dsn = request.getfixturevalue("pg_server").new_database()
        s = await PostgresStore.open(StoreSettings(backend="postgresql", dsn=dsn,
                                                   instance="gw1", path=str(tmp_path / "gw1")),
                                     create=True, clock=clock)
    yield s
    await s.close()


def config(tmp_path: Path, **store: Any) -> Any:
    return parse_config(
        {"gateway": {"internal_domains": ["example.com"]},
         "store": {"path": str(tmp_path / "store"), **store}, "filters": {"chain": []}}
    )


async def hold_item(store: Store, clock: Clock, received: datetime, *, subject: str = "hi",
                    reason: str = "attachment_types", sender: str = "a@ext.test",
                    rcpts: tuple[str, ...] = ("b@example.com",), personal: bool = False,
                    verdicts: list[dict[str, Any]] | None = None) -> str:
    clock.now = received
    raw = (f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n"
           f"body of {subject}\r\n").encode()
    return await store.quarantine(
        raw=raw, queue_id="Q" + subject[:8].replace(" ", ""), received=received,
        direction="inbound", client_addr="192.0.2.1", helo="mx.test", mail_from=sender,
        rcpt_tos=list(rcpts), headers={"from": sender, "to": ", ".join(rcpts), "subject": subject},
        reason=reason, detail="x.exe: executable", personal=personal,
        verdicts=verdicts or [{"filter": reason.split(",")[0], "outcome": "quarantine"}],
    )


async def log_record(store: Store, when: datetime, subject: str, *addrs: str) -> None:
    await store.write_log_batch([{
        "time": iso(when), "queue_id": "Q" + subject[:6], "direction": "inbound",
        "subject": subject, "addresses": list(addrs),
    }])


async def rows(store: Store, sql: str, *args: Any) -> list[Any]:
    """A query on either backend (``?`` placeholders; PostgreSQL through its
    own connection to the store's database)."""
    dsn = getattr(store, "dsn", "")
    if not dsn:
        async with store.db.execute(sql, args) as cur:
            return list(await cur.fetchall())
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]
        return list(await cur.fetchall()) if cur.description else []


async def body_exists(store: Store, item: dict[str, Any]) -> bool:
    """Whether the item's body is still stored (a file, or a ``body`` row)."""
    if getattr(store, "dsn", ""):
        return bool(await rows(store, "SELECT 1 FROM body WHERE path = ?", item["path"]))
    return files.message_path(store.root, item["path"]).exists()


# ----------------------------------------------------------------- list


async def test_list_newest_first_filters_and_pages(any_store: Store, clock: Clock) -> None:
    store = any_store
    ids = []
    for n in range(7):
        ids.append(await hold_item(
            store, clock, T0 + timedelta(hours=n), subject=f"s{n}",
            reason="attachment_types,clamav" if n == 3 else "attachment_types",
            rcpts=("b@example.com", "c@example.com") if n % 2 else ("b@example.com",),
        ))
    items, more = await review.list_items(store, review.ListQuery(limit=3))
    assert [i["id"] for i in items] == ids[::-1][:3] and more
    items, more = await review.list_items(store, review.ListQuery(limit=3, page=3))
    assert [i["id"] for i in items] == [ids[0]] and not more
    found, _ = await review.list_items(store, review.ListQuery(reason="clamav"))
    assert [i["id"] for i in found] == [ids[3]]
    # a filter name matches whole names only (and LIKE wildcards are literal)
    assert (await review.list_items(store, review.ListQuery(reason="attach")))[0] == []
    assert (await review.list_items(store, review.ListQuery(reason="attachment%")))[0] == []
    found, _ = await review.list_items(store, review.ListQuery(address="c@example.com"))
    assert [i["id"] for i in found] == [ids[5], ids[3], ids[1]]
    found, _ = await review.list_items(store, review.ListQuery(
        since=iso(T0 + timedelta(hours=2)), until=iso(T0 + timedelta(hours=4))))
    assert [i["id"] for i in found] == [ids[4], ids[3], ids[2]]
    await rows(store, "UPDATE quarantine SET state = 'released' WHERE id = ?", ids[6])
    assert ids[6] not in [i["id"] for i in (await review.list_items(store, review.ListQuery()))[0]]
    assert ids[6] in [i["id"] for i in (await review.list_items(
        store, review.ListQuery(state="all")))[0]]


async def test_list_uses_the_received_index(store: Store) -> None:
    plan = await rows(store, "EXPLAIN QUERY PLAN SELECT id FROM quarantine WHERE state = ?"
                             " ORDER BY received DESC LIMIT 51", "held")
    text = " ".join(str(r[-1]) for r in plan)
    assert "quarantine_received" in text and "TEMP B-TREE" not in text


async def test_list_falls_back_to_a_scan_when_matches_are_sparse(
    any_store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = any_store
    ids = [await hold_item(store, clock, T0 + timedelta(minutes=n), subject=f"s{n}",
                           reason="clamav" if n in (1, 2) else "attachment_types")
           for n in range(12)]
    await rows(store, "UPDATE quarantine SET state = 'released' WHERE id IN (?, ?, ?)",
               ids[0], ids[3], ids[11])
    expected = {}
    for q in (review.ListQuery(state="released", limit=2),
              review.ListQuery(state="released", limit=2, page=2),
              review.ListQuery(reason="clamav"), review.ListQuery(limit=5, page=2),
              review.ListQuery(state="released", limit=1, page=3),
              review.ListQuery(state="released", until=iso(T0 + timedelta(minutes=5)))):
        expected[q] = await review.list_items(store, q)
    monkeypatch.setattr(review, "LIST_WINDOW", 2)
    for q, result in expected.items():
        assert await review.list_items(store, q) == result, q
    released = expected[review.ListQuery(state="released", limit=2)]
    assert [i["id"] for i in released[0]] == [ids[11], ids[3]] and released[1]
    assert [i["id"] for i in expected[review.ListQuery(state="released", limit=2, page=2)][0]] \
        == [ids[0]]
    assert [i["id"] for i in expected[review.ListQuery(reason="clamav")][0]] == [ids[2], ids[1]]


async def test_get_item_validates_ids(any_store: Store) -> None:
    store = any_store
    with pytest.raises(review.Refusal) as exc:
        await review.get_item(store, "../../etc/passwd")
    assert exc.value.code == 2
    with pytest.raises(review.Refusal) as exc:
        await review.get_item(store, "20260101-ABCDEF")
    assert exc.value.code == 1 and "no quarantine item" in exc.value.message


# -------------------------------------------------------------- release


async def test_release_rules(any_store: Store, clock: Clock) -> None:
    store = any_store
    qid = await hold_item(store, clock, T0, rcpts=("Bob@Example.com", "c@example.com"))
    item = await review.get_item(store, qid)
    assert review.release_recipients(item, []) == ["Bob@Example.com", "c@example.com"]
    assert review.release_recipients(item, ["bob@example.com"]) == ["Bob@Example.com"]
    with pytest.raises(review.Refusal) as exc:
        review.release_recipients(item, ["mallory@evil.test"])
    assert exc.value.code == 2 and "not an original recipient" in exc.value.message
    assert review.release_refusal(item, force=False) is None

    virus = await hold_item(store, clock, T0, reason="clamav", verdicts=[
        {"filter": "clamav", "outcome": "quarantine", "virus": "Eicar-Test-Signature"}])
    vitem = await review.get_item(store, virus)
    refusal = review.release_refusal(vitem, force=False)
    assert refusal is not None and refusal.code == 2 and "Eicar" in refusal.message
    assert review.release_refusal(vitem, force=True) is None
    # an attachment_types hold that clamav could not scan also needs --force
    unscanned = dict(item, verdicts=[{"filter": "clamav", "outcome": "quarantine",
                                      "scan": "unscanned"}])
    assert review.infected(unscanned)

    await review.mark_released(store, qid)
    released = await review.get_item(store, qid)
    assert released["state"] == "released"
    refusal = review.release_refusal(released, force=False)
    assert refusal is not None and "already released" in refusal.message


async def test_read_message_checks_integrity(store: Store, clock: Clock) -> None:
    qid = await hold_item(store, clock, T0)
    item = await review.get_item(store, qid)
    assert b"body of hi" in await review.read_message(store, item)
    files.message_path(store.root, item["path"]).write_bytes(b"altered")
    with pytest.raises(review.IntegrityError, match="SHA-256"):
        await review.read_message(store, item)


def test_clean_text_and_addresses() -> None:
    assert review.clean_text("a\x1b[31mred\x07\r\nline\tx") == "a\ufffd[31mred\ufffd\nline\tx"
    assert review.normalize_address(" <Bob@Example.COM> ") == "bob@example.com"
    for bad in ("", "a b@x", "x\n@y"):
        with pytest.raises(ValueError):
            review.normalize_address(bad)


def test_describe_lists_attachments_and_hides_the_body_unless_asked() -> None:
    raw = (b"From: a@ext.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nsecret text\x1b]0;x\x07\r\n--b\r\n"
           b"Content-Type: application/octet-stream\r\n"
           b"Content-Disposition: attachment; filename=\"run.exe\"\r\n\r\nMZ\r\n--b--\r\n")
    item = {"queue_id": "Q", "mail_from": "a@ext.test", "rcpt_tos": ["b@example.com"],
            "client_addr": "192.0.2.1", "direction": "inbound",
            "received": "2026-01-10T12:00:00.000000Z", "helo": ""}
    view = review.describe(item, raw, body=False)
    assert ("Subject", "café") in view.headers
    assert [a["filename"] for a in view.attachments] == ["run.exe"]
    assert view.body == []
    view = review.describe(item, raw, body=True)
    assert "secret text" in view.body[0] and "\x1b" not in view.body[0]


# ----------------------------------------------------------- delete/hold


async def test_delete_leaves_a_tombstone_without_personal_data(any_store: Store,
                                                               clock: Clock) -> None:
    store = any_store
    qid = await hold_item(store, clock, T0, subject="private matter", sender="x@ext.test")
    item = await review.get_item(store, qid)
    await review.set_hold(store, qid, True)
    with pytest.raises(review.Refusal, match="legal hold"):
        await review.delete_item(store, qid)
    assert await body_exists(store, item)
    await review.set_hold(store, qid, False)
    assert await review.delete_item(store, qid) is True
    assert not await body_exists(store, item)
    gone = await review.get_item(store, qid)
    assert gone["state"] == "deleted"
    assert gone["subject"] is None and gone["mail_from"] == "" and gone["rcpt_tos"] == []
    assert gone["hdr_from"] is None and gone["client_addr"] == "" and gone["verdicts"] == []
    assert await rows(store, "SELECT * FROM quarantine_address WHERE id = ?", qid) == []
    with pytest.raises(review.IntegrityError, match="deleted"):
        await review.read_message(store, gone)


# ------------------------------------------------------------ retention


async def test_purge_removes_expired_data_keeps_holds_and_chains(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    cfg = config(tmp_path, retention_days=90, audit_retention_days=365)
    old = await hold_item(store, clock, T0, subject="old one")
    old_held = await hold_item(store, clock, T0 + timedelta(minutes=1), subject="old held")
    new = await hold_item(store, clock, T0 + timedelta(days=60), subject="newer")
    await review.set_hold(store, old_held, True)
    for n in range(5):
        await log_record(store, T0 + timedelta(days=n), f"rec{n}", "a@ext.test")
    await log_record(store, T0 + timedelta(days=80), "recent", "a@ext.test")
    clock.now = T0
    await store.audit("quarantine show", targets=[old], reason="early")
    old_file = files.message_path(store.root, (await review.get_item(store, old))["path"])
    held_file = files.message_path(store.root, (await review.get_item(store, old_held))["path"])

    clock.now = T0 + timedelta(days=100)
    summary = await retention.purge(store, cfg, dry_run=True, command="purge --dry-run")
    assert (summary["quarantine_items"], summary["kept_under_hold"], summary["log_records"],
            summary["audit_rows"]) == (1, 1, 5, 0)
    assert old_file.exists()  # dry run changes nothing

    summary = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert summary["quarantine_items"] == 1 and summary["files_removed"] == 1
    assert summary["log_records"] == 5 and summary["checkpoint"] == "truncated"
    assert not old_file.exists() and held_file.exists()
    remaining = {r[0] for r in await rows(store, "SELECT id FROM quarantine")}
    assert remaining == {old_held, new}
    assert [r[0] for r in await rows(store, "SELECT seq FROM log")] == [6]
    assert await rows(store, "SELECT seq FROM log_address WHERE seq <= 5") == []
    assert await store.get_meta("log_anchor", GENESIS) != GENESIS
    assert (await verify(store)).ok
    # both purge runs were audited, with their counts, before deleting
    audit = await review.audit_rows(store)
    assert [r["command"] for r in audit][-2:] == ["purge --dry-run", "purge"]
    assert audit[-1]["detail"]["quarantine_items"] == 1

    # a year later the audit rows of that time go too; the chain still verifies
    clock.now = T0 + timedelta(days=400)
    summary = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert summary["audit_rows"] >= 1
    assert all(r["reason"] != "early" for r in await review.audit_rows(store))
    assert await store.get_meta("audit_anchor", GENESIS) != GENESIS
    assert (await verify_audit(store)).ok
    assert old_held in {r[0] for r in await rows(store, "SELECT id FROM quarantine")}


async def test_log_prefix_stops_at_a_newer_record(tmp_path: Path, any_store: Store,
                                                  clock: Clock) -> None:
    store = any_store
    cfg = config(tmp_path, retention_days=30)
    await log_record(store, T0, "a1")
    await log_record(store, T0 + timedelta(days=20), "b2")  # written out of order
    await log_record(store, T0 + timedelta(days=1), "c3")
    clock.now = T0 + timedelta(days=32)
    summary = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert summary["log_records"] == 1
    assert (await verify(store)).ok
    clock.now = T0 + timedelta(days=51)
    summary = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert summary["log_records"] == 2
    assert await rows(store, "SELECT seq FROM log") == []
    assert (await verify(store)).ok
    # the writer continues the chain from the anchor
    await log_record(store, clock.now, "d4")
    assert (await verify(store)).ok


async def test_purge_sweeps_orphan_files_and_empty_dirs(tmp_path: Path, store: Store,
                                                        clock: Clock) -> None:
    cfg = config(tmp_path, retention_days=90)
    held = await hold_item(store, clock, T0, subject="held")
    await review.set_hold(store, held, True)
    day = store.root / "messages" / "2026" / "01" / "10"
    (day / "20260110-0000DEADBEEF.eml").write_bytes(b"orphan after a crash")
    (day / ".20260110-0000FEEDFACE.eml.tmp").write_bytes(b"half written")
    other = store.root / "messages" / "2025" / "12" / "01"
    files.ensure_dir(other)
    (other / "20251201-00000000AAAA.eml").write_bytes(b"orphan")
    clock.now = T0 + timedelta(days=100)
    summary = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert summary["orphan_files_removed"] == 3
    assert sorted(p.name for p in day.iterdir()) == [f"{held}.eml"]
    assert not (store.root / "messages" / "2025").exists()


async def test_purged_data_leaves_no_trace_in_database_or_wal(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    cfg = config(tmp_path, retention_days=90)
    marker = "zqxj-unique-subject-7731"
    for n in range(20):
        await hold_item(store, clock, T0 + timedelta(seconds=n), subject=f"{marker}-{n}")
        await log_record(store, T0 + timedelta(seconds=n), f"{marker}-{n}", "a@ext.test")
    await hold_item(store, clock, T0 + timedelta(days=80), subject="keeper")

    def stored() -> bytes:
        return b"".join(p.read_bytes() for p in store.root.glob(DB_NAME + "*"))

    assert marker.encode() in stored()  # the check below can see it
    clock.now = T0 + timedelta(days=100)
    await retention.purge(store, cfg, dry_run=False, command="purge")
    assert marker.encode() not in stored()
    assert (store.root / (DB_NAME + "-wal")).stat().st_size == 0


# -------------------------------------------------------------- erasure


async def test_erase_tombstones_log_records_and_keeps_the_chain(
    any_store: Store, clock: Clock
) -> None:
    store = any_store
    await log_record(store, T0, "one", "bob@example.com", "a@ext.test")
    await log_record(store, T0 + timedelta(seconds=1), "two", "carol@example.com")
    await log_record(store, T0 + timedelta(seconds=2), "three", "bob@example.com")
    keep = await hold_item(store, clock, T0, subject="held", rcpts=("bob@example.com",))
    await review.set_hold(store, keep, True)
    gone = await hold_item(store, clock, T0, subject="gone", rcpts=("bob@example.com",))
    gone_item = await review.get_item(store, gone)
    subject = await review.find_subject(store, "bob@example.com")
    assert subject.log_seqs == [1, 3] and set(subject.item_ids) == {keep, gone}
    seq = await store.audit("erase", targets=["bob@example.com"], reason="request",
                            detail={"log_seqs": subject.log_seqs})
    result = await review.erase(store, subject, audit_seq=seq)
    assert result["log_records"] == 2 and result["quarantine_items"] == 1
    assert result["kept_under_hold"] == [keep]
    assert not await body_exists(store, gone_item)
    records = [json.loads(r[0]) for r in await rows(store, "SELECT record FROM log ORDER BY seq")]
    assert records[0] == {"erased": True, "erased_at": iso(clock.now), "audit_seq": seq}
    assert records[1]["subject"] == "two"
    result = await verify(store)
    assert result.ok and "erased" in result.message and "1, 3" in result.message
    again = await review.find_subject(store, "bob@example.com")
    assert again.log_seqs == [] and again.item_ids == [keep]
