"""Prometheus metrics and a health check over HTTP (``gateway.metrics_listen``).

Operators watch a mail filter the way they watch their MTA: is it up, is
mail flowing, what happens to it, and is anything it depends on failing.
``mailwarden serve`` with ``metrics_listen = "127.0.0.1:9125"`` serves:

``GET /metrics``
    Prometheus text format (version 0.0.4), from a :class:`CollectorRegistry`
    owned by this gateway (prometheus-client's global registry is never used):

    - ``mailwarden_messages_total{direction,disposition}``: messages finished
      (relayed, quarantined, rejected, tempfailed, next-hop-refused);
    - ``mailwarden_message_duration_seconds``: end of DATA to the reply;
    - ``mailwarden_filter_verdicts_total{filter,outcome}``: every filter's
      verdict on every message;
    - ``mailwarden_filter_duration_seconds{filter}``: time each filter took;
    - ``mailwarden_clamd_errors_total``: messages clamd could not scan (down,
      timeout, error, limits), i.e. the clamav filter's "unscanned" or
      tempfail verdicts;
    - ``mailwarden_next_hop_errors_total{stage}``: next hop unreachable, timed
      out or lost (mailwarden's ``451 4.4.x``) at DATA, and at MAIL/RCPT when
      the server reports those through :meth:`Metrics.next_hop_failed`;
    - ``mailwarden_sessions_in_flight``: SMTP sessions open now;
    - ``mailwarden_next_hop_idle_connections`` and
      ``mailwarden_next_hop_connections_reused``: next-hop connections in the
      cache now, and sessions that started on a cached one since start;
    - ``mailwarden_quarantine_items`` and ``mailwarden_quarantine_bytes``:
      messages held, read from the store at a scrape when the cached value is
      5 s old or a message was held since;
    - ``mailwarden_log_write_failures``: log batches the store could not write;
    - ``mailwarden_start_time_seconds``: process start (unix time).

``GET /healthz``
    JSON: ``{"status": "ok"|"fail", "checks": {"clamd": ..., "next_hop": ...,
    "store": ...}}``, each check ``{"ok": bool, "detail": "..."}``; HTTP 200
    when every check passes, 503 otherwise.  clamd is asked (PING/VERSION)
    through the clamav filter's ``health()`` when ``clamav`` is in the chain;
    the next hop must answer EHLO; the store must take a durable write.

The HTTP side is deliberately tiny: ``asyncio.start_server`` on the gateway's
own loop (no threads, unlike prometheus-client's ``start_http_server``), one
GET or HEAD per connection, ``Connection: close``.  It is meant for loopback
or a management network: it has no authentication, so do not expose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from filters.base import Filter, Outcome, ScanState
from gateway.config import Config, parse_hostport
from gateway.message import Direction, Mail
from gateway.relay import NextHopFailure, Relay

if TYPE_CHECKING:
    from gateway.pipeline import Result

log = logging.getLogger("mailwarden.metrics")

#: Dispositions the pipeline reports (gateway.pipeline.DISPOSITIONS).
DISPOSITIONS = ("relayed", "quarantined", "rejected", "tempfailed", "next-hop-refused")
#: The format ``generate_latest`` writes (Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds the quarantine gauges are cached between store queries.
QUARANTINE_CACHE_SECONDS = 5.0
#: Bound on each /healthz check (seconds); clamav's own health() is 5 s + 1.
HEALTH_TIMEOUT = 8.0
#: Bounds on the HTTP request a client may send.
MAX_HEADER_LINES = 100
REQUEST_TIMEOUT = 10.0

FILTER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 90.0)
MESSAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            503: "Service Unavailable"}


def is_next_hop_error(reply: str) -> bool:
    """True for mailwarden's own "next hop unavailable/timed out/lost" replies (451 4.4.x)."""
    return reply.startswith("451 4.4.")


def is_clamd_error(verdict: Any) -> bool:
    """True when a scanner could not scan (clamd down, timeout, error, limits)."""
    return verdict.scan is ScanState.UNSCANNED


class Metrics:
    """The gateway's metrics (an observer of the pipeline) and its HTTP endpoints.

    ``message_done`` is called by the pipeline for every finished message;
    ``attach`` gives access to the running gateway (sessions, current config,
    chain) for the gauges and /healthz.
    """

    def __init__(
        self,
        config: Config,
        store: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        quarantine_cache_seconds: float = QUARANTINE_CACHE_SECONDS,
    ) -> None:
        self.config = config
        self.store = store
        self.gateway: Any = None
        self.clock = clock
        self.quarantine_cache_seconds = quarantine_cache_seconds
        self._quarantine_at: float | None = None
        self._quarantine_lock = asyncio.Lock()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter(
            "mailwarden_messages", "Messages finished, by direction and disposition.",
            ("direction", "disposition"), registry=r,
        )
        self.message_seconds = Histogram(
            "mailwarden_message_duration_seconds",
            "Seconds from the end of DATA to the reply (filter chain plus disposition).",
            buckets=MESSAGE_BUCKETS, registry=r,
        )
        self.verdicts = Counter(
            "mailwarden_filter_verdicts", "Verdicts returned by each filter, by outcome.",
            ("filter", "outcome"), registry=r,
        )
        self.filter_seconds = Histogram(
            "mailwarden_filter_duration_seconds", "Seconds each filter took per message.",
            ("filter",), buckets=FILTER_BUCKETS, registry=r,
        )
        self.clamd_errors = Counter(
            "mailwarden_clamd_errors",
            "Messages clamd could not scan (unreachable, timeout, error, limits exceeded).",
            registry=r,
        )
        self.next_hop_errors = Counter(
            "mailwarden_next_hop_errors",
            "Next hop unreachable, timed out or connection lost (451 4.4.x), by SMTP stage.",
            ("stage",), registry=r,
        )
        self.sessions = Gauge(
            "mailwarden_sessions_in_flight", "SMTP client sessions open now.", registry=r
        )
        self.sessions.set_function(self._session_count)
        self.next_hop_idle = Gauge(
            "mailwarden_next_hop_idle_connections",
            "Idle next-hop connections kept for the next session.", registry=r,
        )
        self.next_hop_idle.set_function(lambda: float(self._cache_stat("idle_count")))
        self.next_hop_reused = Gauge(
            "mailwarden_next_hop_connections_reused",
            "Sessions that started on a cached next-hop connection since start.", registry=r,
        )
        self.next_hop_reused.set_function(lambda: float(self._cache_stat("reused")))
        self.quarantine_items = Gauge(
            "mailwarden_quarantine_items", "Messages held in quarantine.", registry=r
        )
        self.quarantine_bytes = Gauge(
            "mailwarden_quarantine_bytes", "Size of the messages held in quarantine.", registry=r
        )
        self.log_failures = Gauge(
            "mailwarden_log_write_failures",
            "Header-log batches the store could not write since start.", registry=r,
        )
        self.log_failures.set_function(lambda: float(getattr(self.store, "log_failures", 0)))
        self.start_time = Gauge(
            "mailwarden_start_time_seconds", "Start time of the process (unix time).", registry=r
        )
        self.start_time.set(time.time())
        # Known label values start at 0 so that rate() works from the first scrape.
        for direction in Direction:
            for disposition in DISPOSITIONS:
                self.messages.labels(str(direction), disposition)
        self.next_hop_errors.labels("data")
        self._init_filters(config.chain)

    def _init_filters(self, chain: tuple[str, ...]) -> None:
        for name in chain:
            for outcome in Outcome:
                self.verdicts.labels(name, outcome.name.lower())

    # ------------------------------------------------------------- observers

    def attach(self, gateway: Any) -> None:
        """Give the metrics the running gateway (sessions, config, chain)."""
        self.gateway = gateway

    @property
    def current_config(self) -> Config:
        """The running gateway's config (it changes on reload), else the initial one."""
        return self.gateway.config if self.gateway is not None else self.config

    def _cache_stat(self, name: str) -> int:
        cache = getattr(self.gateway, "next_hop_cache", None)
        if cache is None:
            return 0
        value = getattr(cache, name)
        return int(value() if callable(value) else value)

    def _session_count(self) -> float:
        return float(len(self.gateway.sessions)) if self.gateway is not None else 0.0

    def message_done(self, mail: Mail, result: Result) -> None:
        """Count one finished message (called by the pipeline)."""
        self.messages.labels(str(mail.direction), result.disposition).inc()
        self.message_seconds.observe(result.elapsed)
        for v in result.verdicts:
            self.verdicts.labels(v.filter, v.outcome.name.lower()).inc()
            if is_clamd_error(v):
                self.clamd_errors.inc()
        for name, seconds in result.filter_times.items():
            self.filter_seconds.labels(name).observe(seconds)
        if result.disposition == "tempfailed" and is_next_hop_error(result.reply):
            self.next_hop_errors.labels("data").inc()
        if result.disposition == "quarantined":
            self._quarantine_at = None  # the held count changed: re-read at the next scrape

    def next_hop_failed(self, stage: str) -> None:
        """Count a next-hop failure outside DATA (``stage`` = "mail" or "rcpt")."""
        self.next_hop_errors.labels(stage).inc()

    # -------------------------------------------------------------- /metrics

    async def refresh_quarantine(self) -> None:
        """Re-read the quarantine size from the store if the cached value is stale."""
        async with self._quarantine_lock:
            now = self.clock()
            if (self._quarantine_at is not None
                    and now - self._quarantine_at < self.quarantine_cache_seconds):
                return
            self._quarantine_at = now
            try:
                row = await self.store.quarantine_totals()
            except Exception as exc:
                log.warning("metrics: cannot read the quarantine size: %s", exc)
                return
            if row is not None:
                self.quarantine_items.set(row[0])
                self.quarantine_bytes.set(row[1])

    async def render(self) -> bytes:
        """The Prometheus text exposition of this gateway's registry."""
        await self.refresh_quarantine()
        return generate_latest(self.registry)

    # -------------------------------------------------------------- /healthz

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Run every health check concurrently; (all ok, JSON-able report)."""
        config = self.current_config
        checks: dict[str, Awaitable[tuple[bool, str]]] = {}
        for f in self._filters():
            if f.health_check is not None:
                checks[f.health_check] = f.health()
        checks["next_hop"] = self._check_next_hop(config)
        checks["store"] = self._check_store()
        names = list(checks)
        results = await asyncio.gather(
            *(_bounded(checks[n], HEALTH_TIMEOUT, n) for n in names)
        )
        report = {n: {"ok": ok, "detail": detail} for n, (ok, detail) in zip(names, results, strict=True)}
        ok = all(r["ok"] for r in report.values())
        return ok, {
            "status": "ok" if ok else "fail",
            "checks": report,
            "sessions_in_flight": int(self._session_count()),
        }

    def _filters(self) -> list[Filter]:
        if self.gateway is None:
            return []
        return list(self.gateway.state.pipeline.filters)

    async def _check_next_hop(self, config: Config) -> tuple[bool, str]:
        gw = config.gateway
        relay = Relay(gw.next_hop, timeout=min(5.0, gw.next_hop_timeout), helo_name=gw.hostname)
        try:
            await relay._connect()
        except NextHopFailure as exc:
            return False, f"next hop {gw.next_hop}: {exc.reason}"
        finally:
            await relay.quit()
        return True, f"next hop {gw.next_hop}: EHLO ok"

    async def _check_store(self) -> tuple[bool, str]:
        if self.store is None:
            return False, "no store"
        ok, detail = await self.store.check()
        return bool(ok), str(detail)

    # ------------------------------------------------------------------ HTTP

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one HTTP/1.x request (GET or HEAD) and close the connection."""
        try:
            try:
                method, path = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError):
                await _respond(writer, 400, b"bad request\n", "text/plain; charset=utf-8")
                return
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"only GET and HEAD\n", "text/plain; charset=utf-8",
                               extra={"Allow": "GET, HEAD"})
                return
            head = method == "HEAD"
            if path == "/metrics":
                body = await self.render()
                await _respond(writer, 200, body, CONTENT_TYPE, head=head)
            elif path == "/healthz":
                ok, report = await self.health()
                body = (json.dumps(report, sort_keys=True) + "\n").encode()
                await _respond(writer, 200 if ok else 503, body, "application/json", head=head)
            elif path == "/":
                body = b"mailwarden: /metrics (Prometheus), /healthz (JSON)\n"
                await _respond(writer, 200, body, "text/plain; charset=utf-8", head=head)
            else:
                await _respond(writer, 404, b"not found\n", "text/plain; charset=utf-8", head=head)
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def _bounded(check: Awaitable[tuple[bool, str]], timeout: float, name: str) -> tuple[bool, str]:
    try:
        ok, detail = await asyncio.wait_for(check, timeout)
    except TimeoutError:
        return False, f"{name}: no answer within {timeout:g} s"
    except Exception as exc:
        return False, f"{name}: {exc.__class__.__name__}: {exc}"
    return bool(ok), str(detail)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read the request line and headers; returns (method, path)."""
    line = await reader.readline()
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    for _ in range(MAX_HEADER_LINES):
        header = await reader.readline()
        if not header:
            raise ValueError("connection closed in headers")
        if header in (b"\r\n", b"\n"):
            break
    else:
        raise ValueError("too many header lines")
    return parts[0].upper(), urlsplit(parts[1]).path


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    *,
    head: bool = False,
    extra: dict[str, str] | None = None,
) -> None:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Cache-Control": "no-store",
        "Connection": "close",
        **(extra or {}),
    }
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()


async def start_metrics(config: Config, store: Any) -> tuple[Metrics, asyncio.Server]:
    """Create the metrics and listen on ``gateway.metrics_listen``.

    Raises OSError when the address cannot be bound.  ``gateway.metrics_listen``
    is read at start only (a reload does not move the endpoint).
    """
    metrics = Metrics(config, store)
    host, port = parse_hostport(config.gateway.metrics_listen)
    server = await asyncio.start_server(metrics.handle, host=host, port=port)
    sock = server.sockets[0].getsockname()
    log.info("metrics on http://%s:%s/metrics and /healthz", sock[0], sock[1])
    return metrics, server
