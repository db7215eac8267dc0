"""The store with ``[store] key_file`` set: sealed bodies, holds, purge, on
both backends (SQLite: sealed files, keys in ``keys/datakeys.db``; PostgreSQL:
sealed ``body`` rows, keys in the key database ``<dbname>_keys``).

Proves: ``open_store`` builds the key ring from ``key_file`` and the store
writes quarantined files sealed under the key of the day of receipt (the
``sha256`` column stays the plaintext's, so release's integrity check holds),
reads them back, still reads files kept before encryption was switched on,
and refuses a sealed file when ``key_file`` is unset; a hold re-seals the file
under the item's own key, which outlives the period's key and goes when the
item is deleted; the purge destroys the expired periods' keys after their
rows and files, reports them with their fingerprints (also in its audit row),
keeps held items readable, and a dry run destroys nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.config import parse_config
from quarantine import crypto, files, retention, review
from quarantine.crypto import KeyDestroyed, write_kek
from quarantine.store import Store, StoreError, open_store

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``[store]`` keys choosing the backend (PostgreSQL: a fresh database;
    its key database is made next to it on first open)."""
    if request.param == "sqlite":
        return {}
    dsn = request.getfixturevalue("pg_server").new_database()
    return {"backend": "postgresql", "dsn": dsn, "instance": "gw1"}


def config(tmp_path: Path, key_file: str, backend: dict[str, Any], **store: Any) -> Any:
    return parse_config(
        {"gateway": {"internal_domains": ["example.com"]},
         "store": {"path": str(tmp_path / "store"), "key_file": key_file, **backend, **store},
         "filters": {"chain": []}}
    )


@pytest.fixture
def kek_file(tmp_path: Path) -> str:
    write_kek(tmp_path / "kek")
    return str(tmp_path / "kek")


@pytest.fixture
async def store(tmp_path: Path, clock: Clock, kek_file: str,
                backend: dict[str, Any]) -> AsyncIterator[Store]:
    s = await open_store(config(tmp_path, kek_file, backend).store, create=True, clock=clock)
    yield s
    await s.close()


def raw_message(subject: str) -> bytes:
    return (f"From: a@ext.test\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\n"
            f"the words of {subject}\r\n").encode()


async def put(store: Store, clock: Clock, received: datetime, subject: str) -> str:
    clock.now = received
    return await store.quarantine(
        raw=raw_message(subject), queue_id="Q1", received=received, direction="inbound",
        client_addr="192.0.2.1", helo="mx.test", mail_from="a@ext.test",
        rcpt_tos=["b@example.com"], headers={"from": "a@ext.test", "subject": subject},
        reason="attachment_types", detail="x.exe", personal=False, verdicts=[],
    )


async def stored_bytes(store: Store, qid: str) -> bytes:
    """The body as the backend keeps it: the message file, or the ``body`` row."""
    item = await store.get_item(qid)
    assert item is not None
    dsn = getattr(store, "dsn", "")
    if dsn:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT data FROM body WHERE path = %s", (item["path"],))
            row = await cur.fetchone()
        assert row is not None
        return bytes(row[0])
    return files.message_path(store.root, item["path"]).read_bytes()


def keys_checkpoint(backend: dict[str, Any]) -> str:
    """What the key store reports after destroying keys: SQLite truncates its
    WAL, PostgreSQL rewrites the key table (VACUUM FULL)."""
    return "vacuumed" if backend else "truncated"


async def test_files_are_sealed_under_the_day_of_receipt(store: Store, clock: Clock) -> None:
    qid = await put(store, clock, T0, "sealed one")
    on_disk = await stored_bytes(store, qid)
    assert b"the words of sealed one" not in on_disk
    assert crypto.parse_blob(on_disk).key_id == "2026-01-10"
    item = await review.get_item(store, qid)
    assert item["sha256"] == hashlib.sha256(raw_message("sealed one")).hexdigest()
    assert await review.read_message(store, item) == raw_message("sealed one")
    assert item["size"] == len(raw_message("sealed one"))
    ok, text = await store.check()
    assert ok and "bodies encrypted" in text and "1 live data keys" in text


async def test_plaintext_items_from_before_still_read(tmp_path: Path, clock: Clock,
                                                      kek_file: str,
                                                      backend: dict[str, Any]) -> None:
    plain = await open_store(config(tmp_path, "", backend).store, create=True, clock=clock)
    try:
        old = await put(plain, clock, T0, "from before")
    finally:
        await plain.close()
    # switched on by `serve` (PostgreSQL: it makes the key database then)
    sealed = await open_store(config(tmp_path, kek_file, backend).store, clock=clock,
                              create=bool(backend))
    try:
        new = await put(sealed, clock, T0, "from after")
        assert await review.read_message(sealed, await review.get_item(sealed, old)) \
            == raw_message("from before")
        assert await review.read_message(sealed, await review.get_item(sealed, new)) \
            == raw_message("from after")
    finally:
        await sealed.close()
    # without the key file a sealed body is refused, in one clear line
    plain = await open_store(config(tmp_path, "", backend).store, clock=clock)
    try:
        with pytest.raises(StoreError, match="encrypted and store.key_file is not set"):
            await review.read_message(plain, await review.get_item(plain, new))
    finally:
        await plain.close()


async def test_a_bad_key_file_stops_the_store_from_opening(tmp_path: Path, clock: Clock,
                                                           kek_file: str,
                                                           backend: dict[str, Any]) -> None:
    Path(kek_file).chmod(0o644)
    with pytest.raises(StoreError, match=f"key file {kek_file}: mode 0644"):
        await open_store(config(tmp_path, kek_file, backend).store, create=True, clock=clock)


async def test_hold_reseals_under_its_own_key_until_deleted(store: Store, clock: Clock) -> None:
    qid = await put(store, clock, T0, "evidence")
    await review.set_hold(store, qid, True)
    assert crypto.parse_blob(await stored_bytes(store, qid)).key_id == f"hold:{qid}"
    assert store.keyring is not None
    await store.keyring.destroy(["2026-01-10"])  # the period's key goes; the item stays readable
    assert await review.read_message(store, await review.get_item(store, qid)) \
        == raw_message("evidence")
    await review.set_hold(store, qid, True)  # again: nothing to do
    await review.set_hold(store, qid, False)
    assert await review.delete_item(store, qid)
    record = await store.keyring.keys.get(f"hold:{qid}")
    assert record is not None and record.wrapped is None  # destroyed with the item


async def test_purge_destroys_expired_period_keys_and_reports_them(
    tmp_path: Path, store: Store, clock: Clock, kek_file: str, backend: dict[str, Any]
) -> None:
    cfg = config(tmp_path, kek_file, backend, retention_days=90)
    old = await put(store, clock, T0, "old")
    older = await put(store, clock, T0 - timedelta(days=1), "older")
    held = await put(store, clock, T0 + timedelta(minutes=5), "held")
    new = await put(store, clock, T0 + timedelta(days=60), "new")
    await review.set_hold(store, held, True)
    blobs = {q: await stored_bytes(store, q) for q in (old, older, held, new)}
    assert store.keyring is not None
    before = {r.key_id: r.fingerprint for r in await store.keyring.records()}

    clock.now = T0 + timedelta(days=100)
    dry = await retention.purge(store, cfg, dry_run=True, command="purge --dry-run")
    assert [p["key_id"] for p in dry["periods_destroyed"]] == ["2026-01-09", "2026-01-10"]
    assert await store.keyring.open(blobs[old], old.encode()) == raw_message("old")  # untouched

    report = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert report["encryption"] is True and report["kek_fingerprint"]
    assert [(p["key_id"], p["fingerprint"]) for p in report["periods_destroyed"]] == [
        ("2026-01-09", before["2026-01-09"]), ("2026-01-10", before["2026-01-10"])]
    assert report["quarantine_items"] == 2 and report["kept_under_hold"] == 1
    assert report["held_items"] == [held] and report["keys_checkpoint"] == keys_checkpoint(backend)
    for qid in (old, older):
        with pytest.raises(KeyDestroyed):
            await store.keyring.open(blobs[qid], qid.encode())
    # the held item and the newer one are still readable
    assert await review.read_message(store, await review.get_item(store, held)) \
        == raw_message("held")
    assert await review.read_message(store, await review.get_item(store, new)) \
        == raw_message("new")
    # the purge's audit row carries the (planned) report
    row = (await review.audit_rows(store))[-1]
    assert row["command"] == "purge"
    assert [p["fingerprint"] for p in row["detail"]["periods_destroyed"]] == [
        before["2026-01-09"], before["2026-01-10"]]

    # unheld, the item goes at the next purge, and its hold key with it
    await review.set_hold(store, held, False)
    report = await retention.purge(store, cfg, dry_run=False, command="purge")
    assert report["periods_destroyed"] == []
    assert [h["key_id"] for h in report["hold_keys_destroyed"]] == [f"hold:{held}"]
    with pytest.raises(KeyDestroyed):
        await store.keyring.open(blobs[held], held.encode())
    # nothing is ever sealed under a destroyed period
    with pytest.raises(StoreError):
        await put(store, clock, T0, "late arrival")


async def test_erase_destroys_the_hold_keys_of_erased_items(store: Store, clock: Clock) -> None:
    qid = await put(store, clock, T0, "to erase")
    await review.set_hold(store, qid, True)
    await review.set_hold(store, qid, False)
    assert store.keyring is not None
    removed, files_removed = await store.erase_items([qid])
    assert removed == [qid] and files_removed == 1
    record = await store.keyring.keys.get(f"hold:{qid}")
    assert record is not None and record.wrapped is None


async def test_a_plaintext_message_that_looks_like_a_blob_still_reads(
    tmp_path: Path, clock: Clock, kek_file: str, backend: dict[str, Any]
) -> None:
    """Hostile input: a message whose bytes start like a sealed blob, kept
    before encryption was on, is told apart by its recorded SHA-256."""
    raw = crypto.MAGIC + bytes([1, 10]) + b"2026-01-10" + b"\x00" * 40 + b"\r\n\r\nhi\r\n"

    async def put_raw(s: Store) -> str:
        return await s.quarantine(
            raw=raw, queue_id="Q1", received=T0, direction="inbound", client_addr="192.0.2.1",
            helo="mx.test", mail_from="a@ext.test", rcpt_tos=["b@example.com"], headers={},
            reason="attachment_types", detail="", personal=False, verdicts=[])

    plain = await open_store(config(tmp_path, "", backend).store, create=True, clock=clock)
    try:
        qid = await put_raw(plain)
        assert await review.read_message(plain, await review.get_item(plain, qid)) == raw
    finally:
        await plain.close()
    # switched on by `serve` (PostgreSQL: it makes the key database then)
    sealed = await open_store(config(tmp_path, kek_file, backend).store, clock=clock,
                              create=bool(backend))
    try:
        await sealed.keyring.seal("2026-01-10", b"x", b"make the period's key exist")
        assert await review.read_message(sealed, await review.get_item(sealed, qid)) == raw
        await review.set_hold(sealed, qid, True)  # sealed now, under its hold key
        assert crypto.parse_blob(await stored_bytes(sealed, qid)).key_id == f"hold:{qid}"
        assert await review.read_message(sealed, await review.get_item(sealed, qid)) == raw
        new = await put_raw(sealed)  # with encryption on it is simply sealed
        assert await review.read_message(sealed, await review.get_item(sealed, new)) == raw
    finally:
        await sealed.close()


async def test_a_50_mb_message_is_sealed_and_read_back(store: Store, clock: Clock) -> None:
    raw = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * (50 * 1024 * 1024 // 16)
    qid = await store.quarantine(
        raw=raw, queue_id="Q1", received=T0, direction="inbound", client_addr="192.0.2.1",
        helo="mx.test", mail_from="a@ext.test", rcpt_tos=["b@example.com"], headers={},
        reason="attachment_types", detail="", personal=False, verdicts=[])
    item = await review.get_item(store, qid)
    assert item["size"] == len(raw)
    assert await store.read_body(item) == raw
    await review.set_hold(store, qid, True)
    assert await store.read_body(await review.get_item(store, qid)) == raw
