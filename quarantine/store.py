"""The store protocol and the helpers every backend shares.

:class:`StoreProtocol` lists the domain methods the rest of mailwarden uses
(quarantine, log append/iterate, audit, subject access, erasure, retention,
metrics counts); no SQL outside a backend module.  The backends:
:class:`quarantine.sqlite.SQLiteStore` (the default; ``Store`` stays the name
callers open a SQLite store with, ``await Store.open(path)``) and
:class:`quarantine.postgres.PostgresStore` (several gateways on one database;
docs/store.md); :func:`open_store` picks one from ``[store] backend``.

The SQLite layout under ``store.path``: one database (WAL) and message files.

Tables (schema versioned, see ``MIGRATIONS``):

* ``quarantine``: one row per held message (header-only metadata; the body is
  the file under ``messages/``), with ``quarantine_address`` as an index of the
  addresses each item concerns.
* ``log``: the header-only monitoring log, one record per finished message,
  each carrying ``hash = SHA-256(prev_hash || canonical record)`` so that any
  edit breaks the chain; ``log_address`` indexes the addresses.
* ``audit``: every access to kept data (chained the same way).
* ``meta``: schema version and chain anchors.
* ``access_request`` (schema v2): exceptional-access requests and, once a
  second person approved them, grants (``quarantine/grants.py``).
* ``export`` (schema v2): every log export (id, time, user, ground, case,
  filters) with its pseudonym key (``quarantine/pseudonym.py``).
* ``quarantine.hold_case`` / ``hold_until`` (schema v2): the investigation a
  hold is for and when it ends (``release_expired_holds``).

All SQL is plain and parameterised, in ``quarantine/sqlite.py``.  Writes
from the event loop go through aiosqlite's thread, file I/O through an
executor: nothing here blocks the loop.  Quarantine rows are committed with
``synchronous=FULL`` before the client is told 250.  Log records are batched
by one writer task; a crash may lose the last unwritten batch of *log
records* (never a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

DB_NAME = "mailwarden.db"
MESSAGES_DIR = "messages"
GENESIS = "0" * 64
_T = TypeVar("_T")

class StoreError(Exception):
    """The store cannot be used (permissions, disk, corrupt database)."""


class NotFound(StoreError):
    """No quarantine item with that id."""


class OnHold(StoreError):
    """The quarantine item is under legal hold."""


#: Fields of a quarantine item (the dict the review commands get).
COLUMNS = (
    "id", "received", "queue_id", "direction", "client_addr", "helo", "mail_from",
    "rcpt_tos", "hdr_from", "hdr_to", "subject", "message_id", "hdr_date", "size",
    "reason", "detail", "personal", "hold", "state", "path", "sha256", "verdicts", "updated",
    "hold_case", "hold_until",
)
#: Columns of ``access_request`` and ``export``, both backends (=
#: :data:`quarantine.grants.REQUEST_KEYS` / ``EXPORT_KEYS``).
REQUEST_COLUMNS = (
    "id", "created", "requester", "requester_uid", "scope_kind", "scope", "ground",
    "case_ref", "reason", "state", "decided", "decided_by", "decided_uid", "expires",
)
EXPORT_COLUMNS = ("id", "time", "user", "uid", "ground", "case_ref", "filters", "identified",
                  "hmac_key")
#: An access request's row, every column in :data:`REQUEST_COLUMNS` order (no
#: placeholders: the same text in both SQL dialects).
REQUEST_SELECT = "SELECT " + ", ".join(REQUEST_COLUMNS) + " FROM access_request"


class Row(NamedTuple):
    """One stored log row.

    ``seq`` identifies the record in the whole store (SQLite: its chain
    position; PostgreSQL: the global id that orders all instances' rows).
    A backend with several chains also gives the row's ``instance``, its
    chain position ``pos``, and ``record_hash`` (``sha256(record)``: the
    chain is then ``hash = chain_hash(prev, record_hash)``).  Empty/0 for
    SQLite, whose one chain hashes the record itself."""

    seq: int
    time: str
    queue_id: str
    direction: str
    record: str
    hash: str
    instance: str = ""
    pos: int = 0
    record_hash: str = ""


class Chain(NamedTuple):
    """One hash chain of a store (``log_chains``/``audit_chains``).

    SQLite has one chain (``instance`` ""); PostgreSQL one per gateway
    instance.  ``anchor`` is the ``prev`` of the oldest remaining row (GENESIS,
    or the hash of the last row retention purged), ``anchor_seq`` that purged
    row's chain position (None: not recorded), ``head`` the (position, hash)
    of the last row ever appended (None: not recorded)."""

    instance: str
    anchor: str
    anchor_seq: int | None = None
    head: tuple[int, str] | None = None


class LogFilter(Protocol):
    """Which log records a page or count reads (``quarantine.log.LogQuery``)."""

    since: datetime | None
    until: datetime | None
    address: str | None
    direction: str | None
    up_to: int | None


#: Above this size a message's SHA-256 is computed in a worker thread, not on
#: the event loop (about 1 ms per 2 MB; a 50 MB message would hold the loop).
HASH_ON_LOOP = 256 * 1024


async def sha256_hex(data: bytes) -> str:
    """The SHA-256 of a message, off the event loop when it is large."""
    if len(data) <= HASH_ON_LOOP:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


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
    """The user the current command runs for (``quarantine.access.current``).

    Through the control socket: the peer's user.  Run directly on the store:
    the OS user from the real uid; under sudo (``sudo -u mailwarden mailwarden
    quarantine show ...``) the invoking user is recorded too:
    ``mailwarden (sudo: alice)``.
    """
    from quarantine.access import current

    caller = current()
    return caller.user, caller.uid


def new_quarantine_id(now: datetime) -> str:
    return now.strftime("%Y%m%d") + "-" + secrets.token_hex(6).upper()


def addresses_of(values: Iterable[str | None]) -> set[str]:
    """Lower-case bare addresses from envelope values and header values."""
    import email.utils

    from gateway.message import simple_address

    out: set[str] = set()
    for v in values:
        if not v:
            continue
        simple = simple_address(v)  # the parser only for what is not plain
        for _, addr in email.utils.getaddresses([v]) if simple is None else [("", simple)]:
            addr = addr.strip().lower()
            if addr:
                out.add(addr)
    return out


def driver_errors(
    driver: type[BaseException] | tuple[type[BaseException], ...],
    as_store_error: Callable[[Any, BaseException], StoreError],
    own: frozenset[str],
) -> Callable[[type[_T]], type[_T]]:
    """A backend's class decorator: every public coroutine and async generator
    (but those in ``own``, which map their own errors) raises
    ``as_store_error(self, exc)`` for a ``driver`` exception, never the
    driver's own: callers (the CLI, retention, review, metrics) handle the
    protocol's errors only.  :class:`NotFound` and :class:`OnHold` pass
    through unchanged.  A wrapped method is marked ``maps_driver_errors``
    (the backends' tests check every public method is).

    The cost is one extra coroutine frame per call (about a microsecond, next
    to a round trip to the database).
    """

    def wrap_coroutine(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(self, *args, **kwargs)
            except driver as exc:
                raise as_store_error(self, exc) from exc

        method.maps_driver_errors = True  # type: ignore[attr-defined]
        return method

    def wrap_generator(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(fn)
        async def method(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            try:
                async with contextlib.aclosing(fn(self, *args, **kwargs)) as items:
                    async for item in items:
                        yield item
            except driver as exc:
                raise as_store_error(self, exc) from exc

        method.maps_driver_errors = True  # type: ignore[attr-defined]
        return method

    def decorate(cls: type[_T]) -> type[_T]:
        for name, fn in list(vars(cls).items()):
            if name.startswith("_") or name in own:
                continue
            if inspect.isasyncgenfunction(fn):
                setattr(cls, name, wrap_generator(fn))
            elif inspect.iscoroutinefunction(fn):
                setattr(cls, name, wrap_coroutine(fn))
        return cls

    return decorate


class StoreProtocol(Protocol):
    """What mailwarden needs from a store backend (SQLite, PostgreSQL: docs/store.md).

    Quarantine items are dicts with the keys :data:`COLUMNS`; times are ISO
    strings from :func:`iso`.  Log and audit appends take their chain position
    (seq, previous hash) from the backend inside the write transaction.
    A database failure is raised as :class:`StoreError` (or :class:`NotFound`,
    :class:`OnHold`), never as the backend's driver exception.
    """

    root: Path
    clock: Callable[[], datetime]
    log_failures: int
    #: seals stored content (``[store] key_file``); None = no encryption
    keyring: KeyRing | None

    async def close(self) -> None: ...
    async def check(self) -> tuple[bool, str]: ...
    async def checkpoint(self) -> str: ...

    # quarantine
    async def quarantine(
        self, *, raw: bytes, queue_id: str, received: datetime, direction: str,
        client_addr: str, helo: str, mail_from: str, rcpt_tos: Sequence[str],
        headers: Mapping[str, str | None], reason: str, detail: str, personal: bool,
        verdicts: Sequence[Mapping[str, Any]],
    ) -> str: ...
    async def list_quarantine(
        self, *, since: str | None = None, until: str | None = None,
        reason: str | None = None, address: str | None = None, state: str = "held",
        limit: int = 50, page: int = 1, window: int = 5000,
    ) -> tuple[list[dict[str, Any]], bool]: ...
    async def get_item(self, qid: str) -> dict[str, Any] | None: ...
    async def get_items(self, ids: Sequence[str]) -> list[dict[str, Any]]: ...
    async def read_body(self, item: Mapping[str, Any]) -> bytes: ...
    async def delete_body(self, path: str) -> bool: ...
    async def item_is_live(self, qid: str, path: str) -> bool: ...
    async def mark_released(self, qid: str) -> None: ...
    async def set_hold(self, qid: str, hold: bool, *, case: str | None = None,
                       until: str | None = None) -> None: ...
    async def delete_item(self, qid: str) -> bool: ...
    async def quarantine_totals(self) -> tuple[int, int]: ...

    async def release_expired_holds(
        self, now: str, *, dry_run: bool = False
    ) -> list[tuple[str, str | None, str]]: ...

    # access control (issue 17): requests/grants and exports; rows are dicts
    # with the keys of quarantine.grants.REQUEST_KEYS / EXPORT_KEYS
    async def add_access_request(self, request: Mapping[str, Any]) -> None: ...
    async def get_access_request(self, rid: str) -> dict[str, Any] | None: ...
    async def access_requests(
        self, *, requester: str | None = None, scope_kind: str | None = None,
        scope: Sequence[str] = (), state: str | None = None,
    ) -> list[dict[str, Any]]: ...
    async def decide_access_request(
        self, rid: str, *, state: str, decided: str, decided_by: str, decided_uid: int,
        expires: str | None,
    ) -> bool: ...
    async def add_export(self, export: Mapping[str, Any]) -> None: ...
    async def get_export(self, eid: str) -> dict[str, Any] | None: ...

    # subject access and erasure
    async def subject_log_seqs(self, address: str) -> list[int]: ...
    async def subject_items(self, address: str) -> list[tuple[str, bool, bool]]: ...
    def log_records(self, seqs: Sequence[int]) -> AsyncIterator[tuple[int, str, str]]: ...
    async def erase_log(self, seqs: Sequence[int], tombstone: str) -> int: ...
    async def erase_items(self, ids: Sequence[str]) -> tuple[list[str], int]: ...

    # the log
    def start_log_writer(self) -> None: ...
    def append_log(self, record: dict[str, Any]) -> None: ...
    async def flush_log(self) -> None: ...
    async def stop_log_writer(self) -> None: ...
    async def write_log_batch(self, batch: Sequence[dict[str, Any]]) -> None: ...
    async def log_page(self, query: LogFilter, after: int, limit: int) -> list[Row]: ...
    async def log_count(self, query: LogFilter) -> int: ...
    async def log_last_seq(self) -> int: ...
    async def log_index(self, lo: int, hi: int) -> dict[int, list[str]]: ...
    async def log_anchor(self) -> str: ...

    # chain iteration (for ``mailwarden log verify``): every chain, in chain order
    async def log_chains(self) -> list[Chain]: ...
    async def log_chain_page(self, instance: str, after: int, limit: int) -> list[Row]: ...
    async def audit_chains(self) -> list[Chain]: ...
    async def audit_chain_page(
        self, instance: str, after: int, limit: int
    ) -> list[tuple[Any, ...]]: ...
    async def anchor_chain(self) -> Chain: ...
    async def anchor_page(self, after: int, limit: int) -> list[tuple[int, str, str, str, str]]: ...

    # audit
    async def audit(
        self, command: str, *, targets: Sequence[str] = (),
        filters: Mapping[str, Any] | None = None, reason: str = "",
        exceptional: bool = False, detail: Mapping[str, Any] | None = None,
    ) -> int: ...
    async def audit_anchor(self) -> str: ...
    async def audit_page(self, after: int, limit: int) -> list[tuple[Any, ...]]: ...
    async def audit_rows(
        self, *, since: str | None = None, until: str | None = None
    ) -> list[tuple[Any, ...]]: ...
    async def audit_entry(self, seq: int) -> tuple[str, str] | None: ...
    async def audit_first_seq(self) -> int | None: ...

    # retention
    async def retention_plan(self, cutoff: str, audit_cutoff: str) -> dict[str, int]: ...
    def purge_quarantine_before(
        self, cutoff: str, batch: int = 500
    ) -> AsyncIterator[list[tuple[str, str]]]: ...
    async def purge_log_through(self, end: int, batch: int = 5000) -> int: ...
    async def purge_audit_through(self, end: int, batch: int = 5000) -> int: ...


async def open_store(
    settings: StoreSettings,
    *,
    create: bool = False,
    clock: Callable[[], datetime] = utcnow,
    **tuning: Any,
) -> StoreProtocol:
    """Open the store ``[store]`` names: the one place a backend is chosen.

    ``create`` (``serve``): make the store (directory, database, schema) when it
    is missing; every other command refuses a missing store.  ``tuning`` is the
    log writer's batching (``batch_size``, ``flush_interval``).

    ``[store] key_file`` set: the key ring (:mod:`quarantine.crypto`: the KEK
    from that file, the data keys in their own key store) goes to the backend,
    which seals what it stores with it and closes it; "" = no encryption.
    """
    from quarantine.crypto import open_keyring

    shared = settings.backend == "postgresql"
    ring = await open_keyring(settings.key_file, Path(settings.path), create=create, clock=clock,
                              dsn=settings.dsn if shared else "",
                              key_dsn=settings.key_dsn if shared else "")
    extra: dict[str, Any] = {"keyring": ring} if ring is not None else {}
    try:
        if settings.backend == "postgresql":
            from quarantine.postgres import PostgresStore

            return await PostgresStore.open(settings, create=create, clock=clock, **extra,
                                            **tuning)
        from quarantine.sqlite import SQLiteStore

        return await SQLiteStore.open(settings.path, create=create, clock=clock, **extra,
                                      **tuning)
    except BaseException:
        if ring is not None:
            await ring.close()
        raise


# The first backend, and the name callers open a store with (``Store.open``).
# Resolved lazily (PEP 562): quarantine.sqlite imports the helpers above, so
# either module can be imported first.
_BACKEND_NAMES = {"Store": "SQLiteStore", "SQLiteStore": "SQLiteStore", "MIGRATIONS": "MIGRATIONS"}


def __getattr__(name: str) -> Any:
    if name in _BACKEND_NAMES:
        from quarantine import sqlite

        return getattr(sqlite, _BACKEND_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from gateway.config import StoreSettings
    from quarantine.crypto import KeyRing
    from quarantine.sqlite import MIGRATIONS, SQLiteStore

    Store = SQLiteStore

__all__ = [
    "COLUMNS", "Chain", "DB_NAME", "ERASED_KEYS", "GENESIS", "MESSAGES_DIR", "MIGRATIONS", "LogFilter",
    "NotFound", "OnHold", "Row", "SQLiteStore", "Store", "StoreError", "StoreProtocol",
    "addresses_of", "canonical", "chain_hash", "driver_errors", "sha256_hex", "erased_record", "is_erased", "iso",
    "new_quarantine_id", "open_store", "os_user", "utcnow",
]
