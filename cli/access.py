"""``mailwarden access request|approve|deny|list``: two-person approval of
exceptional access (issue 17), and the ``--ground G --case C`` options every
command that reads content or identifies a person takes.

Policy: the valid reasons for checking an employee's email are listed
(``[access] grounds``); mail marked personal is not opened "save in
exceptional circumstances"; what monitoring finds is shared internally only
"if access to the data is necessary".  So:

* ``access request (--item ID | --address ADDR) --ground G --case C --reason
  TEXT`` records a request and prints its id; it opens nothing;
* ``access approve REQ`` / ``access deny REQ``: a ``dpo`` who is not the
  requester decides; an approved request is a grant for the requester, for
  its case, for ``[access] grant_hours`` (see quarantine/grants.py for what
  each scope opens);
* ``access list [--json]``: requests and grants with their state (a dpo sees
  all, anyone else their own).

Every decision and every refusal is in the audit trail.  The domain rules
live in :mod:`quarantine.grants`; this module is the click layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from cli.common import (
    Group,
    check_address,
    check_qid,
    config_option,
    console,
    fail,
    get_config,
    json_line,
    need_reason,
    run_with_store,
    short,
    short_time,
)
from gateway.config import Config
from quarantine import grants
from quarantine.access import current
from quarantine.grants import Purpose
from quarantine.review import Refusal
from quarantine.store import Store

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------- --ground, --case


def purpose_options(fn: F) -> F:
    """``--ground G --case C`` on a command (parameters ``ground``, ``case``)."""
    fn = click.option("--case", "case", metavar="C",
                      help="The case reference this access is for (recorded in the audit"
                           " trail).")(fn)
    fn = click.option("--ground", "ground", metavar="G",
                      help="The policy's ground for this access (one of [access] grounds;"
                           " recorded in the audit trail).")(fn)
    return fn


def access_enforced() -> bool:
    """Whether access control applies to this command (it came through the
    control socket: roles, grounds and grants are checked).  Run directly on
    the store by its owner, nothing is enforced and ``--ground``/``--case``
    are optional (recorded when given)."""
    return current().enforced


def check_purpose(ctx: click.Context, command: str, ground: str | None, case: str | None, *,
                  required: bool) -> Purpose:
    """The ground and case of an access: an unknown ground is a usage error
    naming the allowed ones (exit 2); both are required when ``required``
    (exit 2 naming what is missing)."""
    allowed = get_config(ctx).access.grounds
    if ground is not None:
        try:
            ground = grants.check_ground(ground, allowed)
        except ValueError as exc:
            fail(f"{command}: {exc}", 2)
    if case is not None:
        try:
            case = grants.check_case(case)
        except ValueError as exc:
            fail(f"{command}: {exc}", 2)
    if required and (ground is None or case is None):
        missing = " and ".join(n for n, v in (("--ground G", ground), ("--case C", case))
                               if v is None)
        fail(f"{command} needs {missing} (grounds: {', '.join(allowed)})", 2)
    return Purpose(ground, case)


# -------------------------------------------------------------- commands


@click.group("access", cls=Group)
@config_option
def access() -> None:
    """Exceptional access with two-person approval: request, approve, deny, list."""


@access.command("request")
@config_option
@click.option("--item", "item", metavar="ID", help="A quarantine item (its body, if personal).")
@click.option("--address", "address", metavar="ADDR",
              help="An address (personal bodies concerning it, identified exports of it,"
                   " re-identification).")
@purpose_options
@click.option("--reason", metavar="TEXT", help="Why (required; recorded in the audit trail).")
@click.pass_context
def request_cmd(ctx: click.Context, item: str | None, address: str | None, ground: str | None,
                case: str | None, reason: str | None) -> None:
    """Ask for exceptional access to one item or one address; prints the request id.

    A dpo other than you must approve it (`mailwarden access approve REQ`);
    the grant then lasts [access] grant_hours, for this case only.
    """
    if (item is None) == (address is None):
        fail("access request needs exactly one of --item ID or --address ADDR", 2)
    purpose = check_purpose(ctx, "access request", ground, case, required=True)
    why = need_reason(reason, "access request")
    scope_kind, scope = ("item", check_qid(item)) if item is not None else (
        "address", check_address(address or ""))

    async def run(store: Store, config: Config) -> int:
        if scope_kind == "item" and await store.get_item(scope) is None:
            raise Refusal(f"no quarantine item {scope}", 1)
        rid = await grants.request(store, current(), scope_kind=scope_kind, scope=scope,
                                   purpose=purpose, reason=why)
        click.echo(rid)
        click.echo(f"mailwarden: access request {rid} ({scope_kind} {scope}, case {purpose.case})"
                   " waits for a dpo's approval", err=True)
        return 0

    run_with_store(ctx, run)


def _decide_command(name: str, approve: bool, doc: str) -> click.Command:
    @access.command(name, help=doc)
    @config_option
    @click.argument("rid", metavar="REQ")
    @click.pass_context
    def cmd(ctx: click.Context, rid: str) -> None:
        rid = rid.strip()
        if not rid or len(rid) > 64 or not rid.isprintable():
            fail(f"access {name}: invalid request id {rid!r}", 2)

        async def run(store: Store, config: Config) -> int:
            try:
                req = await grants.decide(store, current(), rid, approve=approve,
                                          grant_hours=config.access.grant_hours)
            except grants.RequestError as exc:
                raise Refusal(str(exc), 1) from None
            if approve:
                click.echo(f"{rid}: approved for {req['requester']}"
                           f" ({req['scope_kind']} {req['scope']}, case {req['case_ref']})"
                           f" until {req['expires']}")
            else:
                click.echo(f"{rid}: denied")
            return 0

        run_with_store(ctx, run)

    return cmd


_decide_command("approve", True,
                "Approve a pending request (a dpo other than the requester): the requester"
                " holds a grant for [access] grant_hours.")
_decide_command("deny", False, "Deny a pending request (a dpo other than the requester).")


@access.command("list")
@config_option
@click.option("--state", type=click.Choice([*grants.STATES, "all"]), default="all",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def list_cmd(ctx: click.Context, state: str, as_json: bool) -> None:
    """Requests and grants with their state (pending, approved, denied, expired)."""

    async def run(store: Store, config: Config) -> int:
        caller = current()
        rows = await grants.visible_requests(store, caller)
        now = store.clock()
        out = [grants.public(r, now) for r in rows]
        if state != "all":
            out = [r for r in out if r["state"] == state]
        await store.audit("access list", targets=[r["id"] for r in out],
                          filters={"state": state}, detail={"count": len(out)})
        if as_json:
            for r in out:
                json_line(r)
            return 0
        if not out:
            click.echo("no access requests", err=True)
            return 0
        from rich.table import Table

        table = Table(show_lines=False, pad_edge=False, box=None, header_style="bold")
        for col in ("Request", "State", "Requested (UTC)", "By", "Scope", "Ground", "Case",
                    "Decided by", "Until (UTC)"):
            table.add_column(col, overflow="fold" if col == "Request" else "ellipsis")
        for r in out:
            table.add_row(r["id"], r["state"], short_time(r["requested"]), short(r["requester"], 20),
                          short(r["scope"], 40), r["ground"], short(r["case"], 24),
                          short(r["decided_by"] or "", 20),
                          short_time(r["expires"]) if r["expires"] else "")
        console().print(table)
        return 0

    run_with_store(ctx, run)
