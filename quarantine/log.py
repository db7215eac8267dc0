"""The header-only monitoring log: dates, chain verification, export, stats.

Policy: "monitoring normally confines itself to the address and subject
heading" and "monitoring info may be shared with auditors on reasonable
grounds".  The log holds header-only records (see ``filters/header_log.py``);
this module reads them back for auditors, and proves they were not edited.

Tamper evidence
---------------
Every log row carries ``hash = chain_hash(prev, record)`` where ``record`` is
the canonical JSON stored in the row and ``prev`` is the previous row's hash
(the backend's ``write_log_batch``).  The first row's ``prev`` is the
``meta`` value ``log_anchor`` (``GENESIS``, 64 zeros, when absent).

Contract with retention (``quarantine/retention.py``): a purge that deletes
the oldest log rows sets ``meta.log_anchor`` to the ``hash`` of the *last
deleted* row, in the same transaction as the delete.  So the oldest remaining
row always chains from ``log_anchor`` and :func:`verify` needs nothing else.
Deleting rows from the middle or the end of the log is not a purge and is
reported as a break (the end only if the caller knows the expected count).

The address index (``log_address``) lies outside the hashed record (the
store pops ``addresses``), so each record carries ``address_digest``
(``filters.header_log.address_digest``) and :func:`verify` recomputes it from
the index: removing someone from the index is a break too.  The ``time``,
``queue_id`` and ``direction`` columns (used to filter exports) must equal the
record's values.

Erasure by address (``quarantine/review.py``) keeps the row and its ``hash``
and replaces ``record`` with a tombstone (``quarantine.store.erased_record``:
only the keys ``erased``, ``erased_at``, ``audit_seq``), clearing its
``queue_id``/``direction`` columns and its ``log_address`` rows; :func:`verify`
takes a tombstone's stored hash as given (so the records around it stay
verifiable) and names the erased rows in its report: an erasure is visible,
never silent, and points at the audit row of the ``erase`` command.

Export and stats read the log in pages by ``seq`` (keyset pagination: constant
memory, never the whole table at once), up to the last ``seq`` that existed
when the command started, so an export is a well-defined set even while the
gateway keeps appending.

Dates on the command line
-------------------------
:func:`parse_when` (shared with the review commands): ISO 8601 date or
timestamp, UTC unless an offset is given.  ``--since`` is inclusive from the
start of the day; ``--until`` with ``end=True`` is inclusive to the end of the
day (the last microsecond), so callers compare ``time <= until``.
"""


from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, BinaryIO, NamedTuple

import click

from filters.header_log import address_digest
from quarantine.pseudonym import Pseudonymiser, candidates
from quarantine.store import ERASED_KEYS, GENESIS, Chain, Row, canonical, chain_hash, iso
from quarantine.store import StoreProtocol as Store

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

#: Rows fetched per query when reading the log.
PAGE_SIZE = 2000

DIRECTIONS = ("inbound", "outbound", "internal")


# --------------------------------------------------------------------- dates


def parse_when(text: str, end: bool = False) -> datetime:
    """Parse an ISO 8601 date or timestamp into an aware UTC datetime.

    ``2026-11-01`` is the start of that day (UTC), or with ``end=True`` its
    last microsecond, so that ``--until 2026-11-01`` includes the whole day.
    Full timestamps (``2026-11-01T10:30``, ``...Z``, ``...+02:00``, a space
    instead of ``T``) are taken as given; without an offset they are UTC.
    Raises :class:`ValueError` with a message fit for the user.
    """
    value = (text or "").strip()
    if not value:
        raise ValueError("empty date")
    try:
        if _DATE_RE.match(value):
            day = date.fromisoformat(value)
            if end:
                return datetime.combine(day, time.max, tzinfo=UTC)
            return datetime.combine(day, time.min, tzinfo=UTC)
        if value.endswith(("z", "Z")):
            value = value[:-1] + "+00:00"
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"invalid date {text!r}: expected ISO 8601, e.g. 2026-11-01 or "
            "2026-11-01T10:30:00Z"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


class When(click.ParamType):
    """A click parameter type for :func:`parse_when` (usage error -> exit 2)."""

    name = "DATE"

    def __init__(self, end: bool = False) -> None:
        self.end = end

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value), end=self.end)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def month_of(iso_time: str) -> str:
    """``2026-11`` from a stored ISO time."""
    return iso_time[:7]


# ------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LogQuery:
    """Which records an export or stats run reads (all optional)."""

    since: datetime | None = None
    until: datetime | None = None
    address: str | None = None
    direction: str | None = None
    #: only records with ``seq <= up_to`` (fixed when the command starts)
    up_to: int | None = None

    def filters(self) -> dict[str, Any]:
        """The filters as recorded in the audit row."""
        return {
            "since": iso(self.since) if self.since else None,
            "until": iso(self.until) if self.until else None,
            "address": self.address,
            "direction": self.direction,
        }


async def iter_pages(
    store: Store, query: LogQuery, page_size: int = PAGE_SIZE
) -> AsyncIterator[list[Row]]:
    """Yield the matching rows in ``seq`` order, one page at a time.

    The next page is fetched (by the store backend) while the caller works
    on the current one; at most two pages are in memory.
    """
    after = 0
    pending = asyncio.ensure_future(store.log_page(query, after, page_size))
    try:
        while True:
            page = await pending
            if not page:
                return
            after = page[-1].seq
            if len(page) < page_size:
                pending = None
                yield page
                return
            pending = asyncio.ensure_future(store.log_page(query, after, page_size))
            yield page
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, Exception):
                pass


async def count(store: Store, query: LogQuery) -> int:
    """How many records match (for the progress bar)."""
    return await store.log_count(query)


async def last_seq(store: Store) -> int:
    """The highest ``seq`` in the log (0 when empty)."""
    return await store.log_last_seq()


# -------------------------------------------------------------- verification


class VerifyResult(NamedTuple):
    """``(ok, first_bad_seq, message)``."""

    ok: bool
    first_bad: int | None
    message: str


async def _index(store: Store, lo: int, hi: int) -> dict[int, list[str]]:
    return await store.log_index(lo, hi)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _link(row: Row) -> str:
    """What a row's chain hash is over: its record hash where the backend
    stores one (PostgreSQL), else the record itself (SQLite)."""
    return row.record_hash or row.record


def _check_row(row: Row, prevs: tuple[str, ...], index: list[str]) -> tuple[str | None, bool]:
    """Why ``row`` is bad (or None), and whether it is an erasure marker.

    ``prevs`` holds the predecessor's stored hash and, when that row was bad,
    the hash its content should have had: after an edited record *or* an
    edited hash column the chain resumes, so one edit counts once.

    With a stored ``record_hash`` the chain runs over record hashes, so a
    tombstone's link is still checked (only its content no longer matches its
    record hash, as intended)."""
    try:
        rec = json.loads(row.record)
    except ValueError:
        rec = None
    erased = isinstance(rec, dict) and rec.get("erased") is True and set(rec) <= ERASED_KEYS
    if row.record_hash:
        if all(chain_hash(prev, row.record_hash) != row.hash for prev in prevs):
            return "its hash does not match its record hash and its predecessor's hash", erased
        if erased:
            return None, True
        if _sha(row.record) != row.record_hash:
            return "its record does not match its record hash", False
    if rec is None:
        return "its record is not valid JSON", False
    if not isinstance(rec, dict):
        return "its record is not a JSON object", False
    if erased:
        return None, True
    if not row.record_hash and all(chain_hash(prev, row.record) != row.hash for prev in prevs):
        return "its hash does not match its content and its predecessor's hash", False
    for column in ("time", "queue_id", "direction"):
        if rec.get(column, "") != getattr(row, column):
            return f"its {column} column does not match the hashed record", False
    digest = rec.get("address_digest")
    if digest is not None and digest != address_digest(index):
        return "its address index does not match the hashed record", False
    return None, False


class _Failure(NamedTuple):
    seq: int  # the record's seq in the store (global id on PostgreSQL)
    instance: str
    pos: int  # its chain position
    queue_id: str
    time: str
    why: str


def _where(kind: str, f: _Failure) -> str:
    if not f.instance:
        if kind == "log":
            return f"record seq {f.seq} (queue id {f.queue_id}, time {f.time})"
        return f"row seq {f.seq} (time {f.time}, command {f.queue_id!r})"
    if kind == "log":
        return (f"instance {f.instance} seq {f.pos} (record {f.seq}, queue id {f.queue_id},"
                f" time {f.time})")
    return f"instance {f.instance} seq {f.pos} (audit row {f.seq}, time {f.time}," \
           f" command {f.queue_id!r})"


class _Anchors(NamedTuple):
    #: (kind, instance, chain position) -> [(anchor seq, anchored hash)]
    claims: dict[tuple[str, str, int], list[tuple[int, str]]]
    problems: list[str]
    count: int


async def _anchors(store: Store, page_size: int) -> _Anchors:
    """Read and check the anchor chain (PostgreSQL; none on SQLite): each
    anchor is ``chain_hash(prev, sha256(text))`` over its stored text, which
    names every chain's head (kind -> instance -> [position, hash])."""
    claims: dict[tuple[str, str, int], list[tuple[int, str]]] = {}
    problems: list[str] = []
    start = await store.anchor_chain()
    prev = start.anchor
    after = start.anchor_seq or 0
    count = 0
    expected = after + 1
    while rows := await store.anchor_page(after, page_size):
        for seq, _time, _instance, text, h in rows:
            count += 1
            if seq != expected:
                problems.append(f"anchor seq {expected}..{seq - 1} missing")
            expected = seq + 1
            if chain_hash(prev, _sha(text)) != h:
                problems.append(f"anchor seq {seq}: its hash does not match its content"
                                " and its predecessor's hash")
            prev = h
            after = seq
            try:
                heads = json.loads(text)["heads"]
                for kind, chains in heads.items():
                    for instance, (pos, hh) in chains.items():
                        seen = claims.setdefault((kind, instance, int(pos)), [])
                        if not any(hh == h0 for _, h0 in seen):  # an idle head, named again
                            seen.append((seq, hh))
            except (ValueError, KeyError, TypeError, AttributeError):
                problems.append(f"anchor seq {seq}: unreadable content")
    return _Anchors(claims, problems, count)


def _check_claims(kind: str, anchors: _Anchors, chains: list[Chain],
                  seen: dict[tuple[str, int], str], last: dict[str, int]) -> list[str]:
    """Anchored heads that the chains no longer match."""
    problems: list[str] = []
    by_name = {c.instance: c for c in chains}
    for (k, instance, pos), anchored in sorted(anchors.claims.items()):
        if k != kind:
            continue
        chain = by_name.get(instance)
        for seq, h in anchored:
            if chain is None:
                problems.append(f"anchor seq {seq} names instance {instance}, whose {kind}"
                                " chain is gone")
            elif (instance, pos) in seen:
                if seen[(instance, pos)] != h:
                    problems.append(f"anchor seq {seq}: instance {instance} seq {pos} has"
                                    " another hash than the one anchored")
            elif chain.anchor_seq is not None and pos == chain.anchor_seq:
                if chain.anchor != h:
                    problems.append(f"anchor seq {seq}: instance {instance} seq {pos} (purged)"
                                    " does not match the retention anchor")
            elif chain.anchor_seq is not None and pos < chain.anchor_seq:
                continue  # purged by retention
            elif pos > last.get(instance, 0):
                problems.append(f"anchor seq {seq}: instance {instance} seq {pos} is missing")
    return problems


async def verify(store: Store, page_size: int = 5000) -> VerifyResult:
    """Recompute every log chain from its anchor (SQLite: ``meta.log_anchor``;
    PostgreSQL: each instance's chain, then the anchor chain tying their heads).

    Returns ``(True, None, summary)`` or ``(False, seq, message)`` naming the
    first bad record (seq, queue id, time; with several chains ``instance NAME
    seq N``) and how many records are bad in all (after a break the check
    resumes, so one edit counts once).  An erasure tombstone must be confirmed
    by its ``erase`` audit row (which lists the erased seqs);
    :func:`verify_audit` proves that row authentic.
    """
    # anchors first, then the heads, then the rows up to those heads: records
    # appended meanwhile are left for the next run, and an anchor can only
    # name a position at or below the heads read after it
    anchors = await _anchors(store, page_size)
    chains = await store.log_chains()
    failures: list[_Failure] = []
    bad = 0
    checked = 0
    erased: dict[int, list[Row]] = {}  # audit seq -> tombstones
    seqs: list[int] = []
    seen: dict[tuple[str, int], str] = {}
    last: dict[str, int] = {}
    wanted = {(i, p) for (k, i, p) in anchors.claims if k == "log"}
    for chain in chains:
        prevs: tuple[str, ...] = (chain.anchor,)
        prev_pos = chain.anchor_seq
        after = chain.anchor_seq or 0
        end = None
        stop = chain.head[0] if chain.head is not None else None
        while page := await store.log_chain_page(chain.instance, after, page_size):
            if stop is not None:
                page = [r for r in page if (r.pos or r.seq) <= stop]
                if not page:
                    break
            index = await _index(store, min(r.seq for r in page), max(r.seq for r in page))
            for row in page:
                pos = row.pos or row.seq
                reason, is_erased = _check_row(row, prevs, index.get(row.seq, []))
                if reason is None and prev_pos is not None and pos != prev_pos + 1:
                    # unreachable with an intact chain unless rows were removed
                    # *and* the hashes rewritten; report the gap anyway
                    reason = f"records seq {prev_pos + 1}..{pos - 1} are missing"
                if is_erased:
                    audit_seq = int(json.loads(row.record).get("audit_seq", 0))
                    erased.setdefault(audit_seq, []).append(row)
                if reason is None:
                    prevs = (row.hash,)
                else:
                    bad += 1
                    failures.append(_Failure(row.seq, row.instance, pos, row.queue_id, row.time,
                                             reason))
                    # resume from either the stored hash (the record was edited)
                    # or the hash its content implies (the hash was edited)
                    prevs = (row.hash, *(chain_hash(p, _link(row)) for p in prevs))
                if (chain.instance, pos) in wanted:
                    seen[(chain.instance, pos)] = row.hash
                prev_pos = pos
                end = (pos, row.hash)
                checked += 1
                seqs.append(row.seq)
            after = page[-1].pos or page[-1].seq
        last[chain.instance] = end[0] if end else (chain.anchor_seq or 0)
        if chain.head is not None and chain.head[0] > 0 and (
            end is None and chain.head[0] != chain.anchor_seq or end and end != chain.head
        ):
            bad += 1
            failures.append(_Failure(0, chain.instance, last[chain.instance] + 1, "", "",
                                     f"records up to the chain head seq {chain.head[0]}"
                                     " are missing or differ from the head"))
    for audit_seq, rows in erased.items():
        listed = await _erased_by(store, audit_seq)
        for r in rows:
            if listed is None or r.seq in listed:
                continue
            bad += 1
            failures.append(_Failure(r.seq, r.instance, r.pos or r.seq, r.queue_id, r.time,
                                     f"erased, but audit row {audit_seq} is not an erase"
                                     " command listing it"))
    anchor_problems = anchors.problems + _check_claims("log", anchors, chains, seen, last)
    if failures:
        first = min(failures, key=lambda f: (f.seq == 0, f.seq, f.instance, f.pos))
        more = f"; {len(anchor_problems)} anchor problems" if anchor_problems else ""
        return VerifyResult(
            False,
            first.seq or first.pos,
            f"log chain broken at {_where('log', first)}: {first.why};"
            f" {bad} of {checked} records fail{more}",
        )
    if anchor_problems:
        return VerifyResult(False, None, f"log anchors broken: {anchor_problems[0]};"
                                         f" {len(anchor_problems)} anchor problems")
    span = f" (seq {min(seqs)}..{max(seqs)})" if seqs else ""
    extra = ""
    if erased:
        gone = sorted(r.seq for rows in erased.values() for r in rows)
        shown = ", ".join(map(str, gone[:20])) + (", ..." if len(gone) > 20 else "")
        audits = ", ".join(map(str, sorted(erased)))
        extra = f"; erased records: {len(gone)} (seq {shown}; erase audit seq {audits})"
    plural = "" if checked == 1 else "s"
    if len(chains) == 1 and not chains[0].instance:
        anchor = chains[0].anchor
        origin = "genesis" if anchor == GENESIS else f"anchor {anchor[:12]}..."
        return VerifyResult(
            True, None, f"log chain intact: {checked} record{plural}{span} from {origin}{extra}"
        )
    names = ", ".join(c.instance for c in chains) or "none"
    return VerifyResult(
        True, None,
        f"log chain intact: {checked} record{plural}{span} in {len(chains)} instance chains"
        f" ({names}), {anchors.count} anchors{extra}",
    )


async def _erased_by(store: Store, audit_seq: int) -> set[int] | None:
    """The log seqs the ``erase`` audit row ``audit_seq`` lists (empty when it
    is missing or not an erase), or None when that audit row has itself been
    purged by audit retention (nothing left to check against)."""
    row = await store.audit_entry(audit_seq)
    if row is None:
        oldest = await store.audit_first_seq()
        if oldest is not None and 0 < audit_seq < oldest:
            return None
        return set()
    command, detail = row
    if command != "erase":
        return set()
    try:
        return {int(s) for s in json.loads(detail).get("log_seqs") or ()}
    except (ValueError, TypeError, AttributeError):
        return set()


async def verify_audit(store: Store, page_size: int = 5000) -> VerifyResult:
    """Recompute every audit chain from its anchor (and, on PostgreSQL,
    check the anchored audit heads)."""
    anchors = await _anchors(store, page_size)
    chains = await store.audit_chains()
    wanted = {(i, p) for (k, i, p) in anchors.claims if k == "audit"}
    seen: dict[tuple[str, int], str] = {}
    last: dict[str, int] = {}
    checked = 0
    bad = 0
    failures: list[_Failure] = []
    for chain in chains:
        prev = chain.anchor
        prev_pos = chain.anchor_seq
        after = chain.anchor_seq or 0
        end: tuple[int, str] | None = None
        stop = chain.head[0] if chain.head is not None else None
        while rows := await store.audit_chain_page(chain.instance, after, page_size):
            if stop is not None:
                rows = [r for r in rows if r[11] <= stop]
                if not rows:
                    break
            for row in rows:
                (seq, t, user, uid, command, targets, filters, reason, exceptional, detail, h,
                 pos, instance, record_hash) = row
                try:
                    payload = canonical({
                        "time": t,
                        "user": user,
                        "uid": uid,
                        "command": command,
                        "targets": json.loads(targets),
                        "filters": json.loads(filters),
                        "reason": reason,
                        "exceptional": bool(exceptional),
                        "detail": json.loads(detail),
                    })
                    if record_hash:
                        good = _sha(payload) == record_hash and chain_hash(prev, record_hash) == h
                    else:
                        good = chain_hash(prev, payload) == h
                    why = "its hash does not match its content and its predecessor's hash"
                except ValueError:
                    good, why = False, "its content is not valid JSON"
                if good and prev_pos is not None and pos != prev_pos + 1:
                    good, why = False, f"rows seq {prev_pos + 1}..{pos - 1} are missing"
                if not good:
                    bad += 1
                    failures.append(_Failure(seq, instance, pos, command, t, why))
                if (chain.instance, pos) in wanted:
                    seen[(chain.instance, pos)] = h
                prev = h
                prev_pos = pos
                end = (pos, h)
                checked += 1
            after = rows[-1][11]
        last[chain.instance] = end[0] if end else (chain.anchor_seq or 0)
        if chain.head is not None and chain.head[0] > 0 and (
            end is None and chain.head[0] != chain.anchor_seq or end and end != chain.head
        ):
            bad += 1
            failures.append(_Failure(0, chain.instance, last[chain.instance] + 1, "", "",
                                     f"rows up to the chain head seq {chain.head[0]} are"
                                     " missing or differ from the head"))
    problems = anchors.problems + _check_claims("audit", anchors, chains, seen, last)
    if failures:
        first = min(failures, key=lambda f: (f.seq == 0, f.seq, f.instance, f.pos))
        if not first.instance:
            text = (f"audit chain broken at row seq {first.seq} (time {first.time}, command"
                    f" {first.queue_id!r}); {bad} of {checked} rows fail")
        else:
            text = (f"audit chain broken at {_where('audit', first)}: {first.why};"
                    f" {bad} of {checked} rows fail")
        return VerifyResult(False, first.seq or first.pos, text)
    if problems:
        return VerifyResult(False, None, f"audit anchors broken: {problems[0]};"
                                         f" {len(problems)} anchor problems")
    return VerifyResult(True, None, f"audit chain intact: {checked} rows")


# -------------------------------------------------------------------- export

#: CSV columns, in order.  Lists are joined with "; " (attachment columns are
#: parallel lists); ``verdicts`` reads ``filter:outcome (detail) key=value``.
CSV_COLUMNS = (
    "seq",
    "time",
    "queue_id",
    "direction",
    "client_addr",
    "mail_from",
    "rcpt_tos",
    "from",
    "to",
    "cc",
    "subject",
    "message_id",
    "date",
    "size",
    "attachment_names",
    "attachment_types",
    "attachment_declared_types",
    "attachment_sizes",
    "attachment_sha256",
    "personal",
    "disposition",
    "reply",
    "quarantine_id",
    "verdicts",
    "elapsed_ms",
    "hash",
    "export_id",
)

_FORMULA_START = frozenset("=+-@\t\r")
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Record keys copied to the csv as they are (text or numbers).
_PLAIN = ("time", "queue_id", "direction", "client_addr", "mail_from")
_HEADERS = ("from", "to", "cc", "subject", "message_id", "date", "size")
_TAIL = ("personal", "disposition", "reply", "quarantine_id")


def _cell(value: Any) -> str:
    """A CSV cell.  Text that a spreadsheet would run as a formula gets a
    leading apostrophe (CSV injection); the JSONL export is the exact form."""
    t = type(value)
    if t is str:
        return "'" + value if value and value[0] in _FORMULA_START else value
    if value is None:
        return ""
    if t is bool:
        return "true" if value else "false"
    if t is int or t is float:
        return str(value)
    return _cell(_COMPACT(value))


def _join(values: Any) -> str:
    return "; ".join("" if v is None else str(v) for v in values)


def _verdict_text(v: dict[str, Any]) -> str:
    parts = [f"{v.get('filter', '?')}:{v.get('outcome', '?')}"]
    detail = v.get("detail")
    if detail:
        parts.append(f"({detail})")
    for k, val in v.items():
        if k == "filter" or k == "outcome" or k == "detail":
            continue
        parts.append(f"{k}={val if type(val) is str else _COMPACT(val)}")
    return " ".join(parts)


def csv_row(row: Row, export_id: str | None = None,
            pseudo: Pseudonymiser | None = None) -> list[str]:
    """One log row flattened to :data:`CSV_COLUMNS`.

    Lists become ``"; "``-joined text (the attachment columns are parallel
    lists), verdicts read ``filter:outcome (detail) key=value ...``.  With
    ``pseudo`` the addresses are pseudonymised and the hash left empty
    (see :mod:`quarantine.pseudonym`)."""
    rec = json.loads(row.record)
    if pseudo is not None:
        rec = pseudo.record(rec) if type(rec) is dict else {}
    get = rec.get
    cells = [str(row.seq)]
    cells += [_cell(get(k)) for k in _PLAIN]
    cells.append(_cell(_join(get("rcpt_tos") or ())))
    cells += [_cell(get(k)) for k in _HEADERS]
    atts = [a for a in get("attachments") or () if type(a) is dict]
    if atts:
        cells += [
            _cell(_join([a.get(k) for a in atts]))
            for k in ("name", "type", "declared_type", "size", "sha256")
        ]
    else:
        cells += ["", "", "", "", ""]
    cells += [_cell(get(k)) for k in _TAIL]
    cells.append(_cell("; ".join(
        _verdict_text(v) for v in get("verdicts") or () if type(v) is dict
    )))
    cells.append(_cell(get("elapsed_ms")))
    cells.append("" if pseudo is not None else row.hash)
    cells.append(export_id or "")
    return cells


def jsonl_line(row: Row, export_id: str | None = None,
               pseudo: Pseudonymiser | None = None) -> str:
    """One log row as a JSON object: ``seq``, ``hash`` (and ``export_id``),
    then the stored record (spliced, not re-encoded: the record text is
    exactly what was hashed).  With ``pseudo``: ``seq``, ``export_id`` and
    the pseudonymised record, re-encoded, without the hash."""
    if pseudo is not None:
        try:
            rec = json.loads(row.record)
        except ValueError:
            rec = {}
        rec = pseudo.record(rec) if type(rec) is dict else {}
        return _COMPACT({"seq": row.seq, "export_id": export_id, **rec}) + "\n"
    head = f'{{"seq":{row.seq},"hash":"{row.hash}"'
    if export_id:
        head += f',"export_id":{_COMPACT(export_id)}'
    body = row.record.strip()
    if body.startswith("{") and body != "{}":
        return head + "," + body[1:] + "\n"
    return head + "}\n"


class ExportResult(NamedTuple):
    rows: int
    sha256: str
    bytes: int


async def export(
    store: Store,
    query: LogQuery,
    fmt: str,
    out: BinaryIO,
    progress: Callable[[int], None] | None = None,
    page_size: int = PAGE_SIZE,
    *,
    export_id: str | None = None,
    pseudo: Pseudonymiser | None = None,
) -> ExportResult:
    """Stream the matching records to ``out`` as csv (header row first) or
    jsonl; returns the row count and the SHA-256 of the bytes written.

    Every record carries ``export_id``; with ``pseudo`` its addresses are
    replaced by that export's pseudonyms (one HMAC per distinct address,
    cached, so the cost per record is a dict lookup per address)."""
    digest = hashlib.sha256()
    written = 0
    rows = 0

    def emit(data: bytes) -> None:
        nonlocal written
        digest.update(data)
        out.write(data)
        written += len(data)

    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        emit(buf.getvalue().encode("utf-8"))
    async for page in iter_pages(store, query, page_size):
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\r\n")
            writer.writerows(csv_row(r, export_id, pseudo) for r in page)
            chunk = buf.getvalue()
        else:
            chunk = "".join(jsonl_line(r, export_id, pseudo) for r in page)
        emit(chunk.encode("utf-8"))
        rows += len(page)
        if progress is not None:
            progress(len(page))
    out.flush()
    return ExportResult(rows, digest.hexdigest(), written)


# ------------------------------------------------------------ re-identification


def export_query(filters: dict[str, Any]) -> LogQuery:
    """The query an export ran (its recorded filters, ``up_to`` included)."""
    def when(key: str) -> datetime | None:
        value = filters.get(key)
        return parse_when(value) if isinstance(value, str) and value else None

    up_to = filters.get("up_to")
    return LogQuery(since=when("since"), until=when("until"),
                    address=filters.get("address") or None,
                    direction=filters.get("direction") or None,
                    up_to=int(up_to) if isinstance(up_to, int) else None)


async def reidentify(store: Store, filters: dict[str, Any], key: bytes, pseudonym: str,
                     page_size: int = PAGE_SIZE) -> str | None:
    """The address behind ``pseudonym`` in the export that ran with
    ``filters`` and ``key``: the HMAC recomputed over the addresses of that
    export's records (index and text), or None when none matches (records
    purged or erased since, or not a pseudonym of this export)."""
    pseudo = Pseudonymiser(key)
    wanted = pseudonym.strip().lower()
    seen: set[str] = set()
    async for page in iter_pages(store, export_query(filters), page_size):
        index = await _index(store, page[0].seq, page[-1].seq)
        for row in page:
            for address in candidates(row.record, index.get(row.seq, ())):
                if address in seen:
                    continue
                seen.add(address)
                if pseudo.address(address) == wanted:
                    return address
    return None


# --------------------------------------------------------------------- stats


class StatsRow(NamedTuple):
    month: str
    address: str
    messages: int
    personal: int


#: In canonical JSON (sorted keys, no spaces, ``"`` escaped inside strings)
#: this text can only be a key/value pair, never part of a header value.
_PERSONAL = '"personal":true'


async def stats(store: Store, query: LogQuery, page_size: int = PAGE_SIZE) -> list[StatsRow]:
    """Per-address monthly counts of messages and of personal messages.

    Counts only: a record counts once for every address in its index
    (envelope sender and recipients, logged From/To/Cc).  Memory grows with
    the number of distinct (address, month) pairs, not with the log.
    """
    counts: dict[tuple[str, str], list[int]] = {}
    only = query.address.strip().lower() if query.address else None
    async for page in iter_pages(store, query, page_size):
        index = await _index(store, page[0].seq, page[-1].seq)
        for row in page:
            month = month_of(row.time)
            personal = _PERSONAL in row.record
            for address in set(index.get(row.seq, ())):
                if only is not None and address != only:
                    continue
                c = counts.setdefault((month, address), [0, 0])
                c[0] += 1
                if personal:
                    c[1] += 1
    return [StatsRow(m, a, c[0], c[1]) for (m, a), c in sorted(counts.items())]


__all__ = [
    "CSV_COLUMNS",
    "DIRECTIONS",
    "ExportResult",
    "LogQuery",
    "Row",
    "StatsRow",
    "VerifyResult",
    "When",
    "count",
    "csv_row",
    "export",
    "iter_pages",
    "jsonl_line",
    "last_seq",
    "month_of",
    "parse_when",
    "reidentify",
    "stats",
    "verify",
    "verify_audit",
]
