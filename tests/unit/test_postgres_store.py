"""The PostgreSQL backend's own promises (issue 16), on a real PostgreSQL.

Proves: two gateway instances appending at once keep two gapless chains plus
anchors, and ``verify`` walks them all; a tampered record, a rewritten chain
tail or an edited audit row is named by instance and seq; an erased record's
chain link still verifies; an item held by one instance is shown, released
and deleted by the other; ``check()`` names backend, database, instance and
schema version; a missing schema with ``create=False`` is a StoreError naming
it; every public coroutine maps psycopg errors to StoreError; with PostgreSQL
stopped, ``quarantine()`` raises StoreError (the gateway's 451) while log
records go to the outbox, which ships exactly once when PostgreSQL is back,
also from a reopened store and after a crash between commit and outbox rewrite.
Also: verify while both instances keep appending (no false breaks); check()
fails on a read-only database; the instance defaults to the host name; an
unreachable database at open is one StoreError with libpq's reason; with a
key file, bodies are sealed in the ``body`` table (not the plaintext), read
back by any instance, and their data keys live in the key database, never in
the data database; a copy of the bodies taken before a purge (what pg_dump
would hold) cannot be opened after it with everything that remains (KEK,
key database, data database), while a held item survives; retention through
quarantine/retention.py purges both chains' prefixes and old anchors and
everything still verifies; review's integrity check and erasure work across
instances.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.config import StoreSettings
from quarantine import postgres as backend
from quarantine.log import verify, verify_audit
from quarantine.postgres import OUTBOX_NAME, PostgresStore
from quarantine.store import StoreError, erased_record, iso
from tests.support.clock import Clock
from tests.support.postgres import PgServer

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)

Open = Callable[..., Awaitable[PostgresStore]]


def rec(n: int, *addrs: str) -> dict[str, Any]:
    return {"time": iso(T0), "queue_id": f"Q{n}", "direction": "inbound",
            "subject": f"s{n}", "addresses": list(addrs)}


async def hold(store: PostgresStore, subject: str = "hi", received: datetime = T0) -> str:
    raw = f"From: a@ext.test\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    return await store.quarantine(
        raw=raw, queue_id="Q" + subject, received=received, direction="inbound",
        client_addr="192.0.2.1", helo="mx.test", mail_from="a@ext.test",
        rcpt_tos=["b@example.com"], headers={"from": "a@ext.test", "subject": subject},
        reason="clamav", detail="Eicar", personal=False, verdicts=[],
    )


def opener(dsn: str, tmp_path: Path) -> tuple[Open, list[PostgresStore]]:
    opened: list[PostgresStore] = []

    async def open_store(instance: str, **kw: Any) -> PostgresStore:
        settings = StoreSettings(backend="postgresql", dsn=dsn, instance=instance,
                                 path=str(tmp_path / instance))
        kw.setdefault("create", True)
        kw.setdefault("flush_interval", 0.01)
        store = await PostgresStore.open(settings, **kw)
        opened.append(store)
        return store

    return open_store, opened


@pytest.fixture
async def stores(pg_server: PgServer, tmp_path: Path) -> AsyncIterator[tuple[Open, str]]:
    dsn = pg_server.new_database()
    open_store, opened = opener(dsn, tmp_path)
    yield open_store, dsn
    for s in opened:
        await s.close()


async def sql(dsn: str, statement: str, *params: Any) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(statement, params)  # type: ignore[arg-type]
        return list(await cur.fetchall()) if cur.description else []


# ------------------------------------------------------------------ chains


async def test_two_instances_two_gapless_chains_and_anchors(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    a = await open_store("gw-a", anchor_interval=0.0)
    b = await open_store("gw-b", anchor_interval=0.0)

    async def appender(store: PostgresStore, tag: int) -> None:
        for batch in range(8):
            for i in range(5):
                store.append_log(rec(tag * 1000 + batch * 10 + i, f"w{tag}@example.com"))
            await store.flush_log()

    await asyncio.gather(appender(a, 1), appender(b, 2))
    await a.audit("show", targets=["x"])
    await b.audit("show", targets=["y"])
    assert await a.checkpoint() == "truncated"
    rows = await sql(dsn, "SELECT instance, seq FROM log ORDER BY instance, seq")
    assert [s for i, s in rows if i == "gw-a"] == list(range(1, 41))
    assert [s for i, s in rows if i == "gw-b"] == list(range(1, 41))
    anchors = await sql(dsn, "SELECT seq, heads FROM anchor ORDER BY seq")
    assert len(anchors) >= 2
    heads = json.loads(anchors[-1][1])["heads"]
    assert heads["log"]["gw-a"][0] == 40 and heads["log"]["gw-b"][0] == 40
    assert set(heads["audit"]) == {"gw-a", "gw-b"}
    result = await verify(a)
    assert result.ok, result.message
    assert "80 records" in result.message and "2 instance chains" in result.message
    assert (await verify_audit(b)).ok


async def test_tampered_record_is_named_by_instance_and_seq(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    a, b = await open_store("gw-a"), await open_store("gw-b")
    for n in range(5):
        await a.write_log_batch([rec(n)])
        await b.write_log_batch([rec(100 + n)])
    await sql(dsn, "UPDATE log SET record = replace(record, 's102', 'forged')"
                   " WHERE instance = 'gw-b' AND seq = 3")
    result = await verify(a)
    assert not result.ok
    assert "instance gw-b seq 3" in result.message, result.message
    assert "1 of 10 records fail" in result.message
    # an edit that also rewrites record_hash and hash breaks the next link
    await sql(dsn, "UPDATE log SET record = replace(record, 's2', 'x2'),"
                   " record_hash = repeat('a', 64), hash = repeat('b', 64)"
                   " WHERE instance = 'gw-a' AND seq = 3")
    result = await verify(b)
    assert not result.ok and "instance gw-a seq 3" in result.message, result.message

    await sql(dsn, "UPDATE audit SET reason = 'changed' WHERE id = %s", await b.audit("show"))
    res = await verify_audit(a)
    assert not res.ok and "instance gw-b seq 1" in res.message, res.message


async def test_anchors_catch_a_rewritten_tail(stores: tuple[Open, str]) -> None:
    """Dropping an instance's last records and moving its head back leaves
    every remaining link intact: the anchor still names the old head."""
    open_store, dsn = stores
    a = await open_store("gw-a")
    await a.write_log_batch([rec(n) for n in range(6)])
    await a.checkpoint()
    await sql(dsn, "DELETE FROM log WHERE instance = 'gw-a' AND seq > 4")
    await sql(dsn, "UPDATE chain_head SET seq = 4, hash = (SELECT hash FROM log"
                   " WHERE instance = 'gw-a' AND seq = 4) WHERE chain = 'log'")
    result = await verify(a)
    assert not result.ok
    assert "anchor seq 1: instance gw-a seq 6 is missing" in result.message, result.message


async def test_erased_record_keeps_its_chain_link(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    a = await open_store("gw-a")
    await a.write_log_batch([rec(1, "x@ext.test"), rec(2), rec(3, "x@ext.test")])
    seqs = await a.subject_log_seqs("x@ext.test")
    audit_seq = await a.audit("erase", detail={"log_seqs": seqs})
    assert await a.erase_log(seqs, erased_record(iso(T0), audit_seq)) == 2
    assert (await verify(a)).ok
    # the tombstone's link is still checked: a forged hash on it is caught
    await sql(dsn, "UPDATE log SET hash = repeat('c', 64) WHERE id = %s", seqs[0])
    result = await verify(a)
    assert not result.ok and "instance gw-a seq 1" in result.message, result.message


# -------------------------------------------------------------- quarantine


async def test_bodies_are_shared_between_instances(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    a, b = await open_store("gw-a"), await open_store("gw-b")
    qid = await hold(a, "shared")
    item = await b.get_item(qid)
    assert item is not None and item["path"] == f"pg:{qid}"
    body = await b.read_body(item)
    assert body.endswith(b"\r\n\r\nbody\r\n") and len(body) == item["size"]
    await b.mark_released(qid)
    assert (await a.get_item(qid) or {})["state"] == "released"
    assert await a.delete_item(qid) is True
    with pytest.raises(FileNotFoundError):
        await b.read_body(item)
    assert await sql(dsn, "SELECT instance FROM quarantine") == [("gw-a",)]


async def test_check_names_backend_database_instance_and_schema(
        stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    a = await open_store("gw-a")
    ok, text = await a.check()
    assert ok, text
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert text.startswith("store postgresql ") and f"database {dbname}" in text
    assert "instance gw-a" in text and f"schema v{len(backend.MIGRATIONS)}" in text
    assert await sql(dsn, "SELECT version FROM schema_version ORDER BY version") == [
        (n,) for n in range(1, len(backend.MIGRATIONS) + 1)]


async def test_check_fails_on_a_read_only_database(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    await (await open_store("gw-a")).close()
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    await sql(dsn, f"ALTER DATABASE {dbname} SET default_transaction_read_only = on")
    ok, text = await (await open_store("gw-b", create=False)).check()
    assert not ok and "read-only" in text, text


async def test_verify_while_instances_keep_appending(stores: tuple[Open, str]) -> None:
    """A verify run reads the anchors, then the heads, then the rows up to
    those heads: records appended meanwhile are not reported as breaks."""
    open_store, _ = stores
    a = await open_store("gw-a", anchor_interval=0.0)
    b = await open_store("gw-b", anchor_interval=0.0)
    done = asyncio.Event()

    async def appender(store: PostgresStore, tag: int) -> None:
        n = 0
        while not done.is_set():
            n += 1
            await store.write_log_batch([rec(tag * 10000 + n)])
            await store.audit("show", targets=[str(n)])

    tasks = [asyncio.create_task(appender(a, 1)), asyncio.create_task(appender(b, 2))]
    try:
        for _ in range(5):
            result = await verify(a)
            assert result.ok, result.message
            assert (await verify_audit(b)).ok
    finally:
        done.set()
        await asyncio.gather(*tasks)
    assert (await verify(b)).ok


async def test_the_instance_defaults_to_the_host_name(stores: tuple[Open, str]) -> None:
    import socket

    open_store, dsn = stores
    store = await open_store("")
    assert store.instance == socket.gethostname()
    await store.write_log_batch([rec(1)])
    assert await sql(dsn, "SELECT instance, seq FROM log") == [(socket.gethostname(), 1)]


async def test_missing_schema_without_create(pg_server: PgServer, tmp_path: Path) -> None:
    open_store, opened = opener(pg_server.new_database(), tmp_path)
    with pytest.raises(StoreError, match="no mailwarden schema .*schema_version"):
        await open_store("gw-a", create=False)
    assert opened == []


# -------------------------------------------------------------- sealing


def sealed_settings(tmp_path: Path, dsn: str, instance: str) -> StoreSettings:
    kek = tmp_path / "kek"
    if not kek.exists():
        from quarantine.crypto import write_kek

        write_kek(kek)
    return StoreSettings(backend="postgresql", dsn=dsn, instance=instance,
                         path=str(tmp_path / instance), key_file=str(kek),
                         retention_days=90)


async def table_text(dsn: str) -> str:
    """Every row of every table of a database, as text (bytea as hex)."""
    tables = await sql(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    out = []
    for (table,) in tables:
        out += [r[0] for r in await sql(dsn, f'SELECT t::text FROM "{table}" t')]
    return "\n".join(out)


def plain(subject: str) -> bytes:
    """The message :func:`hold` keeps."""
    return (f"From: a@ext.test\r\nTo: b@example.com\r\nSubject: {subject}\r\n\r\n"
            "body\r\n").encode()


async def test_sealed_bodies_round_trip_and_the_keys_live_in_the_key_database(
        pg_server: PgServer, tmp_path: Path) -> None:
    from quarantine import crypto
    from quarantine.postgres_keys import keys_dsn
    from quarantine.store import open_store

    dsn = pg_server.new_database()
    a = await open_store(sealed_settings(tmp_path, dsn, "gw-a"), create=True)
    b = await open_store(sealed_settings(tmp_path, dsn, "gw-b"), create=True)
    try:
        qid = await hold(a, "secret words")
        [(stored,)] = await sql(dsn, "SELECT data FROM body WHERE id = %s", qid)
        assert b"secret words" not in bytes(stored) and b"From:" not in bytes(stored)
        assert crypto.parse_blob(bytes(stored)).key_id == "2026-01-10"
        item = await b.get_item(qid)  # another instance opens it with the shared keys
        assert item is not None and await b.read_body(item) == plain("secret words")
        ok, text = await b.check()
        assert ok and "bodies encrypted" in text and "1 live data keys" in text, text

        key_db = keys_dsn(dsn)
        [(wrapped,)] = await sql(key_db, "SELECT wrapped FROM datakey WHERE key_id = %s",
                                 "2026-01-10")
        assert await sql(dsn, "SELECT to_regclass('datakey'), to_regclass('destroyed')") \
            == [(None, None)]
        assert bytes(wrapped).hex() not in await table_text(dsn)
        assert await sql(key_db, "SELECT count(*) FROM datakey") == [(1,)]
    finally:
        await a.close()
        await b.close()


async def test_a_dump_before_the_purge_cannot_be_opened_after_it(
        pg_server: PgServer, tmp_path: Path) -> None:
    """The issue's "dump, purge, try to decrypt the dump with everything that
    remains", on PostgreSQL: the copy is the ``body`` table as pg_dump reads
    it; what remains is the KEK file, the key database and the data
    database.  The held item survives the purge."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from quarantine import crypto, retention, review
    from quarantine.postgres_keys import keys_dsn
    from quarantine.store import open_store

    dsn = pg_server.new_database()
    clock = Clock(T0)
    settings = sealed_settings(tmp_path, dsn, "gw-a")
    a = await open_store(settings, create=True, clock=clock)
    try:
        old, held = await hold(a, "old words"), await hold(a, "held words")
        await review.set_hold(a, held, True)
        clock.now = T0 + timedelta(days=60)
        new = await hold(a, "new words", clock.now)
        dump = {r[0]: bytes(r[1]) for r in await sql(dsn, "SELECT id, data FROM body")}
        assert crypto.parse_blob(dump[held]).key_id == f"hold:{held}"

        clock.now = T0 + timedelta(days=100)
        cfg = config(tmp_path, dsn, key_file=settings.key_file, retention_days=90)
        report = await retention.purge(a, cfg, dry_run=False, command="purge")
        assert [p["key_id"] for p in report["periods_destroyed"]] == ["2026-01-10"]
        assert report["quarantine_items"] == 1 and report["held_items"] == [held]
        assert report["keys_checkpoint"] == "vacuumed"
        assert await sql(dsn, "SELECT id FROM body ORDER BY id") == sorted([(held,), (new,)])
        # the held item and the newer one still read
        assert await review.read_message(a, await review.get_item(a, held)) \
            == plain("held words")
        assert await review.read_message(a, await review.get_item(a, new)) == plain("new words")
    finally:
        await a.close()

    # everything that remains: the KEK, the key database, the data database
    kek = crypto.load_kek(settings.key_file)
    ring = await crypto.open_keyring(settings.key_file, tmp_path / "gw-a", create=False,
                                     dsn=dsn)
    assert ring is not None
    try:
        with pytest.raises(crypto.KeyDestroyed):
            await ring.open(dump[old], old.encode())
        assert await ring.open(dump[held], held.encode()) == plain("held words")
        live = [r for r in await ring.records() if r.wrapped is not None]
        assert "2026-01-10" not in {r.key_id for r in live}
    finally:
        await ring.close()
    head = crypto.parse_blob(dump[old])
    for record in live:  # no remaining key opens it, whatever its label
        key = crypto.unwrap(kek, record.key_id, record.wrapped or b"")
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(head.nonce, dump[old][head.body_offset:],
                                head.header + b"\0" + old.encode())
    assert await sql(keys_dsn(dsn), "SELECT count(*) FROM destroyed WHERE key_id = %s",
                     "2026-01-10") == [(1,)]
    assert "old words" not in await table_text(dsn)


async def test_an_unreachable_database_is_one_store_error(tmp_path: Path) -> None:
    settings = StoreSettings(backend="postgresql", dsn=f"host={tmp_path} dbname=x user=postgres",
                             instance="gw-a", path=str(tmp_path / "gw-a"))
    with pytest.raises(StoreError, match="cannot open the store at postgresql .*x.*socket"):
        await PostgresStore.open(settings, pool_timeout=1.0)


async def test_concurrent_first_opens_migrate_once(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    await asyncio.gather(*(open_store(f"gw{n}") for n in range(4)))
    assert await sql(dsn, "SELECT version FROM schema_version ORDER BY version") == [
        (n,) for n in range(1, len(backend.MIGRATIONS) + 1)]


async def test_a_v1_database_migrates_to_access_control(
        stores: tuple[Open, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A database made by the first release (schema v1, with an item in it)
    gets migration 2 at the next open; the item keeps its data and has no
    hold case; the row keys are the access-control module's."""
    from quarantine import grants, sqlite

    open_store, dsn = stores
    full = list(backend.MIGRATIONS)
    monkeypatch.setattr(backend, "MIGRATIONS", full[:1])
    old = await open_store("gw-old")
    qid = await hold(old, "from v1")
    await old.close()
    monkeypatch.setattr(backend, "MIGRATIONS", full)
    new = await open_store("gw-new")
    assert await sql(dsn, "SELECT max(version) FROM schema_version") == [(len(full),)]
    item = await new.get_item(qid)
    assert item is not None and item["subject"] == "from v1"
    assert (item["hold_case"], item["hold_until"]) == (None, None)
    await new.set_hold(qid, True, case="C-1", until="2026-02-01T00:00:00.000000Z")
    assert await new.release_expired_holds("2026-02-01T00:00:00.000000Z") == [
        (qid, "C-1", "2026-02-01T00:00:00.000000Z")]
    assert backend.REQUEST_COLUMNS == sqlite.REQUEST_COLUMNS == tuple(grants.REQUEST_KEYS)
    assert backend.EXPORT_COLUMNS == sqlite.EXPORT_COLUMNS == tuple(grants.EXPORT_KEYS)


# ----------------------------------------------------------- driver errors


def test_every_public_coroutine_maps_driver_errors() -> None:
    unmapped = [
        name for name, fn in vars(PostgresStore).items()
        if not name.startswith("_") and name not in backend._OWN_ERRORS
        and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))
        and not getattr(fn, "maps_driver_errors", False)
    ]
    assert unmapped == []
    assert inspect.isasyncgenfunction(PostgresStore.log_records)


async def test_a_driver_error_is_a_store_error(stores: tuple[Open, str]) -> None:
    open_store, dsn = stores
    a = await open_store("gw-a")
    await sql(dsn, "DROP TABLE audit")
    with pytest.raises(StoreError) as info:
        await a.audit("probe")
    assert type(info.value) is StoreError and "audit" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.Error)
    await sql(dsn, "DROP TABLE log_address, log")
    with pytest.raises(StoreError):
        await a.subject_log_seqs("x")
    with pytest.raises(StoreError):  # an async generator maps them too
        [r async for r in a.log_records([1])]
    await sql(dsn, "DROP TABLE body")
    with pytest.raises(StoreError, match="cannot record quarantine item"):
        await hold(a)


# ------------------------------------------------------------------ outage


async def drained(store: PostgresStore) -> None:
    """Wait until the outbox shipped (each attempt waits for a connection)."""
    async with asyncio.timeout(180):
        while await store.drain_outbox():
            pass


async def test_outage_quarantine_fails_log_goes_to_outbox_and_ships_once(
        own_pg_server: PgServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dsn = own_pg_server.new_database()
    open_store, opened = opener(dsn, tmp_path)
    try:
        a = await open_store("gw-a", pool_timeout=2.0)
        a.append_log(rec(1))
        await a.flush_log()
        await asyncio.to_thread(own_pg_server.stop)
        with pytest.raises(StoreError, match="cannot record quarantine item"):
            await hold(a, "during outage")
        caplog.set_level(logging.WARNING, "mailwarden.store")
        for n in range(2, 12):
            a.append_log(rec(n))
        await a.flush_log()
        assert a.outbox_pending() == 10
        assert (tmp_path / "gw-a" / OUTBOX_NAME).stat().st_mode & 0o777 == 0o600
        assert any("log outbox" in r.message and "grows" in r.message for r in caplog.records)
        await asyncio.to_thread(own_pg_server.start)
        await drained(a)
        assert a.outbox_pending() == 0 and not (tmp_path / "gw-a" / OUTBOX_NAME).exists()
        assert any("drained: 10 records shipped" in r.message for r in caplog.records)
        rows = await sql(dsn, "SELECT seq, record FROM log ORDER BY seq")
        assert [s for s, _ in rows] == list(range(1, 12))
        assert [json.loads(r)["queue_id"] for _, r in rows] == [f"Q{n}" for n in range(1, 12)]
        assert (await verify(a)).ok
        # a later record goes straight in
        a.append_log(rec(12))
        await a.flush_log()
        assert len(await sql(dsn, "SELECT 1 FROM log")) == 12
    finally:
        if not own_pg_server.running:
            own_pg_server.start()
        for s in opened:
            await s.close()


async def test_outbox_ships_after_reopen_and_exactly_once(
        own_pg_server: PgServer, tmp_path: Path) -> None:
    dsn = own_pg_server.new_database()
    open_store, opened = opener(dsn, tmp_path)
    outbox = tmp_path / "gw-a" / OUTBOX_NAME
    try:
        a = await open_store("gw-a", pool_timeout=2.0)
        await asyncio.to_thread(own_pg_server.stop)
        for n in range(1, 6):
            a.append_log(rec(n))
        await a.close()  # PostgreSQL still down: the records stay in the outbox
        opened.clear()
        assert len(outbox.read_text().splitlines()) == 5
        await asyncio.to_thread(own_pg_server.start)
        saved = outbox.read_text()
        b = await open_store("gw-a", pool_timeout=2.0)
        assert b.outbox_pending() == 5
        b.start_log_writer()
        await b.flush_log()
        await drained(b)
        assert len(await sql(dsn, "SELECT 1 FROM log")) == 5
        # a crash after the commit, before the outbox was rewritten: the same
        # records again are skipped by their uid
        outbox.write_text(saved)
        await b.close()
        opened.clear()
        c = await open_store("gw-a", pool_timeout=2.0)
        assert c.outbox_pending() == 5
        await drained(c)
        assert not outbox.exists()
        rows = await sql(dsn, "SELECT seq FROM log ORDER BY seq")
        assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
        assert (await verify(c)).ok
    finally:
        if not own_pg_server.running:
            own_pg_server.start()
        for s in opened:
            await s.close()


# ------------------------------------------- review and retention on PostgreSQL


def config(tmp_path: Path, dsn: str, **store: Any) -> Any:
    from gateway.config import parse_config

    return parse_config(
        {"gateway": {"internal_domains": ["example.com"]},
         "store": {"path": str(tmp_path / "gw-a"), "backend": "postgresql", "dsn": dsn,
                   **store},
         "filters": {"chain": []}}
    )


async def test_retention_purge_across_instances(stores: tuple[Open, str], tmp_path: Path) -> None:
    """quarantine/retention.py on PostgreSQL: expired items and bodies go,
    held ones stay; each instance's log prefix goes with its anchor moved, and
    every chain (and the anchors naming purged heads) still verifies."""
    from datetime import timedelta

    from quarantine import retention, review

    open_store, dsn = stores
    clock = Clock(T0)
    a = await open_store("gw-a", clock=clock)
    b = await open_store("gw-b", clock=clock)
    old, kept = await hold(a, "old"), await hold(b, "kept")
    await review.set_hold(a, kept, True)
    for n in range(3):
        await a.write_log_batch([rec(n)])
        await b.write_log_batch([rec(10 + n)])
    await a.checkpoint()  # an anchor naming heads that retention then purges
    clock.now = T0 + timedelta(days=80)
    new = await hold(b, "new", clock.now)
    await a.write_log_batch([dict(rec(99), time=iso(clock.now))])
    await b.write_log_batch([dict(rec(98), time=iso(clock.now))])
    await b.checkpoint()
    clock.now = T0 + timedelta(days=100)
    summary = await retention.purge(a, config(tmp_path, dsn), dry_run=False, command="purge")
    assert summary["quarantine_items"] == 1 and summary["files_removed"] == 1
    assert summary["log_records"] == 6 and summary["checkpoint"] == "truncated"
    assert await sql(dsn, "SELECT id FROM quarantine ORDER BY id") == sorted(
        [(kept,), (new,)])
    assert await sql(dsn, "SELECT count(*) FROM body") == [(2,)]
    assert await sql(dsn, "SELECT instance, seq FROM log ORDER BY instance") == [
        ("gw-a", 4), ("gw-b", 4)]
    result = await verify(b)
    assert result.ok and "2 records" in result.message, result.message
    assert (await verify_audit(a)).ok
    # the anchors of the purged period went too; the anchor chain's start moved
    start = await a.anchor_chain()
    assert start.anchor_seq == 1
    assert [r[0] for r in await sql(dsn, "SELECT seq FROM anchor ORDER BY seq")] == [2, 3]
    await sql(dsn, "UPDATE anchor SET heads = replace(heads, 'gw-b', 'gw-x') WHERE seq = 2")
    result = await verify(b)
    assert not result.ok and "anchor seq 2" in result.message, result.message
    with pytest.raises(FileNotFoundError):
        await b.read_body({"id": old, "path": f"pg:{old}"})


async def test_review_integrity_and_erasure(stores: tuple[Open, str]) -> None:
    from quarantine import review

    open_store, dsn = stores
    a, b = await open_store("gw-a"), await open_store("gw-b")
    qid = await hold(a, "checked")
    item = await review.get_item(b, qid)
    assert b"body" in await review.read_message(b, item)
    await sql(dsn, "UPDATE body SET data = 'altered'::bytea")
    with pytest.raises(review.IntegrityError, match="SHA-256"):
        await review.read_message(b, item)

    await a.write_log_batch([rec(1, "bob@example.com")])
    await b.write_log_batch([rec(2, "carol@example.com"), rec(3, "bob@example.com")])
    subject = await review.find_subject(a, "bob@example.com")
    assert subject.log_seqs == [1, 3]
    seq = await b.audit("erase", targets=["bob@example.com"], reason="request",
                        detail={"log_seqs": subject.log_seqs})
    result = await review.erase(b, subject, audit_seq=seq)
    assert result["log_records"] == 2
    verdict = await verify(a)
    assert verdict.ok and "erased records: 2" in verdict.message, verdict.message
