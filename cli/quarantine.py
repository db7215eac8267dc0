"""IT and data-protection commands: ``quarantine ...`` here; ``audit list`` in
cli/audit.py; ``purge``, ``subject-access`` and ``erase`` in cli/data.py.

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
* With access control (the command came through the control socket:
  ``quarantine.access.current().enforced``), the commands that read content
  or change an item take ``--ground G --case C`` (required; recorded in the
  audit row's detail), a personal body needs an approved grant instead of
  ``--exceptional`` (``quarantine/grants.py``), a reviewer deletes only
  items not marked personal, and ``hold`` needs ``--case``.  Refusals are
  audited as ``<command> (refused)``.
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
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import click

from cli.access import access_enforced, check_purpose, purpose_options
from cli.common import (
    Group,
    audit_detail,
    check_address,
    check_qid,
    config_option,
    console,
    fail,
    iso_or_none,
    json_line,
    need_reason,
    run_with_store,
    short,
    short_time,
)
from gateway.config import Config
from quarantine import grants, review
from quarantine.access import current
from quarantine.log import When
from quarantine.review import Refusal
from quarantine.store import Store, iso, os_user

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
    addr = check_address(address) if address else None
    q = review.ListQuery(iso_or_none(since), iso_or_none(until), reason_filter, addr, state, limit, page)

    async def body(store: Store, config: Config) -> int:
        items, more = await review.list_items(store, q)
        await store.audit("quarantine list", targets=[i["id"] for i in items],
                          filters=q.as_filters(), detail=audit_detail(count=len(items)))
        if as_json:
            for item in items:
                json_line(review.public(item))
            return 0
        _print_items(items, state == "all")
        if more:
            click.echo(f"page {page}: {len(items)} items; more with --page {page + 1}", err=True)
        elif not items:
            click.echo("no quarantined messages match", err=True)
        return 0

    run_with_store(ctx, body)


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
            i["id"], short_time(i["received"]), i["direction"][:3], short(i["mail_from"] or "<>", 30),
            short(", ".join(i["rcpt_tos"]), 30), short(i["subject"], 40), i["reason"],
            short(i["detail"], 30), "yes" if i["personal"] else "", _hold_text(i),
        ]
        if with_state:
            row.append(i["state"])
        table.add_row(*row)
    console().print(table)


def _hold_text(item: dict[str, Any]) -> str:
    """``HOLD``, with the case and end of a named hold: ``HOLD case 7 (to 2026-12-31)``."""
    if not item["hold"]:
        return ""
    text = "HOLD"
    if item.get("hold_case"):
        text += " " + short(item["hold_case"], 20)
    if item.get("hold_until"):
        text += f" (to {item['hold_until'][:10]})"
    return text


@quarantine.command("show")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--body", is_flag=True, help="Also show the message text (needs --reason).")
@click.option("--reason", metavar="TEXT", help="Why (recorded in the audit trail).")
@click.option("--exceptional", is_flag=True,
              help="Exceptional access to the body of mail marked personal (audited as such;"
                   " with access control: an approved grant instead).")
@purpose_options
@click.pass_context
def show_cmd(ctx: click.Context, qid: str, body: bool, reason: str | None,
             exceptional: bool, ground: str | None, case: str | None) -> None:
    """Show a held message's headers and attachment list (and body with --body).

    With access control, --body needs --ground and --case, and the body of
    mail marked personal needs an approved grant (`mailwarden access request`).
    """

    check_qid(qid)
    why = need_reason(reason, "quarantine show --body", required=body)
    purpose = check_purpose(ctx, "quarantine show --body" if body else "quarantine show",
                            ground, case, required=body and access_enforced())
    if exceptional and not body:
        fail("quarantine show: --exceptional applies only to --body", 2)

    async def run(store: Store, config: Config) -> int:
        caller = current()
        item = await review.get_item(store, qid)
        grant = None
        if body and item["personal"]:
            if caller.enforced:
                grant = await grants.require_grant(
                    store, caller, "quarantine show", grants.PERSONAL_BODY, purpose=purpose,
                    what=f"the body of {qid} (marked personal)", item=qid,
                    addresses=grants.item_addresses(item), targets=[qid],
                    hint=f"mailwarden access request --item {qid}")
            elif not exceptional:
                raise Refusal(
                    f"{qid} is marked personal: its body is opened only as an exceptional"
                    " access; add --exceptional (the audit trail records it as such)", 2
                )
        await store.audit(
            "quarantine show", targets=[qid], reason=why,
            exceptional=bool(body and item["personal"]),
            detail=audit_detail(body=body, personal=item["personal"],
                                grant=grant["id"] if grant else None, **purpose.detail()),
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

    run_with_store(ctx, run)


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
        ("Personal", ("yes (body only as an exceptional access: "
                      + ("an approved grant)" if current().enforced else "--exceptional)"))
         if item["personal"] else "no"),
        ("Legal hold", (_hold_text(item).replace("HOLD", "yes", 1) if item["hold"] else "no")),
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
@purpose_options
@click.pass_context
def release_cmd(ctx: click.Context, qid: str, reason: str | None, to: tuple[str, ...],
                force: bool, ground: str | None, case: str | None) -> None:
    """Re-inject a held message to the next hop with its original envelope.

    Adds `X-Mailwarden-Released: <user> <time>`; the item is marked released
    only after the next hop accepted it.
    """
    check_qid(qid)
    why = need_reason(reason, "quarantine release")
    purpose = check_purpose(ctx, "quarantine release", ground, case, required=access_enforced())

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
            detail=audit_detail(recipients=recipients, sender=item["mail_from"], force=force,
                                 next_hop=gw.next_hop, **purpose.detail()),
        )
        accepted, reply, refused = await send_message(
            gw.next_hop, item["mail_from"], recipients, content,
            timeout=gw.next_hop_timeout, helo_name=gw.hostname,
        )
        reply_line = " ".join(reply.replace("\r\n", " ").split())
        await store.audit(
            "quarantine release (result)", targets=[qid], reason=why,
            detail=audit_detail(accepted=accepted, reply=reply_line, refused=refused or None),
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

    run_with_store(ctx, run)


@quarantine.command("delete")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@purpose_options
@click.pass_context
def delete_cmd(ctx: click.Context, qid: str, reason: str | None, ground: str | None,
               case: str | None) -> None:
    """Delete a held message now: the file is overwritten and unlinked, the row
    keeps only a tombstone (id, times, reason) without addresses or headers.

    With access control, a reviewer may delete only items not marked personal
    (a dpo decides about personal mail)."""
    check_qid(qid)
    why = need_reason(reason, "quarantine delete")
    purpose = check_purpose(ctx, "quarantine delete", ground, case, required=access_enforced())

    async def run(store: Store, config: Config) -> int:
        caller = current()
        item = await review.get_item(store, qid)
        if caller.enforced and item["personal"] and "dpo" not in caller.roles:
            await grants.refuse(
                store, "quarantine delete",
                f"quarantine delete: refused: {qid} is marked personal; deleting it needs"
                f" role dpo; {caller.describe()}",
                targets=[qid], purpose=purpose)
        if item["state"] == "deleted":
            raise Refusal(f"quarantine item {qid} was already deleted ({item['updated']})", 1)
        if item["hold"]:
            raise Refusal(f"quarantine item {qid} is under legal hold; unhold it first", 1)
        await store.audit("quarantine delete", targets=[qid], reason=why,
                          detail=audit_detail(state=item["state"], personal=item["personal"],
                                              **purpose.detail()))
        removed = await review.delete_item(store, qid)
        checkpoint = await store.checkpoint()
        click.echo(f"deleted {qid}" + (" (file overwritten and removed)" if removed
                                       else " (no file was left)")
                   + ("" if checkpoint == "truncated" else "; WAL checkpoint pending"))
        return 0

    run_with_store(ctx, run)


@quarantine.command("hold")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--case", "case", metavar="C",
              help="The investigation this hold is for (required with access control).")
@click.option("--until", "until", type=When(end=True), metavar="DATE",
              help="The hold ends then (a date: at its end); purge releases it to normal"
                   " retention afterwards.  Default: until unhold.")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.pass_context
def hold_cmd(ctx: click.Context, qid: str, case: str | None, until: datetime | None,
             reason: str | None) -> None:
    """Put an item under legal hold for an investigation: retention purge
    keeps it (until --until, if given), delete and erase refuse it."""
    check_qid(qid)
    why = need_reason(reason, "quarantine hold")
    purpose = check_purpose(ctx, "quarantine hold", None, case, required=False)
    if access_enforced() and purpose.case is None:
        fail("quarantine hold needs --case C (the investigation the hold is for)", 2)
    until_text = iso_or_none(until)

    async def run(store: Store, config: Config) -> int:
        item = await review.get_item(store, qid)
        if item["state"] == "deleted":
            raise Refusal(f"quarantine item {qid} was deleted", 1)
        if until_text is not None and until_text <= iso(store.clock()):
            raise Refusal(f"quarantine hold: --until {until_text} is not in the future", 2)
        await store.audit("quarantine hold", targets=[qid], reason=why,
                          detail=audit_detail(was_held=item["hold"], until=until_text,
                                              **purpose.detail()))
        await review.set_hold(store, qid, True, case=purpose.case, until=until_text)
        already = " (already; case and end replaced)" if item["hold"] else ""
        named = (f" for case {purpose.case}" if purpose.case else "") + (
            f" until {until_text}" if until_text else "")
        click.echo(f"{qid}: legal hold on{named}{already}")
        return 0

    run_with_store(ctx, run)


@quarantine.command("unhold")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.pass_context
def unhold_cmd(ctx: click.Context, qid: str, reason: str | None) -> None:
    """Lift an item's legal hold (retention applies again)."""
    check_qid(qid)
    why = need_reason(reason, "quarantine unhold")

    async def run(store: Store, config: Config) -> int:
        item = await review.get_item(store, qid)
        if item["state"] == "deleted":
            raise Refusal(f"quarantine item {qid} was deleted", 1)
        await store.audit("quarantine unhold", targets=[qid], reason=why,
                          detail=audit_detail(was_held=item["hold"], case=item.get("hold_case")))
        await review.set_hold(store, qid, False)
        already = " (already)" if not item["hold"] else ""
        click.echo(f"{qid}: legal hold off{already}")
        return 0

    run_with_store(ctx, run)
