"""The PostgreSQL backend of the store protocol (issue 16): several gateways, one store.

Every SQL statement for PostgreSQL lives in this module (docs/store.md has the
picture).  Several gateway instances (``[store] instance``, default the host
name) share one database: one quarantine, one log, one audit trail.

* **Schema**: :data:`MIGRATIONS`, applied in order under an advisory lock
  (several gateways may start at once) and recorded in ``schema_version``.
* **Quarantine**: rows as in SQLite plus the ``instance`` that held the item;
  the message bytes in ``body`` (bytea), so any instance shows and releases
  any item.  Every body write and read goes through :meth:`_put_body` and
  :meth:`_get_body`: with ``[store] key_file`` they seal and open the body
  with the key ring (per-period data keys, ``hold:<id>`` for held items, as
  in the SQLite backend), whose keys live in the key database
  (:mod:`quarantine.postgres_keys`), never in this one.  The row, its
  address index and its body commit in one transaction
  (``synchronous_commit = on``) before :meth:`quarantine` returns.
* **Access control** (schema v2): ``access_request``, ``export`` and the
  hold's ``hold_case`` / ``hold_until``, as in the SQLite backend.
* **Chains**: the log and the audit trail have one chain per instance, keyed
  by ``(instance, seq)``; every row stores ``record_hash = sha256(record)``
  and ``hash = chain_hash(prev_hash, record_hash)``, so an erased record's
  content can go while the chain still verifies.  The head of each chain is a
  row of ``chain_head`` locked ``FOR UPDATE`` inside the appending
  transaction: the position comes from the database.  A global ``id``
  (bigserial) orders rows across instances: it is the protocol's ``seq`` (the
  cursor of ``log_page``, the numbers subject access and erasure use).
* **Anchors**: every ``anchor_interval`` seconds of log writing (and on
  :meth:`checkpoint`) the instance holding ``pg_try_advisory_xact_lock``
  records every chain's head in ``anchor``, itself a hash chain: truncating or
  rewriting one instance's chain no longer matches the anchors.
* **Outage**: :meth:`quarantine` raises :class:`StoreError` (the gateway
  answers 451); the log writer keeps records it cannot ship in a local outbox
  (``<store.path>/log-outbox.jsonl``, fsynced per batch) and ships them when
  PostgreSQL is back, exactly once (each record has a unique ``uid``).

Every psycopg error leaves this module as :class:`StoreError` (or
:class:`NotFound`, :class:`OnHold`): the class decorator :func:`_driver_errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from quarantine import crypto, files
from quarantine.store import (
    COLUMNS,
    EXPORT_COLUMNS,
    GENESIS,
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
    from gateway.config import StoreSettings
    from quarantine.crypto import KeyRing

log = logging.getLogger("mailwarden.store")

#: Advisory lock keys (an arbitrary 64-bit namespace for mailwarden).
MIGRATE_LOCK = 0x6D77_0001
ANCHOR_LOCK = 0x6D77_0002

OUTBOX_NAME = "log-outbox.jsonl"

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE quarantine (
        id text PRIMARY KEY,
        received text NOT NULL,
        queue_id text NOT NULL,
        direction text NOT NULL,
        client_addr text NOT NULL,
        helo text NOT NULL DEFAULT '',
        mail_from text NOT NULL,
        rcpt_tos text NOT NULL,
        hdr_from text,
        hdr_to text,
        subject text,
        message_id text,
        hdr_date text,
        size bigint NOT NULL,
        reason text NOT NULL,
        detail text NOT NULL DEFAULT '',
        personal boolean NOT NULL DEFAULT false,
        hold boolean NOT NULL DEFAULT false,
        state text NOT NULL DEFAULT 'held',
        path text NOT NULL,
        sha256 text NOT NULL,
        verdicts text NOT NULL DEFAULT '[]',
        updated text NOT NULL,
        instance text NOT NULL
    );
    CREATE INDEX quarantine_received ON quarantine (received);
    CREATE INDEX quarantine_reason ON quarantine (reason, received);
    CREATE INDEX quarantine_path ON quarantine (path);
    CREATE TABLE quarantine_address (id text NOT NULL, address text NOT NULL);
    CREATE INDEX quarantine_address_addr ON quarantine_address (address);
    CREATE INDEX quarantine_address_id ON quarantine_address (id);
    CREATE TABLE body (
        path text PRIMARY KEY,
        id text NOT NULL,
        data bytea NOT NULL
    );
    CREATE TABLE chain_head (
        chain text NOT NULL,
        instance text NOT NULL,
        seq bigint NOT NULL,
        hash text NOT NULL,
        anchor_seq bigint NOT NULL DEFAULT 0,
        anchor text NOT NULL,
        PRIMARY KEY (chain, instance)
    );
    CREATE TABLE log (
        id bigserial PRIMARY KEY,
        instance text NOT NULL,
        seq bigint NOT NULL,
        uid text NOT NULL UNIQUE,
        time text NOT NULL,
        queue_id text NOT NULL,
        direction text NOT NULL,
        record text NOT NULL,
        record_hash text NOT NULL,
        hash text NOT NULL,
        UNIQUE (instance, seq)
    );
    CREATE INDEX log_time ON log (time);
    CREATE TABLE log_address (id bigint NOT NULL, address text NOT NULL);
    CREATE INDEX log_address_addr ON log_address (address, id);
    CREATE INDEX log_address_id ON log_address (id);
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        instance text NOT NULL,
        seq bigint NOT NULL,
        time text NOT NULL,
        "user" text NOT NULL,
        uid integer NOT NULL,
        command text NOT NULL,
        targets text NOT NULL DEFAULT '[]',
        filters text NOT NULL DEFAULT '{}',
        reason text NOT NULL DEFAULT '',
        exceptional boolean NOT NULL DEFAULT false,
        detail text NOT NULL DEFAULT '{}',
        record_hash text NOT NULL,
        hash text NOT NULL,
        UNIQUE (instance, seq)
    );
    CREATE INDEX audit_time ON audit (time);
    CREATE TABLE anchor (
        seq bigint PRIMARY KEY,
        time text NOT NULL,
        instance text NOT NULL,
        heads text NOT NULL,
        hash text NOT NULL
    );
    """,
    # 2: access control (issue 17) as in the SQLite backend's migration 2:
    # exceptional-access requests and their grants, pseudonymised exports
    # (with each export's HMAC key), and holds that name their investigation
    # and may expire.  Additive only.
    """
    CREATE TABLE access_request (
        id text PRIMARY KEY,
        created text NOT NULL,
        requester text NOT NULL,
        requester_uid integer NOT NULL,
        scope_kind text NOT NULL,
        scope text NOT NULL,
        ground text NOT NULL,
        case_ref text NOT NULL,
        reason text NOT NULL,
        state text NOT NULL DEFAULT 'pending',
        decided text,
        decided_by text,
        decided_uid integer,
        expires text
    );
    CREATE INDEX access_request_scope ON access_request (scope_kind, scope);
    CREATE INDEX access_request_created ON access_request (created);
    CREATE TABLE export (
        id text PRIMARY KEY,
        time text NOT NULL,
        "user" text NOT NULL,
        uid integer NOT NULL,
        ground text NOT NULL DEFAULT '',
        case_ref text NOT NULL DEFAULT '',
        filters text NOT NULL DEFAULT '{}',
        identified boolean NOT NULL DEFAULT false,
        hmac_key text
    );
    ALTER TABLE quarantine ADD COLUMN hold_case text;
    ALTER TABLE quarantine ADD COLUMN hold_until text;
    CREATE INDEX quarantine_hold_until ON quarantine (hold_until) WHERE hold
    """,
]


#: the item columns, then the instance that held it (a PostgreSQL-only key)
_SELECT = "SELECT " + ", ".join(COLUMNS) + ", instance FROM quarantine"
_AUDIT_COLUMNS = ('id, time, "user", uid, command, targets, filters, reason, exceptional,'
                  " detail, hash")
_LOG_COLUMNS = ("l.id, l.time, l.queue_id, l.direction, l.record, l.hash, l.instance, l.seq,"
                " l.record_hash")

#: Driver errors that mean "PostgreSQL cannot be reached now" (the log writer
#: keeps such batches in the outbox); other errors are the batch's own fault.
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_dsn(dsn: str) -> str:
    """The connection string without its password (for messages and ``check``)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable dsn)"
    shown = [f"{k}={v}" for k, v in sorted(params.items())
             if k in ("dbname", "host", "hostaddr", "port", "user", "service") and v]
    return " ".join(shown) or "(libpq defaults)"


def _json_list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _item(values: Sequence[Any]) -> dict[str, Any]:
    item = dict(zip((*COLUMNS, "instance"), values, strict=True))
    item["rcpt_tos"] = _json_list(item["rcpt_tos"])
    item["verdicts"] = _json_list(item["verdicts"])
    item["personal"] = bool(item["personal"])
    item["hold"] = bool(item["hold"])
    item["size"] = int(item["size"])
    return item


async def _is_plaintext(data: bytes, item: Mapping[str, Any]) -> bool:
    """Whether ``data`` is the plaintext message itself (one that happens to
    start like a sealed blob), by its recorded SHA-256."""
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest() == item["sha256"])


def _chunks(values: Sequence[Any], size: int = 500) -> list[Sequence[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def _log_where(q: LogFilter, after: int) -> tuple[str, list[Any]]:
    clauses = ["l.id > %s"]
    params: list[Any] = [after]
    if q.up_to is not None:
        clauses.append("l.id <= %s")
        params.append(q.up_to)
    if q.since is not None:
        clauses.append("l.time >= %s")
        params.append(iso(q.since))
    if q.until is not None:
        clauses.append("l.time <= %s")
        params.append(iso(q.until))
    if q.direction is not None:
        clauses.append("l.direction = %s")
        params.append(q.direction)
    if q.address is not None:
        clauses.append("a.address = %s")
        params.append(q.address.strip().lower())
    return " AND ".join(clauses), params


def _log_from(q: LogFilter) -> str:
    if q.address is not None:
        return "log_address a JOIN log l ON l.id = a.id"
    return "log l"


# ------------------------------------------------------------ driver errors

#: Public methods that map their own errors (see quarantine/sqlite.py).
_OWN_ERRORS = frozenset({"open", "quarantine", "check"})


def _as_store_error(store: PostgresStore, exc: psycopg.Error) -> StoreError:
    return StoreError(f"store postgresql {store.where}: {str(exc).strip() or type(exc).__name__}")


#: Every public coroutine and async generator raises :class:`StoreError` for a
#: psycopg error (pool timeouts included), never the driver's own.
_driver_errors = driver_errors(psycopg.Error, _as_store_error, _OWN_ERRORS)


async def _connect_error(dsn: str, kwargs: Mapping[str, Any]) -> str | None:
    """What libpq says when connecting to ``dsn`` fails (the pool only says
    it timed out), or None if it connects now."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, **kwargs)
    except psycopg.Error as exc:
        return " ".join(str(exc).split())
    await conn.close()
    return None


# ------------------------------------------------------------------ outbox


class Outbox:
    """Log records waiting for PostgreSQL: a JSON-lines file, one
    ``{"uid": ..., "record": {...}}`` per line, appended and fsynced per batch,
    rewritten atomically (temp file, fsync, rename) after a shipment commits.
    Blocking: call it from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / OUTBOX_NAME

    def append(self, pairs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        files.ensure_dir(self.root)
        data = "".join(canonical({"uid": u, "record": dict(r)}) + "\n" for u, r in pairs)
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, files.FILE_MODE)
        try:
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            files._fsync_dir(self.root)

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        for line in text.splitlines():
            try:
                obj = json.loads(line)
                out.append((str(obj["uid"]), dict(obj["record"])))
            except (ValueError, KeyError, TypeError):
                # a line cut short by a crash mid-append: never acknowledged
                log.error("log outbox %s: skipping an unreadable line", self.path)
        return out

    def replace(self, pairs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        if not pairs:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
                files._fsync_dir(self.root)
            return
        tmp = self.path.with_name(OUTBOX_NAME + ".tmp")
        data = "".join(canonical({"uid": u, "record": dict(r)}) + "\n" for u, r in pairs)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, files.FILE_MODE)
        try:
            os.write(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        files._fsync_dir(self.root)

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0


# ------------------------------------------------------------------- store


@_driver_errors
class PostgresStore:
    """The PostgreSQL backend of :class:`quarantine.store.StoreProtocol`.

    Open with :meth:`open`; one per gateway process.  ``instance`` names this
    gateway's chains; ``root`` (``store.path``) holds only the log outbox."""

    def __init__(
        self,
        settings: StoreSettings,
        pool: AsyncConnectionPool,
        *,
        instance: str,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        anchor_interval: float = 60.0,
        retry_max: float = 30.0,
        keyring: KeyRing | None = None,
    ) -> None:
        self.settings = settings
        #: seals message bodies when ``[store] key_file`` is set (None: plaintext);
        #: its data keys live in the key database, never in this one
        self.keyring = keyring
        self.root = Path(settings.path)
        self.dsn = settings.dsn
        self.where = describe_dsn(settings.dsn)
        self.pool = pool
        self.instance = instance
        self.clock = clock
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.anchor_interval = anchor_interval
        self.retry_max = retry_max
        self.log_failures = 0
        self.schema_version = 0
        self.outbox = Outbox(self.root)
        self._outbox_count = 0
        self._outbox_lock = asyncio.Lock()
        self._outbox_warned = 0.0
        self._backoff = 0.5
        self._next_retry = 0.0
        self._anchor_at = time.monotonic()
        self._log_queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._writer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        settings: StoreSettings,
        *,
        create: bool = False,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = 200,
        flush_interval: float = 0.5,
        anchor_interval: float = 60.0,
        pool_timeout: float = 10.0,
        pool_size: int = 16,
        retry_max: float = 30.0,
        keyring: KeyRing | None = None,
    ) -> PostgresStore:
        """Connect (a pool of up to ``pool_size`` connections), migrate the
        schema (``create``: also make it in an empty database).

        ``keyring`` (``[store] key_file``, :func:`quarantine.crypto.open_keyring`
        with the key database ``[store] key_dsn``): seals new bodies and opens
        sealed ones, as the SQLite backend does; once opened the store closes
        it (if opening fails, the caller :func:`quarantine.store.open_store`
        does)."""
        where = describe_dsn(settings.dsn)
        if not settings.dsn:
            raise StoreError("store.dsn is empty: backend = \"postgresql\" needs a dsn")
        instance = settings.instance or socket.gethostname()
        kwargs: dict[str, Any] = {"autocommit": True}
        try:
            if "connect_timeout" not in conninfo_to_dict(settings.dsn):
                kwargs["connect_timeout"] = max(5, int(pool_timeout))
        except psycopg.Error as exc:
            raise StoreError(f"store.dsn: {exc}") from None
        pool = AsyncConnectionPool(
            settings.dsn,
            kwargs=kwargs,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            timeout=pool_timeout,
            # give up on one reconnection attempt soon: the next request then
            # starts a fresh one at once instead of after a long backoff
            reconnect_timeout=max(30.0, 3 * pool_timeout),
            check=AsyncConnectionPool.check_connection,
            name=f"mailwarden-{instance}",
        )
        try:
            # opening may wait a little longer than one request does (a busy
            # host, a database just starting)
            await pool.open(wait=True, timeout=max(pool_timeout, 10.0))
        except psycopg.Error as exc:
            await pool.close()
            why = await _connect_error(settings.dsn, kwargs) or str(exc)
            raise StoreError(f"cannot open the store at postgresql {where}: {why}") from None
        store = cls(settings, pool, instance=instance, clock=clock, batch_size=batch_size,
                    flush_interval=flush_interval, anchor_interval=anchor_interval,
                    retry_max=retry_max, keyring=keyring)
        try:
            await store._migrate(create)
            store._outbox_count = await asyncio.to_thread(store.outbox.count)
        except psycopg.Error as exc:
            await pool.close()
            raise StoreError(f"cannot open the store at postgresql {where}: {exc}") from None
        except BaseException:
            await pool.close()
            raise
        if store._outbox_count:
            log.warning("log outbox %s: %d records waiting for PostgreSQL",
                        store.outbox.path, store._outbox_count)
        return store

    async def _migrate(self, create: bool) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            row = await cur.fetchone()
            if not (row and row[0]):
                if not create:
                    raise StoreError(
                        f"no mailwarden schema in postgresql {self.where} (table"
                        " schema_version missing: `mailwarden serve` creates it)"
                    )
                await conn.execute(
                    "CREATE TABLE schema_version (version integer PRIMARY KEY,"
                    " applied timestamptz NOT NULL DEFAULT now())"
                )
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"database schema version {version} is newer than this mailwarden "
                    f"({len(MIGRATIONS)})"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        await conn.execute(statement)  # type: ignore[call-overload]
                await conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                                   (number + 1,))
            self.schema_version = len(MIGRATIONS)

    async def close(self) -> None:
        try:
            await self.stop_log_writer()
        finally:
            try:
                await self.pool.close()
            finally:
                if self.keyring is not None:
                    await self.keyring.close()

    async def check(self) -> tuple[bool, str]:
        """For ``mailwarden check``: the backend, database, instance, schema
        version, and a write test (a body row inserted and rolled back)."""
        head = f"store postgresql {self.where}: instance {self.instance}"
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT (SELECT max(version) FROM schema_version), current_database()"
                )
                row = await cur.fetchone()
                assert row is not None
                version, dbname = row
                async with conn.transaction(force_rollback=True):
                    await conn.execute(
                        "INSERT INTO body (path, id, data) VALUES ('check:probe', '', '')"
                    )
        except psycopg.Error as exc:
            return False, f"{head}: {str(exc).strip()}"
        waiting = self._outbox_count
        extra = f"; log outbox: {waiting} records waiting" if waiting else ""
        if self.keyring is not None:
            try:
                records = await self.keyring.records()
            except StoreError as exc:
                return False, f"{head}: {exc}"
            live = sum(1 for r in records if r.wrapped is not None)
            extra += (f"; bodies encrypted, key store {self.keyring.where}: {live} live data"
                      f" keys, {len(records) - live} destroyed")
        return True, f"{head}, database {dbname}, schema v{version}, writable{extra}"

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self.pool.connection() as conn, conn.transaction():
            yield conn

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)  # type: ignore[arg-type]
            return await cur.fetchone()

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)  # type: ignore[arg-type]
            return list(await cur.fetchall())

    # ---------------------------------------------------------------- bodies

    async def _seal_body(self, qid: str, raw: bytes, *, key_id: str) -> bytes:
        """A message's bytes as they are stored: with a key ring, sealed under
        the data key ``key_id`` (a period, or the item's hold key), bound to
        the quarantine id, as the SQLite backend seals its files."""
        if self.keyring is None:
            return raw
        return await self.keyring.seal(key_id, qid.encode(), raw)

    async def _put_body(
        self, conn: psycopg.AsyncConnection[Any], qid: str, path: str, data: bytes, *,
        replace: bool = False,
    ) -> None:
        """Store a body as :meth:`_seal_body` made it (inside the caller's
        transaction); ``replace`` rewrites an existing body (a hold's re-seal)."""
        if replace:
            await conn.execute("UPDATE body SET data = %s WHERE path = %s", (data, path))
        else:
            await conn.execute("INSERT INTO body (path, id, data) VALUES (%s, %s, %s)",
                               (path, qid, data))

    async def _stored_body(self, path: str) -> bytes | None:
        """The bytes as stored (sealed or not), or None when the body is gone."""
        row = await self._one("SELECT data FROM body WHERE path = %s", (path,))
        return None if row is None else bytes(row[0])

    async def _get_body(self, item: Mapping[str, Any]) -> bytes | None:
        """The message bytes of ``item``, opened with the key ring when sealed
        (:class:`~quarantine.crypto.KeyDestroyed` once its key is gone); a
        plaintext body (kept before ``key_file`` was set) as it is, told from a
        sealed one as the SQLite backend does (its recorded SHA-256).  None
        when the body is gone."""
        data = await self._stored_body(item["path"])
        if data is None or not crypto.is_sealed(data):
            return data
        if self.keyring is not None:
            try:
                return await self.keyring.open(data, str(item["id"]).encode())
            except (crypto.CryptoError, crypto.KekError):
                if not await _is_plaintext(data, item):
                    raise
                return data
        if await _is_plaintext(data, item):
            return data
        raise StoreError(f"the message body of {item['id']} is encrypted and store.key_file"
                         " is not set")

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
        """Keep a message durably (row, address index and body committed in
        one transaction, synchronous commit); its id, or :class:`StoreError`."""
        now = self.clock()
        qid = new_quarantine_id(now)
        path = f"pg:{qid}"
        sha = await sha256_hex(raw)
        addrs = addresses_of(
            [mail_from, *rcpt_tos, headers.get("from"), headers.get("to"), headers.get("cc")]
        )
        try:
            # sealed under the key of the day it was received (its period);
            # the sha256 column stays the plaintext's
            data = await self._seal_body(qid, raw, key_id=crypto.period_of(received))
        except StoreError as exc:
            raise StoreError(f"cannot seal quarantine body: {exc}") from None
        try:
            # One round trip: the statements are pipelined, the commit waited for.
            async with self.pool.connection() as conn, conn.pipeline(), conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                await conn.execute(
                    "INSERT INTO quarantine (id, received, queue_id, direction, client_addr,"
                    " helo, mail_from, rcpt_tos, hdr_from, hdr_to, subject, message_id,"
                    " hdr_date, size, reason, detail, personal, hold, state, path, sha256,"
                    " verdicts, updated, instance) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"
                    "%s,%s,%s,%s,%s,%s,false,'held',%s,%s,%s,%s,%s)",
                    (qid, iso(received), queue_id, direction, client_addr, helo, mail_from,
                     json.dumps(list(rcpt_tos)), headers.get("from"), headers.get("to"),
                     headers.get("subject"), headers.get("message-id"), headers.get("date"),
                     len(raw), reason, detail, bool(personal), path, sha,
                     json.dumps(list(verdicts), default=str), iso(now), self.instance),
                )
                if addrs:
                    await conn.execute(
                        "INSERT INTO quarantine_address (id, address)"
                        " SELECT %s, json_array_elements_text(%s::json)",
                        (qid, json.dumps(sorted(addrs))),
                    )
                await self._put_body(conn, qid, path, data)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot record quarantine item in postgresql {self.where}: "
                f"{str(exc).strip() or type(exc).__name__}"
            ) from None
        return qid

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
        """One page of items, newest first; (items, more pages exist).
        ``window`` is SQLite's planning hint; PostgreSQL plans by itself."""
        where: list[str] = []
        args: list[Any] = []
        if since:
            where.append("received >= %s")
            args.append(since)
        if until:
            where.append("received <= %s")
            args.append(until)
        if state != "all":
            where.append("state = %s")
            args.append(state)
        if reason:
            where.append("%s = ANY(string_to_array(reason, ','))")
            args.append(reason.strip().lower())
        if address:
            where.append("id IN (SELECT id FROM quarantine_address WHERE address = %s)")
            args.append(address)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY received DESC, id DESC LIMIT %s OFFSET %s"
        rows = await self._all(sql, [*args, limit + 1, (page - 1) * limit])
        items = [_item(r) for r in rows]
        return items[:limit], len(items) > limit

    async def get_item(self, qid: str) -> dict[str, Any] | None:
        row = await self._one(_SELECT + " WHERE id = %s", (qid,))
        return None if row is None else _item(row)

    async def get_items(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        rows = await self._all(_SELECT + " WHERE id = ANY(%s) ORDER BY received, id",
                               (list(ids),))
        return [_item(r) for r in rows]

    async def read_body(self, item: Mapping[str, Any]) -> bytes:
        """The stored message bytes (FileNotFoundError when the body is gone)."""
        data = await self._get_body(item)
        if data is None:
            raise FileNotFoundError(f"no body for {item['id']} in postgresql {self.where}")
        return data

    async def delete_body(self, path: str) -> bool:
        """Delete a message body; whether one was there."""
        async with self._tx() as conn:
            cur = await conn.execute("DELETE FROM body WHERE path = %s", (path,))
            return cur.rowcount > 0

    async def item_is_live(self, qid: str, path: str) -> bool:
        row = await self._one(
            "SELECT 1 FROM quarantine WHERE id = %s AND path = %s AND state != 'deleted'",
            (qid, path),
        )
        return row is not None

    async def quarantine_totals(self) -> tuple[int, int]:
        row = await self._one(
            "SELECT count(*), coalesce(sum(size), 0) FROM quarantine WHERE state = 'held'"
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def mark_released(self, qid: str) -> None:
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE quarantine SET state = 'released', updated = %s"
                " WHERE id = %s AND state != 'deleted'",
                (iso(self.clock()), qid),
            )

    async def _reseal_for_hold(self, item: Mapping[str, Any]) -> bool:
        """Re-encrypt a held item's body under its own key ``hold:<id>``, so it
        outlives its period's key; whether the body was rewritten."""
        if self.keyring is None or item["state"] == "deleted":
            return False
        qid = str(item["id"])
        stored = await self._stored_body(item["path"])
        if stored is None or not crypto.is_sealed(stored):
            return False  # gone, or kept before encryption was switched on
        try:
            if crypto.parse_blob(stored).key_id == crypto.hold_key_id(qid):
                return False  # done already
        except crypto.BlobError:
            pass  # _get_body tells a plaintext that starts like a blob apart
        plain = await self._get_body(item)
        if plain is None:
            return False
        data = await self._seal_body(qid, plain, key_id=crypto.hold_key_id(qid))
        async with self._tx() as conn:
            await self._put_body(conn, qid, item["path"], data, replace=True)
        return True

    async def _destroy_hold_keys(self, ids: Sequence[str]) -> None:
        if self.keyring is not None and ids:
            await self.keyring.destroy([crypto.hold_key_id(i) for i in ids])

    async def reseal_held_before(self, cutoff: str) -> list[str]:
        """Ids of the items under hold received before ``cutoff``, each made
        sure to be sealed under its own hold key (retention calls this before
        destroying the period keys; normally ``set_hold`` did it already)."""
        rows = await self._all(
            _SELECT + " WHERE received < %s AND hold AND state != 'deleted'"
            " ORDER BY received, id",
            (cutoff,),
        )
        items = [_item(r) for r in rows]
        for item in items:
            await self._reseal_for_hold(item)
        return [i["id"] for i in items]

    async def set_hold(self, qid: str, hold: bool, *, case: str | None = None,
                       until: str | None = None) -> None:
        """Put ``qid`` under hold (naming its ``case``, until ``until`` or
        indefinitely) or lift it (case and until cleared).  Setting it first
        re-seals a sealed body under the item's own key (``hold:<id>``),
        which stays until the item is deleted, erased or purged."""
        if hold:
            item = await self.get_item(qid)
            if item is not None:
                await self._reseal_for_hold(item)
        else:
            case = until = None
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE quarantine SET hold = %s, hold_case = %s, hold_until = %s,"
                " updated = %s WHERE id = %s",
                (bool(hold), case, until, iso(self.clock()), qid),
            )

    async def release_expired_holds(
        self, now: str, *, dry_run: bool = False
    ) -> list[tuple[str, str | None, str]]:
        """(id, case, until) of the holds whose ``until`` is at or before
        ``now``; unless ``dry_run``, lift them (in the same transaction)."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT id, hold_case, hold_until FROM quarantine WHERE hold"
                " AND hold_until IS NOT NULL AND hold_until <= %s ORDER BY hold_until, id"
                " FOR UPDATE",
                (now,),
            )
            rows = [(r[0], r[1], r[2]) for r in await cur.fetchall()]
            if rows and not dry_run:
                await conn.execute(
                    "UPDATE quarantine SET hold = false, hold_case = NULL, hold_until = NULL,"
                    " updated = %s WHERE hold AND id = ANY(%s)",
                    (now, [r[0] for r in rows]),
                )
        return rows

    # ------------------------------------------------- access control

    async def add_access_request(self, request: Mapping[str, Any]) -> None:
        """Insert an exceptional-access request (keys :data:`REQUEST_COLUMNS`)."""
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO access_request (id, created, requester, requester_uid, scope_kind,"
                " scope, ground, case_ref, reason, state, decided, decided_by, decided_uid,"
                " expires) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [request.get(c) for c in REQUEST_COLUMNS],
            )

    async def get_access_request(self, rid: str) -> dict[str, Any] | None:
        row = await self._one(
            REQUEST_SELECT + " WHERE id = %s",
            (rid,),
        )
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
            where.append("requester = %s")
            args.append(requester)
        if scope_kind is not None:
            where.append("scope_kind = %s")
            args.append(scope_kind)
        if scope:
            where.append("scope = ANY(%s)")
            args.append(list(scope))
        if state is not None:
            where.append("state = %s")
            args.append(state)
        sql = REQUEST_SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self._all(sql + " ORDER BY created, id", args)
        return [dict(zip(REQUEST_COLUMNS, r, strict=True)) for r in rows]

    async def decide_access_request(
        self, rid: str, *, state: str, decided: str, decided_by: str, decided_uid: int,
        expires: str | None,
    ) -> bool:
        """Approve or deny a *pending* request; False when it was not pending
        (decided meanwhile: checked inside the updating statement)."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "UPDATE access_request SET state = %s, decided = %s, decided_by = %s,"
                " decided_uid = %s, expires = %s WHERE id = %s AND state = 'pending'",
                (state, decided, decided_by, decided_uid, expires, rid),
            )
            return cur.rowcount == 1

    async def add_export(self, export: Mapping[str, Any]) -> None:
        """Record an export (keys :data:`EXPORT_COLUMNS`; ``filters`` a mapping)."""
        values = [export.get(c) for c in EXPORT_COLUMNS]
        values[EXPORT_COLUMNS.index("filters")] = canonical(dict(export.get("filters") or {}))
        values[EXPORT_COLUMNS.index("identified")] = bool(export.get("identified"))
        async with self._tx() as conn:
            await conn.execute(
                'INSERT INTO export (id, time, "user", uid, ground, case_ref, filters,'
                " identified, hmac_key) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                values,
            )

    async def get_export(self, eid: str) -> dict[str, Any] | None:
        row = await self._one(
            'SELECT id, time, "user", uid, ground, case_ref, filters, identified, hmac_key'
            " FROM export WHERE id = %s",
            (eid,),
        )
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
        """Tombstone the row and delete its body in one transaction, then
        destroy the item's hold key (if it has one); whether a body was
        removed.  :class:`NotFound`, :class:`OnHold` (checked under the row
        lock)."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT hold, path FROM quarantine WHERE id = %s FOR UPDATE", (qid,)
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(qid)
            if row[0]:
                raise OnHold(qid)
            await conn.execute(
                "UPDATE quarantine SET state = 'deleted', client_addr = '', helo = '',"
                " mail_from = '', rcpt_tos = '[]', hdr_from = NULL, hdr_to = NULL,"
                " subject = NULL, message_id = NULL, hdr_date = NULL, detail = '',"
                " verdicts = '[]', updated = %s WHERE id = %s",
                (iso(self.clock()), qid),
            )
            await conn.execute("DELETE FROM quarantine_address WHERE id = %s", (qid,))
            cur = await conn.execute("DELETE FROM body WHERE path = %s", (row[1],))
            removed = cur.rowcount > 0
        await self._destroy_hold_keys([qid])
        return removed

    async def erase_items(self, ids: Sequence[str]) -> tuple[list[str], int]:
        """Remove the rows ``ids`` not under hold and their bodies, then destroy
        their hold keys; (removed ids, bodies removed)."""
        removed: list[str] = []
        bodies = 0
        for chunk in _chunks(list(ids)):
            async with self._tx() as conn:
                cur = await conn.execute(
                    "SELECT id, path FROM quarantine WHERE hold = false AND id = ANY(%s)"
                    " ORDER BY received FOR UPDATE",
                    (list(chunk),),
                )
                rows = await cur.fetchall()
                gone = [r[0] for r in rows]
                if gone:
                    await conn.execute("DELETE FROM quarantine_address WHERE id = ANY(%s)", (gone,))
                    await conn.execute("DELETE FROM quarantine WHERE id = ANY(%s)", (gone,))
                    cur = await conn.execute("DELETE FROM body WHERE path = ANY(%s)",
                                             ([r[1] for r in rows],))
                    bodies += cur.rowcount
            removed += gone
        await self._destroy_hold_keys(removed)
        return removed, bodies

    # ----------------------------------------------------- subject access

    async def subject_log_seqs(self, address: str) -> list[int]:
        rows = await self._all(
            "SELECT DISTINCT id FROM log_address WHERE address = %s ORDER BY id", (address,)
        )
        return [int(r[0]) for r in rows]

    async def subject_items(self, address: str) -> list[tuple[str, bool, bool]]:
        rows = await self._all(
            "SELECT q.id, q.hold, q.personal FROM quarantine q WHERE q.id IN"
            " (SELECT id FROM quarantine_address WHERE address = %s) ORDER BY q.received, q.id",
            (address,),
        )
        return [(r[0], bool(r[1]), bool(r[2])) for r in rows]

    async def log_records(self, seqs: Sequence[int]) -> AsyncIterator[tuple[int, str, str]]:
        for chunk in _chunks(sorted(set(seqs))):
            rows = await self._all(
                "SELECT id, time, record FROM log WHERE id = ANY(%s) ORDER BY id", (list(chunk),)
            )
            for r in rows:
                yield int(r[0]), r[1], r[2]

    async def erase_log(self, seqs: Sequence[int], tombstone: str) -> int:
        """Replace the records ``seqs`` with ``tombstone``; their ``record_hash``
        and ``hash`` stay, so the chain still verifies through them."""
        erased = 0
        for chunk in _chunks(list(seqs)):
            async with self._tx() as conn:
                cur = await conn.execute(
                    "UPDATE log SET record = %s, queue_id = '', direction = ''"
                    " WHERE id = ANY(%s)",
                    (tombstone, list(chunk)),
                )
                erased += max(cur.rowcount, 0)
                await conn.execute("DELETE FROM log_address WHERE id = ANY(%s)", (list(chunk),))
        return erased

    # ---------------------------------------------------------- chain heads

    async def _lock_head(self, conn: psycopg.AsyncConnection[Any], chain: str) -> tuple[int, str]:
        """This instance's head of ``chain`` (seq, hash), locked until commit."""
        await conn.execute(
            "INSERT INTO chain_head (chain, instance, seq, hash, anchor_seq, anchor)"
            " VALUES (%s, %s, 0, %s, 0, %s) ON CONFLICT DO NOTHING",
            (chain, self.instance, GENESIS, GENESIS),
        )
        cur = await conn.execute(
            "SELECT seq, hash FROM chain_head WHERE chain = %s AND instance = %s FOR UPDATE",
            (chain, self.instance),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), str(row[1])

    async def _set_head(
        self, conn: psycopg.AsyncConnection[Any], chain: str, seq: int, h: str
    ) -> None:
        await conn.execute(
            "UPDATE chain_head SET seq = %s, hash = %s WHERE chain = %s AND instance = %s",
            (seq, h, chain, self.instance),
        )

    # --------------------------------------------------------------- the log

    def start_log_writer(self) -> None:
        if self._writer is None:
            self._log_queue = asyncio.Queue()
            self._writer = asyncio.create_task(self._log_writer(), name="log-writer")

    def append_log(self, record: dict[str, Any]) -> None:
        """Queue a header-only log record for the writer task."""
        if self._log_queue is None:
            self.start_log_writer()
        assert self._log_queue is not None
        self._log_queue.put_nowait(record)

    async def flush_log(self) -> None:
        """Wait until every queued record is written (to PostgreSQL, or to the
        outbox while it is unreachable); then try once to ship the outbox."""
        if self._log_queue is not None:
            await self._log_queue.join()
        if self._outbox_count:
            await self.drain_outbox()

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
        loop = asyncio.get_running_loop()
        if self._outbox_count:
            await self._drain_quietly()
        stop = False
        while not stop:
            try:
                if self._outbox_count:
                    wait = max(0.0, self._next_retry - loop.time())
                    item = await asyncio.wait_for(queue.get(), wait)
                else:
                    item = await queue.get()
            except TimeoutError:
                await self._drain_quietly()
                continue
            if item is None:
                queue.task_done()
                break
            batch = [item]
            deadline = loop.time() + self.flush_interval
            while len(batch) < self.batch_size:
                timeout = deadline - loop.time()
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
                await self._write_records(batch)
            except Exception:
                self.log_failures += len(batch)
                log.exception("could not write %d log records", len(batch))
            finally:
                for _ in batch:
                    queue.task_done()

    async def _write_records(self, batch: Sequence[dict[str, Any]]) -> None:
        pairs = [(uuid.uuid4().hex, rec) for rec in batch]
        if self._outbox_count:
            # keep the order: these go after the records already waiting; the
            # next shipment is tried when its backoff is over, not per batch
            await self._to_outbox(pairs, None)
            if asyncio.get_running_loop().time() >= self._next_retry:
                await self._drain_quietly()
            return
        try:
            await self._insert_log(pairs)
        except _UNREACHABLE as exc:
            await self._to_outbox(pairs, exc)
            self._next_retry = asyncio.get_running_loop().time() + self._backoff

    async def _to_outbox(
        self, pairs: Sequence[tuple[str, Mapping[str, Any]]], exc: BaseException | None
    ) -> None:
        async with self._outbox_lock:
            await asyncio.to_thread(self.outbox.append, pairs)
            first = self._outbox_count == 0
            self._outbox_count += len(pairs)
        now = time.monotonic()
        if first or now - self._outbox_warned >= 30:
            self._outbox_warned = now
            why = f" (PostgreSQL unreachable: {str(exc).strip()})" if exc else ""
            log.warning("log outbox %s grows: %d records waiting%s",
                        self.outbox.path, self._outbox_count, why)

    async def _drain_quietly(self) -> None:
        try:
            await self.drain_outbox()
        except Exception:
            log.exception("log outbox %s: cannot ship", self.outbox.path)

    async def drain_outbox(self) -> int:
        """Ship the outbox to PostgreSQL, oldest first, in batches; each batch
        leaves the outbox only after its commit (records already in the log,
        by ``uid``, are skipped: exactly once).  Returns how many records
        still wait (0: drained).  Never raises for an unreachable database."""
        async with self._outbox_lock:
            pairs = await asyncio.to_thread(self.outbox.read)
            if not pairs:
                self._outbox_count = 0
                return 0
            shipped = 0
            size = max(1, self.batch_size)
            while shipped < len(pairs):
                chunk = pairs[shipped : shipped + size]
                try:
                    await self._insert_log(chunk)
                except _UNREACHABLE as exc:
                    rest = pairs[shipped:]
                    if shipped:
                        await asyncio.to_thread(self.outbox.replace, rest)
                    self._outbox_count = len(rest)
                    self._backoff = min(self._backoff * 2, self.retry_max)
                    self._next_retry = asyncio.get_running_loop().time() + self._backoff
                    log.debug("log outbox: PostgreSQL still unreachable: %s", exc)
                    return len(rest)
                except psycopg.Error as exc:
                    # the batch itself is bad: set it aside, never block the rest
                    self.log_failures += len(chunk)
                    aside = Outbox(self.root)
                    aside.path = self.root / (OUTBOX_NAME + ".rejected")
                    await asyncio.to_thread(aside.append, chunk)
                    log.error("log outbox: %d records refused by PostgreSQL (%s), moved to %s",
                              len(chunk), exc, aside.path)
                shipped += len(chunk)
            await asyncio.to_thread(self.outbox.replace, [])
            self._outbox_count = 0
            self._backoff = 0.5
        log.warning("log outbox %s drained: %d records shipped to PostgreSQL",
                    self.outbox.path, shipped)
        return 0

    def outbox_pending(self) -> int:
        """Log records waiting in the outbox (0 normally)."""
        return self._outbox_count

    async def write_log_batch(self, batch: Sequence[dict[str, Any]]) -> None:
        """Append records to this instance's chain in one transaction."""
        await self._insert_log([(uuid.uuid4().hex, rec) for rec in batch])

    async def _insert_log(self, pairs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        async with self._tx() as conn:
            seq, prev = await self._lock_head(conn, "log")
            # Arrays go as one JSON text (json.dumps is C; psycopg's list
            # dumper adapts element by element: 6 % of a held message's CPU).
            cur = await conn.execute(
                "SELECT uid FROM log WHERE uid IN (SELECT json_array_elements_text(%s::json))",
                (json.dumps([u for u, _ in pairs]),))
            done = {r[0] for r in await cur.fetchall()}
            cols: list[list[Any]] = [[] for _ in range(8)]
            addresses: dict[int, list[str]] = {}
            for uid, record in pairs:
                if uid in done:
                    continue
                rec = dict(record)
                addrs = sorted(set(rec.pop("addresses", ()) or ()))
                payload = canonical(rec)
                rh = sha256_text(payload)
                h = chain_hash(prev, rh)
                seq += 1
                for col, value in zip(cols, (seq, uid, rec["time"], rec.get("queue_id", ""),
                                             rec.get("direction", ""), payload, rh, h),
                                      strict=True):
                    col.append(value)
                addresses[seq] = addrs
                prev = h
            if not cols[0]:
                return
            cur = await conn.execute(
                "INSERT INTO log (instance, seq, uid, time, queue_id, direction, record,"
                " record_hash, hash) SELECT %s, (r->>0)::bigint, r->>1, r->>2, r->>3, r->>4,"
                " r->>5, r->>6, r->>7 FROM json_array_elements(%s::json) AS r"
                " ON CONFLICT (uid) DO NOTHING RETURNING id, seq",
                (self.instance, json.dumps(list(zip(*cols, strict=True)))),
            )
            ids = {int(s): int(i) for i, s in await cur.fetchall()}
            index = [(ids[s], a) for s, addrs in addresses.items() for a in addrs if s in ids]
            if index:
                await conn.execute(
                    "INSERT INTO log_address (id, address)"
                    " SELECT (r->>0)::bigint, r->>1 FROM json_array_elements(%s::json) AS r",
                    (json.dumps(index),),
                )
            await self._set_head(conn, "log", seq, prev)
        if time.monotonic() - self._anchor_at >= self.anchor_interval:
            self._anchor_at = time.monotonic()
            try:
                await self._write_anchor(wait=False)
            except psycopg.Error as exc:
                log.warning("could not write a chain anchor: %s", exc)

    async def _write_anchor(self, *, wait: bool) -> bool:
        """Record every chain's head in the anchor chain; False when another
        instance holds the anchor lock (``wait=False``)."""
        async with self._tx() as conn:
            if wait:
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ANCHOR_LOCK,))
            else:
                cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (ANCHOR_LOCK,))
                got = await cur.fetchone()
                if not (got and got[0]):
                    return False
            cur = await conn.execute(
                "SELECT seq, hash FROM anchor UNION ALL SELECT anchor_seq, anchor"
                " FROM chain_head WHERE chain = 'anchor' ORDER BY 1 DESC LIMIT 1"
            )
            last = await cur.fetchone()
            seq, prev = (int(last[0]), str(last[1])) if last else (0, GENESIS)
            cur = await conn.execute(
                "SELECT chain, instance, seq, hash FROM chain_head WHERE seq > 0"
                " ORDER BY chain, instance"
            )
            heads: dict[str, dict[str, list[Any]]] = {}
            for chain, instance, s, h in await cur.fetchall():
                heads.setdefault(chain, {})[instance] = [int(s), h]
            now = iso(self.clock())
            text = canonical({"time": now, "instance": self.instance, "heads": heads})
            await conn.execute(
                "INSERT INTO anchor (seq, time, instance, heads, hash) VALUES (%s,%s,%s,%s,%s)",
                (seq + 1, now, self.instance, text, chain_hash(prev, sha256_text(text))),
            )
        return True

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
        """Write an audit row to this instance's audit chain; its global id."""
        user, uid = os_user()
        now = iso(self.clock())
        row = {
            "time": now, "user": user, "uid": uid, "command": command,
            "targets": list(targets), "filters": dict(filters or {}), "reason": reason,
            "exceptional": bool(exceptional), "detail": dict(detail or {}),
        }
        rh = sha256_text(canonical(row))
        async with self._tx() as conn:
            seq, prev = await self._lock_head(conn, "audit")
            h = chain_hash(prev, rh)
            cur = await conn.execute(
                'INSERT INTO audit (instance, seq, time, "user", uid, command, targets, filters,'
                " reason, exceptional, detail, record_hash, hash)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                (self.instance, seq + 1, now, user, uid, command, json.dumps(row["targets"]),
                 canonical(row["filters"]), reason, bool(exceptional), canonical(row["detail"]),
                 rh, h),
            )
            got = await cur.fetchone()
            await self._set_head(conn, "audit", seq + 1, h)
        assert got is not None
        return int(got[0])

    # ------------------------------------------------------- log: reading

    async def log_page(self, query: LogFilter, after: int, limit: int) -> list[Row]:
        """Rows matching ``query`` with global id ``> after``, in id order."""
        where, params = _log_where(query, after)
        rows = await self._all(
            f"SELECT {_LOG_COLUMNS} FROM {_log_from(query)} WHERE {where}"
            " ORDER BY l.id LIMIT %s",
            [*params, limit],
        )
        return [Row(*r) for r in rows]

    async def log_count(self, query: LogFilter) -> int:
        where, params = _log_where(query, 0)
        row = await self._one(f"SELECT count(*) FROM {_log_from(query)} WHERE {where}", params)
        return int(row[0]) if row else 0

    async def log_last_seq(self) -> int:
        row = await self._one("SELECT max(id) FROM log")
        return int(row[0]) if row and row[0] is not None else 0

    async def log_index(self, lo: int, hi: int) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for i, address in await self._all(
            "SELECT id, address FROM log_address WHERE id >= %s AND id <= %s", (lo, hi)
        ):
            out.setdefault(int(i), []).append(address)
        return out

    async def _anchor_of(self, chain: str) -> str:
        row = await self._one(
            "SELECT anchor FROM chain_head WHERE chain = %s AND instance = %s",
            (chain, self.instance),
        )
        return str(row[0]) if row else GENESIS

    async def log_anchor(self) -> str:
        """This instance's log chain anchor (GENESIS until retention purged a prefix)."""
        return await self._anchor_of("log")

    async def audit_anchor(self) -> str:
        return await self._anchor_of("audit")

    async def _chains(self, chain: str) -> list[Chain]:
        rows = await self._all(
            "SELECT instance, anchor, anchor_seq, seq, hash FROM chain_head WHERE chain = %s"
            " ORDER BY instance",
            (chain,),
        )
        return [Chain(r[0], r[1], int(r[2]), (int(r[3]), r[4])) for r in rows]

    async def log_chains(self) -> list[Chain]:
        """Every instance's log chain (anchor and head)."""
        return await self._chains("log")

    async def audit_chains(self) -> list[Chain]:
        return await self._chains("audit")

    async def log_chain_page(self, instance: str, after: int, limit: int) -> list[Row]:
        """Rows of ``instance``'s chain with chain seq ``> after``, in chain order."""
        rows = await self._all(
            f"SELECT {_LOG_COLUMNS} FROM log l WHERE l.instance = %s AND l.seq > %s"
            " ORDER BY l.seq LIMIT %s",
            (instance, after, limit),
        )
        return [Row(*r) for r in rows]

    async def audit_chain_page(
        self, instance: str, after: int, limit: int
    ) -> list[tuple[Any, ...]]:
        """Audit rows of ``instance``'s chain after chain seq ``after``: the
        :meth:`audit_page` columns, then chain seq, instance and record hash."""
        rows = await self._all(
            f"SELECT {_AUDIT_COLUMNS}, seq, instance, record_hash FROM audit"
            " WHERE instance = %s AND seq > %s ORDER BY seq LIMIT %s",
            (instance, after, limit),
        )
        return [tuple(r) for r in rows]

    async def anchor_chain(self) -> Chain:
        """Where the anchor chain starts: GENESIS, or the last anchor that
        retention removed (its seq and hash)."""
        row = await self._one(
            "SELECT anchor, anchor_seq FROM chain_head WHERE chain = 'anchor' AND instance = ''"
        )
        return Chain("", str(row[0]), int(row[1])) if row else Chain("", GENESIS, 0)

    async def anchor_page(self, after: int, limit: int) -> list[tuple[int, str, str, str, str]]:
        """Anchor rows (seq, time, instance, heads JSON, hash) after ``after``."""
        rows = await self._all(
            "SELECT seq, time, instance, heads, hash FROM anchor WHERE seq > %s"
            " ORDER BY seq LIMIT %s",
            (after, limit),
        )
        return [(int(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    # ----------------------------------------------------- audit: reading

    async def audit_page(self, after: int, limit: int) -> list[tuple[Any, ...]]:
        rows = await self._all(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE id > %s ORDER BY id LIMIT %s",
            (after, limit),
        )
        return [tuple(r) for r in rows]

    async def audit_rows(
        self, *, since: str | None = None, until: str | None = None
    ) -> list[tuple[Any, ...]]:
        where, args = [], []
        if since:
            where.append("time >= %s")
            args.append(since)
        if until:
            where.append("time <= %s")
            args.append(until)
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [tuple(r) for r in await self._all(sql + " ORDER BY id", args)]

    async def audit_entry(self, seq: int) -> tuple[str, str] | None:
        row = await self._one("SELECT command, detail FROM audit WHERE id = %s", (seq,))
        return None if row is None else (row[0], row[1])

    async def audit_first_seq(self) -> int | None:
        row = await self._one("SELECT min(id) FROM audit")
        return None if row is None or row[0] is None else int(row[0])

    # ---------------------------------------------------------- retention

    async def _prefix_end(self, table: str, cutoff: str) -> int:
        # the first row to keep, walking the primary key from the oldest:
        # retention runs often, so the expired prefix is short
        row = await self._one(
            f"SELECT id FROM {table} WHERE time >= %s ORDER BY id LIMIT 1", (cutoff,)
        )
        if row is not None:
            return int(row[0]) - 1
        row = await self._one(f"SELECT coalesce(max(id), 0) FROM {table}")
        return int(row[0]) if row else 0

    async def retention_plan(self, cutoff: str, audit_cutoff: str) -> dict[str, int]:
        log_end = await self._prefix_end("log", cutoff)
        audit_end = await self._prefix_end("audit", audit_cutoff)

        async def count(sql: str, args: Sequence[Any]) -> int:
            row = await self._one(sql, args)
            return int(row[0] or 0) if row else 0

        return {
            "quarantine_items": await count(
                "SELECT count(*) FROM quarantine WHERE received < %s AND NOT hold", (cutoff,)),
            "kept_under_hold": await count(
                "SELECT count(*) FROM quarantine WHERE received < %s AND hold", (cutoff,)),
            "log_records": await count("SELECT count(*) FROM log WHERE id <= %s", (log_end,)),
            "audit_rows": await count("SELECT count(*) FROM audit WHERE id <= %s", (audit_end,)),
            "log_end": log_end,
            "audit_end": audit_end,
        }

    async def purge_quarantine_before(
        self, cutoff: str, batch: int = 500
    ) -> AsyncIterator[list[tuple[str, str]]]:
        """Remove rows received before ``cutoff`` and not under hold, ``batch``
        per transaction; yields (id, path) after each commit for
        :meth:`delete_body`.  Finally removes bodies no row owns (left by a
        purge interrupted between a batch and its bodies)."""
        while True:
            async with self._tx() as conn:
                cur = await conn.execute(
                    "SELECT id, path FROM quarantine WHERE received < %s AND NOT hold"
                    " ORDER BY received LIMIT %s FOR UPDATE SKIP LOCKED",
                    (cutoff, batch),
                )
                rows = [(r[0], r[1]) for r in await cur.fetchall()]
                if rows:
                    ids = [r[0] for r in rows]
                    await conn.execute("DELETE FROM quarantine_address WHERE id = ANY(%s)", (ids,))
                    await conn.execute("DELETE FROM quarantine WHERE id = ANY(%s)", (ids,))
            if not rows:
                break
            yield rows
        async with self._tx() as conn:
            await conn.execute(
                "DELETE FROM body b WHERE NOT EXISTS (SELECT 1 FROM quarantine q"
                " WHERE q.path = b.path)"
            )

    async def purge_log_through(self, end: int, batch: int = 5000) -> int:
        """Purge each instance's log prefix up to global id ``end``, then the
        anchors older than the oldest remaining record (never the newest
        one); the anchor chain's start moves to the last anchor removed."""
        total = await self._purge_chain("log", end, batch)
        if total:
            await self._purge_anchors()
        return total

    async def _purge_anchors(self) -> None:
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ANCHOR_LOCK,))
            cur = await conn.execute(
                "SELECT seq, hash FROM anchor WHERE time < (SELECT min(time) FROM log)"
                " AND seq < (SELECT max(seq) FROM anchor) ORDER BY seq DESC LIMIT 1"
            )
            row = await cur.fetchone()
            if row is None:
                return
            await conn.execute("DELETE FROM anchor WHERE seq <= %s", (row[0],))
            await conn.execute(
                "INSERT INTO chain_head (chain, instance, seq, hash, anchor_seq, anchor)"
                " VALUES ('anchor', '', 0, %s, %s, %s) ON CONFLICT (chain, instance)"
                " DO UPDATE SET anchor_seq = excluded.anchor_seq, anchor = excluded.anchor",
                (GENESIS, row[0], row[1]),
            )

    async def purge_audit_through(self, end: int, batch: int = 5000) -> int:
        return await self._purge_chain("audit", end, batch)

    async def _purge_chain(self, chain: str, end: int, batch: int) -> int:
        """Delete rows with global id ``<= end``, oldest first; in the same
        transaction each instance's anchor moves to its last deleted row (a
        chain prefix: ids grow with the chain seq within an instance)."""
        table = {"log": "log", "audit": "audit"}[chain]
        total = 0
        while True:
            async with self._tx() as conn:
                cur = await conn.execute(
                    f"SELECT id, instance, seq, hash FROM {table} WHERE id <= %s"
                    " ORDER BY id LIMIT %s",
                    (end, batch),
                )
                rows = await cur.fetchall()
                if rows:
                    last: dict[str, tuple[int, str]] = {}
                    for _, instance, seq, h in rows:
                        if instance not in last or seq > last[instance][0]:
                            last[instance] = (int(seq), h)
                    await conn.execute(
                        "SELECT 1 FROM chain_head WHERE chain = %s AND instance = ANY(%s)"
                        " ORDER BY instance FOR UPDATE",
                        (chain, sorted(last)),
                    )
                    ids = [int(r[0]) for r in rows]
                    if table == "log":
                        await conn.execute("DELETE FROM log_address WHERE id = ANY(%s)", (ids,))
                    await conn.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (ids,))
                    for instance, (seq, h) in last.items():
                        await conn.execute(
                            "UPDATE chain_head SET anchor_seq = %s, anchor = %s"
                            " WHERE chain = %s AND instance = %s",
                            (seq, h, chain, instance),
                        )
            if not rows:
                return total
            total += len(rows)

    async def checkpoint(self) -> str:
        """Anchor every chain's head now, then VACUUM the tables rows were
        deleted from (dead tuples become reusable space).  ``"truncated"``."""
        await self._write_anchor(wait=True)
        async with self.pool.connection() as conn:
            await conn.execute(
                "VACUUM body, quarantine, quarantine_address, log, log_address, audit"
            )
        return "truncated"


__all__ = ["MIGRATIONS", "Outbox", "PostgresStore", "describe_dsn"]
