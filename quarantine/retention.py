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

Crypto-shredding (``[store] key_file`` set; docs/crypto-shredding.md): the
bodies are sealed under one data key per period (UTC day of receipt), so the
copies in backups, which no overwrite reaches, die with the key.  After the
rows and files are gone, every period key of a day before the cutoff's day is
destroyed (held items were re-sealed under their own ``hold:<id>`` keys when
they were held; :meth:`reseal_held_before` makes sure of it first), and so
are the hold keys of items that no longer exist.  The summary is the
**destruction report**: time, cutoff, the periods destroyed with their key
fingerprints, the hold keys destroyed, items, log records and audit rows
removed, held items kept.  The audit row written before the purge carries
the planned report (the same periods and fingerprints: only those planned
are destroyed); the report returned (``mailwarden purge``) is what was done.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.config import Config
from quarantine import crypto, files
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


def _key_entry(record: crypto.KeyRecord) -> dict[str, Any]:
    entry = {"key_id": record.key_id, "fingerprint": record.fingerprint,
             "created": record.created}
    if record.destroyed:
        entry["destroyed"] = record.destroyed
    return entry


async def _hold_keys_to_destroy(store: Store, ring: crypto.KeyRing, cutoff: str) -> list[str]:
    """Hold keys whose item is gone, deleted, or goes in this purge (not held,
    received before the cutoff)."""
    out: list[str] = []
    for record in await ring.hold_keys():
        item = await store.get_item(record.key_id[len(crypto.HOLD_PREFIX):])
        if (item is None or item["state"] == "deleted"
                or (not item["hold"] and item["received"] < cutoff)):
            out.append(record.key_id)
    return out


async def _key_plan(store: Store, cutoff: str) -> dict[str, Any]:
    ring: crypto.KeyRing | None = getattr(store, "keyring", None)
    if ring is None:
        return {"encryption": False, "periods_destroyed": [], "hold_keys_destroyed": []}
    periods = await ring.periods_before(cutoff[:10])
    holds = await _hold_keys_to_destroy(store, ring, cutoff)
    by_id = {r.key_id: r for r in await ring.hold_keys()}
    return {
        "encryption": True,
        "kek_fingerprint": ring.kek.fingerprint,
        "periods_destroyed": [_key_entry(r) for r in periods],
        "hold_keys_destroyed": [_key_entry(by_id[k]) for k in holds if k in by_id],
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
    summary.update(await _key_plan(store, summary["cutoff"]))
    await store.audit(
        command,
        filters={"retention_days": config.store.retention_days,
                 "audit_retention_days": config.store.audit_retention_days},
        detail=dict(summary),
    )
    if dry_run:
        return summary
    ring: crypto.KeyRing | None = getattr(store, "keyring", None)
    held_before = getattr(store, "reseal_held_before", None)
    if ring is not None and held_before is not None:
        # normally a no-op: set_hold re-sealed each held item under its own key
        summary["held_items"] = await held_before(summary["cutoff"])
    removed, files_removed = await _purge_quarantine(store, summary["cutoff"])
    summary["quarantine_items"] = removed
    summary["files_removed"] = files_removed
    summary["log_records"] = await store.purge_log_through(log_end, BATCH * 10)
    # The purge's own audit row is newer than the cutoff, so it always stays.
    summary["audit_rows"] = await store.purge_audit_through(audit_end, BATCH * 10)
    summary["orphan_files_removed"] = await _sweep(store, summary["cutoff"])
    summary["checkpoint"] = await store.checkpoint()
    if ring is not None:
        await _destroy_keys(store, ring, summary)
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


async def _destroy_keys(store: Store, ring: crypto.KeyRing, summary: dict[str, Any]) -> None:
    """Destroy the planned period keys, and the planned hold keys whose item
    is still gone (one held again since the plan keeps its key)."""
    cutoff = summary["cutoff"]
    planned = [p["key_id"] for p in summary["periods_destroyed"]]
    now_gone = set(await _hold_keys_to_destroy(store, ring, cutoff))
    holds = [h["key_id"] for h in summary["hold_keys_destroyed"] if h["key_id"] in now_gone]
    destroyed = await ring.destroy(planned)
    summary["periods_destroyed"] = [_key_entry(r) for r in destroyed]
    destroyed = await ring.destroy(holds)
    summary["hold_keys_destroyed"] = [_key_entry(r) for r in destroyed]
    summary["keys_checkpoint"] = getattr(ring.keys, "checkpoint_state", "") or "n/a"
    if summary["periods_destroyed"] or summary["hold_keys_destroyed"]:
        log.info(
            "retention: destroyed the data keys of %d periods (%s) and %d hold keys",
            len(summary["periods_destroyed"]),
            ", ".join(p["key_id"] for p in summary["periods_destroyed"]),
            len(summary["hold_keys_destroyed"]),
        )


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
