"""``mailwarden audit list``: the audit trail (who, when, what, why).

Listing the trail is itself audited (see cli/quarantine.py for the rules
every command that reads kept data follows).
"""

from __future__ import annotations

import json
from datetime import datetime

import click

from cli.common import (
    Group,
    audit_detail,
    config_option,
    console,
    iso_or_none,
    json_line,
    run_with_store,
    short,
    short_time,
)
from gateway.config import Config
from quarantine import review
from quarantine.log import When
from quarantine.store import Store

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
        filters = {k: v for k, v in (("since", iso_or_none(since)), ("until", iso_or_none(until))) if v}
        await store.audit("audit list", filters=filters, detail=audit_detail())
        rows = await review.audit_rows(store, since=iso_or_none(since), until=iso_or_none(until))
        if as_json:
            for row in rows:
                json_line(row)
            return 0
        from rich.table import Table

        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("Seq", "Time (UTC)", "User", "Command", "Targets", "Reason", "Exc", "Detail"):
            table.add_column(col, no_wrap=col not in ("Reason", "Detail"))
        for r in rows:
            table.add_row(
                str(r["seq"]), short_time(r["time"]), f"{r['user']}({r['uid']})", r["command"],
                short(", ".join(map(str, r["targets"])), 40), short(r["reason"], 60),
                "EXC" if r["exceptional"] else "",
                short(json.dumps({**r["filters"], **r["detail"]}, ensure_ascii=False), 80),
            )
        console().print(table)
        return 0

    run_with_store(ctx, run)
