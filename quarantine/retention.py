"""Retention: what is kept is destroyed after ``store.retention_days``.

Policy clause: *"data normally securely destroyed after three months; kept
longer only for an investigation"*.  :func:`purge` (``mailwarden purge`` and,
every ``store.purge_interval`` seconds, ``mailwarden serve``) removes

* quarantine items received more than ``retention_days`` ago, in any state,
  except items under legal hold (``quarantine hold``): the row and its
  address index rows, then the message file, overwritten and unlinked;
* log records older than ``retention_days``, always as a *prefix* of the
  chain: in the same transaction ``meta.log_anchor`` is set to the hash of the
  last deleted record, so ``log verify`` starts from the oldest remaining one
  (a record newer than the cutoff stops the prefix; anything older behind it
  goes at the next purge);
* audit rows older than ``audit_retention_days`` (default 365: the audit trail
  outlives the data it is about, so a data subject or an auditor can still
  see who accessed it), the same way with ``meta.audit_anchor``;
* orphan message files (a crash between a row's deletion and its file's) in
  day directories older than the cutoff, and then those empty directories.

Secure deletion: ``PRAGMA secure_delete=ON`` (set by the store) zeroes
deleted rows in the database pages; message files are overwritten before
unlink (:func:`quarantine.files.secure_delete`); finally
``PRAGMA wal_checkpoint(TRUNCATE)`` so that deleted data is not left in the
WAL.  Each batch is its own short transaction, so a running gateway is never
blocked for long.  The clock is the store's (``Store.clock``), so tests can
shift it.  Every purge, dry runs included, writes an audit row with the
cutoffs and the counts *before* deleting anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.config import Config
from quarantine import files
from quarantine.store import MESSAGES_DIR, Store, iso

log = logging.getLogger("mailwarden.retention")

#: Rows per transaction (keeps the store's lock short while serving).
BATCH = 500


async def _count(store: Store, sql: str, args: tuple[Any, ...]) -> int:
    async with store.db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return int(row[0] or 0) if row else 0


async def _prefix_end(store: Store, table: str, cutoff: str) -> int:
    """The last seq of the chain prefix whose rows are all older than ``cutoff`` (0: none).

    ``time || ''`` keeps SQLite off the time index, so it walks the primary
    key from the oldest row and stops at the first one to keep: the cost is
    the number of expired rows, not the size of the log.
    """
    async with store.db.execute(
        f"SELECT seq FROM {table} WHERE time || '' >= ? ORDER BY seq LIMIT 1", (cutoff,)
    ) as cur:
        row = await cur.fetchone()
    if row is not None:
        return int(row[0]) - 1
    return await _count(store, f"SELECT max(seq) FROM {table}", ())


async def plan(store: Store, config: Config, now: datetime) -> dict[str, Any]:
    """What a purge at ``now`` removes (counts only; changes nothing)."""
    cutoff = iso(now - timedelta(days=config.store.retention_days))
    audit_cutoff = iso(now - timedelta(days=config.store.audit_retention_days))
    log_end = await _prefix_end(store, "log", cutoff)
    audit_end = await _prefix_end(store, "audit", audit_cutoff)
    return {
        "now": iso(now),
        "cutoff": cutoff,
        "retention_days": config.store.retention_days,
        "audit_cutoff": audit_cutoff,
        "audit_retention_days": config.store.audit_retention_days,
        "quarantine_items": await _count(
            store, "SELECT count(*) FROM quarantine WHERE received < ? AND hold = 0", (cutoff,)
        ),
        "kept_under_hold": await _count(
            store, "SELECT count(*) FROM quarantine WHERE received < ? AND hold = 1", (cutoff,)
        ),
        "log_records": await _count(store, "SELECT count(*) FROM log WHERE seq <= ?", (log_end,)),
        "audit_rows": await _count(
            store, "SELECT count(*) FROM audit WHERE seq <= ?", (audit_end,)
        ),
        "_log_end": log_end,
        "_audit_end": audit_end,
    }


async def purge(store: Store, config: Config, *, dry_run: bool, command: str) -> dict[str, Any]:
    """Apply retention now; returns a summary (counts, cutoffs, checkpoint state).

    With ``dry_run`` nothing is deleted; the summary says what would go.
    """
    now = store.clock()
    summary = await plan(store, config, now)
    log_end = summary.pop("_log_end")
    audit_end = summary.pop("_audit_end")
    summary["dry_run"] = dry_run
    await store.audit(
        command,
        filters={"retention_days": config.store.retention_days,
                 "audit_retention_days": config.store.audit_retention_days},
        detail=dict(summary),
    )
    if dry_run:
        return summary
    removed, files_removed = await _purge_quarantine(store, summary["cutoff"])
    summary["quarantine_items"] = removed
    summary["files_removed"] = files_removed
    summary["log_records"] = await _purge_chain(store, "log", "log_anchor", log_end)
    # The purge's own audit row is newer than the cutoff, so it always stays.
    summary["audit_rows"] = await _purge_chain(store, "audit", "audit_anchor", audit_end)
    summary["orphan_files_removed"] = await _sweep(store, summary["cutoff"])
    summary["checkpoint"] = await store.checkpoint()
    if removed or summary["log_records"] or summary["audit_rows"]:
        log.info(
            "retention: removed %d quarantine items (%d files), %d log records, %d audit rows;"
            " %d items kept under hold",
            removed, files_removed, summary["log_records"], summary["audit_rows"],
            summary["kept_under_hold"],
        )
    return summary


async def _purge_quarantine(store: Store, cutoff: str) -> tuple[int, int]:
    removed = files_removed = 0
    while True:
        async with store.transaction() as db:
            async with db.execute(
                "SELECT id, path FROM quarantine WHERE received < ? AND hold = 0"
                " ORDER BY received LIMIT ?",
                (cutoff, BATCH),
            ) as cur:
                rows = await cur.fetchall()
            if rows:
                ids = [r[0] for r in rows]
                marks = ",".join("?" * len(ids))
                await db.execute(f"DELETE FROM quarantine_address WHERE id IN ({marks})", ids)
                await db.execute(f"DELETE FROM quarantine WHERE id IN ({marks})", ids)
        if not rows:
            return removed, files_removed
        removed += len(rows)
        for _, path in rows:
            try:
                if await asyncio.to_thread(files.secure_delete, store.root, path):
                    files_removed += 1
            except (OSError, files.StorePathError) as exc:
                log.error("retention: cannot delete %s: %s", path, exc)


async def _purge_chain(store: Store, table: str, anchor: str, end: int) -> int:
    """Delete rows ``seq <= end`` of a chained table, oldest first, moving the anchor."""
    index = {"log": "log_address"}.get(table)
    total = 0
    while True:
        async with store.transaction() as db:
            async with db.execute(
                f"SELECT seq, hash FROM {table} WHERE seq <= ? ORDER BY seq LIMIT ?",
                (end, BATCH * 10),
            ) as cur:
                rows = await cur.fetchall()
            if rows:
                last_seq, last_hash = rows[-1]
                if index:
                    await db.execute(f"DELETE FROM {index} WHERE seq <= ?", (last_seq,))
                await db.execute(f"DELETE FROM {table} WHERE seq <= ?", (last_seq,))
                await store.set_meta(anchor, last_hash)
        if not rows:
            return total
        total += len(rows)


def _old_message_files(root: Path, cutoff_day: str) -> list[tuple[str, str]]:
    """(relative path, quarantine id or "") of files in day directories before ``cutoff_day``."""
    base = root / MESSAGES_DIR
    out: list[tuple[str, str]] = []
    if not base.is_dir():
        return out
    for dirpath, _dirnames, filenames in os.walk(base):
        rel = Path(dirpath).relative_to(base).parts
        if len(rel) != 3 or "-".join(rel) >= cutoff_day:
            continue
        for name in filenames:
            qid = name[: -len(".eml")] if name.endswith(".eml") else ""
            out.append((f"{MESSAGES_DIR}/{'/'.join(rel)}/{name}", qid))
    return out


def _remove_empty_dirs(root: Path, cutoff_day: str) -> None:
    base = root / MESSAGES_DIR
    for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
        path = Path(dirpath)
        rel = path.relative_to(base).parts
        if not rel or "-".join(rel) >= cutoff_day[: len("-".join(rel))]:
            continue
        try:
            path.rmdir()
        except OSError:
            pass


async def _sweep(store: Store, cutoff: str) -> int:
    """Remove message files in expired day directories that no live row owns."""
    cutoff_day = cutoff[:10]
    candidates = await asyncio.to_thread(_old_message_files, store.root, cutoff_day)
    removed = 0
    for relative, qid in candidates:
        if qid:
            async with store.db.execute(
                "SELECT 1 FROM quarantine WHERE id = ? AND path = ? AND state != 'deleted'",
                (qid, relative),
            ) as cur:
                if await cur.fetchone() is not None:
                    continue  # a held item, or one from the cutoff day itself
        try:
            if await asyncio.to_thread(files.secure_delete, store.root, relative):
                removed += 1
        except (OSError, files.StorePathError) as exc:
            log.error("retention: cannot delete orphan %s: %s", relative, exc)
    await asyncio.to_thread(_remove_empty_dirs, store.root, cutoff_day)
    return removed


__all__ = ["BATCH", "plan", "purge"]
