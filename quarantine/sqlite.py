"""The SQLite backend of the store protocol (:class:`quarantine.store.StoreProtocol`).

Every SQL statement of mailwarden lives in this module: the schema and its
migrations (``MIGRATIONS``, versioned by ``PRAGMA user_version``), the
quarantine, the chained log and audit trail, subject access, erasure and
retention.  The rest of the code sees only the protocol's domain methods, so a
second backend (PostgreSQL) is an addition next to this file.

One database ``mailwarden.db`` (WAL, ``synchronous=FULL``, ``secure_delete``)
and message files under ``messages/``.  Writes from the event loop go through
aiosqlite's thread, file I/O through an executor: nothing here blocks the loop.

Chain positions: a log or audit append reads the chain's head (last seq and
hash, or the anchor) *inside* its own ``BEGIN IMMEDIATE`` transaction and
inserts after it, so the position comes from the database, not from Python
state: several processes appending to one file still get one gapless chain.
The in-process lock only serialises transactions on the one shared
connection (aiosqlite cannot interleave two transactions on a connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from quarantine import crypto, files
from quarantine.store import (
    COLUMNS,
    DB_NAME,
    EXPORT_COLUMNS,
    GENESIS,
    MESSAGES_DIR,
    REQUEST_COLUMNS,
    REQUEST_SELECT,
    Chain,
    LogFilter,
    NotFound,
    OnHold,
    Row,
    StoreError,
    addresses_of,
    canonical,
    chain_hash,
    driver_errors,
    iso,
    new_quarantine_id,
    os_user,
    sha256_hex,
    utcnow,
)

if TYPE_CHECKING:
    from quarantine.crypto import KeyRing

log = logging.getLogger("mailwarden.store")

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE quarantine (
        id TEXT PRIMARY KEY,
        received TEXT NOT NULL,
        queue_id TEXT NOT NULL,
        direction TEXT NOT NULL,
        client_addr TEXT NOT NULL,
        helo TEXT NOT NULL DEFAULT '',
        mail_from TEXT NOT NULL,
        rcpt_tos TEXT NOT NULL,
        hdr_from TEXT,
        hdr_to TEXT,
        subject TEXT,
        message_id TEXT,
        hdr_date TEXT,
        size INTEGER NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        personal INTEGER NOT NULL DEFAULT 0,
        hold INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'held',
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        verdicts TEXT NOT NULL DEFAULT '[]',
        updated TEXT NOT NULL
    );
    CREATE INDEX quarantine_received ON quarantine (received);
    CREATE INDEX quarantine_reason ON quarantine (reason, received);
    CREATE TABLE quarantine_address (id TEXT NOT NULL, address TEXT NOT NULL);
    CREATE INDEX quarantine_address_addr ON quarantine_address (address);
    CREATE INDEX quarantine_address_id ON quarantine_address (id);
    CREATE TABLE log (
        seq INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        queue_id TEXT NOT NULL,
        direction TEXT NOT NULL,
        record TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX log_time ON log (time);
    CREATE TABLE log_address (seq INTEGER NOT NULL, address TEXT NOT NULL);
    CREATE INDEX log_address_addr ON log_address (address, seq);
    CREATE INDEX log_address_seq ON log_address (seq);
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        user TEXT NOT NULL,
        uid INTEGER NOT NULL,
        command TEXT NOT NULL,
        targets TEXT NOT NULL DEFAULT '[]',
        filters TEXT NOT NULL DEFAULT '{}',
        reason TEXT NOT NULL DEFAULT '',
        exceptional INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '{}',
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_time ON audit (time);
    """,
    # 2: access control (issue 17): exceptional-access requests and their
    # grants, pseudonymised exports (with each export's HMAC key), and holds
    # that name their investigation and may expire.  Additive only: old rows
    # (and the audit chain over them) are untouched.
    """
    CREATE TABLE access_request (
        id TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        requester TEXT NOT NULL,
        requester_uid INTEGER NOT NULL,
        scope_kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        ground TEXT NOT NULL,
        case_ref TEXT NOT NULL,
        reason TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        decided TEXT,
        decided_by TEXT,
        decided_uid INTEGER,
        expires TEXT
    );
    CREATE INDEX access_request_scope ON access_request (scope_kind, scope);
    CREATE INDEX access_request_created ON access_request (created);
    CREATE TABLE export (
        id TEXT PRIMARY KEY,
        time TEXT NOT NULL,
        user TEXT NOT NULL,
        uid INTEGER NOT NULL,
        ground TEXT NOT NULL DEFAULT '',
        case_ref TEXT NOT NULL DEFAULT '',
        filters TEXT NOT NULL DEFAULT '{}',
        identified INTEGER NOT NULL DEFAULT 0,
        hmac_key TEXT
    );
    ALTER TABLE quarantine ADD COLUMN hold_case TEXT;
    ALTER TABLE quarantine ADD COLUMN hold_until TEXT;
    CREATE INDEX quarantine_hold_until ON quarantine (hold_until) WHERE hold = 1
    """,
]




_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM quarantine"


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(values: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def _json_list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def item_row(values: Sequence[Any]) -> dict[str, Any]:
    """A quarantine row as the dict the review commands use."""
    item = dict(zip(COLUMNS, values, strict=True))
    item["rcpt_tos"] = _json_list(item["rcpt_tos"])
    item["verdicts"] = _json_list(item["verdicts"])
    item["personal"] = bool(item["personal"])
    item["hold"] = bool(item["hold"])
    return item


def _log_where(q: LogFilter, after: int) -> tuple[str, list[Any]]:
    clauses = ["l.seq > ?"]
    params: list[Any] = [after]
    if q.up_to is not None:
        clauses.append("l.seq <= ?")
        params.append(q.up_to)
    if q.since is not None:
        clauses.append("l.time >= ?")
        params.append(iso(q.since))
    if q.until is not None:
        clauses.append("l.time <= ?")
        params.append(iso(q.until))
    if q.direction is not None:
        clauses.append("l.direction = ?")
        params.append(q.direction)
    if q.address is not None:
        clauses.append("a.address = ?")
        params.append(q.address.strip().lower())
    return " AND ".join(clauses), params


def _log_from(q: LogFilter) -> str:
    if q.address is not None:
        # (address, seq) index: a keyset scan over one address's records
        return "log_address a JOIN log l ON l.seq = a.seq"
    return "log l"


#: Public methods that map their own errors, so the class decorator
#: :func:`_driver_errors` leaves them alone: ``open`` (its messages name what
#: could not be opened), ``quarantine`` (the message path: it names what could
#: not be recorded, and stays one plain coroutine), ``check`` (answers
#: ``(False, text)`` instead of raising).
_OWN_ERRORS = frozenset({"open", "quarantine", "check"})


def _as_store_error(root: Path, exc: sqlite3.Error) -> StoreError:
    """The driver's error as the protocol's: ``store <path>: <what SQLite said>``."""
    return StoreError(f"store {root}: {exc}")


#: Every public coroutine (and async generator) raises :class:`StoreError` for a
#: driver error (``sqlite3.Error``, which is also ``aiosqlite.Error``); the
#: message path's ``quarantine`` is not wrapped (see :data:`_OWN_ERRORS`), and
#: the log writer pays the wrapper once per batch, not per message.
_driver_errors = driver_errors(sqlite3.Error, lambda self, exc: _as_store_error(self.root, exc),
                               _OWN_ERRORS)


#: the most held messages one group commit carries
HOLD_BATCH = 128


@dataclass(slots=True)
class _Hold:
    """A held message waiting for its group commit."""

    qid: str
    relative: str
    #: the directory still to fsync before the commit ("": synced with the file)
    day: str
    row: tuple[Any, ...]
    addresses: list[tuple[str, str]]
    done: asyncio.Future[str]


def _remove_files(root: Path, relatives: Sequence[str]) -> None:
    for relative in relatives:
        try:
            files.secure_delete(root, relative)
        except OSError:
            log.error("could not remove orphaned quarantine file %s", relative)


@_driver_errors
class SQLiteStore:
    """The SQLite backend of :class:`quarantine.store.StoreProtocol`.

    Open with :meth:`open`; one instance per process (several processes may
    share the file: chain positions are read inside each write transaction)."""

    def __init__(
        self,
        root: Path,
        db: aiosqlite.Connection,
        *,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        keyring: KeyRing | None = None,
    ) -> None:
        self.root = root
        self.db = db
        self.clock = clock
        #: seals message files when ``[store] key_file`` is set (None: plaintext)
        self.keyring = keyring
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._log_queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.log_failures = 0
        #: held messages whose file is written, waiting for the group commit
        self._holds: list[_Hold] = []
        self._committer: asyncio.Task[None] | None = None
        #: quarantine() calls writing their file now
        self._writing = 0
        #: the message directory the last file went to (known to exist)
        self._last_dir = ""

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        create: bool = True,
        keyring: KeyRing | None = None,
    ) -> SQLiteStore:
        """Open (``create``: make) the store at ``path``.  ``keyring``
        (:func:`quarantine.crypto.open_keyring`) seals new message files and
        opens sealed ones; the store closes it."""
        root = Path(path)
        try:
            if create:
                await asyncio.to_thread(files.ensure_dir, root)
                await asyncio.to_thread(files.ensure_dir, root / MESSAGES_DIR)
            elif not root.is_dir():
                raise StoreError(f"store {root} does not exist")
            if not os.access(root, os.R_OK | os.X_OK):
                raise StoreError(f"cannot read the store at {root} (permission denied)")
            dbfile = root / DB_NAME
            if not create and not dbfile.exists():
                raise StoreError(f"no database at {dbfile}")
            new = not dbfile.exists()
            db = await aiosqlite.connect(dbfile, isolation_level=None)
        except (OSError, aiosqlite.Error) as exc:
            raise StoreError(f"cannot open the store at {root}: {exc}") from None
        try:
            if new:
                os.chmod(dbfile, files.FILE_MODE)
            # The busy timeout first: another process may be opening (and
            # switching to WAL, migrating) the same store right now.
            await db.execute("PRAGMA busy_timeout=10000")
            await switch_to_wal(db)
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA secure_delete=ON")
            await db.execute("PRAGMA foreign_keys=ON")
            store = cls(root, db, clock=clock, batch_size=batch_size, flush_interval=flush_interval,
                        keyring=keyring)
            await store._migrate()
        except (OSError, aiosqlite.Error) as exc:
            await db.close()
            raise StoreError(f"cannot open the store at {root}: {exc}") from None
        return store

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database schema version {version} is newer than this mailwarden "
                f"({len(MIGRATIONS)})"
            )
        for number in range(version, len(MIGRATIONS)):
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                # Another process opening the same new store (several serve
                # processes) may have run this step while we waited.
                async with self.db.execute("PRAGMA user_version") as cur:
                    row = await cur.fetchone()
                if row and row[0] > number:
                    await self.db.execute("COMMIT")
                    continue
                await _run_script(self.db, MIGRATIONS[number])
                await self.db.execute(f"PRAGMA user_version={number + 1}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        try:
            if self._committer is not None:
                await asyncio.shield(self._committer)
            await self.stop_log_writer()
            await self.db.close()
        finally:
            if self.keyring is not None:
                await self.keyring.close()

    async def check(self) -> tuple[bool, str]:
        """For ``mailwarden check`` and /healthz: a write test in the store."""
        try:
            await self.db.execute("SELECT count(*) FROM meta")
            probe = self.root / ".probe"
            await asyncio.to_thread(files.write_durable, self.root, ".probe", b"ok")
            await asyncio.to_thread(probe.unlink)
        except (OSError, aiosqlite.Error) as exc:
            return False, f"store {self.root}: {exc}"
        text = f"store {self.root} writable (schema v{len(MIGRATIONS)})"
        if self.keyring is not None:
            try:
                records = await self.keyring.records()
            except StoreError as exc:
                return False, str(exc)
            live = sum(1 for r in records if r.wrapped is not None)
            text += (f"; bodies encrypted, key store {self.keyring.where}: {live} live data keys,"
                     f" {len(records) - live} destroyed")
        return True, text

    # ------------------------------------------------------------ quarantine

    async def quarantine(
        self,
        *,
        raw: bytes,
        queue_id: str,
        received: datetime,
        direction: str,
        client_addr: str,
        helo: str,
        mail_from: str,
        rcpt_tos: Sequence[str],
        headers: Mapping[str, str | None],
        reason: str,
        detail: str,
        personal: bool,
        verdicts: Sequence[Mapping[str, Any]],
    ) -> str:
        """Keep a message durably; returns its quarantine id.

        The file is fsynced and renamed and the row committed before this
        returns; any failure raises :class:`StoreError` (the caller answers
        451) and leaves no half-kept item behind.

        Group commit: the file is written (and fsynced) at once, then the
        row joins the next batch of :meth:`_commit_holds`, which fsyncs the
        batch's directories once and commits all its rows in one transaction
        (one WAL fsync).  This returns only after its batch committed; a
        batch that fails fails every message of it (their files removed).
        """
        now = self.clock()
        qid = new_quarantine_id(now)
        day = f"{MESSAGES_DIR}/{now:%Y/%m/%d}"
        relative = f"{day}/{qid}.eml"
        sha = await sha256_hex(raw)
        loop = asyncio.get_running_loop()
        data = raw
        if self.keyring is not None:
            # sealed under the key of the day it was received (its period),
            # bound to its quarantine id; the sha256 column stays the plaintext's
            try:
                data = await self.keyring.seal(crypto.period_of(received), qid.encode(), raw)
            except (StoreError, OSError, aiosqlite.Error) as exc:
                raise StoreError(f"cannot seal quarantine file: {exc}") from None
        # Alone (no other hold being written or committed): the directory's
        # fsync goes with the file's, in the same worker job -- no batch to
        # amortise it over, and one thread hop less.
        alone = not self._writing and not self._holds and (
            self._committer is None or self._committer.done())
        self._writing += 1
        try:
            await loop.run_in_executor(
                None, partial(files.write_durable, self.root, relative, data, sync_dir=alone,
                              ensure=day != self._last_dir))
        except OSError as exc:
            raise StoreError(f"cannot write quarantine file: {exc}") from None
        finally:
            self._writing -= 1
        self._last_dir = day
        addrs = addresses_of(
            [mail_from, *rcpt_tos, headers.get("from"), headers.get("to"), headers.get("cc")]
        )
        row = (
            qid,
            iso(received),
            queue_id,
            direction,
            client_addr,
            helo,
            mail_from,
            json.dumps(list(rcpt_tos)),
            headers.get("from"),
            headers.get("to"),
            headers.get("subject"),
            headers.get("message-id"),
            headers.get("date"),
            len(raw),
            reason,
            detail,
            int(personal),
            relative,
            sha,
            json.dumps(list(verdicts), default=str),
            iso(now),
        )
        hold = _Hold(qid, relative, "" if alone else day, row,
                     [(qid, a) for a in sorted(addrs)], loop.create_future())
        self._holds.append(hold)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_holds(), name="quarantine-commit")
        # Shielded: a caller that goes away leaves its message to the batch.
        return await asyncio.shield(hold.done)

    async def _commit_holds(self) -> None:
        """Commit the waiting holds, a batch at a time, until none wait.

        Messages that arrive while a batch commits form the next batch, so
        under load each commit carries every session that got its file
        written meanwhile (no added wait at low load)."""
        loop = asyncio.get_running_loop()
        while self._holds:
            batch, self._holds = self._holds[:HOLD_BATCH], self._holds[HOLD_BATCH:]
            try:
                unsynced = [h.day for h in batch if h.day]
                if unsynced:
                    await loop.run_in_executor(None, files.sync_dirs, self.root, unsynced)
                async with self._lock:
                    await self.db.execute("BEGIN IMMEDIATE")
                    try:
                        await self.db.executemany(
                            "INSERT INTO quarantine (id, received, queue_id, direction,"
                            " client_addr, helo, mail_from, rcpt_tos, hdr_from, hdr_to, subject,"
                            " message_id, hdr_date, size, reason, detail, personal, hold, state,"
                            " path, sha256, verdicts, updated) VALUES"
                            " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,'held',?,?,?,?)",
                            [h.row for h in batch],
                        )
                        await self.db.executemany(
                            "INSERT INTO quarantine_address (id, address) VALUES (?, ?)",
                            [a for h in batch for a in h.addresses],
                        )
                        await self.db.execute("COMMIT")
                    except BaseException:
                        await self.db.execute("ROLLBACK")
                        raise
            except BaseException as exc:
                # Nothing of the batch is kept: no row, no file, no 250.
                error = StoreError(f"cannot record quarantine item: {exc}")
                try:
                    await loop.run_in_executor(
                        None, _remove_files, self.root, [h.relative for h in batch])
                finally:
                    for h in batch:
                        if not h.done.done():
                            h.done.set_exception(error)
                if not isinstance(exc, Exception):
                    for h in self._holds:  # cancelled or exiting: nobody commits these
                        if not h.done.done():
                            h.done.set_exception(error)
                    await loop.run_in_executor(
                        None, _remove_files, self.root, [h.relative for h in self._holds])
                    self._holds = []
                    raise
                continue
            for h in batch:
                if not h.done.done():
                    h.done.set_result(h.qid)

    # --------------------------------------------------------------- the log

    def start_log_writer(self) -> None:
        if self._writer is None:
            self._log_queue = asyncio.Queue()
            self._writer = asyncio.create_task(self._log_writer(), name="log-writer")

    def append_log(self, record: dict[str, Any]) -> None:
        """Queue a header-only log record; the writer task batches it to disk.

        ``record`` must carry ``time`` (ISO), ``queue_id``, ``direction`` and
        may carry ``addresses`` (removed from the record, used for the index).
        """
        if self._log_queue is None:
            self.start_log_writer()
        assert self._log_queue is not None
        self._log_queue.put_nowait(record)

    async def flush_log(self) -> None:
        """Wait until every queued record is written."""
        if self._log_queue is not None:
            await self._log_queue.join()

    async def stop_log_writer(self) -> None:
        if self._writer is None or self._log_queue is None:
            return
        await self._log_queue.put(None)
        try:
            await self._writer
        finally:
            self._writer = None
            self._log_queue = None

    async def _log_writer(self) -> None:
        queue = self._log_queue
        assert queue is not None
        stop = False
        while not stop:
            item = await queue.get()
            batch: list[dict[str, Any]] = []
            if item is None:
                queue.task_done()
                break
            batch.append(item)
            deadline = asyncio.get_running_loop().time() + self.flush_interval
            while len(batch) < self.batch_size:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    item = queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(
                        queue.get(), timeout
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if item is None:
                    stop = True
                    queue.task_done()
                    break
                batch.append(item)
            try:
                await self.write_log_batch(batch)
            except Exception:
                self.log_failures += len(batch)
                log.exception("could not write %d log records", len(batch))
            finally:
                for _ in batch:
                    queue.task_done()

    async def write_log_batch(self, batch: Sequence[dict[str, Any]]) -> None:
        """Append records to the chained log in one transaction.

        A fixed number of round trips to the database thread whatever the
        batch size (the rows get their ``seq`` here, the next after the last,
        inside the write lock: what SQLite would give them): each round trip
        is a hand-over between threads that competes with the mail on the
        event loop."""
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                seq, prev = await self._chain_head("log", "log_anchor")
                rows: list[tuple[int, str, str, str, str, str]] = []
                index: list[tuple[int, str]] = []
                for rec in batch:
                    rec = dict(rec)
                    addrs = sorted(set(rec.pop("addresses", ()) or ()))
                    payload = canonical(rec)
                    h = chain_hash(prev, payload)
                    seq += 1
                    rows.append((seq, rec["time"], rec.get("queue_id", ""),
                                 rec.get("direction", ""), payload, h))
                    index.extend((seq, a) for a in addrs)
                    prev = h
                await self.db.executemany(
                    "INSERT INTO log (seq, time, queue_id, direction, record, hash)"
                    " VALUES (?,?,?,?,?,?)",
                    rows,
                )
                if index:
                    await self.db.executemany(
                        "INSERT INTO log_address (seq, address) VALUES (?, ?)", index
                    )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    # ----------------------------------------------------------------- audit

    async def audit(
        self,
        command: str,
        *,
        targets: Sequence[str] = (),
        filters: Mapping[str, Any] | None = None,
        reason: str = "",
        exceptional: bool = False,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Write an audit row (chained) and commit it; returns its seq.

        Call this *before* showing or changing anything.
        """
        user, uid = os_user()
        now = iso(self.clock())
        row = {
            "time": now,
            "user": user,
            "uid": uid,
            "command": command,
            "targets": list(targets),
            "filters": dict(filters or {}),
            "reason": reason,
            "exceptional": bool(exceptional),
            "detail": dict(detail or {}),
        }
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                last, prev = await self._chain_head("audit", "audit_anchor")
                seq = last + 1
                h = chain_hash(prev, canonical(row))
                await self.db.execute(
                    "INSERT INTO audit (seq, time, user, uid, command, targets, filters, reason,"
                    " exceptional, detail, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        seq,
                        now,
                        user,
                        uid,
                        command,
                        json.dumps(row["targets"]),
                        canonical(row["filters"]),
                        reason,
                        int(exceptional),
                        canonical(row["detail"]),
                        h,
                    ),
                )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return seq

    # ------------------------------------------------- quarantine: reading

    async def quarantine_reasons(self, name: str) -> list[str]:
        """The stored ``reason`` values (comma-separated filter names) naming ``name``.

        A loose index scan over ``quarantine_reason``: one index seek per
        distinct value, so it costs nothing on 100,000 items.
        """
        async with self.db.execute(
            "WITH RECURSIVE r(reason) AS (SELECT min(reason) FROM quarantine UNION ALL"
            " SELECT (SELECT min(reason) FROM quarantine WHERE reason > r.reason) FROM r"
            " WHERE r.reason IS NOT NULL) SELECT reason FROM r WHERE reason IS NOT NULL"
        ) as cur:
            values = [r[0] for r in await cur.fetchall()]
        return [v for v in values if name in v.split(",")]

    async def list_quarantine(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        reason: str | None = None,
        address: str | None = None,
        state: str = "held",
        limit: int = 50,
        page: int = 1,
        window: int = 5000,
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of items, newest first; returns (items, more pages exist).

        Two plans, so that no filter makes a page slow on a big quarantine:

        1. walk the ``received`` index backwards over the newest ``window``
           items in range and stop after the page is full (dense matches);
        2. if the window holds fewer matches than the page needs, one
           sequential scan with a top-N sort (ordering by ``received || ''``
           keeps SQLite off the index, whose random row lookups cost thirty
           times more than reading the table in order).
        """
        where: list[str] = []
        args: list[Any] = []
        rng: list[str] = []
        rng_args: list[Any] = []
        if since:
            rng.append("received >= ?")
            rng_args.append(since)
        if until:
            rng.append("received <= ?")
            rng_args.append(until)
        if state != "all":
            where.append("state = ?")
            args.append(state)
        if reason:
            values = await self.quarantine_reasons(reason.strip().lower())
            if not values:
                return [], False
            where.append(f"reason IN ({_marks(len(values))})")
            args += values
        if address:
            where.append("id IN (SELECT id FROM quarantine_address WHERE address = ?)")
            args.append(address)
        need, offset = limit + 1, (page - 1) * limit
        conditions = [*rng, *where]
        base = _SELECT + (" WHERE " + " AND ".join(conditions) if conditions else "")

        async with self.db.execute(
            "SELECT received FROM quarantine" + (" WHERE " + " AND ".join(rng) if rng else "")
            + " ORDER BY received DESC LIMIT 1 OFFSET ?",
            [*rng_args, window + offset],
        ) as cur:
            edge = await cur.fetchone()
        rows: list[Any] = []
        if where and offset > window:
            # A deep page of a filtered list: straight to the sequential scan.
            async with self.db.execute(
                base + " ORDER BY received || '' DESC LIMIT ? OFFSET ?",
                [*rng_args, *args, need, offset],
            ) as cur:
                rows = list(await cur.fetchall())
        elif edge is None or where:
            # The index walk, bounded to the window when the range is bigger.
            sql = base + (" AND" if conditions else " WHERE") + " received >= ?" if edge else base
            bound = [edge[0]] if edge else []
            async with self.db.execute(
                sql + " ORDER BY received DESC LIMIT ? OFFSET ?",
                [*rng_args, *args, *bound, need, offset],
            ) as cur:
                rows = list(await cur.fetchall())
            if edge is not None and len(rows) < need:
                async with self.db.execute(
                    base + " ORDER BY received || '' DESC LIMIT ? OFFSET ?",
                    [*rng_args, *args, need, offset],
                ) as cur:
                    rows = list(await cur.fetchall())
        else:
            # No filter beyond the range: the index walk is exact and short.
            async with self.db.execute(
                base + " ORDER BY received DESC LIMIT ? OFFSET ?", [*rng_args, need, offset]
            ) as cur:
                rows = list(await cur.fetchall())
        items = [item_row(r) for r in rows]
        return items[:limit], len(items) > limit

    async def get_item(self, qid: str) -> dict[str, Any] | None:
        """The item ``qid`` (see :data:`COLUMNS`), or None."""
        async with self.db.execute(_SELECT + " WHERE id = ?", (qid,)) as cur:
            row = await cur.fetchone()
        return None if row is None else item_row(row)

    async def get_items(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The items ``ids`` that exist, oldest first."""
        out: list[dict[str, Any]] = []
        for chunk in _chunks(list(ids)):
            async with self.db.execute(
                _SELECT + f" WHERE id IN ({_marks(len(chunk))}) ORDER BY received", list(chunk)
            ) as cur:
                out += [item_row(r) for r in await cur.fetchall()]
        out.sort(key=lambda i: i["received"])
        return out

    async def read_body(self, item: Mapping[str, Any]) -> bytes:
        """The stored message bytes of ``item`` (FileNotFoundError, StorePathError).

        A sealed file is opened with the key ring (:class:`~quarantine.crypto.KeyDestroyed`
        once its period's key is gone); a plaintext file (kept before
        ``key_file`` was set) is returned as it is."""
        data = await asyncio.to_thread(files.read_message, self.root, item["path"])
        if not crypto.is_sealed(data):
            return data
        if self.keyring is not None:
            try:
                return await self.keyring.open(data, str(item["id"]).encode())
            except (crypto.CryptoError, crypto.KekError):
                if not await self._is_plaintext(data, item):
                    raise
                return data
        if await self._is_plaintext(data, item):
            return data
        raise StoreError(f"the message file of {item['id']} is encrypted and store.key_file"
                         " is not set")

    @staticmethod
    async def _is_plaintext(data: bytes, item: Mapping[str, Any]) -> bool:
        """Whether ``data`` is the plaintext message itself (one that happens to
        start like a sealed blob), by its recorded SHA-256."""
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest() == item["sha256"])

    async def _reseal_for_hold(self, item: Mapping[str, Any]) -> bool:
        """Re-encrypt a held item's file under its own key ``hold:<id>``, so it
        outlives its period's key; whether the file was rewritten."""
        if self.keyring is None or item["state"] == "deleted":
            return False
        qid = str(item["id"])
        try:
            head = await asyncio.to_thread(files.read_head, self.root, item["path"])
        except FileNotFoundError:
            return False
        if not crypto.is_sealed(head):
            return False  # kept before encryption was switched on: stays as it is
        try:
            if crypto.parse_blob(head).key_id == crypto.hold_key_id(qid):
                return False  # done already
        except crypto.BlobError:
            pass  # read_body tells a plaintext that starts like a blob apart
        plain = await self.read_body(item)
        blob = await self.keyring.seal(crypto.hold_key_id(qid), qid.encode(), plain)
        await asyncio.to_thread(files.write_durable, self.root, item["path"], blob)
        return True

    async def _destroy_hold_keys(self, ids: Sequence[str]) -> None:
        if self.keyring is not None and ids:
            await self.keyring.destroy([crypto.hold_key_id(i) for i in ids])

    async def reseal_held_before(self, cutoff: str) -> list[str]:
        """Ids of the items under hold received before ``cutoff``, each made
        sure to be sealed under its own hold key (retention calls this before
        destroying the period keys; normally ``set_hold`` did it already)."""
        async with self.db.execute(
            _SELECT + " WHERE received < ? AND hold = 1 AND state != 'deleted' ORDER BY received",
            (cutoff,),
        ) as cur:
            items = [item_row(r) for r in await cur.fetchall()]
        for item in items:
            await self._reseal_for_hold(item)
        return [i["id"] for i in items]

    async def item_is_live(self, qid: str, path: str) -> bool:
        """Whether a live (not deleted) row owns the message file ``path``."""
        async with self.db.execute(
            "SELECT 1 FROM quarantine WHERE id = ? AND path = ? AND state != 'deleted'",
            (qid, path),
        ) as cur:
            return await cur.fetchone() is not None

    async def quarantine_totals(self) -> tuple[int, int]:
        """(items, bytes) held now (for the metrics)."""
        async with self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM quarantine WHERE state = 'held'"
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # ------------------------------------------------ quarantine: changing

    async def mark_released(self, qid: str) -> None:
        now = iso(self.clock())
        async with self.transaction() as db:
            await db.execute(
                "UPDATE quarantine SET state = 'released', updated = ?"
                " WHERE id = ? AND state != 'deleted'",
                (now, qid),
            )

    async def set_hold(self, qid: str, hold: bool, *, case: str | None = None,
                       until: str | None = None) -> None:
        """Put ``qid`` under hold (naming its ``case``, until ``until`` or
        indefinitely) or lift it (case and until cleared).  Setting it first
        re-encrypts a sealed file under the item's own key (``hold:<id>``),
        which stays until the item is deleted, erased or purged (an unheld
        item keeps it)."""
        if hold:
            item = await self.get_item(qid)
            if item is not None:
                await self._reseal_for_hold(item)
        now = iso(self.clock())
        if not hold:
            case = until = None
        async with self.transaction() as db:
            await db.execute(
                "UPDATE quarantine SET hold = ?, hold_case = ?, hold_until = ?, updated = ?"
                " WHERE id = ?",
                (int(hold), case, until, now, qid),
            )

    async def release_expired_holds(
        self, now: str, *, dry_run: bool = False
    ) -> list[tuple[str, str | None, str]]:
        """(id, case, until) of the holds whose ``until`` is at or before
        ``now``; unless ``dry_run``, lift them (in the same transaction), so
        retention applies to those items again."""
        async with self.transaction() as db:
            async with db.execute(
                "SELECT id, hold_case, hold_until FROM quarantine WHERE hold = 1"
                " AND hold_until IS NOT NULL AND hold_until <= ? ORDER BY hold_until, id",
                (now,),
            ) as cur:
                rows = [(r[0], r[1], r[2]) for r in await cur.fetchall()]
            if rows and not dry_run:
                for chunk in _chunks([r[0] for r in rows]):
                    await db.execute(
                        "UPDATE quarantine SET hold = 0, hold_case = NULL, hold_until = NULL,"
                        f" updated = ? WHERE hold = 1 AND id IN ({_marks(len(chunk))})",
                        [now, *chunk],
                    )
        return rows

    # ------------------------------------------------- access control

    async def add_access_request(self, request: Mapping[str, Any]) -> None:
        """Insert an exceptional-access request (keys :data:`REQUEST_COLUMNS`)."""
        values = [request.get(c) for c in REQUEST_COLUMNS]
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO access_request (id, created, requester, requester_uid, scope_kind,"
                " scope, ground, case_ref, reason, state, decided, decided_by, decided_uid,"
                " expires) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                values,
            )

    async def get_access_request(self, rid: str) -> dict[str, Any] | None:
        async with self.db.execute(
            REQUEST_SELECT + " WHERE id = ?",
            (rid,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else dict(zip(REQUEST_COLUMNS, row, strict=True))

    async def access_requests(
        self, *, requester: str | None = None, scope_kind: str | None = None,
        scope: Sequence[str] = (), state: str | None = None,
    ) -> list[dict[str, Any]]:
        """Requests (oldest first), optionally only ``requester``'s, of one
        scope kind and scope values, in one stored state."""
        where: list[str] = []
        args: list[Any] = []
        if requester is not None:
            where.append("requester = ?")
            args.append(requester)
        if scope_kind is not None:
            where.append("scope_kind = ?")
            args.append(scope_kind)
        if scope:
            values = list(scope)
            where.append(f"scope IN ({_marks(len(values))})")
            args += values
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = REQUEST_SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, id"
        async with self.db.execute(sql, args) as cur:
            return [dict(zip(REQUEST_COLUMNS, r, strict=True)) for r in await cur.fetchall()]

    async def decide_access_request(
        self, rid: str, *, state: str, decided: str, decided_by: str, decided_uid: int,
        expires: str | None,
    ) -> bool:
        """Approve or deny a *pending* request; False when it was not pending
        (decided meanwhile: checked inside the updating statement)."""
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE access_request SET state = ?, decided = ?, decided_by = ?,"
                " decided_uid = ?, expires = ? WHERE id = ? AND state = 'pending'",
                (state, decided, decided_by, decided_uid, expires, rid),
            )
            changed = cur.rowcount
            await cur.close()
        return changed == 1

    async def add_export(self, export: Mapping[str, Any]) -> None:
        """Record an export (keys :data:`EXPORT_COLUMNS`; ``filters`` a mapping)."""
        values = [export.get(c) for c in EXPORT_COLUMNS]
        values[EXPORT_COLUMNS.index("filters")] = canonical(dict(export.get("filters") or {}))
        values[EXPORT_COLUMNS.index("identified")] = int(bool(export.get("identified")))
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO export (id, time, user, uid, ground, case_ref, filters, identified,"
                " hmac_key) VALUES (?,?,?,?,?,?,?,?,?)",
                values,
            )

    async def get_export(self, eid: str) -> dict[str, Any] | None:
        async with self.db.execute(
            "SELECT id, time, user, uid, ground, case_ref, filters, identified, hmac_key"
            " FROM export WHERE id = ?",
            (eid,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        out = dict(zip(EXPORT_COLUMNS, row, strict=True))
        try:
            out["filters"] = json.loads(out["filters"] or "{}")
        except ValueError:
            out["filters"] = {}
        out["identified"] = bool(out["identified"])
        return out

    async def delete_item(self, qid: str) -> bool:
        """Tombstone the row (blanking everything personal), then overwrite and
        unlink the file; returns whether a file was removed.  Raises
        :class:`NotFound`, or :class:`OnHold` (hold checked inside the
        deleting transaction)."""
        now = iso(self.clock())
        async with self.transaction() as db:
            async with db.execute("SELECT hold, path FROM quarantine WHERE id = ?", (qid,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound(qid)
            if row[0]:
                raise OnHold(qid)
            path = row[1]
            await db.execute(
                "UPDATE quarantine SET state = 'deleted', client_addr = '', helo = '',"
                " mail_from = '', rcpt_tos = '[]', hdr_from = NULL, hdr_to = NULL,"
                " subject = NULL, message_id = NULL, hdr_date = NULL, detail = '',"
                " verdicts = '[]', updated = ? WHERE id = ?",
                (now, qid),
            )
            await db.execute("DELETE FROM quarantine_address WHERE id = ?", (qid,))
        removed = await asyncio.to_thread(files.secure_delete, self.root, path)
        await self._destroy_hold_keys([qid])
        return removed

    async def _remove_items(self, rows: Sequence[Sequence[Any]], db: aiosqlite.Connection) -> None:
        ids = [r[0] for r in rows]
        if ids:
            await db.execute(f"DELETE FROM quarantine_address WHERE id IN ({_marks(len(ids))})", ids)
            await db.execute(f"DELETE FROM quarantine WHERE id IN ({_marks(len(ids))})", ids)

    async def erase_items(self, ids: Sequence[str]) -> tuple[list[str], int]:
        """Remove the rows ``ids`` not under hold (hold re-checked inside each
        transaction), then their files; returns (removed ids, files removed)."""
        removed: list[str] = []
        paths: list[str] = []
        for chunk in _chunks(list(ids)):
            async with self.transaction() as db:
                async with db.execute(
                    f"SELECT id, path FROM quarantine WHERE hold = 0"
                    f" AND id IN ({_marks(len(chunk))})",
                    list(chunk),
                ) as cur:
                    rows = await cur.fetchall()
                await self._remove_items(rows, db)
            removed += [r[0] for r in rows]
            paths += [r[1] for r in rows]
        files_removed = 0
        for p in paths:
            if await asyncio.to_thread(files.secure_delete, self.root, p):
                files_removed += 1
        await self._destroy_hold_keys(removed)
        return removed, files_removed

    # ----------------------------------------------------- subject access

    async def subject_log_seqs(self, address: str) -> list[int]:
        async with self.db.execute(
            "SELECT seq FROM log_address WHERE address = ? ORDER BY seq", (address,)
        ) as cur:
            return sorted({int(r[0]) for r in await cur.fetchall()})

    async def subject_items(self, address: str) -> list[tuple[str, bool, bool]]:
        """(id, hold, personal) of the items concerning ``address``, oldest first."""
        async with self.db.execute(
            "SELECT q.id, q.hold, q.personal FROM quarantine q WHERE q.id IN"
            " (SELECT id FROM quarantine_address WHERE address = ?) ORDER BY q.received",
            (address,),
        ) as cur:
            return [(r[0], bool(r[1]), bool(r[2])) for r in await cur.fetchall()]

    async def log_records(self, seqs: Sequence[int]) -> AsyncIterator[tuple[int, str, str]]:
        """(seq, time, record) of the log rows ``seqs``, in seq order, in chunks."""
        for chunk in _chunks(list(seqs)):
            async with self.db.execute(
                f"SELECT seq, time, record FROM log WHERE seq IN ({_marks(len(chunk))})"
                " ORDER BY seq",
                list(chunk),
            ) as cur:
                rows = await cur.fetchall()
            for r in rows:
                yield int(r[0]), r[1], r[2]

    async def erase_log(self, seqs: Sequence[int], tombstone: str) -> int:
        """Replace the records ``seqs`` with ``tombstone`` (hash kept), drop their index rows."""
        erased = 0
        for chunk in _chunks(list(seqs)):
            async with self.transaction() as db:
                cur = await db.execute(
                    f"UPDATE log SET record = ?, queue_id = '', direction = ''"
                    f" WHERE seq IN ({_marks(len(chunk))})",
                    [tombstone, *chunk],
                )
                erased += max(cur.rowcount, 0)
                await cur.close()
                await db.execute(
                    f"DELETE FROM log_address WHERE seq IN ({_marks(len(chunk))})", list(chunk)
                )
        return erased

    # ------------------------------------------------------- log: reading

    async def log_page(self, query: LogFilter, after: int, limit: int) -> list[Row]:
        """Up to ``limit`` rows matching ``query`` with ``seq > after``, in seq order."""
        where, params = _log_where(query, after)
        async with self.db.execute(
            "SELECT l.seq, l.time, l.queue_id, l.direction, l.record, l.hash"
            f" FROM {_log_from(query)} WHERE {where} ORDER BY l.seq LIMIT ?",
            [*params, limit],
        ) as cur:
            return [Row(*r) for r in await cur.fetchall()]

    async def log_count(self, query: LogFilter) -> int:
        where, params = _log_where(query, 0)
        async with self.db.execute(
            f"SELECT count(*) FROM {_log_from(query)} WHERE {where}", params
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def log_last_seq(self) -> int:
        async with self.db.execute("SELECT max(seq) FROM log") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def log_index(self, lo: int, hi: int) -> dict[int, list[str]]:
        """The address index of the log rows ``lo..hi``."""
        out: dict[int, list[str]] = {}
        async with self.db.execute(
            "SELECT seq, address FROM log_address WHERE seq >= ? AND seq <= ?", (lo, hi)
        ) as cur:
            for seq, address in await cur.fetchall():
                out.setdefault(seq, []).append(address)
        return out

    async def log_anchor(self) -> str:
        return await self._meta("log_anchor", GENESIS)

    async def audit_anchor(self) -> str:
        return await self._meta("audit_anchor", GENESIS)

    # ------------------------------------------- chains (for log verify)

    async def log_chains(self) -> list[Chain]:
        """The one log chain (instance ""), from ``meta.log_anchor``."""
        return [Chain("", await self.log_anchor())]

    async def log_chain_page(self, instance: str, after: int, limit: int) -> list[Row]:
        """Rows of the (one) chain with ``seq > after``, in seq order."""
        async with self.db.execute(
            "SELECT seq, time, queue_id, direction, record, hash FROM log WHERE seq > ?"
            " ORDER BY seq LIMIT ?",
            (after, limit),
        ) as cur:
            return [Row(*r) for r in await cur.fetchall()]

    async def audit_chains(self) -> list[Chain]:
        return [Chain("", await self.audit_anchor())]

    async def audit_chain_page(
        self, instance: str, after: int, limit: int
    ) -> list[tuple[Any, ...]]:
        """:meth:`audit_page` rows plus (chain seq, instance "", record hash "")."""
        return [(*r, r[0], "", "") for r in await self.audit_page(after, limit)]

    async def anchor_chain(self) -> Chain:
        """No anchor chain (see :meth:`anchor_page`): it starts at GENESIS."""
        return Chain("", GENESIS, 0)

    async def anchor_page(self, after: int, limit: int) -> list[tuple[int, str, str, str, str]]:
        """No anchor chain: one writer's chain needs none."""
        return []

    # ----------------------------------------------------- audit: reading

    async def audit_page(self, after: int, limit: int) -> list[tuple[Any, ...]]:
        """Raw audit rows (seq, time, user, uid, command, targets, filters,
        reason, exceptional, detail, hash) with ``seq > after``, in seq order."""
        async with self.db.execute(
            "SELECT seq, time, user, uid, command, targets, filters, reason, exceptional,"
            " detail, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def audit_rows(
        self, *, since: str | None = None, until: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Raw audit rows (as :meth:`audit_page`), oldest first, ``until`` inclusive."""
        where, args = [], []
        if since:
            where.append("time >= ?")
            args.append(since)
        if until:
            where.append("time <= ?")
            args.append(until)
        sql = ("SELECT seq, time, user, uid, command, targets, filters, reason, exceptional,"
               " detail, hash FROM audit")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq"
        async with self.db.execute(sql, args) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def audit_entry(self, seq: int) -> tuple[str, str] | None:
        """(command, detail JSON) of audit row ``seq``, or None."""
        async with self.db.execute(
            "SELECT command, detail FROM audit WHERE seq = ?", (seq,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else (row[0], row[1])

    async def audit_first_seq(self) -> int | None:
        async with self.db.execute("SELECT min(seq) FROM audit") as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # ---------------------------------------------------------- retention

    async def _count(self, sql: str, args: tuple[Any, ...]) -> int:
        async with self.db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0] or 0) if row else 0

    async def _prefix_end(self, table: str, cutoff: str) -> int:
        # ``time || ''`` keeps SQLite off the time index: it walks the primary
        # key from the oldest row and stops at the first one to keep.
        async with self.db.execute(
            f"SELECT seq FROM {table} WHERE time || '' >= ? ORDER BY seq LIMIT 1", (cutoff,)
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            return int(row[0]) - 1
        return await self._count(f"SELECT max(seq) FROM {table}", ())

    async def retention_plan(self, cutoff: str, audit_cutoff: str) -> dict[str, int]:
        """Counts of what a purge with these cutoffs removes, and the chain
        prefix ends (``log_end``, ``audit_end``: the last seq of each chain's
        prefix older than its cutoff, 0 for none)."""
        log_end = await self._prefix_end("log", cutoff)
        audit_end = await self._prefix_end("audit", audit_cutoff)
        return {
            "quarantine_items": await self._count(
                "SELECT count(*) FROM quarantine WHERE received < ? AND hold = 0", (cutoff,)
            ),
            "kept_under_hold": await self._count(
                "SELECT count(*) FROM quarantine WHERE received < ? AND hold = 1", (cutoff,)
            ),
            "log_records": await self._count("SELECT count(*) FROM log WHERE seq <= ?", (log_end,)),
            "audit_rows": await self._count(
                "SELECT count(*) FROM audit WHERE seq <= ?", (audit_end,)
            ),
            "log_end": log_end,
            "audit_end": audit_end,
        }

    async def purge_quarantine_before(
        self, cutoff: str, batch: int = 500
    ) -> AsyncIterator[list[tuple[str, str]]]:
        """Remove the rows of items received before ``cutoff`` and not under
        hold, ``batch`` per transaction; yields each batch's (id, path) after
        its commit so the caller destroys the files (rows first, files after)."""
        while True:
            async with self.transaction() as db:
                async with db.execute(
                    "SELECT id, path FROM quarantine WHERE received < ? AND hold = 0"
                    " ORDER BY received LIMIT ?",
                    (cutoff, batch),
                ) as cur:
                    rows = [(r[0], r[1]) for r in await cur.fetchall()]
                await self._remove_items(rows, db)
            if not rows:
                return
            yield rows

    async def delete_body(self, path: str) -> bool:
        """Overwrite and unlink a message file; whether one was there."""
        return await asyncio.to_thread(files.secure_delete, self.root, path)

    async def purge_log_through(self, end: int, batch: int = 5000) -> int:
        return await self._purge_chain("log", "log_anchor", end, batch)

    async def purge_audit_through(self, end: int, batch: int = 5000) -> int:
        return await self._purge_chain("audit", "audit_anchor", end, batch)

    async def _purge_chain(self, table: str, anchor: str, end: int, batch: int) -> int:
        """Delete rows ``seq <= end`` of a chained table, oldest first, moving
        the anchor to the last deleted hash in the same transaction."""
        index = {"log": "log_address"}.get(table)
        total = 0
        while True:
            async with self.transaction() as db:
                async with db.execute(
                    f"SELECT seq, hash FROM {table} WHERE seq <= ? ORDER BY seq LIMIT ?",
                    (end, batch),
                ) as cur:
                    rows = await cur.fetchall()
                if rows:
                    last, last_hash = rows[-1]
                    if index:
                        await db.execute(f"DELETE FROM {index} WHERE seq <= ?", (last,))
                    await db.execute(f"DELETE FROM {table} WHERE seq <= ?", (last,))
                    await self.set_meta(anchor, last_hash)
            if not rows:
                return total
            total += len(rows)


    # ------------------------------------------------------------------ meta

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the store's lock (ROLLBACK on error).

        For code outside this class that changes several rows at once
        (retention, review commands): the connection is shared with the log
        writer and the quarantine writes, so every transaction takes the lock.
        """
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def checkpoint(self) -> str:
        """``PRAGMA wal_checkpoint(TRUNCATE)``: copy the WAL into the database
        and truncate it, so deleted data does not linger in the WAL file.
        Returns ``"truncated"``, or ``"busy"`` when a reader elsewhere kept the
        WAL from being reset (the next checkpoint finishes the job)."""
        async with self._lock:
            async with self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                row = await cur.fetchone()
        return "busy" if row is None or row[0] else "truncated"

    async def get_meta(self, key: str, default: str) -> str:
        """A value from the ``meta`` table (e.g. the chain anchors)."""
        return await self._meta(key, default)

    async def _chain_head(self, table: str, anchor: str) -> tuple[int, str]:
        """The chain's last (seq, hash), or (0, its anchor) when it is empty.

        Read inside the caller's write transaction, so the position a new
        row takes is the store's, whatever other writers did before."""
        async with self.db.execute(
            f"SELECT seq, hash FROM {table} ORDER BY seq DESC LIMIT 1"  # table: a fixed name
        ) as cur:
            row = await cur.fetchone()
        if row:
            return int(row[0]), str(row[1])
        return 0, await self._meta(anchor, GENESIS)

    async def _meta(self, key: str, default: str) -> str:
        async with self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return row[0] if row else default

    async def set_meta(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


async def switch_to_wal(db: aiosqlite.Connection, patience: float = 10.0) -> None:
    """``PRAGMA journal_mode=WAL``.  While another process switches the same
    new store, SQLite may answer "database is locked" at once (without the
    busy handler): try again, for up to ``patience`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() > deadline:
                raise
        await asyncio.sleep(0.05)


async def _run_script(db: aiosqlite.Connection, script: str) -> None:
    """Run a migration's statements inside the already-open transaction."""
    for statement in script.split(";"):
        if statement.strip():
            await db.execute(statement)
