"""The milter front end behind a REAL Postfix (issue 15).

A private Postfix (tests/support/postfix.py, mode "milter": the shipped
``deploy/postfix/milter/main.cf`` with ``smtpd_milters`` /
``non_smtpd_milters`` pointing at a run-time port, ``milter_protocol = 6``,
``milter_default_action = tempfail``) takes mail over SMTP and relays what
it accepts to a recording next hop.  mailwarden's milter listener runs
in-process (its own loop thread) with a test handler that answers by the
message's Subject: ``plain`` accept unchanged, ``edit`` accept with added,
changed and folded headers and a body over 65,535 bytes (REPLBODY pieces),
``reject``, ``tempfail``, ``raise`` (the handler breaks), ``quarantine``,
``die`` (the milter connection is lost mid-message), ``slow`` (longer than
Postfix's milter_content_timeout: PROGRESS keeps it alive).

What Postfix did is checked where it shows: the bytes at the next hop
(byte-exact after Postfix's own Received header), the SMTP reply at the
client, the queue (hold queue for quarantine = "hold") and Postfix's log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.milter import actions as a
from gateway.milter.api import MilterAnswer, MilterMessage
from gateway.milter.server import MilterServer, start_milter
from gateway.milter.session import WANTED_ACTIONS, WANTED_PROTOCOL
from tests.support.harness import LoopThread, NextHop
from tests.support.postfix import Postfix, after_received, require_postfix

pytestmark = pytest.mark.postfix

EXTERNAL_CLIENT = "127.0.0.2"
BANNER = b"CAUTION: This email came from outside the organisation.\r\n\r\n"
CONTENT_TIMEOUT = 8          # Postfix's milter_content_timeout here (seconds)
SLOW = 12                    # the "slow" handler takes longer than that
REJECT = "554 5.7.1 message refused: attachment type not allowed (tool.exe)"
TEMPFAIL = "451 4.7.1 virus scanner unavailable, try again later"


@pytest.fixture(scope="module", autouse=True)
def _need_postfix() -> None:
    require_postfix()


class SubjectHandler:
    """Answers by Subject (see the module docstring); records every message."""

    def __init__(self) -> None:
        self.messages: list[MilterMessage] = []
        self.edited: dict[str, bytes] = {}     # Subject -> the edited raw message

    async def __call__(self, msg: MilterMessage) -> MilterAnswer:
        self.messages.append(msg)
        headers, body = a.split_message(msg.raw)
        subject = next((v.strip().decode() for n, v in headers if n.lower() == b"subject"), "")
        kind = subject.split()[0] if subject else "plain"
        if kind == "edit":
            new = [(b"X-Mailwarden-Scan", b" clean")]
            for n, v in headers:
                new.append((n, b" [EXTERNAL]" + v) if n.lower() == b"subject" else (n, v))
            new.append((b"X-Mailwarden-External", b" attachments;\r\n\tsender=unidentified"))
            edited = a.join_message(new, BANNER + body)
            self.edited[subject] = edited
            return MilterAnswer.accept(msg.raw, edited)
        if kind == "reject":
            return MilterAnswer.reject(REJECT)
        if kind == "tempfail":
            return MilterAnswer.tempfail(TEMPFAIL)
        if kind == "raise":
            raise RuntimeError("the store is on fire")
        if kind == "quarantine":
            return MilterAnswer.quarantine("virus found (Eicar-Test-Signature)")
        if kind == "die":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()                      # the connection is lost, nothing answered
            await asyncio.sleep(0)
        if kind == "slow":
            await asyncio.sleep(SLOW)          # a long scan (not synchronisation)
        return MilterAnswer.accept()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread("milter")
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def capture() -> Iterator[NextHop]:
    nh = NextHop(xforward=False)
    yield nh
    nh.stop()


@pytest.fixture(scope="module")
def pf(capture: NextHop) -> Iterator[Postfix]:
    p = Postfix("milter", relay_to=capture.port, extra_main_cf=(
        "soft_bounce = no\n"                 # 5xx stay 5xx (milter8 softens them otherwise)
        "smtputf8_enable = yes\n"
        f"milter_content_timeout = {CONTENT_TIMEOUT}s\n"
    ))
    assert p.config_warnings() == [], "the shipped milter snippet must not make Postfix warn"
    p.start()
    yield p
    warnings = [line for line in p.log().splitlines() if "warning:" in line
                and "can't read SMFIC_BODYEOB reply" not in line]   # the "die" test
    p.close()
    assert warnings == [], "\n".join(warnings)


@pytest.fixture
def relay(capture: NextHop) -> NextHop:
    capture.messages.clear()
    capture.answered = 0
    return capture


@pytest.fixture
def milter(loop_thread: LoopThread, pf: Postfix) -> Iterator[Any]:
    """Factory: start the milter listener on Postfix's milter port."""
    started: list[MilterServer] = []

    def start(quarantine_mode: str = "own", progress_interval: float = 10.0,
              max_message_size: int = 10 << 20) -> SubjectHandler:
        handler = SubjectHandler()
        srv = loop_thread.call(start_milter(
            f"127.0.0.1:{pf.filter_port}", handler, quarantine_mode=quarantine_mode,
            progress_interval=progress_interval, max_message_size=max_message_size))
        started.append(srv)
        return handler

    yield start

    async def stop(srv: MilterServer) -> None:
        srv.close()
        await srv.wait_closed()

    for srv in started:
        loop_thread.call(stop(srv))


def message(subject: str, body: bytes = b"Hello,\r\nthis is a test.\r\n", *,
            extra: bytes = b"") -> bytes:
    return (b"From: Alice <alice@ext.test>\r\nTo: Bob <bob@example.com>\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: Fri, 04 Dec 2026 21:00:00 +0000\r\n"
            b"Message-ID: <" + subject.replace(" ", ".").encode() + b"@ext.test>\r\n"
            b"Thread-Topic: a folded\r\n header value\r\n" + extra +
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"\r\n" + body)


def smtp(pf: Postfix) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", pf.port, source_address=(EXTERNAL_CLIENT, 0), timeout=90)
    s.ehlo("client.ext.test")
    return s


def send(s: smtplib.SMTP, raw: bytes, *, mail_from: str = "alice@ext.test",
         rcpts: tuple[str, ...] = ("bob@example.com",),
         options: tuple[str, ...] = ()) -> tuple[int, str]:
    """One transaction; the reply to the end of DATA."""
    code, text = s.mail(mail_from, list(options))
    assert code == 250, text
    for r in rcpts:
        code, text = s.rcpt(r)
        assert code == 250, text
    code, text = s.data(raw)
    return code, text.decode(errors="replace")


def queued(pf: Postfix) -> list[dict[str, Any]]:
    return pf.queue()


def test_clean_and_edited_mail_delivered_byte_exact(pf: Postfix, milter: Any, relay: NextHop,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "mailwarden.milter")
    handler = milter()
    big = b"".join(b"line %05d of a long report\r\n" % i for i in range(3000))  # ~87 KB
    assert len(big) > 65535
    with smtp(pf) as s:
        plain = message("plain hello")
        code, text = send(s, plain)
        assert code == 250, text
        edit = message("edit quarterly figures", big)
        code, text = send(s, edit)
        assert code == 250, text
    got = relay.wait_for(2)
    assert len(got) == 2, got
    by_subject = {re.search(rb"(?m)^Subject: (.*)\r$", m.data).group(1): m for m in got}
    assert after_received(by_subject[b"plain hello"].data) == plain
    delivered = after_received(by_subject[b"[EXTERNAL] edit quarterly figures"].data)
    assert delivered == handler.edited["edit quarterly figures"]
    assert delivered.startswith(b"X-Mailwarden-Scan: clean\r\nFrom: Alice")
    assert b"X-Mailwarden-External: attachments;\r\n\tsender=unidentified\r\n" in delivered
    assert BANNER + big in delivered
    # what the handler saw: the message as received, and the macros it asked for
    m1, m2 = handler.messages
    assert m1.raw == plain and m2.raw == edit
    assert m1.client_addr == EXTERNAL_CLIENT and m1.helo == "client.ext.test"
    assert m1.mail_from == "alice@ext.test" and m1.rcpts == ("bob@example.com",)
    assert m1.macros.get("daemon_name") and m1.macros.get("j") == "postfix.test"
    assert m1.auth_authen == ""
    for m in (m1, m2):
        assert m.queue_id and re.search(rf"{m.queue_id}: message-id=", pf.log()), m.queue_id
    # Postfix granted every step mailwarden skips (no per-header replies, ...)
    neg = [r.getMessage() for r in caplog.records if "negotiated" in r.getMessage()]
    assert neg and all(f"steps 0x{WANTED_PROTOCOL:x} " in line for line in neg), neg
    assert all(f"actions 0x{WANTED_ACTIONS:x}," in line for line in neg), neg


def test_over_max_message_size_is_552_at_the_client(pf: Postfix, milter: Any,
                                                   relay: NextHop) -> None:
    handler = milter(max_message_size=50_000)
    with smtp(pf) as s:
        code, text = send(s, message("plain big", (b"x" * 70 + b"\r\n") * 1000))
        assert (code, text) == (552, "5.3.4 message size exceeds fixed limit (50000 bytes)")
        code, text = send(s, message("plain small"))
        assert code == 250, text
    got = relay.wait_for(1)
    assert [after_received(m.data) for m in got] == [message("plain small")]
    assert [m.raw for m in handler.messages] == [message("plain small")]


def test_reject_tempfail_and_a_broken_handler_at_the_smtp_client(
        pf: Postfix, milter: Any, relay: NextHop) -> None:
    milter()
    with smtp(pf) as s:
        assert send(s, message("reject this")) == (554, REJECT[4:])
        assert send(s, message("tempfail this")) == (451, TEMPFAIL[4:])
        code, text = send(s, message("raise inside"))
        assert (code, text) == (451, "4.3.0 local error in processing, try again later")
        code, text = send(s, message("plain after the failures"))
        assert code == 250, text
    got = relay.wait_for(1)
    assert [after_received(m.data) for m in got] == [message("plain after the failures")]
    assert queued(pf) == []


def test_quarantine_own_is_discarded(pf: Postfix, milter: Any, relay: NextHop) -> None:
    handler = milter("own")
    with smtp(pf) as s:
        code, text = send(s, message("quarantine eicar"))
        assert code == 250, text               # the client is done; mailwarden holds the copy
        code, _ = send(s, message("plain marker"))
        assert code == 250
    qid = handler.messages[0].queue_id
    pf.wait_log(rf"{qid}: milter-discard: END-OF-MESSAGE")
    got = relay.wait_for(1)
    assert [after_received(m.data) for m in got] == [message("plain marker")]
    assert queued(pf) == []


def test_quarantine_hold_is_in_postfix_hold_queue(pf: Postfix, milter: Any,
                                                   relay: NextHop) -> None:
    handler = milter("hold")
    try:
        with smtp(pf) as s:
            code, text = send(s, message("quarantine eicar"))
            assert code == 250, text
            code, _ = send(s, message("plain marker"))
            assert code == 250
        qid = handler.messages[0].queue_id
        pf.wait_log(rf"{qid}: milter-hold: END-OF-MESSAGE")
        got = relay.wait_for(1)
        assert [after_received(m.data) for m in got] == [message("plain marker")]
        held = [q for q in queued(pf) if q["queue_id"] == qid]
        assert held and held[0]["queue_name"] == "hold", queued(pf)
    finally:
        pf._run("/usr/sbin/postsuper", "-c", str(pf.config_dir), "-d", "ALL", "hold")


def test_several_messages_on_one_connection_one_aborted_with_rset(
        pf: Postfix, milter: Any, relay: NextHop) -> None:
    handler = milter()
    with smtp(pf) as s:
        code, text = send(s, message("edit first"), rcpts=("one@example.com",))
        assert code == 250, text
        # a transaction aborted with RSET: the milter sees MAIL, RCPT, ABORT
        assert s.mail("aborted@ext.test")[0] == 250
        assert s.rcpt("never@example.com")[0] == 250
        assert s.rset()[0] == 250
        code, text = send(s, message("plain second"), mail_from="second@ext.test",
                          rcpts=("two@example.com", "three@example.com"))
        assert code == 250, text
        assert send(s, message("reject third"))[0] == 554
        code, text = send(s, message("edit fourth"), rcpts=("four@example.com",))
        assert code == 250, text
    got = relay.wait_for(3)
    assert len(got) == 3, [(m.mail_from, m.rcpt_tos) for m in got]
    seen = [(m.mail_from, m.rcpts) for m in handler.messages]
    assert seen == [("alice@ext.test", ("one@example.com",)),
                    ("second@ext.test", ("two@example.com", "three@example.com")),
                    ("alice@ext.test", ("bob@example.com",)),
                    ("alice@ext.test", ("four@example.com",))]
    assert len({m.queue_id for m in handler.messages}) == 4
    delivered = {tuple(sorted(m.rcpt_tos)): after_received(m.data) for m in got}
    assert delivered[("one@example.com",)] == handler.edited["edit first"]
    assert delivered[("four@example.com",)] == handler.edited["edit fourth"]
    assert delivered[("three@example.com", "two@example.com")] == message("plain second")


def test_milter_lost_mid_message_is_4xx_and_nothing_kept(pf: Postfix, milter: Any,
                                                         relay: NextHop) -> None:
    milter()
    with smtp(pf) as s:
        code, text = send(s, message("die now"))
        assert 400 <= code < 500, (code, text)
    with smtp(pf) as s:                        # the listener keeps serving
        code, text = send(s, message("plain marker"))
        assert code == 250, text
    got = relay.wait_for(1)
    assert [after_received(m.data) for m in got] == [message("plain marker")]
    assert queued(pf) == []


def test_progress_outlasts_milter_content_timeout(pf: Postfix, milter: Any,
                                                  relay: NextHop) -> None:
    milter(progress_interval=0.5)
    with smtp(pf) as s:
        code, text = send(s, message("slow scan"))
        assert code == 250, text
    got = relay.wait_for(1)
    assert [after_received(m.data) for m in got] == [message("slow scan")]


def test_8bitmime_and_smtputf8_edited_byte_exact(pf: Postfix, milter: Any,
                                                 relay: NextHop) -> None:
    handler = milter()
    body = "Grüße aus Köln — ½ € 日本\r\n".encode() * 2000
    with smtp(pf) as s:
        code, text = send(s, message("edit 8bit", body), options=("BODY=8BITMIME",))
        assert code == 250, text
        utf8 = message("edit utf8", body, extra="X-Name: Jürgen <jürgen@ext.test>\r\n".encode())
        code, text = send(s, utf8, mail_from="jürgen@ext.test", rcpts=("bob@example.com",),
                          options=("BODY=8BITMIME", "SMTPUTF8"))
        assert code == 250, text
    got = relay.wait_for(2)
    delivered = sorted(after_received(m.data) for m in got)
    assert delivered == sorted([handler.edited["edit 8bit"], handler.edited["edit utf8"]])
    m1, m2 = handler.messages
    assert "BODY=8BITMIME" in m1.mail_args
    assert m2.mail_from == "jürgen@ext.test" and "SMTPUTF8" in m2.mail_args


def test_local_submission_with_sendmail_goes_through_non_smtpd_milters(
        pf: Postfix, milter: Any, relay: NextHop) -> None:
    handler = milter()
    raw = message("edit from sendmail").replace(b"\r\n", b"\n")
    proc = subprocess.run(
        ["/usr/sbin/sendmail", "-C", str(pf.config_dir), "-f", "carol@example.com",
         "dan@example.com"], input=raw, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    got = relay.wait_for(1)
    assert len(got) == 1, pf.log_tail()
    (m,) = handler.messages
    assert m.mail_from == "carol@example.com" and m.rcpts == ("dan@example.com",)
    assert after_received(got[0].data) == handler.edited["edit from sendmail"]
