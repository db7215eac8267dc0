"""The shared store's data-key store: a PostgreSQL database apart from the data.

Several gateways share one quarantine on PostgreSQL, so they must share the
data keys too; the keys must still never sit in the database they protect
(a ``pg_dump`` of the data must hold no key).  They live in a database of
their own on the same server (``[store] key_dsn``; default: the data
database's name with ``_keys`` appended), which the organisation never backs
up (docs/crypto-shredding.md, deploy/postgresql/README.md).  Implements
:class:`quarantine.crypto.KeyStore`; the only SQL on data keys for the
PostgreSQL backend lives here.

Destroying a key: in one transaction its wrapped bytes are overwritten with
zeros, the row deleted and a tombstone (id, fingerprint, times) written; then
``VACUUM FULL datakey`` rewrites the table, so no dead row version holding the
old bytes is left in the table's files.  What PostgreSQL keeps beyond that (WAL
segments until they are recycled, a WAL archive if one is configured) is out
of a client's reach: the deploy recipe says to archive no WAL of the key
database.  The wrapped bytes are useless without the key-encryption key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg_pool import AsyncConnectionPool

from quarantine.crypto import KeyRecord
from quarantine.store import StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS datakey (
    key_id TEXT PRIMARY KEY,
    wrapped BYTEA NOT NULL,
    fingerprint TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS destroyed (
    key_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    created TEXT NOT NULL,
    destroyed TEXT NOT NULL
);
"""

#: advisory lock key for the schema (any constant shared by every gateway)
_SCHEMA_LOCK = 0x6D776B73  # "mwks"


def keys_dsn(dsn: str, key_dsn: str = "") -> str:
    """The key database's connection string: ``key_dsn``, or ``dsn`` with the
    database name suffixed ``_keys``."""
    if key_dsn:
        return key_dsn
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"store.dsn: {exc}") from None
    base = params.get("dbname") or params.get("user") or "mailwarden"
    params["dbname"] = f"{base}_keys"
    return conninfo.make_conninfo(**params)


def describe(dsn: str) -> str:
    """The connection string without a password (for messages)."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable dsn)"
    params.pop("password", None)
    return conninfo.make_conninfo(**params)


class PostgresKeyStore:
    """Wrapped data keys in their own PostgreSQL database (see the module doc)."""

    def __init__(self, dsn: str, pool: AsyncConnectionPool[Any]) -> None:
        self.dsn = dsn
        self.pool = pool
        #: "vacuumed" or "failed: ...": the table rewrite after the last destruction
        self.checkpoint_state = ""

    @property
    def where(self) -> str:
        return describe(self.dsn)

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(f"key store {self.where}: {exc}")

    @classmethod
    async def open(cls, dsn: str, *, create: bool, data_dsn: str = "") -> PostgresKeyStore:
        """Connect; with ``create`` make the key database (through ``data_dsn``'s
        server, if missing) and its tables."""
        if create and data_dsn:
            await _create_database(dsn, data_dsn)
        elif not create:
            # one attempt first: a missing key database is said at once, in
            # libpq's words, not after the pool's timeout
            try:
                probe = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10)
            except psycopg.Error as exc:
                raise StoreError(
                    f"cannot open the key store {describe(dsn)}: {' '.join(str(exc).split())}"
                    " (`mailwarden serve` with store.key_file set creates it)"
                ) from None
            await probe.close()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn, min_size=1, max_size=8, open=False, timeout=10,
            kwargs={"connect_timeout": 10},
        )
        try:
            await pool.open(wait=True, timeout=15)
        except Exception as exc:
            await pool.close()
            raise StoreError(f"cannot open the key store {describe(dsn)}: {exc}") from None
        store = cls(dsn, pool)
        try:
            async with pool.connection() as conn:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    cur = await conn.execute("SELECT to_regclass('datakey') IS NOT NULL")
                    row = await cur.fetchone()
                    if not (row and row[0]):
                        if not create:
                            raise StoreError(f"key store {describe(dsn)}: no key tables"
                                             " (run mailwarden serve once to create them)")
                        await conn.execute(SCHEMA)
        except StoreError:
            await pool.close()
            raise
        except psycopg.Error as exc:
            await pool.close()
            raise store._error(exc) from None
        return store

    async def close(self) -> None:
        await self.pool.close()

    async def get(self, key_id: str) -> KeyRecord | None:
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT key_id, wrapped, fingerprint, created FROM datakey WHERE key_id = %s",
                    (key_id,))
                row = await cur.fetchone()
                if row is not None:
                    return KeyRecord(row[0], bytes(row[1]), row[2], row[3])
                cur = await conn.execute(
                    "SELECT key_id, fingerprint, created, destroyed FROM destroyed"
                    " WHERE key_id = %s", (key_id,))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise self._error(exc) from None
        return None if row is None else KeyRecord(row[0], None, row[1], row[2], row[3])

    async def insert_if_absent(
        self, key_id: str, wrapped: bytes, fingerprint: str, created: str
    ) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO datakey (key_id, wrapped, fingerprint, created)"
                    " SELECT %s, %s, %s, %s WHERE NOT EXISTS"
                    " (SELECT 1 FROM destroyed WHERE key_id = %s)"
                    " ON CONFLICT (key_id) DO NOTHING",
                    (key_id, wrapped, fingerprint, created, key_id))
        except psycopg.Error as exc:
            raise self._error(exc) from None

    async def destroy(self, key_ids: Sequence[str], when: str) -> list[KeyRecord]:
        out: list[KeyRecord] = []
        try:
            async with self.pool.connection() as conn:
                async with conn.transaction():
                    for key_id in key_ids:
                        cur = await conn.execute(
                            "SELECT fingerprint, created FROM datakey WHERE key_id = %s"
                            " FOR UPDATE", (key_id,))
                        row = await cur.fetchone()
                        if row is None:
                            continue
                        await conn.execute(
                            "UPDATE datakey SET wrapped = decode(repeat('00', length(wrapped)),"
                            " 'hex') WHERE key_id = %s", (key_id,))
                        await conn.execute("DELETE FROM datakey WHERE key_id = %s", (key_id,))
                        await conn.execute(
                            "INSERT INTO destroyed (key_id, fingerprint, created, destroyed)"
                            " VALUES (%s, %s, %s, %s) ON CONFLICT (key_id) DO NOTHING",
                            (key_id, row[0], row[1], when))
                        out.append(KeyRecord(key_id, None, row[0], row[1], when))
                if out or self.checkpoint_state.startswith("failed"):
                    await self._vacuum(conn)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        return out

    async def _vacuum(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Rewrite the key table so no dead row version keeps the old bytes."""
        autocommit = conn.autocommit
        try:
            await conn.set_autocommit(True)
            await conn.execute("VACUUM FULL datakey")
            self.checkpoint_state = "vacuumed"
        except psycopg.Error as exc:
            self.checkpoint_state = f"failed: {exc}".strip()
        finally:
            await conn.set_autocommit(autocommit)

    async def list(self, prefix: str = "") -> list[KeyRecord]:
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT key_id, wrapped, fingerprint, created FROM datakey"
                    " WHERE key_id LIKE %s ORDER BY key_id", (like,))
                live = [KeyRecord(r[0], bytes(r[1]), r[2], r[3]) for r in await cur.fetchall()]
                cur = await conn.execute(
                    "SELECT key_id, fingerprint, created, destroyed FROM destroyed"
                    " WHERE key_id LIKE %s ORDER BY key_id", (like,))
                dead = [KeyRecord(r[0], None, r[1], r[2], r[3]) for r in await cur.fetchall()]
        except psycopg.Error as exc:
            raise self._error(exc) from None
        return sorted(live + dead, key=lambda r: r.key_id)


async def _create_database(dsn: str, data_dsn: str) -> None:
    """CREATE DATABASE for the key store when it does not exist (needs CREATEDB
    on the data database's role; otherwise the DBA creates it: the recipe)."""
    try:
        name = conninfo.conninfo_to_dict(dsn).get("dbname")
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"store.key_dsn: {exc}") from None
    if not name:
        return
    try:
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(data_dsn, autocommit=True, connect_timeout=10), 15)
    except (psycopg.Error, TimeoutError) as exc:
        raise StoreError(f"cannot reach PostgreSQL at {describe(data_dsn)}: {exc}") from None
    try:
        cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if await cur.fetchone() is None:
            from psycopg import sql

            try:
                await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another gateway made it first
    except psycopg.Error as exc:
        raise StoreError(f"cannot create the key database {name!r}: {exc}") from None
    finally:
        await conn.close()


__all__ = ["PostgresKeyStore", "describe", "keys_dsn"]
