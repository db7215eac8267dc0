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

Before any of that, holds whose ``--until`` has passed are lifted
(:func:`release_expired_holds`), so their items fall under normal retention
in the same purge; the summary lists them (``holds_released``).

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
from quarantine.store import MESSAGES_DIR, iso
from quarantine.store import StoreProtocol as Store

log = logging.getLogger("mailwarden.retention")

#: Rows per transaction (keeps the store's lock short while serving).
BATCH = 500


async def plan(store: Store, config: Config, now: datetime) -> dict[str, Any]:
    """What a purge at ``now`` removes (counts only; changes nothing)."""
    cutoff = iso(now - timedelta(days=config.store.retention_days))
    audit_cutoff = iso(now - timedelta(days=config.store.audit_retention_days))
    counts = await store.retention_plan(cutoff, audit_cutoff)
    return {
        "now": iso(now),
        "cutoff": cutoff,
        "retention_days": config.store.retention_days,
        "audit_cutoff": audit_cutoff,
        "audit_retention_days": config.store.audit_retention_days,
        "quarantine_items": counts["quarantine_items"],
        "kept_under_hold": counts["kept_under_hold"],
        "log_records": counts["log_records"],
        "audit_rows": counts["audit_rows"],
        "_log_end": counts["log_end"],
        "_audit_end": counts["audit_end"],
    }


async def purge(store: Store, config: Config, *, dry_run: bool, command: str) -> dict[str, Any]:
    """Apply retention now; returns a summary (counts, cutoffs, checkpoint state).

    With ``dry_run`` nothing is deleted; the summary says what would go.
    """
    now = store.clock()
    released = await release_expired_holds(store, now, dry_run=dry_run)
    summary = await plan(store, config, now)
    summary["holds_released"] = released
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
    summary["log_records"] = await store.purge_log_through(log_end, BATCH * 10)
    # The purge's own audit row is newer than the cutoff, so it always stays.
    summary["audit_rows"] = await store.purge_audit_through(audit_end, BATCH * 10)
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


async def release_expired_holds(store: Store, now: datetime, *,
                                dry_run: bool = False) -> list[dict[str, Any]]:
    """Lift the holds whose ``--until`` has passed (issue 17), so the purge
    that follows applies normal retention to those items; returns what was
    released (id, case, until).  Audited first (``quarantine hold expired``);
    with ``dry_run`` only reported."""
    expired = await store.release_expired_holds(iso(now), dry_run=True)
    out = [{"id": qid, "case": case, "until": until} for qid, case, until in expired]
    if not out or dry_run:
        return out
    await store.audit("quarantine hold expired", targets=[r["id"] for r in out],
                      detail={"holds": out})
    done = await store.release_expired_holds(iso(now))
    ids = {r[0] for r in done}
    for r in out:
        if r["id"] not in ids:
            log.info("retention: hold on %s changed meanwhile; left as it is", r["id"])
    released = [r for r in out if r["id"] in ids]
    if released:
        log.info("retention: %d expired holds released: %s", len(released),
                 ", ".join(f"{r['id']} (case {r['case'] or '-'})" for r in released))
    return released


async def _purge_quarantine(store: Store, cutoff: str) -> tuple[int, int]:
    removed = files_removed = 0
    async for rows in store.purge_quarantine_before(cutoff, BATCH):
        removed += len(rows)
        for _, path in rows:
            try:
                if await store.delete_body(path):
                    files_removed += 1
            except (OSError, files.StorePathError) as exc:
                log.error("retention: cannot delete %s: %s", path, exc)
    return removed, files_removed


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
            if await store.item_is_live(qid, relative):
                continue  # a held item, or one from the cutoff day itself
        try:
            if await asyncio.to_thread(files.secure_delete, store.root, relative):
                removed += 1
        except (OSError, files.StorePathError) as exc:
            log.error("retention: cannot delete orphan %s: %s", relative, exc)
    await asyncio.to_thread(_remove_empty_dirs, store.root, cutoff_day)
    return removed


__all__ = ["BATCH", "plan", "purge", "release_expired_holds"]
