"""The embedded store's data-key store: a SQLite file apart from the data.

``<store.path>/keys/datakeys.db`` (directory 0700, file 0600): a database of
its own in a directory of its own, so that a backup of the store that leaves
``keys/`` out (docs/crypto-shredding.md) never holds a data key, and the
quarantine database never does.  Implements :class:`quarantine.crypto.KeyStore`;
the only SQL on data keys lives here.

Destroying a key: in one transaction its wrapped bytes are overwritten in
place with zeros, the row is deleted (``secure_delete=ON`` zeroes the freed
cell) and a tombstone (id, fingerprint, times) is written; then
``wal_checkpoint(TRUNCATE)`` copies the pages into the database and empties
the WAL, so no frame holding the old bytes is left in the journal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from quarantine import files
from quarantine.crypto import KeyRecord
from quarantine.sqlite import switch_to_wal
from quarantine.store import StoreError

log = logging.getLogger("mailwarden.store")

KEYS_DIR = "keys"
KEYS_DB = "datakeys.db"

SCHEMA = [
    """
    CREATE TABLE datakey (
        key_id TEXT PRIMARY KEY,
        wrapped BLOB NOT NULL,
        fingerprint TEXT NOT NULL,
        created TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE destroyed (
        key_id TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        created TEXT NOT NULL,
        destroyed TEXT NOT NULL
    )
    """,
]


class SQLiteKeyStore:
    """Wrapped data keys in ``<root>/keys/datakeys.db`` (see the module doc)."""

    def __init__(self, path: Path, db: aiosqlite.Connection) -> None:
        self.path = path
        self.db = db
        self._lock = asyncio.Lock()
        #: "truncated" or "busy": the last WAL checkpoint after a destruction
        self.checkpoint_state = ""

    @classmethod
    async def open(cls, root: str | os.PathLike[str], *, create: bool) -> SQLiteKeyStore:
        """Open (and with ``create``, or when the store exists, make) the key store.

        The key directory is made whenever the store directory exists:
        encryption may be switched on for a store that had none."""
        base = Path(root)
        keydir = base / KEYS_DIR
        path = keydir / KEYS_DB
        try:
            if not base.is_dir() and not create:
                raise StoreError(f"store {base} does not exist")
            if create:
                await asyncio.to_thread(files.ensure_dir, base)  # 0700, as the store makes it
            await asyncio.to_thread(files.ensure_dir, keydir)
            new = not path.exists()
            if new:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, files.FILE_MODE)
                os.close(fd)
            db = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the key store {path}: {exc}") from None
        try:
            # The busy timeout first: another process may be opening (and
            # switching to WAL, creating) the same key store right now.
            await db.execute("PRAGMA busy_timeout=10000")
            await switch_to_wal(db)
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA secure_delete=ON")
            async with db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            if not row or row[0] == 0:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    async with db.execute("PRAGMA user_version") as cur:
                        row = await cur.fetchone()
                    if not row or row[0] == 0:
                        for statement in SCHEMA:
                            await db.execute(statement)
                        await db.execute("PRAGMA user_version=1")
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
            elif row[0] > 1:
                raise StoreError(f"key store {path}: schema version {row[0]} is newer than this"
                                 " mailwarden (1)")
        except sqlite3.Error as exc:
            await db.close()
            raise StoreError(f"cannot open the key store {path}: {exc}") from None
        except BaseException:
            await db.close()
            raise
        return cls(path, db)

    async def close(self) -> None:
        await self.db.close()

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"key store {self.path}: {exc}")

    async def get(self, key_id: str) -> KeyRecord | None:
        try:
            async with self.db.execute(
                "SELECT key_id, wrapped, fingerprint, created FROM datakey WHERE key_id = ?",
                (key_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is not None:
                return KeyRecord(row[0], bytes(row[1]), row[2], row[3])
            async with self.db.execute(
                "SELECT key_id, fingerprint, created, destroyed FROM destroyed WHERE key_id = ?",
                (key_id,),
            ) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return None if row is None else KeyRecord(row[0], None, row[1], row[2], row[3])

    async def insert_if_absent(
        self, key_id: str, wrapped: bytes, fingerprint: str, created: str
    ) -> None:
        try:
            async with self._lock:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    await self.db.execute(
                        "INSERT OR IGNORE INTO datakey (key_id, wrapped, fingerprint, created)"
                        " SELECT ?, ?, ?, ? WHERE NOT EXISTS"
                        " (SELECT 1 FROM destroyed WHERE key_id = ?)",
                        (key_id, wrapped, fingerprint, created, key_id),
                    )
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self.db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    async def destroy(self, key_ids: Sequence[str], when: str) -> list[KeyRecord]:
        out: list[KeyRecord] = []
        try:
            async with self._lock:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    for key_id in key_ids:
                        async with self.db.execute(
                            "SELECT fingerprint, created FROM datakey WHERE key_id = ?",
                            (key_id,),
                        ) as cur:
                            row = await cur.fetchone()
                        if row is None:
                            continue
                        # overwrite in place first, then delete (secure_delete
                        # zeroes the freed cell), then the tombstone
                        await self.db.execute(
                            "UPDATE datakey SET wrapped = zeroblob(length(wrapped))"
                            " WHERE key_id = ?", (key_id,),
                        )
                        await self.db.execute("DELETE FROM datakey WHERE key_id = ?", (key_id,))
                        await self.db.execute(
                            "INSERT OR REPLACE INTO destroyed (key_id, fingerprint, created,"
                            " destroyed) VALUES (?, ?, ?, ?)",
                            (key_id, row[0], row[1], when),
                        )
                        out.append(KeyRecord(key_id, None, row[0], row[1], when))
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self.db.execute("ROLLBACK")
                    raise
                if out or self.checkpoint_state == "busy":
                    await self._checkpoint()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return out

    async def _checkpoint(self) -> None:
        async with self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
            row = await cur.fetchone()
        self.checkpoint_state = "busy" if row is None or row[0] else "truncated"
        if self.checkpoint_state == "busy":
            log.warning("key store %s: the WAL could not be truncated after destroying keys"
                        " (another process is reading it); the next purge retries", self.path)

    async def list(self, prefix: str = "") -> list[KeyRecord]:
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        try:
            async with self.db.execute(
                "SELECT key_id, wrapped, fingerprint, created FROM datakey"
                " WHERE key_id LIKE ? ESCAPE '\\' ORDER BY key_id", (like,),
            ) as cur:
                live = [KeyRecord(r[0], bytes(r[1]), r[2], r[3]) for r in await cur.fetchall()]
            async with self.db.execute(
                "SELECT key_id, fingerprint, created, destroyed FROM destroyed"
                " WHERE key_id LIKE ? ESCAPE '\\' ORDER BY key_id", (like,),
            ) as cur:
                dead = [KeyRecord(r[0], None, r[1], r[2], r[3]) for r in await cur.fetchall()]
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        return sorted(live + dead, key=lambda r: r.key_id)


__all__ = ["KEYS_DB", "KEYS_DIR", "SQLiteKeyStore"]
