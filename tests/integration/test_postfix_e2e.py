"""mailwarden behind a real Postfix, with the shipped integration snippets (issue 8).

A private Postfix instance (tests/support/postfix.py: temp config directory,
loopback ports chosen at run time, ``deploy/postfix/<mode>/`` appended to a
minimal base) takes mail from swaks, hands it to ``mailwarden serve`` (a real
subprocess, full default chain, real clamd) and delivers what mailwarden
relays to a recording capture server.

swaks connects from 127.0.0.2 (an "external" client: mailwarden's
``trusted_networks`` is 127.0.0.1/32 only, which is where Postfix's own
connections come from), or from 127.0.0.1 (an internal client), so the
direction mailwarden uses can only come from Postfix's XFORWARD (or, for the
submission transport that sends none, from Postfix's own address).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import DEFAULT_CHAIN
from tests.support.eicar import EICAR_NAME, eicar
from tests.support.harness import NextHop, make_message
from tests.support.postfix import Mode, Postfix, require_postfix
from tests.support.process import GatewayProcess, write_config

pytestmark = pytest.mark.postfix

#: A small but genuine PDF (libmagic: application/pdf): an allowed attachment.
PDF = (
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\n"
    b"trailer << /Root 1 0 R >>\n%%EOF\n"
)
EXTERNAL_CLIENT = "127.0.0.2"
INTERNAL_CLIENT = "127.0.0.1"


@pytest.fixture(autouse=True)
def _need_postfix() -> None:
    require_postfix()
    if shutil.which("swaks") is None:
        pytest.fail("swaks is not installed: apt-get install -y swaks", pytrace=False)


@pytest.fixture
def postfix(next_hop: NextHop) -> Iterator[Callable[..., Postfix]]:
    """Factory: a started private Postfix relaying everything to ``next_hop``."""
    started: list[Postfix] = []

    def start(mode: Mode) -> Postfix:
        pf = Postfix(mode, relay_to=next_hop.port)
        started.append(pf)
        assert pf.config_warnings() == [], "the shipped snippets must not make Postfix warn"
        pf.start()
        return pf

    yield start
    for pf in started:
        pf.close()


@pytest.fixture
def mailwarden(tmp_path: Path, clamd: Any, dns_server: Any) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``mailwarden serve`` (not started) in front of a Postfix instance."""
    procs: list[GatewayProcess] = []

    def make(pf: Postfix) -> GatewayProcess:
        cfg, port = write_config(
            tmp_path / "config.toml",
            store=tmp_path / "store",
            next_hop=f"127.0.0.1:{pf.reinject_port}",
            listen_port=pf.filter_port,
            chain=list(DEFAULT_CHAIN),
            gateway={"trusted_networks": ["127.0.0.1/32"], "next_hop_timeout": 30},
            filters={
                "clamav": {"address": clamd.socket, "clamd_conf": str(clamd.config_path)},
                # Nothing here is signed, but never let a lookup leave the box.
                "external_attachments": {"nameservers": [dns_server.address], "dns_timeout": 2},
            },
        )
        p = GatewayProcess(cfg, port, tmp_path / "mailwarden.log")
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


def swaks(port: int, raw: bytes, *, client: str = EXTERNAL_CLIENT,
          mail_from: str = "alice@ext.test", to: str = "bob@example.com") -> tuple[int, str]:
    """Send ``raw`` with swaks from ``client``; returns the reply to the end of DATA."""
    proc = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--local-interface", client,
         "--ehlo", "client.ext.test", "--from", mail_from, "--to", to,
         "--data", "-", "--timeout", "60"],
        input=raw, capture_output=True, timeout=90, check=False,
    )
    out = proc.stdout.decode(errors="replace")
    lines = out.splitlines()
    try:
        end = max(i for i, line in enumerate(lines) if line.strip() == "-> .")
    except ValueError:
        raise AssertionError(f"swaks did not get to the end of DATA:\n{out}") from None
    reply = next(line for line in lines[end + 1:] if line.startswith(("<-", "<**")))
    m = re.match(r"<(?:-|\*\*)\s+(\d{3})[ -](.*)", reply)
    assert m, reply
    return int(m.group(1)), m.group(2)


def logged(mw: GatewayProcess, text: str, timeout: float = 120, after: str = "") -> str:
    """Wait until mailwarden logged a line containing ``text`` (after the line
    ``after``, if given); return that line."""
    deadline = time.monotonic() + timeout
    while True:
        lines = mw.log().splitlines()
        if after in lines:
            lines = lines[lines.index(after) + 1:]
        for line in lines:
            if text in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"mailwarden never logged {text!r}:\n{mw.log()}")
        time.sleep(0.05)


def quarantine_row(store: Path, qid: str) -> dict[str, Any]:
    with sqlite3.connect(f"file:{store / 'mailwarden.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM quarantine WHERE id = ?", (qid,)).fetchone()
    assert row is not None, f"no quarantine item {qid}"
    return dict(row)


def header_block(data: bytes) -> str:
    """The header section, with LF line ends (for ``re.M`` anchors)."""
    return data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").replace("\r\n", "\n")


def test_after_queue_clean_delivered_virus_held_direction_from_xforward(
    postfix: Callable[..., Postfix], mailwarden: Callable[..., GatewayProcess],
    next_hop: NextHop, tmp_path: Path,
) -> None:
    pf = postfix("after-queue")
    mw = mailwarden(pf).start()

    # 1. An external client sends a clean message with an attachment.
    code, text = swaks(pf.port, make_message(
        subject="quarterly figures", from_="Alice <alice@ext.test>", to="Bob <bob@example.com>",
        attachments=[("figures.pdf", "application/pdf", PDF)],
    ))
    assert code == 250, text  # Postfix queued it
    inbound = next_hop.wait_for(1)[0]
    head = header_block(inbound.data)
    assert inbound.rcpt_tos == ["bob@example.com"]
    assert re.search(r"(?m)^X-Mailwarden-Scan: clean$", head), head
    # inbound: DKIM verdict recorded and the external-attachment warning applied
    assert re.search(r"(?m)^Authentication-Results: mailwarden\.test;.*dkim=none", head), head
    assert re.search(r"(?m)^X-Mailwarden-External: attachments; sender=unidentified$", head), head
    assert re.search(r"(?m)^Subject: \[EXTERNAL\] quarterly figures$", head), head
    # it went through Postfix twice: accepted from the client, re-injected by mailwarden
    assert len(re.findall(r"(?m)^Received: .*\n\s+by postfix\.test \(Postfix\)", head)) == 2, head
    line = logged(mw, "direction=inbound")
    assert f"client={EXTERNAL_CLIENT} " in line and "disposition=relayed" in line, line

    # 2. An internal client (127.0.0.1 is trusted) sends the same kind of message out.
    code, text = swaks(pf.port, make_message(
        subject="figures for you", from_="Carol <carol@example.com>", to="Dan <dan@partner.test>",
        attachments=[("figures.pdf", "application/pdf", PDF)],
    ), client=INTERNAL_CLIENT, mail_from="carol@example.com", to="dan@partner.test")
    assert code == 250, text
    outbound = next_hop.wait_for(2)[1]
    head = header_block(outbound.data)
    assert outbound.rcpt_tos == ["dan@partner.test"]
    assert re.search(r"(?m)^X-Mailwarden-Scan: clean$", head), head
    assert "X-Mailwarden-External" not in head and "[EXTERNAL]" not in head, head
    assert not re.search(r"(?m)^Authentication-Results: mailwarden\.test", head), head
    line = logged(mw, "direction=outbound")
    assert f"client={INTERNAL_CLIENT} " in line and "disposition=relayed" in line, line

    # 3. A roaming user on authenticated submission (Internet address): the
    # mailwarden-submission transport sends no XFORWARD, so it is outbound.
    code, text = swaks(pf.submission_port, make_message(
        subject="from the road", from_="Carol <carol@example.com>", to="Dan <dan@partner.test>",
        attachments=[("figures.pdf", "application/pdf", PDF)],
    ), client=EXTERNAL_CLIENT, mail_from="carol@example.com", to="dan@partner.test")
    assert code == 250, text
    roaming = next_hop.wait_for(3)[2]
    head = header_block(roaming.data)
    assert "X-Mailwarden-External" not in head and "[EXTERNAL]" not in head, head
    line = logged(mw, "from=<carol@example.com>", after=line)
    assert "direction=outbound" in line and f"client={INTERNAL_CLIENT} " in line, line

    # 4. An external client sends a virus: Postfix accepted it, mailwarden holds it.
    code, text = swaks(pf.port, make_message(
        subject="invoice", attachments=[("invoice.com", "application/octet-stream", eicar())],
    ))
    assert code == 250, text
    m = pf.wait_log(r"status=sent \(250 2\.7\.0 accepted, held for review \((?P<qid>[^)]+)\)\)")
    pf.wait_queue_empty()
    assert len(next_hop.messages) == 3  # nothing more was delivered
    row = quarantine_row(tmp_path / "store", m.group("qid"))
    assert row["direction"] == "inbound"
    assert row["client_addr"] == EXTERNAL_CLIENT
    assert "clamav" in row["reason"] and EICAR_NAME in row["detail"]
    assert row["subject"] == "invoice"


def test_after_queue_mail_waits_in_postfix_while_mailwarden_is_down(
    postfix: Callable[..., Postfix], mailwarden: Callable[..., GatewayProcess],
    next_hop: NextHop,
) -> None:
    pf = postfix("after-queue")
    mw = mailwarden(pf)  # configured, not running

    code, text = swaks(pf.port, make_message(subject="while you were out"))
    assert code == 250, text  # the sender is done: Postfix has it
    # Postfix tries, is refused, keeps the message and tries again (the test
    # instance retries every second or two).
    # Judged from the queue itself (postqueue -j), not the maillog: postlogd
    # may lag behind under load.
    deadline = time.monotonic() + 180
    while True:
        queued = pf.queue()
        reasons = [r.get("delay_reason", "") for q in queued for r in q.get("recipients", [])]
        if queued and queued[0]["queue_name"] == "deferred" and any(
            "Connection refused" in r for r in reasons
        ):
            break
        assert time.monotonic() < deadline, (queued, pf.log_tail())
        time.sleep(0.2)
    assert len(queued) == 1 and queued[0]["queue_name"] in ("deferred", "active"), queued
    assert [r["address"] for r in queued[0]["recipients"]] == ["bob@example.com"]
    assert next_hop.messages == []

    mw.start()
    pf.flush()
    delivered = next_hop.wait_for(1)
    assert len(delivered) == 1, pf.log_tail()
    assert b"Subject: while you were out" in delivered[0].data
    assert b"X-Mailwarden-Scan: clean" in delivered[0].data
    pf.wait_queue_empty()


def test_before_queue_client_gets_mailwardens_answer(
    postfix: Callable[..., Postfix], mailwarden: Callable[..., GatewayProcess],
    next_hop: NextHop,
) -> None:
    pf = postfix("before-queue")
    mw = mailwarden(pf).start()

    code, text = swaks(pf.port, make_message(subject="hello"))
    assert code == 250 and "queued as" in text, text
    delivered = next_hop.wait_for(1)
    assert b"X-Mailwarden-Scan: clean" in delivered[0].data
    assert "direction=inbound" in logged(mw, f"client={EXTERNAL_CLIENT} ")

    code, text = swaks(pf.port, make_message(
        subject="invoice", attachments=[("invoice.com", "application/octet-stream", eicar())],
    ))
    assert code == 250 and text.startswith("2.7.0 accepted, held for review ("), text

    mw.stop()
    code, text = swaks(pf.port, make_message(subject="nobody home"))
    assert 400 <= code < 500, (code, text)  # the client keeps the message and retries
    pf.wait_log(rf"warning: connect to proxy filter 127\.0\.0\.1:{pf.filter_port}: Connection refused")
    # (Postfix also tells its postmaster, which the capture may receive: count bob's mail only)
    assert [m.data for m in next_hop.messages if m.rcpt_tos == ["bob@example.com"]] == [delivered[0].data]
