"""IT and data-protection commands: ``quarantine ...``, ``audit list``, ``purge``,
``subject-access``, ``erase``.

Policy clauses: *"monitoring information is shared internally only on
reasonable grounds"*, *"the organisation avoids opening mail marked personal
or private"*, *"normally securely destroyed after three months"* and *"right
of access, rectification, erasure"*.  The rules every command here follows:

* Every command that reads or changes kept data writes an audit row (OS user
  from the real uid, time, command, targets, filters, reason, exceptional
  flag) *before* it shows or changes anything; if the audit row cannot be
  written the command stops (exit 1).  Refusals write none: nothing was shown.
* ``quarantine show --body`` needs ``--reason``; the body of an item marked
  personal also needs ``--exceptional``, and the audit row is then marked
  exceptional.  Without ``--body`` only headers and the attachment list are
  shown.  ``subject-access --include-bodies`` follows the same rule.
* Exit status: 0 success; 1 failure (store unreadable, unknown item, next hop
  refused, item under hold); 2 usage (a missing reason or flag, a bad id or
  date, a recipient that was not an original one).  Every refusal is one line
  on stderr.  Quarantine ids are checked by :func:`quarantine.files.check_id`;
  no path is ever built from message data.
* Message text printed on a terminal has control characters (escape
  sequences) replaced, and rich markup is off, so a hostile subject cannot
  drive the operator's terminal.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, NoReturn

import click

from gateway.cli import config_option, fail, get_config
from gateway.config import Config
from quarantine import files, review
from quarantine.log import When
from quarantine.review import Refusal
from quarantine.store import Store, StoreError, iso, os_user

# ------------------------------------------------------------ click plumbing


class _OneLineUsage(click.UsageError):
    """A usage error shown as one line (``mailwarden: <command>: <problem>``)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"mailwarden: {self.format_message()}", err=True)


def _command_name(ctx: click.Context | None, info_name: str | None = None) -> str:
    names: list[str] = [info_name] if info_name else []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed([n for n in names if n]))


def _one_line(exc: click.UsageError, name: str) -> click.UsageError:
    if isinstance(exc, _OneLineUsage) or type(exc).__name__ == "NoArgsIsHelpError":
        return exc
    out = _OneLineUsage(f"{name}: {exc.format_message()} (see --help)")
    out.exit_code = 2
    return out


class Command(click.Command):
    """A command whose usage errors are one line, exit 2."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(parent, info_name)) from None


class Group(click.Group):
    """A group whose usage errors (and those of its commands) are one line."""

    command_class = Command

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(parent, info_name)) from None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(ctx)) from None


def _run(ctx: click.Context, body: Callable[[Store, Config], Awaitable[int | None]]) -> NoReturn:
    """Open the store (never creating it), run ``body``, exit with its status.

    A store this user cannot read or write, a refusal, or a database error
    ends the command with one line on stderr, never a traceback.
    """
    config = get_config(ctx)

    async def go() -> int:
        try:
            store = await Store.open(config.store.path, create=False)
        except StoreError as exc:
            raise Refusal(str(exc), 1) from None
        try:
            return await body(store, config) or 0
        finally:
            await store.close()

    try:
        code = asyncio.run(go())
    except Refusal as exc:
        fail(exc.message, exc.code)
    except StoreError as exc:
        fail(str(exc), 1)
    except sqlite3.Error as exc:
        fail(f"store {config.store.path}: {exc}", 1)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename or config.store.path}", 1)
    sys.exit(code)


def _reason(reason: str | None, what: str, *, required: bool = True) -> str:
    """The reason, whitespace-normalised; exit 2 when it is required and blank."""
    text = review.clean_text(" ".join((reason or "").split()))
    if required and not text:
        fail(f"{what} needs --reason TEXT (why; recorded in the audit trail)", 2)
    return text


def _qid(qid: str) -> str:
    """A quarantine id as :func:`files.check_id` accepts it; exit 2 otherwise."""
    try:
        return files.check_id(qid)
    except files.StorePathError as exc:
        fail(str(exc), 2)


def _address(address: str) -> str:
    try:
        return review.normalize_address(address)
    except ValueError as exc:
        fail(str(exc), 2)


def _console() -> Any:
    from rich.console import Console

    tty = sys.stdout.isatty()
    return Console(markup=False, highlight=False, emoji=False, width=None if tty else 250)


def _short(text: str | None, width: int) -> str:
    text = review.clean_text(" ".join((text or "").split()))
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _time(value: str) -> str:
    return value[:19].replace("T", " ")


def _when(dt: datetime | None) -> str | None:
    return iso(dt) if dt is not None else None


def _audit_detail(**extra: Any) -> dict[str, Any]:
    """Detail for audit rows: with SUDO_USER when run through sudo."""
    detail = {k: v for k, v in extra.items() if v is not None}
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and os.getuid() == 0:
        detail["sudo_user"] = sudo_user
    return detail


def _json_line(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, sort_keys=False))


# -------------------------------------------------------------- quarantine


@click.group(cls=Group)
@config_option
def quarantine() -> None:
    """Review held mail: list, show, release, delete, legal hold.

    Every command records who, when, what and why in the audit trail before
    it shows or changes anything.
    """


@quarantine.command("list")
@config_option
@click.option("--since", type=When(), metavar="DATE", help="Received on or after (ISO 8601, UTC).")
@click.option("--until", type=When(end=True), metavar="DATE", help="Received on or before.")
@click.option("--reason", "reason_filter", metavar="FILTER",
              help="Held by this filter (clamav, attachment_types, ...).")
@click.option("--address", metavar="ADDR", help="Concerning this address (sender or recipient).")
@click.option("--state", type=click.Choice(["held", *review.STATES[1:], "all"]), default="held",
              show_default=True)
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True,
              help="Items per page.")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def list_cmd(ctx: click.Context, since: datetime | None, until: datetime | None,
             reason_filter: str | None, address: str | None, state: str, limit: int, page: int,
             as_json: bool) -> None:
    """List quarantined messages, newest first."""
    addr = _address(address) if address else None
    q = review.ListQuery(_when(since), _when(until), reason_filter, addr, state, limit, page)

    async def body(store: Store, config: Config) -> int:
        items, more = await review.list_items(store, q)
        await store.audit("quarantine list", targets=[i["id"] for i in items],
                          filters=q.as_filters(), detail=_audit_detail(count=len(items)))
        if as_json:
            for item in items:
                _json_line(review.public(item))
            return 0
        _print_items(items, state == "all")
        if more:
            click.echo(f"page {page}: {len(items)} items; more with --page {page + 1}", err=True)
        elif not items:
            click.echo("no quarantined messages match", err=True)
        return 0

    _run(ctx, body)


def _print_items(items: Iterable[dict[str, Any]], with_state: bool) -> None:
    from rich.table import Table

    table = Table(show_lines=False, pad_edge=False, box=None, header_style="bold")
    for col in ("ID", "Received (UTC)", "Dir", "Sender", "Recipients", "Subject", "Reason",
                "Detail", "Pers", "Hold"):
        table.add_column(col, overflow="fold" if col == "ID" else "ellipsis",
                         no_wrap=col != "Subject")
    if with_state:
        table.add_column("State")
    for i in items:
        row = [
            i["id"], _time(i["received"]), i["direction"][:3], _short(i["mail_from"] or "<>", 30),
            _short(", ".join(i["rcpt_tos"]), 30), _short(i["subject"], 40), i["reason"],
            _short(i["detail"], 30), "yes" if i["personal"] else "", "HOLD" if i["hold"] else "",
        ]
        if with_state:
            row.append(i["state"])
        table.add_row(*row)
    _console().print(table)


@quarantine.command("show")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--body", is_flag=True, help="Also show the message text (needs --reason).")
@click.option("--reason", metavar="TEXT", help="Why (recorded in the audit trail).")
@click.option("--exceptional", is_flag=True,
              help="Exceptional access to the body of mail marked personal (audited as such).")
@click.pass_context
def show_cmd(ctx: click.Context, qid: str, body: bool, reason: str | None,
             exceptional: bool) -> None:
    """Show a held message's headers and attachment list (and body with --body)."""

    _qid(qid)
    why = _reason(reason, "quarantine show --body", required=body)
    if exceptional and not body:
        fail("quarantine show: --exceptional applies only to --body", 2)

    async def run(store: Store, config: Config) -> int:
        item = await review.get_item(store, qid)
        if body and item["personal"] and not exceptional:
            raise Refusal(
                f"{qid} is marked personal: its body is opened only as an exceptional access; "
                "add --exceptional (the audit trail records it as such)", 2
            )
        await store.audit(
            "quarantine show", targets=[qid], reason=why,
            exceptional=bool(body and item["personal"]),
            detail=_audit_detail(body=body, personal=item["personal"]),
        )
        _print_item(item)
        if item["state"] == "deleted":
            click.echo("\n(message deleted: nothing else is kept)")
            return 0
        raw = await review.read_message(store, item)
        view = await asyncio.to_thread(review.describe, item, raw, body=body)
        click.echo("\nHeaders:")
        for name, value in view.headers:
            click.echo(f"  {name}: {value}")
        click.echo("\nAttachments:" + ("" if view.attachments else " none"))
        for a in view.attachments:
            if "error" in a:
                click.echo(f"  {a['error']}")
                continue
            indent = "  " * (a["depth"] + 1)
            name = review.clean_text(a["filename"] or "(no name)")
            click.echo(f"{indent}{a['index']}. {name}  {a['type']}  {a['size']} bytes"
                       f"  sha256:{a['sha256'][:16]}")
        if body:
            click.echo("\nBody:")
            for n, text in enumerate(view.body):
                if n:
                    click.echo("  ----")
                click.echo(text.rstrip("\n"))
            if not view.body:
                click.echo("  (no text part)")
        return 0

    _run(ctx, run)


def _print_item(item: dict[str, Any]) -> None:
    fields = [
        ("ID", item["id"]),
        ("Received", item["received"]),
        ("State", item["state"] + (f" (updated {item['updated']})" if item["state"] != "held" else "")),
        ("Direction", item["direction"]),
        ("Client", f"{item['client_addr']} (helo {item['helo'] or '-'})"),
        ("Sender", f"<{item['mail_from']}>"),
        ("Recipients", ", ".join(item["rcpt_tos"])),
        ("Subject", item["subject"] or ""),
        ("Reason", item["reason"]),
        ("Detail", item["detail"]),
        ("Personal", "yes (body only with --exceptional)" if item["personal"] else "no"),
        ("Legal hold", "yes" if item["hold"] else "no"),
        ("Size", f"{item['size']} bytes"),
        ("SHA-256", item["sha256"]),
    ]
    for name, value in fields:
        click.echo(f"{name + ':':<12} {review.clean_text(str(value))}")


@quarantine.command("release")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.option("--to", "to", multiple=True, metavar="ADDR",
              help="Release only to these original recipients (repeatable).")
@click.option("--force", is_flag=True,
              help="Release mail held by clamav (virus or unscannable), or send again.")
@click.pass_context
def release_cmd(ctx: click.Context, qid: str, reason: str | None, to: tuple[str, ...],
                force: bool) -> None:
    """Re-inject a held message to the next hop with its original envelope.

    Adds `X-Mailwarden-Released: <user> <time>`; the item is marked released
    only after the next hop accepted it.
    """
    _qid(qid)
    why = _reason(reason, "quarantine release")

    async def run(store: Store, config: Config) -> int:
        from gateway.relay import send_message
        from gateway.rewrite import add_header, remove_header

        item = await review.get_item(store, qid)
        refusal = review.release_refusal(item, force=force)
        if refusal is not None:
            raise refusal
        recipients = review.release_recipients(item, to)
        raw = await review.read_message(store, item)
        user, _uid = os_user()
        when = store.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
        content = add_header(remove_header(raw, "X-Mailwarden-Released"),
                             "X-Mailwarden-Released", f"{user} {when}")
        gw = config.gateway
        await store.audit(
            "quarantine release", targets=[qid], reason=why,
            detail=_audit_detail(recipients=recipients, sender=item["mail_from"], force=force,
                                 next_hop=gw.next_hop),
        )
        accepted, reply, refused = await send_message(
            gw.next_hop, item["mail_from"], recipients, content,
            timeout=gw.next_hop_timeout, helo_name=gw.hostname,
        )
        reply_line = " ".join(reply.replace("\r\n", " ").split())
        await store.audit(
            "quarantine release (result)", targets=[qid], reason=why,
            detail=_audit_detail(accepted=accepted, reply=reply_line, refused=refused or None),
        )
        if not accepted:
            detail = "; ".join(f"{r}: {t}" for r, t in refused.items())
            raise Refusal(
                f"release of {qid} failed, the item stays held: {reply_line}"
                + (f" ({detail})" if detail else ""), 1
            )
        await review.mark_released(store, qid)
        delivered = [r for r in recipients if r not in refused]
        click.echo(f"released {qid} to {', '.join(delivered)} via {gw.next_hop}: {reply_line}")
        if refused:
            for r, text in refused.items():
                click.echo(f"mailwarden: next hop refused {r}: {text}", err=True)
            return 1
        return 0

    _run(ctx, run)


@quarantine.command("delete")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.pass_context
def delete_cmd(ctx: click.Context, qid: str, reason: str | None) -> None:
    """Delete a held message now: the file is overwritten and unlinked, the row
    keeps only a tombstone (id, times, reason) without addresses or headers."""
    _qid(qid)
    why = _reason(reason, "quarantine delete")

    async def run(store: Store, config: Config) -> int:
        item = await review.get_item(store, qid)
        if item["state"] == "deleted":
            raise Refusal(f"quarantine item {qid} was already deleted ({item['updated']})", 1)
        if item["hold"]:
            raise Refusal(f"quarantine item {qid} is under legal hold; unhold it first", 1)
        await store.audit("quarantine delete", targets=[qid], reason=why,
                          detail=_audit_detail(state=item["state"]))
        removed = await review.delete_item(store, qid)
        checkpoint = await store.checkpoint()
        click.echo(f"deleted {qid}" + (" (file overwritten and removed)" if removed
                                       else " (no file was left)")
                   + ("" if checkpoint == "truncated" else "; WAL checkpoint pending"))
        return 0

    _run(ctx, run)


def _hold_command(name: str, hold: bool, doc: str) -> click.Command:
    @quarantine.command(name, help=doc)
    @config_option
    @click.argument("qid", metavar="ID")
    @click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
    @click.pass_context
    def cmd(ctx: click.Context, qid: str, reason: str | None) -> None:
        _qid(qid)
        why = _reason(reason, f"quarantine {name}")

        async def run(store: Store, config: Config) -> int:
            item = await review.get_item(store, qid)
            if item["state"] == "deleted":
                raise Refusal(f"quarantine item {qid} was deleted", 1)
            await store.audit(f"quarantine {name}", targets=[qid], reason=why,
                              detail=_audit_detail(was_held=item["hold"]))
            await review.set_hold(store, qid, hold)
            already = " (already)" if item["hold"] == hold else ""
            click.echo(f"{qid}: legal hold {'on' if hold else 'off'}{already}")
            return 0

        _run(ctx, run)

    return cmd


_hold_command("hold", True,
              "Put an item under legal hold: retention purge keeps it, delete and erase refuse it.")
_hold_command("unhold", False, "Lift an item's legal hold (retention applies again).")


# ------------------------------------------------------------------- audit


@click.group(cls=Group)
@config_option
def audit() -> None:
    """The audit trail: every access to kept data (who, when, what, why)."""


@audit.command("list")
@config_option
@click.option("--since", type=When(), metavar="DATE", help="On or after (ISO 8601, UTC).")
@click.option("--until", type=When(end=True), metavar="DATE", help="On or before.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def audit_list(ctx: click.Context, since: datetime | None, until: datetime | None,
               as_json: bool) -> None:
    """List audit rows, oldest first (this listing is itself audited)."""

    async def run(store: Store, config: Config) -> int:
        filters = {k: v for k, v in (("since", _when(since)), ("until", _when(until))) if v}
        await store.audit("audit list", filters=filters, detail=_audit_detail())
        rows = await review.audit_rows(store, since=_when(since), until=_when(until))
        if as_json:
            for row in rows:
                _json_line(row)
            return 0
        from rich.table import Table

        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("Seq", "Time (UTC)", "User", "Command", "Targets", "Reason", "Exc", "Detail"):
            table.add_column(col, no_wrap=col not in ("Reason", "Detail"))
        for r in rows:
            table.add_row(
                str(r["seq"]), _time(r["time"]), f"{r['user']}({r['uid']})", r["command"],
                _short(", ".join(map(str, r["targets"])), 40), _short(r["reason"], 60),
                "EXC" if r["exceptional"] else "",
                _short(json.dumps({**r["filters"], **r["detail"]}, ensure_ascii=False), 80),
            )
        _console().print(table)
        return 0

    _run(ctx, run)


# ------------------------------------------------------------------- purge


@click.command(cls=Command)
@config_option
@click.option("--dry-run", is_flag=True, help="Only count what would go.")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@click.pass_context
def purge(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Apply retention now: log records, quarantine items and files older than
    store.retention_days (except items under legal hold), audit rows older than
    store.audit_retention_days.  `serve` does this every store.purge_interval."""
    from quarantine.retention import purge as do_purge

    async def run(store: Store, config: Config) -> int:
        summary = await do_purge(store, config, dry_run=dry_run,
                                 command="purge --dry-run" if dry_run else "purge")
        if as_json:
            _json_line(summary)
            return 0
        verb = "to remove (dry run)" if dry_run else "removed"
        click.echo(f"retention {summary['retention_days']} days: cutoff {summary['cutoff']}")
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
        return 0

    _run(ctx, run)


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
              help="With --include-bodies: also the content of mail marked personal.")
@click.pass_context
def subject_access(ctx: click.Context, address: str, output: str | None, include_bodies: bool,
                   reason: str | None, exceptional: bool) -> None:
    """Everything kept about ADDRESS (log records, quarantine metadata, audit
    rows) as one JSON document; a summary goes to stderr."""
    addr = _address(address)
    why = _reason(reason, "subject-access --include-bodies", required=include_bodies)
    if exceptional and not include_bodies:
        fail("subject-access: --exceptional applies only to --include-bodies", 2)

    async def run(store: Store, config: Config) -> int:
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
                detail=_audit_detail(log_records=len(subject.log_seqs),
                                     quarantine_items=len(subject.item_ids)),
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

    _run(ctx, run)


@click.command(cls=Command)
@config_option
@click.argument("address")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object.")
@click.pass_context
def erase(ctx: click.Context, address: str, reason: str | None, as_json: bool) -> None:
    """Erase log records and quarantine items concerning ADDRESS (securely),
    except items under legal hold, which are reported.  Erased log records
    become chain tombstones so `log verify` still holds; audit rows stay."""
    addr = _address(address)
    why = _reason(reason, "erase")

    async def run(store: Store, config: Config) -> int:
        subject = await review.find_subject(store, addr)
        erasable = [i for i in subject.item_ids if i not in set(subject.held_ids)]
        seq = await store.audit(
            "erase", targets=[addr], reason=why,
            detail=_audit_detail(log_seqs=subject.log_seqs, quarantine_ids=erasable,
                                 kept_under_hold=subject.held_ids),
        )
        result = await review.erase(store, subject, audit_seq=seq)
        if as_json:
            _json_line(result)
        else:
            click.echo(f"erased {addr}: {result['log_records']} log records,"
                       f" {result['quarantine_items']} quarantine items"
                       f" ({result['files_removed']} files overwritten and removed);"
                       f" audit rows kept (audit seq {seq})")
        for qid in result["kept_under_hold"]:
            click.echo(f"mailwarden: {qid} concerns {addr} but is under legal hold: kept", err=True)
        return 0

    _run(ctx, run)


COMMANDS: list[click.Command] = [quarantine, audit, purge, subject_access, erase]
