"""The store under ``store.path``: one SQLite database (WAL) and message files.

Tables (schema versioned, see ``MIGRATIONS``):

* ``quarantine``: one row per held message (header-only metadata; the body is
  the file under ``messages/``), with ``quarantine_address`` as an index of the
  addresses each item concerns.
* ``log``: the header-only monitoring log, one record per finished message,
  each carrying ``hash = SHA-256(prev_hash || canonical record)`` so that any
  edit breaks the chain; ``log_address`` indexes the addresses.
* ``audit``: every access to kept data (chained the same way).
* ``meta``: schema version and chain anchors.

All SQL is plain and parameterised (portable to PostgreSQL later).  Writes
from the event loop go through aiosqlite's thread, file I/O through an
executor: nothing here blocks the loop.  Quarantine rows are committed with
``synchronous=FULL`` before the client is told 250.  Log records are batched
by one writer task; a crash may lose the last unwritten batch of *log
records* (never a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import pwd
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from quarantine import files

log = logging.getLogger("mailwarden.store")

DB_NAME = "mailwarden.db"
MESSAGES_DIR = "messages"
GENESIS = "0" * 64

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
]


class StoreError(Exception):
    """The store cannot be used (permissions, disk, corrupt database)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a Z suffix (sorts as text)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(obj: Any) -> str:
    """The canonical JSON encoding hashed by the log and audit chains."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev: str, payload: str) -> str:
    return hashlib.sha256((prev + "\n" + payload).encode("utf-8")).hexdigest()


#: Keys of an erased log record's payload (see :func:`erased_record`).
ERASED_KEYS = frozenset({"erased", "erased_at", "audit_seq"})


def erased_record(when: str, audit_seq: int) -> str:
    """The payload that replaces a log record erased at a data subject's request.

    The row keeps its ``hash``; only its link to the previous row can no
    longer be recomputed.  A verifier takes an erased row's stored hash as the
    ``prev`` of the next row, so every other record stays verifiable (and the
    erased row's hash is still bound into its successor's).  ``audit_seq``
    names the audit row of the ``erase`` command that lists the erased seqs.
    """
    return canonical({"erased": True, "erased_at": when, "audit_seq": audit_seq})


def is_erased(payload: str) -> bool:
    """Whether a log row's stored record is an :func:`erased_record` tombstone."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("erased") is True and set(obj) <= ERASED_KEYS


def os_user() -> tuple[str, int]:
    """The OS user from the real uid (who ran the command).

    Under sudo (e.g. ``sudo -u mailwarden mailwarden quarantine show ...``) the
    invoking user is recorded too: ``mailwarden (sudo: alice)``.
    """
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != name:
        name = f"{name} (sudo: {''.join(c for c in sudo_user if c.isprintable())[:64]})"
    return name, uid


def new_quarantine_id(now: datetime) -> str:
    return now.strftime("%Y%m%d") + "-" + secrets.token_hex(6).upper()


def addresses_of(values: Iterable[str | None]) -> set[str]:
    """Lower-case bare addresses from envelope values and header values."""
    import email.utils

    out: set[str] = set()
    for v in values:
        if not v:
            continue
        for _, addr in email.utils.getaddresses([v]):
            addr = addr.strip().lower()
            if addr:
                out.add(addr)
    return out


class Store:
    """The store.  Open with :meth:`open`; one instance per process."""

    def __init__(
        self,
        root: Path,
        db: aiosqlite.Connection,
        *,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = 200,
        flush_interval: float = 0.5,
    ) -> None:
        self.root = root
        self.db = db
        self.clock = clock
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._log_queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.log_failures = 0

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
    ) -> Store:
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
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA secure_delete=ON")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=10000")
            store = cls(root, db, clock=clock, batch_size=batch_size, flush_interval=flush_interval)
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
                await _run_script(self.db, MIGRATIONS[number])
                await self.db.execute(f"PRAGMA user_version={number + 1}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        await self.stop_log_writer()
        await self.db.close()

    async def check(self) -> tuple[bool, str]:
        """For ``mailwarden check`` and /healthz: a write test in the store."""
        try:
            await self.db.execute("SELECT count(*) FROM meta")
            probe = self.root / ".probe"
            await asyncio.to_thread(files.write_durable, self.root, ".probe", b"ok")
            await asyncio.to_thread(probe.unlink)
        except (OSError, aiosqlite.Error) as exc:
            return False, f"store {self.root}: {exc}"
        return True, f"store {self.root} writable (schema v{len(MIGRATIONS)})"

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
        """
        now = self.clock()
        qid = new_quarantine_id(now)
        relative = f"{MESSAGES_DIR}/{now:%Y/%m/%d}/{qid}.eml"
        sha = hashlib.sha256(raw).hexdigest()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, files.write_durable, self.root, relative, raw)
        except OSError as exc:
            raise StoreError(f"cannot write quarantine file: {exc}") from None
        addrs = addresses_of(
            [mail_from, *rcpt_tos, headers.get("from"), headers.get("to"), headers.get("cc")]
        )
        try:
            async with self._lock:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    await self.db.execute(
                        "INSERT INTO quarantine (id, received, queue_id, direction, client_addr,"
                        " helo, mail_from, rcpt_tos, hdr_from, hdr_to, subject, message_id,"
                        " hdr_date, size, reason, detail, personal, hold, state, path, sha256,"
                        " verdicts, updated) VALUES"
                        " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,'held',?,?,?,?)",
                        (
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
                        ),
                    )
                    await self.db.executemany(
                        "INSERT INTO quarantine_address (id, address) VALUES (?, ?)",
                        [(qid, a) for a in sorted(addrs)],
                    )
                    await self.db.execute("COMMIT")
                except BaseException:
                    await self.db.execute("ROLLBACK")
                    raise
        except (aiosqlite.Error, OSError) as exc:
            try:
                await loop.run_in_executor(None, files.secure_delete, self.root, relative)
            except OSError:
                log.error("could not remove orphaned quarantine file %s", relative)
            raise StoreError(f"cannot record quarantine item: {exc}") from None
        return qid

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
                async with self.db.execute(
                    "SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1"
                ) as cur:
                    row = await cur.fetchone()
                if row:
                    seq, prev = int(row[0]), row[1]
                else:
                    seq, prev = 0, await self._meta("log_anchor", GENESIS)
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
                async with self.db.execute(
                    "SELECT hash FROM audit ORDER BY seq DESC LIMIT 1"
                ) as cur:
                    last = await cur.fetchone()
                prev = last[0] if last else await self._meta("audit_anchor", GENESIS)
                h = chain_hash(prev, canonical(row))
                cur = await self.db.execute(
                    "INSERT INTO audit (time, user, uid, command, targets, filters, reason,"
                    " exceptional, detail, hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
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
                seq = cur.lastrowid
                await cur.close()
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return int(seq or 0)

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


async def _run_script(db: aiosqlite.Connection, script: str) -> None:
    """Run a migration's statements inside the already-open transaction."""
    for statement in script.split(";"):
        if statement.strip():
            await db.execute(statement)
