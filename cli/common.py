"""What every ``mailwarden`` command shares.

* ``--config PATH`` (:data:`config_option`) and :func:`get_config`;
* :func:`fail`: one line on stderr, then exit;
* :class:`Command` and :class:`Group`: usage errors as one line
  (``mailwarden: <command>: <problem> (see --help)``), exit 2;
* :func:`run_with_store`: the one store runner;
* argument checks and output helpers for the commands on kept data
  (:func:`need_reason`, :func:`check_qid`, :func:`check_address`,
  :func:`json_line`, ...);
* :func:`setup_logging` for ``serve``.

Exit status everywhere: 0 success, 1 failure or a check that failed, 2 usage
or configuration error (one line on stderr naming the problem).

Imports stay light here: nothing that scans mail (the filters and their
scanners are imported by ``serve`` and ``check`` only, when they build the
chain).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import click

from gateway.config import Config, ConfigError, load_config, resolve_path

if TYPE_CHECKING:
    from quarantine.store import Store

#: The body a command runs with the store open: returns the exit status
#: (``None`` counts as 0).
StoreBody = Callable[["Store", Config], Awaitable[int | None]]


# ------------------------------------------------------------------ errors


def fail(message: str, code: int = 2) -> NoReturn:
    """``mailwarden: <message>`` on stderr, then exit ``code`` (2: usage or config)."""
    click.echo(f"mailwarden: {message}", err=True)
    sys.exit(code)


class _OneLineUsage(click.UsageError):
    """A usage error shown as one line (``mailwarden: <command>: <problem>``)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"mailwarden: {self.format_message()}", err=True)


def _command_name(ctx: click.Context | None, info_name: str | None = None) -> str:
    """``quarantine show``: the command's path below ``mailwarden``."""
    if ctx is None:  # the root group itself: its name is the program's
        return ""
    names: list[str] = [info_name] if info_name else []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed([n for n in names if n]))


#: click >= 8.2: a group run with nothing after it shows its help (exit 2).
_HELP_REQUEST: tuple[type[Exception], ...] = tuple(
    filter(None, [getattr(click.exceptions, "NoArgsIsHelpError", None)])
)


def _one_line(exc: click.UsageError, name: str) -> click.UsageError:
    if isinstance(exc, (_OneLineUsage, *_HELP_REQUEST)):
        return exc
    out = _OneLineUsage(f"{name + ': ' if name else ''}{exc.format_message()} (see --help)")
    out.exit_code = 2
    return out


class _OneLineParse:
    """Parsing errors (bad options, missing arguments) as one line, exit 2."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(  # type: ignore[misc,no-any-return]
                info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(parent, info_name)) from None


class Command(_OneLineParse, click.Command):
    """A command whose usage errors (parsing, and those its body raises) are one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(ctx)) from None


class Group(_OneLineParse, click.Group):
    """A group whose usage errors (and those of its commands and subgroups) are one line."""

    command_class = Command
    group_class = type

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(ctx)) from None

    def invoke(self, ctx: click.Context) -> Any:
        # "Missing command." (options but no subcommand); the subcommands'
        # own errors are one line already and pass through unchanged.
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc, _command_name(ctx)) from None


def check_one_line(group: click.Group, path: str = "mailwarden") -> list[str]:
    """Commands below ``group`` that would print click's multi-line usage
    block (not a :class:`Command` or :class:`Group`): for the tests."""
    bad = [] if isinstance(group, Group) else [path]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            bad += check_one_line(cmd, f"{path} {name}")
        elif not isinstance(cmd, Command):
            bad.append(f"{path} {name}")
    return bad


# ------------------------------------------------------------------ config


def _store_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(dict)["config_path"] = value


#: ``--config PATH`` on the group and on every command.
config_option = click.option(
    "--config",
    metavar="PATH",
    callback=_store_config,
    expose_value=False,
    help="Config file (default: $MAILWARDEN_CONFIG, ./config.toml, /etc/mailwarden/config.toml).",
)


def get_config(ctx: click.Context, *, chain: bool = False) -> Config:
    """The config named by --config, loaded once per command; exit 2 on error.

    ``chain=True`` (``serve``, ``check``) also builds every filter's own
    settings, which imports the filters and their scanners; the other
    commands check the filter names only (see :func:`gateway.config.load_config`).
    """
    obj = ctx.ensure_object(dict)
    if "config" in obj:
        return obj["config"]
    key = "config" if chain else "config_without_filters"
    if key not in obj:
        path = resolve_path(obj.get("config_path"))
        try:
            obj[key] = load_config(path, with_filters=chain)
        except ConfigError as exc:
            fail(str(exc))
    return obj[key]


# ------------------------------------------------------------ store runner


def run_with_store(ctx: click.Context, body: StoreBody, *, serving: bool = False) -> NoReturn:
    """Open the store, run ``body(store, config)``, close the store, exit with
    the body's status.  Every command that opens the store goes through here.

    Every command but ``serve`` refuses a missing store rather than create an
    empty one.  ``serving`` (``serve``): create the store when it is missing,
    open it with ``[store]``'s log batching, start the header log's writer,
    and report an error as a log line (``... ERROR mailwarden: ...``), like
    everything else ``serve`` says.

    Errors end the command with one line on stderr, never a traceback: a
    :class:`~quarantine.access.Denied` (a grant or finer rule missing:
    audited where it was decided, ``quarantine.grants.refuse``; exit 1); a
    :class:`~quarantine.review.Refusal` with its own status (2: the command
    line lacks something; 1: the store or item does not allow it); a store
    that is missing, unreadable or broken exits 1: the backend raises
    :class:`~quarantine.store.StoreError` (NotFound and OnHold are kinds of
    it) for every database error, never its driver's exceptions; an OS error
    (a message file, an output file) exits 1 too.  A reader that went away
    (``| head``) ends it quietly with status 1.
    """
    from quarantine.access import Denied
    from quarantine.review import Refusal
    from quarantine.store import NotFound, OnHold, StoreError, open_store

    config = get_config(ctx)

    def failed(message: str, code: int) -> NoReturn:
        if serving:
            logging.getLogger("mailwarden").error("%s", message)
            sys.exit(code)
        fail(message, code)

    async def go() -> int:
        tuning: dict[str, Any] = {}
        if serving:
            tuning = {"batch_size": config.store.log_batch_size,
                      "flush_interval": config.store.log_flush_interval}
        store = await open_store(config.store, create=serving, **tuning)
        try:
            if serving:
                store.start_log_writer()
            return await body(store, config) or 0
        finally:
            await store.close()

    try:
        code = asyncio.run(go())
    except Refusal as exc:
        failed(exc.message, exc.code)
    except Denied as exc:
        # refused for lack of a role or grant: audited where it was decided
        failed(exc.message, 1)
    except NotFound as exc:
        failed(f"no quarantine item {exc}", 1)
    except OnHold as exc:
        failed(f"quarantine item {exc} is under legal hold; unhold it first", 1)
    except StoreError as exc:
        failed(str(exc), 1)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:
        failed(f"{exc.strerror or exc}: {exc.filename or config.store.path}", 1)
    sys.exit(code)


# ------------------------------------------- arguments and output (kept data)


def need_reason(reason: str | None, what: str, *, required: bool = True) -> str:
    """The reason, whitespace-normalised; exit 2 when it is required and blank."""
    from quarantine.review import clean_text

    text = clean_text(" ".join((reason or "").split()))
    if required and not text:
        fail(f"{what} needs --reason TEXT (why; recorded in the audit trail)", 2)
    return text


def check_qid(qid: str) -> str:
    """A quarantine id as :func:`quarantine.files.check_id` accepts it; exit 2 otherwise."""
    from quarantine import files

    try:
        return files.check_id(qid)
    except files.StorePathError as exc:
        fail(str(exc), 2)


def check_address(address: str) -> str:
    """An address as :func:`quarantine.review.normalize_address` gives it; exit 2 otherwise."""
    from quarantine.review import normalize_address

    try:
        return normalize_address(address)
    except ValueError as exc:
        fail(str(exc), 2)


def console() -> Any:
    """A rich console for tables: no markup, so message text cannot style itself."""
    from rich.console import Console

    from quarantine.access import current

    tty = sys.stdout.isatty()
    width = None if tty else 250
    caller = current()
    if caller.enforced and tty:
        # Through the control socket: the client's terminal, not the daemon's.
        width = caller.width or 80
    return Console(markup=False, highlight=False, emoji=False, width=width)


def short(text: str | None, width: int) -> str:
    """One line of at most ``width`` characters, control characters replaced."""
    from quarantine.review import clean_text

    text = clean_text(" ".join((text or "").split()))
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def short_time(value: str) -> str:
    """``2026-11-23 12:00:01`` from a stored ISO time."""
    return value[:19].replace("T", " ")


def iso_or_none(dt: datetime | None) -> str | None:
    from quarantine.store import iso

    return iso(dt) if dt is not None else None


def audit_detail(**extra: Any) -> dict[str, Any]:
    """Detail for audit rows: with SUDO_USER when run through sudo."""
    from quarantine.access import current

    detail = {k: v for k, v in extra.items() if v is not None}
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and os.getuid() == 0 and not current().enforced:
        detail["sudo_user"] = sudo_user
    return detail


def json_line(obj: Any) -> None:
    """One JSON object on one line of stdout (``--json``)."""
    click.echo(json.dumps(obj, ensure_ascii=False, sort_keys=False))


# ----------------------------------------------------------------- logging


class UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO: far too chatty for an operator.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
