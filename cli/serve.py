"""The ``mailwarden`` command.

Exit status everywhere: 0 success, 1 failure or a check that failed, 2 usage
or configuration error (one line on stderr naming the problem).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import click

from gateway.config import Config, ConfigError, load_config, resolve_path

log = logging.getLogger("mailwarden")


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


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"mailwarden: {message}", err=True)
    sys.exit(code)


def get_config(ctx: click.Context) -> Config:
    """Load the config named by --config (cached on the context); exit 2 on error."""
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        path = resolve_path(obj.get("config_path"))
        try:
            obj["config"] = load_config(path)
        except ConfigError as exc:
            fail(str(exc))
    return obj["config"]


def run(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return asyncio.run(coro_fn())


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@config_option
@click.version_option(package_name="mailwarden")
@click.pass_context
def main(ctx: click.Context) -> None:
    """mailwarden: an email gateway filter that enforces the organisation's
    email acceptable-use policy inline in the mail flow.

    The MTA hands every message to `mailwarden serve` over SMTP; mailwarden
    scans it (ClamAV), checks attachment true types, warns on external
    attachments, tags personal mail and logs headers only, then relays, holds
    or refuses it.  IT reviews held mail with `mailwarden quarantine`,
    auditors export the log with `mailwarden log export`.
    """
    ctx.ensure_object(dict)


@main.command()
@config_option
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.pass_context
def serve(ctx: click.Context, log_level: str) -> None:
    """Run the gateway in the foreground.

    SIGTERM/SIGINT: stop accepting, finish sessions in flight (bounded by
    gateway.drain_timeout), exit 0.  SIGHUP: reload the config; an invalid new
    config is logged and the old one kept.
    """
    config = get_config(ctx)
    setup_logging(log_level)
    sys.exit(run(lambda: _serve(config)))


async def _serve(config: Config) -> int:
    from gateway.server import Gateway
    from quarantine.store import Store, StoreError

    try:
        store = await Store.open(
            config.store.path,
            batch_size=config.store.log_batch_size,
            flush_interval=config.store.log_flush_interval,
        )
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    store.start_log_writer()
    observers: list[Any] = []
    metrics_server = None
    if config.gateway.metrics_listen:
        from gateway.metrics import start_metrics

        try:
            metrics, metrics_server = await start_metrics(config, store)
        except OSError as exc:
            log.error("cannot listen on %s for metrics: %s", config.gateway.metrics_listen, exc)
            await store.close()
            return 1
        observers.append(metrics)
    gateway = Gateway(config, store=store, observers=observers)
    if metrics_server is not None:
        metrics.attach(gateway)
    try:
        await gateway.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.gateway.listen, exc)
        await store.close()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        async def reload() -> None:
            try:
                new = load_config(config.path)
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)
                return
            await gateway.reload(new)

        t = loop.create_task(reload())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    purge_task = loop.create_task(_purge_loop(gateway, store))
    _sd_notify("READY=1")
    log.info("mailwarden ready (pid %d)", os.getpid())
    await stop.wait()
    _sd_notify("STOPPING=1")
    log.info("stopping: draining sessions in flight")
    purge_task.cancel()
    await gateway.stop()
    if metrics_server is not None:
        metrics_server.close()
    await store.close()
    log.info("stopped")
    return 0


async def _purge_loop(gateway: Any, store: Any) -> None:
    """Apply retention on a schedule while serving (see quarantine/retention.py)."""
    try:
        from quarantine.retention import purge
    except ImportError:  # retention not available in this build
        return
    while True:
        await asyncio.sleep(gateway.config.store.purge_interval)
        try:
            await purge(store, gateway.config, dry_run=False, command="purge (scheduled)")
        except Exception:
            log.exception("scheduled purge failed")


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about state changes; no-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    import socket

    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


@main.command()
@config_option
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the config and reach everything the gateway needs.

    One line per check (config and chain, each filter's own checks such as
    clamd PING/VERSION/signature date, the next hop's EHLO, the store); exit 1
    if any fails.  WARN lines (e.g. clamd.conf's StreamMaxLength below
    gateway.max_message_size) do not change the exit status.
    """
    config = get_config(ctx)
    sys.exit(run(lambda: _check(config)))


async def _check(config: Config) -> int:
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from filters.base import FilterContext
    from gateway.pipeline import build_chain
    from gateway.relay import NextHopFailure, Relay
    from quarantine.store import Store, StoreError

    ok = True

    def line(good: bool, text: str) -> None:
        nonlocal ok
        ok = ok and good
        click.echo(f"{'ok  ' if good else 'FAIL'} {text}")

    line(True, f"config {config.path}: chain = {', '.join(config.chain) or '(empty)'}")
    executor = ThreadPoolExecutor(max_workers=2)
    ctx = FilterContext(
        hostname=config.gateway.hostname,
        internal_domains=config.gateway.internal_domains,
        executor=executor,
        clock=lambda: datetime.now(UTC),
        max_message_size=config.gateway.max_message_size,
    )
    try:
        chain = build_chain(config, ctx)
    except Exception as exc:
        line(False, f"filters: {exc}")
        chain = []
    for f in chain:
        health = getattr(f, "health", None)
        if health is None:
            continue
        try:
            results = await health()
        except Exception as exc:
            results = (False, f"{exc.__class__.__name__}: {exc}")
        if isinstance(results, tuple):
            results = [results]
        for good, text in results:
            line(good, f"{f.name}: {text}")
        conf_check = getattr(f, "clamd_conf_check", None)
        if conf_check is not None:
            warning = conf_check()
            if warning:
                # Reported, not fatal: the operator decides (e.g. a remote clamd
                # whose local clamd.conf is not the one in use).
                click.echo(f"WARN {f.name}: {warning}")
        await f.aclose()
    relay = Relay(config.gateway.next_hop, timeout=10, helo_name=config.gateway.hostname)
    try:
        await relay._connect()
        line(True, f"next hop {config.gateway.next_hop}: EHLO ok")
    except NextHopFailure as exc:
        line(False, f"next hop {config.gateway.next_hop}: {exc.reason}")
    finally:
        await relay.quit()
    try:
        store = await Store.open(config.store.path)
        good, text = await store.check()
        line(good, text)
        await store.close()
    except StoreError as exc:
        line(False, str(exc))
    executor.shutdown(wait=False)
    return 0 if ok else 1


def _mount_subcommands() -> None:
    """Attach the store-side command groups (quarantine, log, audit, ...)."""
    try:
        from quarantine.cli import register
    except ImportError:
        return
    register(main)


if __name__ == "__main__":  # pragma: no cover
    # `python -m gateway.cli`: run the real module (not this __main__ copy), so
    # that the subcommand modules, which import gateway.cli, see one module.
    from gateway.cli import main as _main

    _main()
else:
    # Last, once every name above exists: the subcommand modules import them.
    _mount_subcommands()
