"""/metrics and /healthz of a running ``mailwarden serve`` (issue 8).

A real gateway process with ``gateway.metrics_listen`` on a free port, a real
clamd and a recording next hop; the endpoints are read over HTTP with urllib
as Prometheus or a load balancer would.
"""

from __future__ import annotations

import json
import signal
import smtplib
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.eicar import eicar
from tests.support.harness import NextHop, make_message
from tests.support.process import GatewayProcess, free_port, write_config


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, ctype, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def send(port: int, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.ext.test")
        s.mail("alice@ext.test")
        s.rcpt("bob@example.com")
        code, text = s.data(raw)
        return code, text.decode()


def test_metrics_move_and_healthz_follows_dependencies(
    tmp_path: Path, next_hop: NextHop, clamd: Any
) -> None:
    mport = free_port()
    sections: dict[str, Any] = {
        "store": tmp_path / "store",
        "next_hop": next_hop.address,
        "chain": ["clamav", "personal", "header_log"],
        # loopback is not trusted: mail from the test is inbound
        "gateway": {"metrics_listen": f"127.0.0.1:{mport}", "trusted_networks": ["10.255.255.0/24"]},
    }
    cfg, port = write_config(
        tmp_path / "config.toml", **sections,
        filters={"clamav": {"address": clamd.socket, "clamd_conf": ""}},
    )
    gw = GatewayProcess(cfg, port, tmp_path / "serve.log").start()
    try:
        base = f"http://127.0.0.1:{mport}"
        m0 = scrape(mport)
        assert value(m0, "mailwarden_messages_total", direction="inbound", disposition="relayed") == 0

        assert send(port, make_message(subject="clean"))[0] == 250
        code, text = send(port, make_message(
            subject="virus", attachments=[("x.com", "application/octet-stream", eicar())]))
        assert code == 250 and "held for review" in text
        next_hop.drop_on_data = True
        code, text = send(port, make_message(subject="next hop drops"))
        assert code == 451 and text.startswith("4.4."), text
        next_hop.drop_on_data = False

        with smtplib.SMTP("127.0.0.1", port, timeout=30) as idle:
            idle.ehlo("client.ext.test")
            # earlier sessions may still be closing on the server's side
            deadline = time.monotonic() + 120
            while True:
                m1 = scrape(mport)
                if value(m1, "mailwarden_sessions_in_flight") == 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        inbound = {d: value(m1, "mailwarden_messages_total", direction="inbound", disposition=d)
                   for d in ("relayed", "quarantined", "tempfailed")}
        assert inbound == {"relayed": 1, "quarantined": 1, "tempfailed": 1}
        assert value(m1, "mailwarden_filter_verdicts_total", filter="clamav", outcome="relay") == 2
        assert value(m1, "mailwarden_filter_verdicts_total", filter="clamav", outcome="quarantine") == 1
        assert value(m1, "mailwarden_filter_duration_seconds_count", filter="clamav") == 3
        assert value(m1, "mailwarden_filter_duration_seconds_sum", filter="clamav") > 0
        assert value(m1, "mailwarden_message_duration_seconds_count") == 3
        assert value(m1, "mailwarden_next_hop_errors_total", stage="data") == 1
        assert value(m1, "mailwarden_clamd_errors_total") == 0
        assert value(m1, "mailwarden_quarantine_items") == 1
        assert value(m1, "mailwarden_quarantine_bytes") > 0
        assert value(m1, "mailwarden_sessions_in_flight") == 1
        # the sessions after the first started on its next-hop connection
        assert value(m1, "mailwarden_next_hop_connections_reused") >= 1
        assert value(m1, "mailwarden_next_hop_idle_connections") <= 1

        status, ctype, body = get(f"{base}/healthz")
        report = json.loads(body)
        assert (status, ctype, report["status"]) == (200, "application/json", "ok"), report
        assert set(report["checks"]) == {"clamd", "next_hop", "store"}
        assert all(c["ok"] for c in report["checks"].values()), report

        # clamd unreachable (a reload onto a dead socket): 451 and a clamd error;
        # the counters survive the reload.
        write_config(tmp_path / "config.toml", listen_port=port, **sections,
                     filters={"clamav": {"address": str(tmp_path / "no-clamd.sock"),
                                         "clamd_conf": ""}})
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "configuration reloaded" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, text = send(port, make_message(subject="scanner down"))
        assert code == 451 and text.startswith("4.7.1"), text
        m2 = scrape(mport)
        assert value(m2, "mailwarden_clamd_errors_total") == 1
        assert value(m2, "mailwarden_messages_total", direction="inbound", disposition="relayed") == 1
        assert value(m2, "mailwarden_messages_total", direction="inbound", disposition="tempfailed") == 2
        status, _, body = get(f"{base}/healthz")
        report = json.loads(body)
        assert status == 503 and report["status"] == "fail"
        assert report["checks"]["clamd"]["ok"] is False
        assert report["checks"]["next_hop"]["ok"] is True

        # and the next hop down
        next_hop.stop_listening()
        status, _, body = get(f"{base}/healthz")
        report = json.loads(body)
        assert status == 503 and report["checks"]["next_hop"]["ok"] is False, report
        assert report["checks"]["store"]["ok"] is True
    finally:
        gw.stop()
    assert "Traceback" not in gw.log(), gw.log()
