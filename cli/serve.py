"""``mailwarden serve`` and ``mailwarden check``: the two commands that build
the filter chain (and so import the filters and their scanners: libmagic,
pyclamd, dkimpy, olefile, ...).  Those imports happen inside the commands,
never when this module is imported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from cli.common import Command, config_option, fail, get_config, run_with_store, setup_logging
from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from quarantine.store import Store

log = logging.getLogger("mailwarden")


@click.command(cls=Command)
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
    get_config(ctx, chain=True)
    setup_logging(log_level)
    run_with_store(ctx, _serve, serving=True)


async def _serve(store: Store, config: Config) -> int:
    from gateway.server import Gateway

    observers: list[Any] = []
    metrics_server = None
    if config.gateway.metrics_listen:
        from gateway.metrics import start_metrics

        try:
            metrics, metrics_server = await start_metrics(config, store)
        except OSError as exc:
            log.error("cannot listen on %s for metrics: %s", config.gateway.metrics_listen, exc)
            return 1
        observers.append(metrics)
    gateway = Gateway(config, store=store, observers=observers)
    if metrics_server is not None:
        metrics.attach(gateway)
    try:
        await gateway.start()
    except OSError as exc:
        # The message names the key (gateway.listen or milter.listen).
        log.error("cannot listen on %s", exc.strerror or exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[Any]] = set()

    async def reload() -> tuple[bool, str]:
        """SIGHUP and `mailwarden reload`: the config file again, or the old one kept."""
        try:
            new = load_config(config.path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return False, f"reload refused, keeping the running config: {exc}"
        await gateway.reload(new)
        return True, f"configuration reloaded from {config.path}"

    control = None
    if config.access.enabled:
        from cli import main as root
        from cli.control import ControlServer

        control = ControlServer(root=root, config=lambda: gateway.config, store=store,
                                reload=reload)
        try:
            await control.start()
        except OSError as exc:
            log.error("cannot listen on the control socket %s: %s", config.access.control_socket,
                      exc.strerror or exc)
            await gateway.stop()
            if metrics_server is not None:
                metrics_server.close()
            return 1

    def on_hup() -> None:
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
    if control is not None:
        await control.stop()
    await gateway.stop()
    if metrics_server is not None:
        metrics_server.close()
    log.info("stopped")
    return 0


async def _purge_loop(gateway: Any, store: Any) -> None:
    """Apply retention on a schedule while serving (see quarantine/retention.py)."""
    from quarantine.retention import purge

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


@click.command("reload", cls=Command)
@config_option
@click.pass_context
def reload_cmd(ctx: click.Context) -> None:
    """Make the running daemon re-read its config file (as SIGHUP does).

    Works through the control socket (``[access]``; role operator); an
    invalid config is refused (exit 1, the running one kept).  Without
    ``[access]``: ``systemctl reload mailwarden`` (SIGHUP).
    """
    hook = ctx.ensure_object(dict).get("reload")
    if hook is None:
        fail("reload talks to a running mailwarden serve through its control socket"
             " ([access]); without it send SIGHUP (systemctl reload mailwarden)", 2)
    ok, message = hook()
    if not ok:
        fail(message, 1)
    click.echo(message)


@click.command(cls=Command)
@config_option
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the config and reach everything the gateway needs.

    One line per check (config and chain, each filter's own checks such as
    clamd PING/VERSION/signature date, the next hop's EHLO, the store); exit 1
    if any fails.  WARN lines (e.g. clamd.conf's StreamMaxLength below
    gateway.max_message_size) do not change the exit status.
    """
    config = get_config(ctx, chain=True)
    sys.exit(asyncio.run(_check(config)))


async def _check(config: Config) -> int:
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from filters.base import FilterContext
    from gateway.pipeline import build_chain
    from gateway.relay import NextHopFailure, Relay
    from quarantine.store import StoreError, open_store

    ok = True

    def line(good: bool, text: str) -> None:
        nonlocal ok
        ok = ok and good
        click.echo(f"{'ok  ' if good else 'FAIL'} {text}")

    line(True, f"config {config.path}: chain = {', '.join(config.chain) or '(empty)'}")
    gw, milter = config.gateway, config.milter
    click.echo(f"ok   SMTP proxy: {f'gateway.listen = {gw.listen}' if gw.listen else 'off'}")
    if milter.listen:
        where = milter.listen
        if where.startswith("unix:"):
            parent = os.path.dirname(where[5:])
            line(os.path.isdir(parent), f"milter: listen = {where} (quarantine = "
                 f"{milter.quarantine}, progress every {milter.progress_interval:g} s)"
                 + ("" if os.path.isdir(parent) else f": directory {parent} missing"))
        else:
            line(True, f"milter: listen = {where} (quarantine = {milter.quarantine},"
                       f" progress every {milter.progress_interval:g} s)")
    else:
        click.echo("ok   milter: off")
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
        if f.health_check is not None:
            try:
                good, text = await f.health()
            except Exception as exc:
                good, text = False, f"{exc.__class__.__name__}: {exc}"
            line(good, f"{f.name}: {text}")
        warning = f.conf_check()
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
    if config.store.key_file:
        from quarantine.crypto import KekError, load_kek

        try:
            kek = load_kek(config.store.key_file)
            line(True, f"key file {config.store.key_file}: readable, mode ok,"
                       f" fingerprint {kek.fingerprint}")
        except KekError as exc:
            line(False, str(exc))
    try:
        store = await open_store(config.store, create=True)
        good, text = await store.check()
        line(good, text)
        await store.close()
    except StoreError as exc:
        line(False, str(exc))
    executor.shutdown(wait=False)
    return 0 if ok else 1
