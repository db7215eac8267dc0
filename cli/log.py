"""``mailwarden log export|verify|stats``: the auditors' commands.

Policy: monitoring data is shared internally only on reasonable grounds and
every read of it is recorded.  Each export and stats run writes an audit row
(OS user, filters, format, destination) *before* any data is read for output;
an export writes a second row, ``log export done``, with the number of rows,
the SHA-256 of the bytes written and whether it completed (so an interrupted
export is visible as such).  ``verify`` reads only hashes and shows no data,
so it is not audited.

Exports are pseudonymised (``quarantine/pseudonym.py``): each gets an id
(printed on stderr, in every record) and a random HMAC key kept in the
store's ``export`` table; ``log reidentify EXPORT_ID PSEUDONYM`` finds the
address again.  ``--identified`` exports and re-identification need an
approved grant when access control applies (``quarantine/grants.py``).

Exit status: 0 success, 1 failure (store unusable, output not writable, a
broken chain), 2 usage or configuration error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import click

from cli.access import access_enforced, check_purpose, purpose_options
from cli.common import Group, config_option, run_with_store
from gateway.config import Config
from quarantine import grants
from quarantine import log as logmod
from quarantine.access import current
from quarantine.grants import Purpose
from quarantine.pseudonym import Pseudonymiser, new_key
from quarantine.review import Refusal
from quarantine.store import Store, StoreError, iso


def _err(message: str) -> None:
    click.echo(f"mailwarden: {message}", err=True)


def _query(since: datetime | None, until: datetime | None, address: str | None,
           direction: str | None) -> logmod.LogQuery:
    if since and until and since > until:
        raise click.UsageError("--since is after --until")
    if address is not None:
        address = address.strip().lower()
        if not address:
            raise click.UsageError("--address is empty")
    return logmod.LogQuery(since=since, until=until, address=address, direction=direction)


@click.group("log", cls=Group)
@config_option
def log_group() -> None:
    """The header-only monitoring log (auditors): export, verify, stats."""


# ------------------------------------------------------------------- export


class _AtomicFile:
    """``--output FILE``: a 0600 temp file beside FILE, fsynced and renamed
    into place only when the export completed."""

    def __init__(self, target: Path) -> None:
        self.target = target
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self.tmp = Path(name)
        os.fchmod(fd, 0o600)
        self.fh: BinaryIO = os.fdopen(fd, "wb", buffering=1024 * 1024)

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.target)
        dfd = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass
        try:
            self.tmp.unlink()
        except OSError:
            pass


@log_group.command("export")
@config_option
@click.option("--since", type=logmod.When(), help="From this date/time (ISO 8601, UTC default).")
@click.option("--until", type=logmod.When(end=True), help="Up to this date/time (a date includes the whole day).")
@click.option("--address", metavar="A", help="Only records concerning this address.")
@click.option("--direction", type=click.Choice(logmod.DIRECTIONS))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="csv (header row; default) or jsonl.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format jsonl.")
@click.option("--output", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Write FILE atomically (mode 0600) and print its SHA-256 on stderr.")
@click.option("--identified", is_flag=True,
              help="Real addresses instead of pseudonyms (with access control: needs --address,"
                   " --ground, --case and an approved grant for that address).")
@purpose_options
@click.pass_context
def export_cmd(ctx: click.Context, since: datetime | None, until: datetime | None,
               address: str | None, direction: str | None, fmt: str | None, as_json: bool,
               output: Path | None, identified: bool, ground: str | None,
               case: str | None) -> None:
    """Export the header-only log for auditors (streams; csv to stdout by default).

    Addresses are replaced by pseudonyms (HMAC-SHA256 with a key of this
    export only: the same person has the same pseudonym within the export,
    another one in the next); the export id goes to stderr
    (`mailwarden log reidentify EXPORT_ID PSEUDONYM` with a grant).
    Every export is recorded in the audit trail before any record is read.
    A progress bar is shown on stderr when it is a terminal.
    """
    if as_json and fmt == "csv":
        raise click.UsageError("--json and --format csv contradict each other")
    fmt = "jsonl" if as_json else (fmt or "csv")
    query = _query(since, until, address, direction)
    enforced = access_enforced()
    purpose = check_purpose(ctx, "log export --identified" if identified else "log export",
                            ground, case, required=identified and enforced)
    if identified and enforced and query.address is None:
        raise click.UsageError("--identified needs --address A (a grant covers one address)")
    if output is not None and not output.parent.is_dir():
        raise click.BadParameter(f"directory {output.parent} does not exist",
                                 param_hint="--output")

    async def body(store: Store, config: Config) -> int:
        grant = None
        if identified:
            grant = await grants.require_grant(
                store, current(), "log export", grants.IDENTIFIED_EXPORT, purpose=purpose,
                what=f"an identified export of {query.address}",
                addresses=[query.address or ""], targets=[query.address or ""],
                hint=f"mailwarden access request --address {query.address}")
        return await _export(store, query, fmt, output, identified=identified,
                             purpose=purpose, grant=grant["id"] if grant else None)

    run_with_store(ctx, body)


async def _export(store: Store, query: logmod.LogQuery, fmt: str, output: Path | None, *,
                  identified: bool = False, purpose: Purpose | None = None,
                  grant: str | None = None) -> int:
    sink: _AtomicFile | None = None
    progress: Any = None
    status = "failed"
    result: logmod.ExportResult | None = None
    audited = False
    filters = {**query.filters(), "format": fmt,
               "output": str(output.resolve()) if output else "-"}
    targets = [query.address] if query.address else []
    purpose = purpose or Purpose()
    caller = current()
    now = store.clock()
    export_id = grants.new_export_id(now)
    pseudo = None if identified else Pseudonymiser(new_key())
    try:
        query = dataclasses.replace(query, up_to=await logmod.last_seq(store))
        try:
            await store.audit("log export", targets=targets, filters=filters,
                              detail={"up_to_seq": query.up_to, "export_id": export_id,
                                      "identified": identified, "grant": grant,
                                      **purpose.detail()})
            await store.add_export({
                "id": export_id, "time": iso(now), "user": caller.user, "uid": caller.uid,
                "ground": purpose.ground or "", "case_ref": purpose.case or "",
                "filters": {**query.filters(), "up_to": query.up_to, "format": fmt},
                "identified": identified,
                "hmac_key": None if pseudo is None else pseudo.key.hex(),
            })
        except StoreError as exc:
            _err(f"cannot write the audit row, nothing exported: {exc}")
            return 1
        audited = True
        click.echo(f"export {export_id} ({'identified' if identified else 'pseudonymised'})",
                   err=True)
        if output is not None:
            try:
                sink = _AtomicFile(output)
            except OSError as exc:
                _err(f"cannot write {output}: {exc.strerror or exc}")
                return 1
            out: BinaryIO = sink.fh
        else:
            out = sys.stdout.buffer
        tick = None
        # A bar on stderr only when it is a terminal and the data is not
        # going to that same terminal.
        if sys.stderr.isatty() and (output is not None or not sys.stdout.isatty()):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            total = await logmod.count(store, query)
            progress = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            progress.start()
            task = progress.add_task("export", total=total)

            def tick(n: int) -> None:
                progress.advance(task, n)

        try:
            result = await logmod.export(store, query, fmt, out, tick,
                                         export_id=export_id, pseudo=pseudo)
        except BrokenPipeError:
            # The reader went away (``| head``): stop quietly, but say so.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            status = "interrupted: output closed"
            _err("export stopped: output closed")
            return 1
        except OSError as exc:
            status = f"failed: {exc.strerror or exc}"
            _err(f"export failed: {exc.strerror or exc}")
            return 1
        if progress is not None:
            progress.stop()
            progress = None
        if sink is not None:
            try:
                sink.commit()
            except OSError as exc:
                status = f"failed: {exc.strerror or exc}"
                _err(f"cannot write {output}: {exc.strerror or exc}")
                return 1
            sink = None
            click.echo(f"sha256 {result.sha256}  {output}  {result.rows} records", err=True)
        status = "complete"
        return 0
    except StoreError as exc:
        _err(str(exc))
        return 1
    finally:
        if progress is not None:
            progress.stop()
        if sink is not None:
            sink.abort()
        try:
            if audited:
                await store.audit(
                    "log export done", targets=targets, filters=filters,
                    detail={"status": status,
                            "rows": result.rows if result else None,
                            "sha256": result.sha256 if result else None},
                )
        except StoreError as exc:
            _err(f"could not record the end of the export in the audit trail: {exc}")


# --------------------------------------------------------------- reidentify


@log_group.command("reidentify")
@config_option
@click.argument("export_id", metavar="EXPORT_ID")
@click.argument("pseudonym", metavar="PSEUDONYM")
@purpose_options
@click.pass_context
def reidentify_cmd(ctx: click.Context, export_id: str, pseudonym: str, ground: str | None,
                   case: str | None) -> None:
    """The address behind PSEUDONYM in export EXPORT_ID.

    With access control this needs --ground, --case and an approved grant
    for that address, or for the address the export was filtered to
    (`mailwarden access request --address A`).  Audited, refusals included.
    """
    purpose = check_purpose(ctx, "log reidentify", ground, case, required=access_enforced())
    export_id = export_id.strip()
    pseudonym = pseudonym.strip().lower()
    if not export_id or len(export_id) > 64 or not export_id.isprintable():
        raise click.UsageError(f"invalid export id {export_id!r}")
    if not pseudonym.startswith("pn-") or len(pseudonym) > 64 or not pseudonym.isprintable():
        raise click.UsageError(f"invalid pseudonym {pseudonym!r} (expected pn-...)")

    async def body(store: Store, config: Config) -> int:
        caller = current()
        targets = [export_id, pseudonym]
        export = await store.get_export(export_id)
        if export is None:
            await store.audit("log reidentify", targets=targets,
                              detail={**purpose.detail(), "result": "no such export"})
            raise Refusal(f"log reidentify: no export {export_id}", 1)
        if export["identified"] or not export["hmac_key"]:
            await store.audit("log reidentify", targets=targets,
                              detail={**purpose.detail(), "result": "identified export"})
            raise Refusal(f"log reidentify: export {export_id} was identified: it has no"
                          " pseudonyms", 1)
        address = await logmod.reidentify(store, export["filters"],
                                          bytes.fromhex(export["hmac_key"]), pseudonym)
        if address is None:
            await store.audit("log reidentify", targets=targets,
                              detail={**purpose.detail(), "result": "not found"})
            raise Refusal(f"log reidentify: {pseudonym} stands for no address of export"
                          f" {export_id} (records purged or erased since?)", 1)
        scope = [address]
        if export["filters"].get("address"):
            scope.append(str(export["filters"]["address"]))
        grant = await grants.require_grant(
            store, caller, "log reidentify", grants.REIDENTIFY, purpose=purpose,
            what=f"re-identifying {pseudonym} of export {export_id}", addresses=scope,
            targets=targets, hint="for the address behind it, or the address the export is"
                                  " filtered to: mailwarden access request --address ADDR")
        await store.audit("log reidentify", targets=[*targets, address],
                          detail={**purpose.detail(), "result": "found",
                                  "grant": grant["id"] if grant else None,
                                  "export_user": export["user"]})
        click.echo(address)
        return 0

    run_with_store(ctx, body)


# ------------------------------------------------------------------- verify


@log_group.command("verify")
@config_option
@click.pass_context
def verify_cmd(ctx: click.Context) -> None:
    """Verify the tamper-evidence chains of the log (and the audit trail).

    One line per chain; exit 1 on any break, naming the first bad record
    (seq, queue id, time).
    """
    run_with_store(ctx, _verify)


async def _verify(store: Store, config: Config) -> int:
    results = [await logmod.verify(store), await logmod.verify_audit(store)]
    for r in results:
        click.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.message}")
    return 0 if all(r.ok for r in results) else 1


# -------------------------------------------------------------------- stats


@log_group.command("stats")
@config_option
@click.option("--since", type=logmod.When(), help="From this date/time (ISO 8601, UTC default).")
@click.option("--until", type=logmod.When(end=True), help="Up to this date/time.")
@click.option("--address", metavar="A", help="Only this address.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def stats_cmd(ctx: click.Context, since: datetime | None, until: datetime | None,
              address: str | None, as_json: bool) -> None:
    """Per-address monthly counts of messages and of personal messages.

    Counts only, never content (the policy's "excessive personal use"
    question).  Audited like an export.
    """
    query = _query(since, until, address, None)

    async def body(store: Store, config: Config) -> int:
        return await _stats(store, query, as_json)

    run_with_store(ctx, body)


async def _stats(store: Store, query: logmod.LogQuery, as_json: bool) -> int:
    try:
        query = dataclasses.replace(query, up_to=await logmod.last_seq(store))
        await store.audit("log stats", targets=[query.address] if query.address else [],
                          filters=query.filters(), detail={"up_to_seq": query.up_to})
        rows = await logmod.stats(store, query)
    except StoreError as exc:
        _err(str(exc))
        return 1
    if as_json:
        for r in rows:
            click.echo(json.dumps(r._asdict(), ensure_ascii=False))
    elif sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table("month", "address", "messages", "personal")
        for r in rows:
            table.add_row(r.month, r.address, str(r.messages), str(r.personal))
        Console().print(table)
    else:
        width = max((len(r.address) for r in rows), default=7)
        click.echo(f"{'month':7}  {'address':{width}}  {'messages':>8}  {'personal':>8}")
        for r in rows:
            click.echo(f"{r.month:7}  {r.address:{width}}  {r.messages:>8}  {r.personal:>8}")
    return 0

