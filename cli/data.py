"""What is kept, and for how long: ``purge`` (retention), ``subject-access``
and ``erase`` (the data subject's rights of access and erasure).

Policy: *"normally securely destroyed after three months"* and *"right of
access, rectification, erasure"*.  Every command writes its audit row before
it shows or changes anything; refusals are one line on stderr (see
cli/quarantine.py for the rules all these commands follow).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from cli.access import access_enforced, check_purpose, purpose_options
from cli.common import (
    Command,
    audit_detail,
    check_address,
    config_option,
    fail,
    json_line,
    need_reason,
    run_with_store,
)
from gateway.config import Config
from quarantine import grants, review
from quarantine.access import current
from quarantine.review import Refusal
from quarantine.store import Store, os_user

# ------------------------------------------------------------------- purge


@click.command(cls=Command)
@config_option
@click.option("--dry-run", is_flag=True, help="Only count what would go.")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@click.pass_context
def purge(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Apply retention now: log records, quarantine items and files older than
    store.retention_days (except items under legal hold), audit rows older than
    store.audit_retention_days.  `serve` does this every store.purge_interval.

    With store.key_file set, the data keys of the expired periods are destroyed
    too, so that copies in backups cannot be read any more; the destruction
    report lists them with their fingerprints (--json: one object)."""
    from quarantine.retention import purge as do_purge

    async def run(store: Store, config: Config) -> int:
        summary = await do_purge(store, config, dry_run=dry_run,
                                 command="purge --dry-run" if dry_run else "purge")
        if as_json:
            json_line(summary)
            return 0
        verb = "to remove (dry run)" if dry_run else "removed"
        click.echo(f"destruction report {summary['now']}"
                   + (" (dry run: nothing destroyed)" if dry_run else ""))
        click.echo(f"  retention {summary['retention_days']} days: cutoff {summary['cutoff']}")
        for h in summary.get("holds_released", ()):
            click.echo(f"  hold {'expired' if dry_run else 'expired, released'}: {h['id']}"
                       f" (case {h['case'] or '-'}, until {h['until']})")
        files = "" if dry_run else f" ({summary['files_removed']} files)"
        click.echo(f"  quarantine items {verb}: {summary['quarantine_items']}{files};"
                   f" kept under legal hold: {summary['kept_under_hold']}")
        click.echo(f"  log records {verb}: {summary['log_records']}")
        click.echo(f"  audit rows {verb}: {summary['audit_rows']}"
                   f" (retention {summary['audit_retention_days']} days,"
                   f" cutoff {summary['audit_cutoff']})")
        if not dry_run:
            if summary["orphan_files_removed"]:
                click.echo(f"  orphan message files removed: {summary['orphan_files_removed']}")
            click.echo(f"  database checkpoint: {summary['checkpoint']}")
        _print_keys(summary, dry_run)
        return 0

    run_with_store(ctx, run)


def _print_keys(summary: dict[str, Any], dry_run: bool) -> None:
    """The crypto-shredding part of the destruction report."""
    if not summary.get("encryption"):
        click.echo("  encryption: off (store.key_file is not set): no keys to destroy")
        return
    verb = "to destroy (dry run)" if dry_run else "destroyed"
    periods = summary["periods_destroyed"]
    click.echo(f"  bodies encrypted; key-encryption key fingerprint {summary['kek_fingerprint']}")
    click.echo(f"  period keys {verb}: {len(periods)}")
    for p in periods:
        click.echo(f"    {p['key_id']}  fingerprint {p['fingerprint']}  created {p['created']}")
    holds = summary["hold_keys_destroyed"]
    click.echo(f"  hold keys {verb}: {len(holds)}")
    for h in holds:
        click.echo(f"    {h['key_id']}  fingerprint {h['fingerprint']}")
    if not dry_run:
        click.echo(f"  key store checkpoint: {summary.get('keys_checkpoint', 'n/a')}")
        for qid in summary.get("held_items", []):
            click.echo(f"  kept under legal hold (own key): {qid}")


# ------------------------------------------------------ subject access, erase


@click.command("subject-access", cls=Command)
@config_option
@click.argument("address")
@click.option("--output", metavar="FILE",
              help="Write the JSON document here (atomically, mode 0600); default stdout.")
@click.option("--include-bodies", is_flag=True,
              help="Include held messages' content (needs --reason).")
@click.option("--reason", metavar="TEXT", help="Why (recorded in the audit trail).")
@click.option("--exceptional", is_flag=True,
              help="With --include-bodies: also the content of mail marked personal (with"
                   " access control: needs an approved grant for ADDRESS).")
@purpose_options
@click.pass_context
def subject_access(ctx: click.Context, address: str, output: str | None, include_bodies: bool,
                   reason: str | None, exceptional: bool, ground: str | None,
                   case: str | None) -> None:
    """Everything kept about ADDRESS (log records, quarantine metadata, audit
    rows) as one JSON document; a summary goes to stderr."""
    addr = check_address(address)
    why = need_reason(reason, "subject-access --include-bodies", required=include_bodies)
    purpose = check_purpose(ctx, "subject-access", ground, case, required=access_enforced())
    if exceptional and not include_bodies:
        fail("subject-access: --exceptional applies only to --include-bodies", 2)

    async def run(store: Store, config: Config) -> int:
        grant = None
        if include_bodies and exceptional:
            grant = await grants.require_grant(
                store, current(), "subject-access", grants.PERSONAL_BODY, purpose=purpose,
                what=f"the content of personal mail of {addr}", addresses=[addr],
                targets=[addr], hint=f"mailwarden access request --address {addr}")
        handle = tmp = None
        if output:
            try:
                handle, tmp = review.open_private_output(output)
            except OSError as exc:
                raise Refusal(f"cannot write {output}: {exc.strerror or exc}", 1) from None
        try:
            subject = await review.find_subject(store, addr)
            personal_bodies = include_bodies and exceptional and bool(subject.personal_ids)
            await store.audit(
                "subject-access", targets=[addr], reason=why, exceptional=personal_bodies,
                filters={"include_bodies": include_bodies, "output": output or "-"},
                detail=audit_detail(log_records=len(subject.log_seqs),
                                     quarantine_items=len(subject.item_ids),
                                     grant=grant["id"] if grant else None, **purpose.detail()),
            )
            out = handle if handle is not None else sys.stdout
            counts = await review.write_subject_access(
                store, subject, out, include_bodies=include_bodies, exceptional=exceptional,
                generated_by=os_user()[0],
            )
            if handle is not None and tmp is not None:
                review.commit_private_output(handle, tmp, output or "")
                handle = None
            else:
                sys.stdout.flush()
        finally:
            if handle is not None and tmp is not None:
                handle.close()
                os.unlink(tmp)
        click.echo(
            f"subject-access {addr}: {counts['log_records']} log records,"
            f" {counts['quarantine_items']} quarantine items ({counts['bodies']} with content),"
            f" {counts['audit_rows']} audit rows" + (f" -> {output}" if output else ""),
            err=True,
        )
        return 0

    run_with_store(ctx, run)


@click.command(cls=Command)
@config_option
@click.argument("address")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@purpose_options
@click.pass_context
def erase(ctx: click.Context, address: str, reason: str | None, as_json: bool,
          ground: str | None, case: str | None) -> None:
    """Erase log records and quarantine items concerning ADDRESS (securely),
    except items under legal hold, which are reported.  Erased log records
    become chain tombstones so `log verify` still holds; audit rows stay."""
    addr = check_address(address)
    why = need_reason(reason, "erase")
    purpose = check_purpose(ctx, "erase", ground, case, required=access_enforced())

    async def run(store: Store, config: Config) -> int:
        subject = await review.find_subject(store, addr)
        erasable = [i for i in subject.item_ids if i not in set(subject.held_ids)]
        seq = await store.audit(
            "erase", targets=[addr], reason=why,
            detail=audit_detail(log_seqs=subject.log_seqs, quarantine_ids=erasable,
                                 kept_under_hold=subject.held_ids, **purpose.detail()),
        )
        result = await review.erase(store, subject, audit_seq=seq)
        if as_json:
            json_line(result)
        else:
            click.echo(f"erased {addr}: {result['log_records']} log records,"
                       f" {result['quarantine_items']} quarantine items"
                       f" ({result['files_removed']} files overwritten and removed);"
                       f" audit rows kept (audit seq {seq})")
        for qid in result["kept_under_hold"]:
            click.echo(f"mailwarden: {qid} concerns {addr} but is under legal hold: kept", err=True)
        return 0

    run_with_store(ctx, run)
