"""header_log filter: the header-only monitoring log record.

Policy clause enforced: *"monitoring normally confines itself to the address
and subject heading"* (and *"data normally securely destroyed after three
months"*, by the store's retention).  Its place in the chain only switches the
log on and carries its options; ``check`` always relays.  Once the message's
outcome and the next hop's reply are known, the pipeline calls
:meth:`HeaderLogFilter.build_record` and queues the result with
``Store.append_log`` (batched by one writer task; a crash may lose the last
unwritten batch of log records, never a message).

What a record holds (header-only, DESIGN rule 4)
    ``time`` (received, ISO 8601 UTC), ``queue_id``, ``direction``,
    ``client_addr`` (the original client, from XFORWARD when trusted),
    ``mail_from``, ``rcpt_tos``, the header fields ``from``, ``to``, ``cc``,
    ``subject``, ``message_id``, ``date`` (RFC 2047 decoded), ``size`` in
    bytes, ``attachments`` (name, declared type, true type, size, SHA-256),
    ``verdicts`` (per filter: outcome, detail and header-only facts such as
    the virus name, DKIM result or personal flag), ``personal``,
    ``disposition``, ``reply`` (the SMTP reply given to the client, i.e. the
    next hop's reply for relayed mail), ``quarantine_id``, ``elapsed_ms`` and
    ``filter_ms``.  ``addresses`` (lower-case envelope and logged header
    addresses) is popped by the store into its address index;
    ``address_digest`` (see :func:`address_digest`) stays in the hashed record
    so that the index is covered by the tamper-evidence chain too.

    ``check`` computes the attachment descriptions (SHA-256 included) in the
    thread pool while the other filters run; ``build_record`` only merges
    them with the true types from the ``attachment_types`` verdict's
    ``attachments`` fact (matched by SHA-256, part ``index``, or position and
    name) and is cheap enough for the event loop.

    Never a body or attachment content: attachments are described by name,
    type, size and digest only.  Filter facts are header-only by contract;
    as a second line of defence every value is bounded here (strings longer
    than ``max_value_length`` are cut, bytes are replaced by their length,
    containers are bounded in depth and length), so a filter bug cannot pour
    content into the log.

Settings (``[filters.header_log]``, data minimisation)
    ``log_subject``, ``log_from``, ``log_to``, ``log_cc``, ``log_message_id``,
    ``log_date``, ``log_attachments``, ``log_client_addr``: each ``true`` by
    default; ``false`` leaves that field out of every record (and a header
    that is not logged is not indexed by address either).  Envelope
    addresses, direction, size and verdicts are always logged.
    ``max_value_length`` (default 2000): longest string kept in a record.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from filters.base import BaseFilter, FilterContext, Verdict
from gateway.message import Mail, decode_header_value, simple_address

#: Format of the record's ``time`` (identical to ``quarantine.store.iso``).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
#: Longest list kept in a record (recipients, attachments, list-valued facts).
MAX_ITEMS = 1000
#: Deepest nesting kept from a filter's facts.
MAX_DEPTH = 4

#: header field -> (record key, setting that switches it)
HEADER_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("From", "from", "log_from"),
    ("To", "to", "log_to"),
    ("Cc", "cc", "log_cc"),
    ("Subject", "subject", "log_subject"),
    ("Message-ID", "message_id", "log_message_id"),
    ("Date", "date", "log_date"),
)
_ADDRESS_HEADERS = ("from", "to", "cc")


def _positive(value: int) -> int:
    if value < 64:
        raise ValueError("must be at least 64")
    return value


@dataclass(frozen=True)
class Settings:
    """``[filters.header_log]``: which fields each record keeps."""

    log_subject: bool = True
    log_from: bool = True
    log_to: bool = True
    log_cc: bool = True
    log_message_id: bool = True
    log_date: bool = True
    log_attachments: bool = True
    log_client_addr: bool = True
    max_value_length: int = field(default=2000, metadata={"check": _positive})


def format_time(dt: datetime) -> str:
    """ISO 8601 UTC with microseconds and ``Z`` (sorts as text)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime(TIME_FORMAT)


def clean_text(value: str, limit: int) -> str:
    """A string safe to hash and store: valid UTF-8 (lone surrogates from
    8-bit headers re-decoded), at most ``limit`` characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        value = value.encode("utf-8", "replace").decode("utf-8")
    if len(value) > limit:
        value = value[: limit - 1] + "\u2026"
    return value


def bounded(value: Any, limit: int, depth: int = 0) -> Any:
    """A JSON-able, size-bounded copy of a header-only fact."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return clean_text(value, limit)
    if isinstance(value, bytes | bytearray | memoryview):
        # Never store bytes: they could be content.
        return f"<{len(value)} bytes>"
    if depth >= MAX_DEPTH:
        return clean_text(f"<{type(value).__name__}>", limit)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= MAX_ITEMS:
                out["_truncated"] = True
                break
            out[clean_text(str(k), 200)] = bounded(v, limit, depth + 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        out_list = [bounded(v, limit, depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            out_list.append(f"<{len(items) - MAX_ITEMS} more>")
        return out_list
    return clean_text(str(value), limit)


def raw_header(mail: Mail, name: str) -> str | None:
    """The first ``name`` header, decoded; raw UTF-8 (RFC 6532) kept readable."""
    lname = name.lower()
    try:
        items = mail.headers.raw_items()
        for key, value in items:
            if key.lower() == lname:
                text = str(value)
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                return decode_header_value(text)
    except Exception:
        return mail.header(name)
    return None


def addresses(values: Iterable[str | None]) -> list[str]:
    """Lower-case bare addresses found in envelope and header values."""
    out: set[str] = set()
    for v in values:
        if not v:
            continue
        simple = simple_address(v)  # the parser only for what is not plain
        try:
            pairs = email.utils.getaddresses([v]) if simple is None else [("", simple)]
        except Exception:
            continue
        for _, addr in pairs:
            addr = addr.strip().lower()
            if addr and len(addr) <= 320:
                out.add(addr)
    return sorted(out)


def address_digest(index: Iterable[str]) -> str:
    """SHA-256 over the sorted, distinct index addresses (one per line): lets
    ``mailwarden log verify`` prove the address index was not edited."""
    return hashlib.sha256("\n".join(sorted(set(index))).encode("utf-8")).hexdigest()


class HeaderLogFilter(BaseFilter):
    """Switches the header-only log on; builds each message's record."""

    name: ClassVar[str] = "header_log"
    Settings: ClassVar[type] = Settings
    writes_log: ClassVar[bool] = True

    def __init__(self, settings: Settings, ctx: FilterContext) -> None:
        self.settings = settings
        self.ctx = ctx

    async def check(self, mail: Mail) -> Verdict:
        """Always relay.  The attachment descriptions (SHA-256 of every
        attachment) are computed here, in the thread pool and concurrently
        with the other filters, so that :meth:`build_record`, which runs on
        the event loop once the outcome is known, has nothing heavy to do."""
        now = self.check_now(mail)
        if now is not None:
            return now
        loop = asyncio.get_running_loop()
        return self._verdict_of(
            *await loop.run_in_executor(self.ctx.executor, self.describe, mail))

    def check_now(self, mail: Mail) -> Verdict | None:
        """The verdict when there is nothing to describe or the message is
        parsed (and its attachments hashed) already; else None."""
        if not self.settings.log_attachments:
            return Verdict.relay(self.name)
        if mail.prepared:
            return self._verdict_of(*self.describe(mail))  # cheap: parsed and hashed
        return None

    def _verdict_of(self, described: list[dict[str, Any]], error: str | None) -> Verdict:
        if error:
            return Verdict.relay(self.name, attachments_error=error)
        return Verdict.relay(self.name, attachments=tuple(described))

    def describe(self, mail: Mail) -> tuple[list[dict[str, Any]], str | None]:
        """Name, declared type, size and SHA-256 of each attachment (never
        raises: an unparseable message gives ``([], "unparseable: ...")``)."""
        limit = self.settings.max_value_length
        try:
            parts = mail.attachments
        except Exception as exc:
            return [], clean_text(f"unparseable: {exc}", limit)
        out = []
        for a in parts[:MAX_ITEMS]:
            out.append(
                {
                    "index": a.index,
                    "name": clean_text(a.filename, limit) if a.filename is not None else None,
                    "declared_type": clean_text(a.declared_type, limit),
                    "size": a.size,
                    "sha256": a.sha256,
                }
            )
        return out, None

    # ---------------------------------------------------------------- record

    def log_record(self, mail: Mail, outcome: Any, own: Verdict | None) -> dict[str, Any]:
        """:meth:`build_record` (the :class:`~filters.base.Filter` hook)."""
        return self.build_record(mail, outcome, own)

    def build_record(self, mail: Mail, result: Any, own: Verdict | None = None
                     ) -> dict[str, Any]:
        """The header-only record for ``mail`` and its outcome ``result``
        (a ``gateway.pipeline.Result``); ``own`` is this filter's verdict
        (with the attachment descriptions :meth:`check` made).  Never raises
        for bad mail."""
        s = self.settings
        limit = s.max_value_length
        text = lambda v: clean_text(str(v), limit) if v is not None else None  # noqa: E731
        record: dict[str, Any] = {
            "time": format_time(mail.received),
            "queue_id": text(mail.queue_id),
            "direction": str(mail.direction),
        }
        if s.log_client_addr:
            record["client_addr"] = text(mail.client_addr)
        record["mail_from"] = text(mail.mail_from)
        record["rcpt_tos"] = [text(r) for r in mail.rcpt_tos[:MAX_ITEMS]]
        logged_headers: dict[str, str | None] = {}
        for header, key, setting in HEADER_FIELDS:
            if getattr(s, setting):
                value = raw_header(mail, header)
                logged_headers[key] = value
                record[key] = text(value)
        record["size"] = mail.size
        if s.log_attachments:
            record["attachments"], error = self._attachments(mail, result, own)
            if error:
                record["attachments_error"] = error
        verdicts = list(getattr(result, "verdicts", []) or [])
        sealed = getattr(result, "arc_sealed", None)
        record["verdicts"] = [self._verdict(v, sealed) for v in verdicts]
        record["personal"] = any(v.personal for v in verdicts)
        record["disposition"] = text(getattr(result, "disposition", ""))
        record["reply"] = text(getattr(result, "reply", ""))
        record["quarantine_id"] = getattr(result, "quarantine_id", None)
        record["elapsed_ms"] = round(float(getattr(result, "elapsed", 0.0)) * 1000, 1)
        times = getattr(result, "filter_times", None) or {}
        record["filter_ms"] = {str(k): round(float(t) * 1000, 1) for k, t in times.items()}
        index = addresses(
            [mail.mail_from, *mail.rcpt_tos, *(logged_headers.get(k) for k in _ADDRESS_HEADERS)]
        )
        # The store moves ``addresses`` into its index (outside the hashed
        # record); the digest keeps that index under the chain's protection.
        record["address_digest"] = address_digest(index)
        record["addresses"] = index
        return record

    def _verdict(self, v: Verdict, sealed: bool | None) -> dict[str, Any]:
        limit = self.settings.max_value_length
        out: dict[str, Any] = {}
        for k, val in v.summary(sealed).items():
            if k in ("attachments", "attachments_error"):
                continue  # attachments are logged once, at the top level
            if k == "detail":
                out[k] = clean_text(val, limit)
            elif k in ("filter", "outcome"):
                out[k] = val
            else:
                out[clean_text(str(k), 200)] = bounded(val, limit)
        return out

    def _attachments(self, mail: Mail, result: Any, own: Verdict | None
                     ) -> tuple[list[dict[str, Any]], str | None]:
        """Attachment descriptions: ours (from :meth:`check`, else computed
        now), with the true type from the verdict that carries true types
        (``Verdict.true_types``: attachment_types) where it has one for the
        same part."""
        limit = self.settings.max_value_length
        verdicts = list(getattr(result, "verdicts", []) or [])
        if own is not None and own.attachments_error is not None:
            described: list[dict[str, Any]] = []
            error: str | None = clean_text(str(own.attachments_error), limit)
        elif own is not None and own.attachments is not None:
            described, error = [dict(a) for a in own.attachments], None
        elif own is not None:
            # Our check did not finish (timed out or failed): do not parse a
            # possibly pathological message on the event loop now.
            described, error = [], clean_text(f"not described: {own.detail or 'no result'}", limit)
        else:
            described, error = self.describe(mail)
        typed = next((v.attachments for v in verdicts if v.true_types and v.attachments), None)
        facts = (
            [a for a in typed if isinstance(a, Mapping)]
            if isinstance(typed, list | tuple)
            else []
        )
        out = []
        for ordinal, a in enumerate(described):
            match = _match(a, ordinal, facts, len(described))
            true_type = None
            extra: dict[str, Any] = {}
            if match is not None:
                true_type = _pick(match, limit, "true_type", "type", "magic_type", "magic")
                for k in ("category", "blocked", "members", "reason"):
                    if k in match:
                        extra[k] = bounded(match[k], limit)
            out.append(
                {
                    "name": a.get("name"),
                    "declared_type": a.get("declared_type"),
                    "type": true_type,
                    "size": a.get("size"),
                    "sha256": a.get("sha256"),
                    **extra,
                }
            )
        return out, error


def _pick(fact: Mapping[str, Any], limit: int, *keys: str) -> Any:
    for k in keys:
        if fact.get(k) is not None:
            return bounded(fact[k], limit)
    return None


def _match(
    a: Mapping[str, Any], ordinal: int, facts: list[Mapping[str, Any]], count: int
) -> Mapping[str, Any] | None:
    """The attachment_types fact describing the same part as ``a``: same
    SHA-256, else same part index, else same position and name when both
    lists have the same length."""
    for f in facts:
        if f.get("sha256") and f.get("sha256") == a.get("sha256"):
            return f
    for f in facts:
        if "index" in f and f.get("index") == a.get("index"):
            return f
    if len(facts) == count and ordinal < len(facts):
        f = facts[ordinal]
        if (f.get("name") or f.get("filename")) == a.get("name"):
            return f
    return None
