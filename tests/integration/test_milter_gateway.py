"""The whole gateway as a milter behind a REAL Postfix: one Decision, two front ends.

A private Postfix (tests/support/postfix.py, mode "milter", the shipped
``deploy/postfix/milter/main.cf``) takes mail over SMTP from an "external"
client (127.0.0.2) and asks mailwarden's milter listener -- the real
gateway (``gateway.server.Gateway`` with ``[milter] listen``), the real
chain, real clamd and loopback DNS -- what to do.  Checked where it shows:

* the same policy as the proxy: a message relayed through the milter
  arrives byte for byte as the SMTP proxy relays it (after Postfix's own
  Received header): scan header, Authentication-Results, subject tag and
  banner (REPLBODY);
* a virus is held in mailwarden's quarantine (DISCARD: nothing delivered),
  with the same row and header-only log record as in proxy mode, or
  refused with the proxy's 554 (``action = "reject"``);
* clamd down: the client gets the proxy's 451 and nothing is delivered;
* the direction comes from the macros: an SMTP client in
  ``trusted_networks`` is one of ours (no external warning).
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import replies
from quarantine.store import DB_NAME
from tests.support import served
from tests.support.clamd import Clamd
from tests.support.dns import LoopbackDNS
from tests.support.eicar import EICAR_NAME, eicar
from tests.support.harness import Gateway, NextHop, make_message
from tests.support.postfix import Postfix, after_received, require_postfix
from tests.support.process import GatewayProcess, write_config

pytestmark = pytest.mark.postfix

EXTERNAL_CLIENT = "127.0.0.2"
CHAIN = ["clamav", "attachment_types", "external_attachments", "personal", "header_log"]
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


@pytest.fixture(scope="module", autouse=True)
def _need_postfix() -> None:
    require_postfix()


@pytest.fixture(scope="module")
def capture() -> Iterator[NextHop]:
    nh = NextHop(xforward=False)
    yield nh
    nh.stop()


@pytest.fixture(scope="module")
def pf(capture: NextHop) -> Iterator[Postfix]:
    p = Postfix("milter", relay_to=capture.port, extra_main_cf="soft_bounce = no\n")
    p.start()
    yield p
    p.close()


@pytest.fixture
def delivered(capture: NextHop) -> NextHop:
    capture.messages.clear()
    capture.answered = 0
    return capture


@pytest.fixture
def milter_gateway(make_gateway: Callable[..., Gateway], pf: Postfix, clamd: Clamd,
                   dns_server: LoopbackDNS) -> Callable[..., Gateway]:
    """The real gateway with both front ends: the milter on Postfix's milter
    port, the SMTP proxy on a free port (for comparison)."""

    def start(*, clamav: dict[str, Any] | None = None, trusted: tuple[str, ...] = (
            "10.255.255.0/24",), **milter: Any) -> Gateway:
        return make_gateway(
            chain=CHAIN,
            filters={"clamav": {"address": clamd.socket, **(clamav or {})},
                     "external_attachments": {"nameservers": [dns_server.address],
                                              "dns_timeout": 1}},
            gateway={"trusted_networks": list(trusted)},
            milter={"listen": f"127.0.0.1:{pf.filter_port}", **milter},
        )

    return start


def through_postfix(pf: Postfix, raw: bytes, *, mail_from: str = "alice@sender.test",
                    rcpts: tuple[str, ...] = ("bob@example.com",)) -> tuple[int, str]:
    """One transaction into Postfix from the external client; the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", pf.port, source_address=(EXTERNAL_CLIENT, 0),
                      timeout=120) as s:
        s.ehlo("client.sender.test")
        code, text = s.mail(mail_from)
        assert code == 250, text
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, text
        try:
            code, text = s.data(raw)
        except smtplib.SMTPDataError as exc:  # pragma: no cover - smtplib raises for some
            code, text = exc.smtp_code, exc.smtp_error
        return code, text.decode(errors="replace")


def quarantine_rows(gw: Gateway) -> list[dict[str, Any]]:
    return served.quarantine_rows(gw.store_path)


def log_records(gw: Gateway) -> list[dict[str, Any]]:
    # The record is queued before Postfix hears the milter's answer, so
    # once the client has its reply the flush below comes after it.
    gw.flush_log()
    db = sqlite3.connect(gw.store_path / DB_NAME)
    try:
        return [json.loads(r) for (r,) in db.execute("SELECT record FROM log ORDER BY seq")]
    finally:
        db.close()


def message(**kw: Any) -> bytes:
    kw.setdefault("from_", "Alice <alice@sender.test>")
    kw.setdefault("subject", "contract draft")
    kw.setdefault("attachments", [("draft.pdf", "application/pdf", PDF)])
    kw.setdefault("html", "<html><body><p>Please sign.</p></body></html>")
    return make_message(**kw)


def test_relayed_through_the_milter_exactly_as_through_the_proxy(
        milter_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop,
        next_hop: NextHop) -> None:
    gw = milter_gateway()
    raw = message()
    code, text = through_postfix(pf, raw)
    assert code == 250, text
    [via_milter] = delivered.wait_for(1)
    # The same message through the same gateway's SMTP proxy (inbound too).
    code, text = gw.send(raw, mail_from="alice@sender.test")
    assert code == 250, text
    [via_proxy] = next_hop.wait_for(1)
    out = after_received(via_milter.data)
    assert out == via_proxy.data
    assert out.startswith(b"X-Mailwarden-Scan: clean\r\n")
    assert b"Subject: [EXTERNAL] contract draft" in out
    assert b"X-Mailwarden-External: attachments; sender=unidentified" in out
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    for kind in ("plain", "html"):  # the banner in both text parts (REPLBODY)
        part = parsed.get_body((kind,))
        assert part is not None and "CAUTION" in part.get_content(), kind
    assert out.startswith(b"X-Mailwarden-Scan: clean\r\n")
    assert b"\r\nAuthentication-Results: mailwarden.test; dkim=none" in out
    [milter_rec, proxy_rec] = log_records(gw)
    assert milter_rec["disposition"] == "relayed" and milter_rec["direction"] == "inbound"
    assert re.search(rf"\b{milter_rec['queue_id']}: ", pf.log())  # Postfix's own queue id
    assert [v["filter"] for v in milter_rec["verdicts"]] == CHAIN
    def same(rec: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in verdict.items() if k != "scan_seconds"}
                for verdict in rec["verdicts"]]
    assert same(milter_rec) == same(proxy_rec)
    assert milter_rec["client_addr"] == EXTERNAL_CLIENT


def test_a_large_banner_body_goes_back_in_pieces(
        milter_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop,
        next_hop: NextHop) -> None:
    """A body well over 65,535 bytes: REPLBODY in several pieces, back to back."""
    gw = milter_gateway()
    text_body = "".join(f"line {i:06d} of a long contract text\n" for i in range(8000))
    raw = message(body=text_body, html=None)
    assert len(raw) > 3 * 65535
    assert through_postfix(pf, raw)[0] == 250
    [via_milter] = delivered.wait_for(1)
    assert gw.send(raw, mail_from="alice@sender.test")[0] == 250
    [via_proxy] = next_hop.wait_for(1)
    assert after_received(via_milter.data) == via_proxy.data


def test_virus_is_held_in_mailwardens_quarantine_and_discarded(
        milter_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop) -> None:
    gw = milter_gateway()
    raw = message(attachments=[("eicar.com", "application/octet-stream", eicar())])
    code, text = through_postfix(pf, raw)
    assert code == 250, text  # Postfix took it; mailwarden holds it (DISCARD)
    [row] = quarantine_rows(gw)
    assert row["reason"].split(",")[0] == "clamav" and row["state"] == "held"
    assert row["detail"].startswith(EICAR_NAME)
    assert (gw.store_path / row["path"]).read_bytes().endswith(raw.split(b"\r\n\r\n", 1)[1])
    [rec] = log_records(gw)
    assert rec["disposition"] == "quarantined" and rec["quarantine_id"] == row["id"]
    assert delivered.messages == []
    assert "milter-discard" in pf.log() or "discard" in pf.log().lower()
    assert pf.queue() == []


def test_virus_with_action_reject_gets_the_proxys_554(
        milter_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop) -> None:
    gw = milter_gateway(clamav={"action": "reject"})
    raw = message(attachments=[("eicar.com", "application/octet-stream", eicar())])
    code, text = through_postfix(pf, raw)
    expected = replies.VIRUS_REJECTED.format(EICAR_NAME)
    assert (code, text) == (int(expected[:3]), expected[4:]), text
    assert delivered.messages == [] and quarantine_rows(gw) == []
    assert log_records(gw)[0]["disposition"] == "rejected"


def test_a_blocked_attachment_with_action_reject_gets_the_proxys_554(
        make_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop) -> None:
    gw = make_gateway(chain=["attachment_types", "header_log"],
                      filters={"attachment_types": {"action": "reject"}},
                      gateway={"trusted_networks": ["10.255.255.0/24"]},
                      milter={"listen": f"127.0.0.1:{pf.filter_port}"})
    raw = message(attachments=[("tool.exe", "application/octet-stream",
                                b"MZ\x90\x00" + b"\x00" * 200)])
    code, text = through_postfix(pf, raw)
    expected = replies.ATTACHMENT_REJECTED.format("tool.exe")
    assert (code, text) == (int(expected[:3]), expected[4:]), text
    assert delivered.messages == [] and quarantine_rows(gw) == [] and pf.queue() == []


def test_clamd_down_is_the_proxys_451_and_nothing_is_delivered(
        milter_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop,
        tmp_path: Path) -> None:
    gw = milter_gateway(clamav={"address": str(tmp_path / "no-clamd.sock")})
    code, text = through_postfix(pf, message())
    expected = replies.SCANNER_UNAVAILABLE
    assert (code, text) == (int(expected[:3]), expected[4:]), text
    assert delivered.messages == [] and quarantine_rows(gw) == []
    assert log_records(gw)[0]["disposition"] == "tempfailed"
    assert pf.queue() == []  # the sender keeps it


def test_direction_comes_from_the_client_address_macro(
        milter_gateway: Callable[..., Gateway], pf: Postfix, delivered: NextHop) -> None:
    gw = milter_gateway(trusted=("127.0.0.0/8",))  # the client is one of ours
    raw = message(from_="Bob <bob@example.com>", subject="to a partner")
    code, text = through_postfix(pf, raw, mail_from="bob@example.com",
                                 rcpts=("carol@partner.test",))
    assert code == 250, text
    [msg] = delivered.wait_for(1)
    out = after_received(msg.data)
    assert b"X-Mailwarden-External" not in out and b"[EXTERNAL]" not in out
    assert log_records(gw)[0]["direction"] == "outbound"


def test_mailwarden_killed_mid_body_leaves_the_message_with_the_sender(
        pf: Postfix, delivered: NextHop, next_hop: NextHop, clamd: Clamd,
        tmp_path: Path) -> None:
    """kill -9 while Postfix is taking the body: the client gets Postfix's 4xx
    (milter_default_action = tempfail), Postfix keeps nothing, and the same
    message sent again once mailwarden is back is delivered: nothing lost."""
    config, _port = write_config(
        tmp_path / "config.toml", store=tmp_path / "store", next_hop=next_hop.address,
        chain=["clamav", "personal", "header_log"], gateway={"trusted_networks": ["10.9.9.0/24"]},
        filters={"clamav": {"address": clamd.socket}},
        milter={"listen": f"127.0.0.1:{pf.filter_port}"},
    )
    served = GatewayProcess(config, _port, tmp_path / "serve.log").start()
    raw = message(body="body line\n" * 60000, html=None, attachments=[])
    body_at = raw.index(b"\r\n\r\n") + 4
    try:
        with socket.create_connection(("127.0.0.1", pf.port), timeout=120) as s:
            f = s.makefile("rb")

            def command(line: bytes) -> bytes:
                s.sendall(line + b"\r\n")
                reply = f.readline()
                while reply[3:4] == b"-":
                    reply = f.readline()
                return reply

            assert f.readline().startswith(b"220")
            assert command(b"EHLO client.sender.test").startswith(b"250")
            assert command(b"MAIL FROM:<alice@sender.test>").startswith(b"250")
            assert command(b"RCPT TO:<bob@example.com>").startswith(b"250")
            assert command(b"DATA").startswith(b"354")
            half = body_at + (len(raw) - body_at) // 2
            s.sendall(raw[:half])  # the headers and half the body are in flight
            served.kill()          # SIGKILL: no goodbye to Postfix
            s.sendall(raw[half:] + b".\r\n")
            reply = f.readline()
        assert reply.startswith(b"4"), reply  # the sender keeps it and tries again
    finally:
        if served.proc is not None and served.proc.poll() is None:
            served.kill()
    assert delivered.messages == [] and pf.queue() == []
    again = GatewayProcess(config, _port, tmp_path / "serve2.log").start()
    try:
        code, text = through_postfix(pf, raw)
        assert code == 250, text
        [msg] = delivered.wait_for(1)
        assert after_received(msg.data).endswith(raw[body_at:])
    finally:
        again.stop()
