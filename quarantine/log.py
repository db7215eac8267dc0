"""The header-only monitoring log: dates, chain verification, export, stats.

Policy: "monitoring normally confines itself to the address and subject
heading" and "monitoring info may be shared with auditors on reasonable
grounds".  The log holds header-only records (see ``filters/header_log.py``);
this module reads them back for auditors, and proves they were not edited.

Tamper evidence
---------------
Every log row carries ``hash = chain_hash(prev, record)`` where ``record`` is
the canonical JSON stored in the row and ``prev`` is the previous row's hash
(``quarantine.store.Store.write_log_batch``).  The first row's ``prev`` is the
``meta`` value ``log_anchor`` (``GENESIS``, 64 zeros, when absent).

Contract with retention (``quarantine/retention.py``): a purge that deletes
the oldest log rows sets ``meta.log_anchor`` to the ``hash`` of the *last
deleted* row, in the same transaction as the delete.  So the oldest remaining
row always chains from ``log_anchor`` and :func:`verify` needs nothing else.
Deleting rows from the middle or the end of the log is not a purge and is
reported as a break (the end only if the caller knows the expected count).

Dates on the command line
-------------------------
:func:`parse_when` (shared with the review commands): ISO 8601 date or
timestamp, UTC unless an offset is given.  ``--since`` is inclusive from the
start of the day; ``--until`` with ``end=True`` is inclusive to the end of the
day (the last microsecond), so callers compare ``time <= until``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from typing import Any

import click

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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


__all__ = ["When", "month_of", "parse_when"]
