"""The PostgreSQL key store (quarantine/postgres_keys.py), on a real PostgreSQL.

Proves: two stores (two gateways) racing to create the same data key end up
with one key, the first insert's, and two key rings sealing under a new
period at once can each open the other's blob; destroying a key leaves a
tombstone (id, fingerprint, times) and the key is never created again, not
by ``insert_if_absent`` nor by a ring sealing under it; after the
destruction's ``VACUUM FULL`` and a ``CHECKPOINT`` the wrapped bytes are in
no file of the key table (``pg_relation_filepath('datakey')`` under the
server's data directory, read directly: the suite runs as root), while they
were there before; opening without ``create`` a key database that does not
exist is one StoreError with libpq's reason.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from quarantine import crypto
from quarantine.postgres_keys import PostgresKeyStore
from quarantine.store import StoreError
from tests.support.postgres import PgServer


async def sql(dsn: str, statement: str, *params: Any) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(statement, params)  # type: ignore[arg-type]
        return list(await cur.fetchall()) if cur.description else []


@pytest.fixture
async def key_db(pg_server: PgServer) -> AsyncIterator[tuple[str, list[PostgresKeyStore]]]:
    """A fresh database for the keys; the stores opened on it are closed at the end."""
    opened: list[PostgresKeyStore] = []
    yield pg_server.new_database(), opened
    for s in opened:
        await s.close()


async def open_keys(key_db: tuple[str, list[PostgresKeyStore]]) -> PostgresKeyStore:
    dsn, opened = key_db
    store = await PostgresKeyStore.open(dsn, create=True)
    opened.append(store)
    return store


def kek() -> crypto.Kek:
    return crypto.Kek(secrets.token_bytes(crypto.KEY_BYTES), "(test)")


async def test_insert_if_absent_race_from_two_stores(
        key_db: tuple[str, list[PostgresKeyStore]]) -> None:
    a, b = await asyncio.gather(open_keys(key_db), open_keys(key_db))
    for n in range(20):
        key_id = f"2026-01-{n + 1:02d}"
        wa, wb = secrets.token_bytes(61), secrets.token_bytes(61)
        await asyncio.gather(
            a.insert_if_absent(key_id, wa, crypto.fingerprint(wa), "2026-01-01T00:00:00Z"),
            b.insert_if_absent(key_id, wb, crypto.fingerprint(wb), "2026-01-01T00:00:00Z"),
        )
        ra, rb = await a.get(key_id), await b.get(key_id)
        assert ra is not None and ra == rb and ra.wrapped in (wa, wb)
        assert ra.fingerprint == crypto.fingerprint(ra.wrapped or b"")
    assert len(await a.list()) == 20

    # two rings (two gateways, one KEK) sealing under a new period at once
    k = kek()
    ring_a, ring_b = crypto.KeyRing(k, a), crypto.KeyRing(k, b)
    blob_a, blob_b = await asyncio.gather(ring_a.seal("2026-02-01", b"q1", b"one"),
                                          ring_b.seal("2026-02-01", b"q2", b"two"))
    assert await ring_b.open(blob_a, b"q1") == b"one"
    assert await ring_a.open(blob_b, b"q2") == b"two"
    assert len(await a.list("2026-02")) == 1


async def test_destroy_leaves_a_tombstone_and_never_recreates(
        key_db: tuple[str, list[PostgresKeyStore]]) -> None:
    store = await open_keys(key_db)
    ring = crypto.KeyRing(kek(), store)
    blob = await ring.seal("2026-01-10", b"q", b"secret")
    live = await store.get("2026-01-10")
    assert live is not None and live.wrapped is not None

    gone = await store.destroy(["2026-01-10", "2026-01-11"], "2026-04-20T00:00:00Z")
    assert [(r.key_id, r.wrapped, r.fingerprint, r.destroyed) for r in gone] == [
        ("2026-01-10", None, live.fingerprint, "2026-04-20T00:00:00Z")]
    assert store.checkpoint_state == "vacuumed"
    tomb = await store.get("2026-01-10")
    assert tomb == crypto.KeyRecord("2026-01-10", None, live.fingerprint, live.created,
                                    "2026-04-20T00:00:00Z")
    assert await store.get("2026-01-11") is None  # never seen: no tombstone invented

    # never created again: not by an insert, not by a ring sealing under it
    again = secrets.token_bytes(61)
    await store.insert_if_absent("2026-01-10", again, crypto.fingerprint(again), "later")
    assert await store.get("2026-01-10") == tomb
    with pytest.raises(crypto.KeyDestroyed):
        await ring.seal("2026-01-10", b"q", b"late")
    with pytest.raises(crypto.KeyDestroyed):
        await ring.open(blob, b"q")
    assert await store.destroy(["2026-01-10"], "2026-04-21T00:00:00Z") == []
    assert [r.key_id for r in await store.list()] == ["2026-01-10"]
    assert await sql(key_db[0], "SELECT count(*) FROM datakey") == [(0,)]


async def relation_file(dsn: str) -> Path:
    [(data_dir, relpath)] = await sql(
        dsn, "SELECT current_setting('data_directory'), pg_relation_filepath('datakey')")
    return Path(data_dir) / relpath


async def test_after_destroy_the_wrapped_bytes_are_in_no_file_of_the_key_table(
        key_db: tuple[str, list[PostgresKeyStore]]) -> None:
    dsn = key_db[0]
    store = await open_keys(key_db)
    doomed = secrets.token_bytes(61)
    kept = secrets.token_bytes(61)
    await store.insert_if_absent("2026-01-10", doomed, crypto.fingerprint(doomed), "t")
    await store.insert_if_absent("2026-01-11", kept, crypto.fingerprint(kept), "t")
    await sql(dsn, "CHECKPOINT")
    before = await relation_file(dsn)
    data = before.read_bytes()
    assert doomed in data and kept in data  # the test can see them where they are

    await store.destroy(["2026-01-10"], "2026-04-20T00:00:00Z")
    await sql(dsn, "CHECKPOINT")
    after = await relation_file(dsn)
    assert after != before  # VACUUM FULL wrote a new file
    data = after.read_bytes()
    assert doomed not in data and kept in data
    # the old file is emptied (and unlinked) once the checkpoint is past
    assert not before.exists() or doomed not in before.read_bytes()
    assert (await store.get("2026-01-11")) == crypto.KeyRecord(
        "2026-01-11", kept, crypto.fingerprint(kept), "t")


async def test_a_missing_key_database_without_create_is_one_clear_error(
        pg_server: PgServer) -> None:
    dsn = pg_server.dsn("no_such_keys")
    # libpq's own reason (said at once, not the pool's timeout) and what to do
    with pytest.raises(StoreError, match="key store .*no_such_keys.*does not exist.*serve"):
        await PostgresKeyStore.open(dsn, create=False)
