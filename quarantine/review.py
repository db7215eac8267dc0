"""Quarantine review, subject access and erasure: the queries behind the IT commands.

Policy clauses: *"monitoring information is shared internally only on
reasonable grounds"* (every read or change is audited before anything is
shown; a body needs a reason; the body of mail marked personal or private is
opened only as an exceptional, reasoned, audited access) and *"right of
access, rectification, erasure"* (subject-access export and erasure by
address).  The click layer is ``cli/quarantine.py``; this module holds
the logic, against a :class:`quarantine.store.Store`, so it can be tested and
reused without click.

Decisions
    * ``delete`` keeps a *tombstone* row (state ``deleted``): id, times,
      direction, size, reason and flags stay so that the audit trail's
      references still resolve, but every address, header value and verdict
      detail is blanked, the address index rows are removed and the file is
      overwritten and unlinked.  Retention removes the tombstone later.
    * ``erase`` removes quarantine rows entirely (the audit row lists the
      ids) and turns erased log records into chain tombstones
      (:func:`quarantine.store.erased_record`) so that ``log verify`` still
      verifies every remaining record.  Audit rows are kept: they are the
      record of who accessed the data, and expire with
      ``store.audit_retention_days``.
    * Row changes are committed first, the file is deleted after: a crash in
      between leaves an orphan file that :mod:`quarantine.retention` sweeps,
      never a live row whose file was already destroyed (and a legal hold set
      concurrently is always honoured, because hold is re-checked inside the
      deleting transaction).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import IO, Any

from gateway.message import Direction, Mail, decode_header_value
from quarantine import files
from quarantine.store import COLUMNS, NotFound, OnHold, erased_record, iso
from quarantine.store import StoreProtocol as Store

STATES = ("held", "released", "deleted")

class Refusal(Exception):
    """A command refused, with a one-line reason and its exit status
    (2: the command line lacks something; 1: the store or item does not allow it)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class IntegrityError(Refusal):
    """A message file is missing or does not match its recorded SHA-256."""


# --------------------------------------------------------------------- rows


def public(item: dict[str, Any]) -> dict[str, Any]:
    """An item's metadata for output (no store path)."""
    return {
        "id": item["id"],
        "received": item["received"],
        "direction": item["direction"],
        "sender": item["mail_from"],
        "recipients": item["rcpt_tos"],
        "from": item["hdr_from"],
        "to": item["hdr_to"],
        "subject": item["subject"],
        "message_id": item["message_id"],
        "date": item["hdr_date"],
        "size": item["size"],
        "reason": item["reason"],
        "detail": item["detail"],
        "personal": item["personal"],
        "hold": item["hold"],
        "hold_case": item.get("hold_case"),
        "hold_until": item.get("hold_until"),
        "state": item["state"],
        "queue_id": item["queue_id"],
        "client_addr": item["client_addr"],
        "helo": item["helo"],
        "sha256": item["sha256"],
        "verdicts": item["verdicts"],
        "updated": item["updated"],
        # the gateway that held it (the shared PostgreSQL store); None on SQLite
        "instance": item.get("instance"),
    }


def normalize_address(text: str) -> str:
    """A bare lower-case address as the store indexes it; ValueError if it is none."""
    addr = (text or "").strip().strip("<>").strip().lower()
    if not addr or any(c.isspace() for c in addr) or any(ord(c) < 32 for c in addr):
        raise ValueError(f"invalid address {text!r}")
    return addr


# --------------------------------------------------------------------- list


@dataclass(frozen=True)
class ListQuery:
    """Filters for ``quarantine list`` (times are ISO strings as stored; ``until`` inclusive)."""

    since: str | None = None
    until: str | None = None
    reason: str | None = None
    address: str | None = None
    state: str = "held"
    limit: int = 50
    page: int = 1

    def as_filters(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


#: How many of the newest items (in the --since/--until range) the index walk
#: looks at before ``list`` falls back to one sequential scan.
LIST_WINDOW = 5000


async def list_items(store: Store, q: ListQuery) -> tuple[list[dict[str, Any]], bool]:
    """One page of items, newest first; returns (items, more pages exist).

    Two plans, so that no filter makes a page slow on a big quarantine:

    1. walk the ``received`` index backwards over the newest
       :data:`LIST_WINDOW` items in range and stop after the page is full
       (dense matches, the usual case: well under a millisecond);
    2. if the window holds fewer matches than the page needs (a rare state or
       reason, an address seen long ago), one sequential scan with a top-N sort
       (ordering by the expression ``received || ''`` keeps SQLite off the
       index, whose random row lookups cost thirty times more than reading
       the table in order).
    """
    return await store.list_quarantine(
        since=q.since, until=q.until, reason=q.reason, address=q.address, state=q.state,
        limit=q.limit, page=q.page, window=LIST_WINDOW,
    )


async def get_item(store: Store, qid: str) -> dict[str, Any]:
    """The item ``qid`` (validated with :func:`files.check_id`); Refusal if unknown."""
    try:
        files.check_id(qid)
    except files.StorePathError as exc:
        raise Refusal(str(exc), 2) from None
    item = await store.get_item(qid)
    if item is None:
        raise Refusal(f"no quarantine item {qid}", 1)
    return item


# ----------------------------------------------------------------- messages


async def read_message(store: Store, item: dict[str, Any]) -> bytes:
    """The stored message bytes, checked against the recorded SHA-256."""
    if item["state"] == "deleted":
        raise IntegrityError(f"quarantine item {item['id']} was deleted", 1)
    try:
        raw = await store.read_body(item)
    except FileNotFoundError:
        raise IntegrityError(f"the message file of {item['id']} is missing", 1) from None
    except files.StorePathError as exc:
        raise IntegrityError(f"{item['id']}: {exc}", 1) from None
    if hashlib.sha256(raw).hexdigest() != item["sha256"]:
        raise IntegrityError(
            f"the message file of {item['id']} does not match its recorded SHA-256 "
            "(altered or corrupt)", 1
        )
    return raw


def clean_text(text: str) -> str:
    """Text safe to print on a terminal: newlines and tabs kept, every other
    control character (escape sequences included) replaced."""
    text = text.replace("\r\n", "\n")
    return "".join(
        ch if ch in "\n\t" or (ch.isprintable() and ch not in "\u2028\u2029") else "\ufffd"
        for ch in text
    )


@dataclass(frozen=True)
class MessageView:
    """What ``quarantine show`` prints: headers, attachments, text body parts."""

    headers: list[tuple[str, str]]
    attachments: list[dict[str, Any]]
    body: list[str]


def _mail(item: dict[str, Any], raw: bytes) -> Mail:
    try:
        direction = Direction(item["direction"])
    except ValueError:
        direction = Direction.INBOUND
    try:
        received = datetime.fromisoformat(item["received"].replace("Z", "+00:00"))
    except ValueError:
        received = datetime.now(UTC)
    return Mail(
        queue_id=item["queue_id"], mail_from=item["mail_from"],
        rcpt_tos=tuple(item["rcpt_tos"]), raw=raw, client_addr=item["client_addr"],
        direction=direction, received=received, helo=item["helo"],
    )


def _text_parts(msg: Message) -> list[str]:
    plain: list[str] = []
    html: list[str] = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        disposition = str(part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        if disposition == "attachment":
            continue
        try:
            payload = part.get_payload(decode=True) or b""
        except Exception:
            continue
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload.decode(charset, "replace")
        except LookupError:
            text = payload.decode("utf-8", "replace")
        (html if part.get_content_subtype() == "html" else plain).append(clean_text(text))
    return plain or html


def describe(item: dict[str, Any], raw: bytes, *, body: bool) -> MessageView:
    """Headers and attachment list of a stored message (and its text body if asked)."""
    mail = _mail(item, raw)
    headers = [
        (clean_text(str(k)), decode_header_value(str(v)) or "")
        for k, v in mail.headers.items()
    ]
    try:
        attachments = [
            {
                "index": a.index,
                "filename": decode_header_value(a.filename) if a.filename else None,
                "type": a.declared_type,
                "size": a.size,
                "sha256": hashlib.sha256(a.payload).hexdigest(),
                "depth": a.depth,
            }
            for a in mail.attachments
        ]
    except Exception as exc:  # ParseError: beyond the parser's bounds
        attachments = [{"error": f"cannot list attachments: {exc}"}]
    text: list[str] = []
    if body:
        try:
            text = _text_parts(mail.parsed)
        except Exception as exc:
            text = [f"(cannot decode the body: {exc})"]
    return MessageView(headers, attachments, text)


# ------------------------------------------------------------------ release


def infected(item: dict[str, Any]) -> str | None:
    """Why releasing needs ``--force``: a scanner's finding (a virus, or a
    message the scanner could not scan: the stored verdict's ``scan``
    finding), None otherwise."""
    for v in item["verdicts"]:
        if (isinstance(v, dict) and v.get("outcome") != "relay"
                and (v.get("virus") or v.get("scan") in ("infected", "unscanned"))):
            return str(v.get("virus") or v.get("detail") or "scanner finding")
    return None


def release_recipients(item: dict[str, Any], requested: Sequence[str]) -> list[str]:
    """The recipients to release to: all original ones, or the requested
    subset (compared case-insensitively, original spelling kept).  Refusal
    (exit 2) for anyone who was not an original recipient."""
    original = list(item["rcpt_tos"])
    if not requested:
        return original
    by_lower = {r.lower(): r for r in original}
    out: list[str] = []
    for r in requested:
        match = by_lower.get(r.strip().strip("<>").lower())
        if match is None:
            raise Refusal(
                f"{r} is not an original recipient of {item['id']} "
                f"(original: {', '.join(original) or 'none'})", 2
            )
        if match not in out:
            out.append(match)
    return out


def release_refusal(item: dict[str, Any], *, force: bool) -> Refusal | None:
    """Why ``release`` must not go ahead (None when it may)."""
    if item["state"] == "deleted":
        return Refusal(f"quarantine item {item['id']} was deleted", 1)
    if item["state"] == "released" and not force:
        return Refusal(
            f"quarantine item {item['id']} was already released ({item['updated']}); "
            "use --force to send it again", 1
        )
    finding = infected(item)
    if finding and not force:
        return Refusal(
            f"quarantine item {item['id']} was held by clamav ({finding}); "
            "releasing it needs --force", 2
        )
    return None


async def mark_released(store: Store, qid: str) -> None:
    await store.mark_released(qid)


# ------------------------------------------------------------ delete, hold


async def delete_item(store: Store, qid: str) -> bool:
    """Tombstone the row (blanking everything personal), then overwrite and
    unlink the file.  Refusal if the item is under legal hold.  Returns whether
    a file was removed."""
    try:
        return await store.delete_item(qid)
    except NotFound:
        raise Refusal(f"no quarantine item {qid}", 1) from None
    except OnHold:
        raise Refusal(f"quarantine item {qid} is under legal hold; unhold it first", 1) from None


async def set_hold(store: Store, qid: str, hold: bool, *, case: str | None = None,
                   until: str | None = None) -> None:
    """Hold ``qid`` (for ``case``, until ``until`` or indefinitely), or lift its hold."""
    await store.set_hold(qid, hold, case=case, until=until)


# ---------------------------------------------------- subject access, erase


@dataclass
class SubjectData:
    """What the store holds about one address (ids and seqs; rows are streamed)."""

    address: str
    log_seqs: list[int]
    item_ids: list[str]
    held_ids: list[str]
    personal_ids: list[str]


async def find_subject(store: Store, address: str) -> SubjectData:
    """Log seqs and quarantine ids that concern ``address`` (via the indexes)."""
    seqs = await store.subject_log_seqs(address)
    rows = await store.subject_items(address)
    return SubjectData(
        address, seqs, [r[0] for r in rows], [r[0] for r in rows if r[1]],
        [r[0] for r in rows if r[2]],
    )


def _concerns(row: dict[str, Any], address: str, ids: set[str]) -> bool:
    if any(t in ids for t in row["targets"] if isinstance(t, str)):
        return True
    haystack = " ".join(
        [json.dumps(row["targets"]), json.dumps(row["filters"]), json.dumps(row["detail"]),
         row["reason"]]
    ).lower()
    return address in haystack


async def audit_rows(
    store: Store, *, since: str | None = None, until: str | None = None
) -> list[dict[str, Any]]:
    """Audit rows, oldest first, optionally bounded by time (``until`` inclusive)."""
    return [_audit_row(r) for r in await store.audit_rows(since=since, until=until)]


def _audit_row(r: Sequence[Any]) -> dict[str, Any]:
    def load(text: str, default: Any) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return default

    return {
        "seq": r[0], "time": r[1], "user": r[2], "uid": r[3], "command": r[4],
        "targets": load(r[5], []), "filters": load(r[6], {}), "reason": r[7],
        "exceptional": bool(r[8]), "detail": load(r[9], {}), "hash": r[10],
    }


async def write_subject_access(
    store: Store,
    subject: SubjectData,
    out: IO[str],
    *,
    include_bodies: bool,
    exceptional: bool,
    generated_by: str,
) -> dict[str, int]:
    """Stream the subject-access document (one JSON object) to ``out``.

    Bodies are included only when asked; a personal item's body only with
    ``exceptional`` (otherwise ``body_withheld`` says why).  Returns counts.
    """
    counts = {"log_records": 0, "quarantine_items": 0, "bodies": 0, "audit_rows": 0}
    out.write("{\n")
    out.write(f'"address": {json.dumps(subject.address)},\n')
    out.write(f'"generated": {json.dumps(iso(store.clock()))},\n')
    out.write(f'"generated_by": {json.dumps(generated_by)},\n')
    out.write('"log_records": [')
    first = True
    async for seq, time, record in store.log_records(subject.log_seqs):
        try:
            rec = json.loads(record)
        except ValueError:
            rec = {"unreadable": True}
        out.write(("\n" if first else ",\n") + json.dumps(
            {"seq": seq, "time": time, "record": rec}, ensure_ascii=False))
        first = False
        counts["log_records"] += 1
    out.write('\n],\n"quarantine_items": [')
    first = True
    for item in await store.get_items(subject.item_ids):
        doc = public(item)
        if include_bodies and item["state"] != "deleted":
            if item["personal"] and not exceptional:
                doc["body_withheld"] = "marked personal: needs --exceptional"
            else:
                try:
                    raw = await read_message(store, item)
                except IntegrityError as exc:
                    doc["body_withheld"] = exc.message
                else:
                    try:
                        doc["message"] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        doc["message_base64"] = base64.b64encode(raw).decode("ascii")
                    counts["bodies"] += 1
        out.write(("\n" if first else ",\n") + json.dumps(doc, ensure_ascii=False))
        first = False
        counts["quarantine_items"] += 1
    out.write('\n],\n"audit_rows": [')
    first = True
    ids = set(subject.item_ids)
    for row in await audit_rows(store):
        if _concerns(row, subject.address, ids):
            out.write(("\n" if first else ",\n") + json.dumps(row, ensure_ascii=False))
            first = False
            counts["audit_rows"] += 1
    out.write("\n]\n}\n")
    return counts


def open_private_output(path: str) -> tuple[IO[str], str]:
    """A temp file (0600) next to ``path`` for an atomic write; returns (file, temp path)."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


def commit_private_output(fh: IO[str], tmp: str, path: str) -> None:
    """fsync, close and rename the temp file into place."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, path)


async def erase(store: Store, subject: SubjectData, *, audit_seq: int) -> dict[str, Any]:
    """Erase what ``subject`` found (except items under hold).

    Log records become chain tombstones (the chain stays verifiable), their
    address index rows go; quarantine rows go entirely, then their files are
    overwritten and unlinked.  Hold is re-checked inside the transaction.
    """
    now = iso(store.clock())
    tomb = erased_record(now, audit_seq)
    erased_log = await store.erase_log(subject.log_seqs, tomb)
    removed, files_removed = await store.erase_items(subject.item_ids)
    held = [i for i in subject.item_ids if i not in set(removed)]
    checkpoint = await store.checkpoint()
    return {
        "address": subject.address,
        "log_records": erased_log,
        "quarantine_items": len(removed),
        "files_removed": files_removed,
        "kept_under_hold": held,
        "checkpoint": checkpoint,
    }


__all__ = [
    "COLUMNS", "LIST_WINDOW", "STATES", "IntegrityError", "ListQuery", "MessageView", "Refusal", "SubjectData",
    "audit_rows", "clean_text", "commit_private_output", "delete_item", "describe", "erase",
    "find_subject", "get_item", "infected", "list_items", "mark_released",
    "normalize_address", "open_private_output", "public", "read_message", "release_recipients",
    "release_refusal", "set_hold", "write_subject_access",
]
