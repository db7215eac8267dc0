"""gateway/metrics.py: counting, the quarantine gauge, /healthz and the tiny HTTP server.

The metrics get a real store and a real (recording) next hop; the gateway
they observe is reduced to the attributes the metrics read (sessions,
config, chain).  tests/integration/test_metrics.py runs the whole thing
in ``mailwarden serve``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from filters.base import BaseFilter, Reason, ScanState, Verdict
from gateway import replies
from gateway.message import Direction, Mail
from gateway.metrics import Metrics, start_metrics
from gateway.pipeline import Result
from quarantine.store import Store
from tests.support.harness import NextHop
from tests.support.harness import test_config as make_config


def mail(direction: Direction = Direction.INBOUND) -> Mail:
    return Mail(
        queue_id="Q1", mail_from="a@ext.test", rcpt_tos=("b@example.com",), raw=b"Subject: x\r\n\r\nx\r\n",
        client_addr="192.0.2.1", direction=direction, received=datetime.now(UTC),
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeFilter(BaseFilter):
    """A filter whose dependency check (``health_check = "clamd"``) answers ``health``."""

    def __init__(self, name: str, health: tuple[bool, str] | None = None) -> None:
        self.name = name  # type: ignore[misc]
        self._health = health
        if health is not None:
            self.health_check = "clamd"  # type: ignore[misc]

    async def health(self) -> tuple[bool, str]:
        assert self._health is not None
        return self._health


def fake_gateway(config: Any, filters: list[Any], sessions: int = 0) -> Any:
    return SimpleNamespace(
        config=config, sessions=set(range(sessions)),
        state=SimpleNamespace(pipeline=SimpleNamespace(filters=filters)),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "store")
    yield s
    await s.close()


async def test_message_done_counts_by_direction_disposition_and_filter(
    tmp_path: Path, store: Store
) -> None:
    config = make_config(tmp_path, "127.0.0.1:1", chain=["clamav", "personal"])
    m = Metrics(config, store)
    m.attach(fake_gateway(config, [], sessions=3))
    before = samples((await m.render()).decode())
    # known label values are there (at 0) before any mail
    assert before[("mailwarden_messages_total", (("direction", "outbound"), ("disposition", "relayed")))] == 0
    assert before[("mailwarden_filter_verdicts_total", (("filter", "clamav"), ("outcome", "tempfail")))] == 0

    clean = [Verdict.relay("clamav", scan=ScanState.CLEAN), Verdict.relay("personal")]
    m.message_done(mail(), Result("relayed", "250 ok", clean, elapsed=0.2,
                                  filter_times={"clamav": 0.03, "personal": 0.001}))
    down = [Verdict.tempfail("clamav", "clamd unreachable", Reason.SCANNER_UNAVAILABLE,
                             scan=ScanState.UNSCANNED), Verdict.relay("personal")]
    m.message_done(mail(Direction.OUTBOUND), Result("tempfailed", replies.SCANNER_UNAVAILABLE, down,
                                                    filter_times={"clamav": 5.0, "personal": 0.001}))
    m.message_done(mail(), Result("tempfailed", replies.NEXT_HOP_LOST, clean))
    m.message_done(mail(), Result("next-hop-refused", "554 5.7.1 no", clean))
    after = samples((await m.render()).decode())

    def msgs(direction: str, disposition: str) -> float:
        return after[("mailwarden_messages_total",
                      (("direction", direction), ("disposition", disposition)))]

    assert msgs("inbound", "relayed") == 1
    assert msgs("outbound", "tempfailed") == 1
    assert msgs("inbound", "tempfailed") == 1
    assert msgs("inbound", "next-hop-refused") == 1
    verdict = after[("mailwarden_filter_verdicts_total", (("filter", "clamav"), ("outcome", "relay")))]
    assert verdict == 3
    assert after[("mailwarden_filter_verdicts_total", (("filter", "clamav"), ("outcome", "tempfail")))] == 1
    assert after[("mailwarden_filter_duration_seconds_count", (("filter", "clamav"),))] == 2
    assert after[("mailwarden_filter_duration_seconds_bucket", (("filter", "clamav"), ("le", "0.05")))] == 1
    assert after[("mailwarden_message_duration_seconds_count", ())] == 4
    assert after[("mailwarden_clamd_errors_total", ())] == 1
    # only mailwarden's own "next hop" 451s count, not a next hop's 5xx
    assert after[("mailwarden_next_hop_errors_total", (("stage", "data"),))] == 1
    assert after[("mailwarden_sessions_in_flight", ())] == 3


async def test_quarantine_gauge_is_cached_but_refreshed_when_mail_is_held(
    tmp_path: Path, store: Store
) -> None:
    config = make_config(tmp_path, "127.0.0.1:1")
    now = [100.0]
    m = Metrics(config, store, clock=lambda: now[0])

    def held() -> tuple[float, float]:
        s = samples(generate())
        return s[("mailwarden_quarantine_items", ())], s[("mailwarden_quarantine_bytes", ())]

    def generate() -> str:
        from prometheus_client import generate_latest
        return generate_latest(m.registry).decode()

    raw = b"Subject: held\r\n\r\nbody\r\n"

    async def hold() -> str:
        return await store.quarantine(
            raw=raw, queue_id="Q", received=datetime.now(UTC),
            direction="inbound", client_addr="192.0.2.1", helo="h", mail_from="a@ext.test",
            rcpt_tos=["b@example.com"], headers={"subject": "held"}, reason="clamav",
            detail="Eicar", personal=False, verdicts=[],
        )

    await m.refresh_quarantine()
    assert held() == (0, 0)
    await hold()
    await m.refresh_quarantine()
    assert held() == (0, 0)  # cached for a few seconds
    now[0] += 6
    await m.refresh_quarantine()
    assert held() == (1, len(raw))
    await hold()
    m.message_done(mail(), Result("quarantined", "250 held", [Verdict.quarantine("clamav", "Eicar")]))
    await m.refresh_quarantine()
    assert held() == (2, 2 * len(raw))  # a held message invalidates the cache at once


async def test_healthz_reports_each_dependency(tmp_path: Path, store: Store) -> None:
    nh = NextHop()
    try:
        config = make_config(tmp_path, nh.address, chain=["clamav"])
        m = Metrics(config, store)
        m.attach(fake_gateway(config, [FakeFilter("clamav", (True, "clamd PONG"))]))
        ok, report = await m.health()
        assert ok and report["status"] == "ok"
        assert report["checks"]["clamd"] == {"ok": True, "detail": "clamd PONG"}
        assert report["checks"]["next_hop"]["ok"] is True
        assert "EHLO ok" in report["checks"]["next_hop"]["detail"]
        assert report["checks"]["store"]["ok"] is True

        nh.stop_listening()
        m.attach(fake_gateway(config, [FakeFilter("clamav", (False, "clamd: connection refused"))]))
        ok, report = await m.health()
        assert not ok and report["status"] == "fail"
        assert report["checks"]["clamd"]["ok"] is False
        assert report["checks"]["next_hop"]["ok"] is False
        assert "unreachable" in report["checks"]["next_hop"]["detail"]
        assert report["checks"]["store"]["ok"] is True
    finally:
        nh.stop()


async def test_healthz_without_clamav_in_the_chain_has_no_clamd_check(
    tmp_path: Path, store: Store
) -> None:
    nh = NextHop()
    try:
        config = make_config(tmp_path, nh.address, chain=["personal"])
        m = Metrics(config, store)
        m.attach(fake_gateway(config, [FakeFilter("personal")]))
        ok, report = await m.health()
        assert ok and set(report["checks"]) == {"next_hop", "store"}
    finally:
        nh.stop()


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def test_http_endpoints(tmp_path: Path, store: Store) -> None:
    nh = NextHop()
    config = make_config(tmp_path, nh.address, gateway={"metrics_listen": "127.0.0.1:0"})
    m, server = await start_metrics(config, store)
    m.attach(fake_gateway(config, []))
    port = server.sockets[0].getsockname()[1]
    try:
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert int(headers["Content-Length"]) == len(body)
        assert b"mailwarden_messages_total" in body

        status, headers, body = await http(port, b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["status"] == "ok"

        status, headers, body = await http(port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

        status, _, _ = await http(port, b"GET /nothing HTTP/1.1\r\n\r\n")
        assert status == 404
        status, headers, _ = await http(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        status, _, _ = await http(port, b"EHLO mail.example\r\n\r\n")
        assert status == 400

        nh.stop_listening()
        status, _, body = await http(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        assert status == 503 and json.loads(body)["checks"]["next_hop"]["ok"] is False
    finally:
        server.close()
        await server.wait_closed()
        nh.stop()
