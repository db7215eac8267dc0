"""The clamav filter against a real clamd (and a fake one for the failures).

Proves: EICAR and clamav-testfiles are found wherever clamd has to dig for
them (base64 attachment, zip, message/rfc822, the testfiles' own containers);
the action decides quarantine vs the CONTRACT reject reply; every way clamd
can fail (down, silent, garbage, closed connection, error, size limit, limits
exceeded, encrypted) is "unscanned" and never a relay; the scan pool and the
deadline bound the work; settings errors name the key; the clamd.conf check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pyclamd
import pytest

from filters.base import AddHeader, FilterContext, Outcome, Reason
from filters.clamav import (
    MAX_SCAN_TIMEOUT,
    ClamAVFilter,
    ScanResult,
    Settings,
    check_stream_max_length,
    clamd_conf_warnings,
    parse_address,
    parse_reply,
    parse_size,
    parse_version,
)
from gateway import replies
from gateway.config import ConfigError, build_settings
from gateway.message import Direction, Mail
from tests.support.clamd import TESTFILES, Clamd, virus_name_for_testfile
from tests.support.eicar import EICAR_NAME, eicar, forwarded, zipped
from tests.support.fake_clamd import FakeClamd

# --------------------------------------------------------------------- helpers


def message(attachments: list[tuple[str, str, bytes]] = (), *, subject: str = "hi") -> bytes:  # type: ignore[assignment]
    msg = EmailMessage()
    msg["From"] = "Alice <a@ext.test>"
    msg["To"] = "Bob <b@example.com>"
    msg["Subject"] = subject
    msg["Message-ID"] = "<unit@ext.test>"
    msg.set_content("Hello,\nplease see the attachment.\n")
    for name, ctype, data in attachments:
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=SMTP)


def mail(raw: bytes) -> Mail:
    return Mail(
        queue_id="Q1", mail_from="a@ext.test", rcpt_tos=("b@example.com",), raw=raw,
        client_addr="192.0.2.1", direction=Direction.INBOUND,
        received=datetime(2026, 11, 23, tzinfo=UTC),
    )


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as ex:
        yield ex


@pytest.fixture
def ctx(executor: ThreadPoolExecutor) -> FilterContext:
    return FilterContext(
        hostname="mailwarden.test", internal_domains=("example.com",), executor=executor,
        clock=lambda: datetime(2026, 11, 23, tzinfo=UTC), max_message_size=50 * 1024 * 1024,
    )


@pytest.fixture
async def filt(ctx: FilterContext) -> AsyncIterator[Callable[..., ClamAVFilter]]:
    """Factory for filters with the given settings; closed after the test."""
    made: list[ClamAVFilter] = []

    def factory(address: str, **settings: Any) -> ClamAVFilter:
        f = ClamAVFilter(Settings(address=address, **settings), ctx)
        made.append(f)
        return f

    yield factory
    for f in made:
        await f.aclose()


# ------------------------------------------------------------- real clamd: finds


async def test_clean_message_is_relayed_with_scan_header(clamd: Clamd, filt: Any) -> None:
    f = filt(clamd.socket)
    v = await f.check(mail(message([("report.pdf", "application/pdf", b"%PDF-1.4 fine\n")])))
    assert v.outcome is Outcome.RELAY
    assert v.edits == (AddHeader("X-Mailwarden-Scan", "clean"),)
    assert v.facts["virus"] is None and v.facts["scan"] == "clean"
    assert v.facts["scan_seconds"] > 0


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(lambda: message([("eicar.com", "application/octet-stream", eicar())]),
                     id="base64-attachment"),
        pytest.param(lambda: message([("eicar.txt", "text/plain", eicar(newline=True))]),
                     id="attachment-with-newline"),
        pytest.param(lambda: message([("docs.zip", "application/zip", zipped("x.com", eicar()))]),
                     id="inside-zip"),
        pytest.param(lambda: forwarded(message([("eicar.com", "application/octet-stream",
                                                 eicar())])), id="inside-message-rfc822"),
        pytest.param(lambda: forwarded(message([("a.zip", "application/zip",
                                                 zipped("x.com", eicar()))])), id="rfc822-zip"),
    ],
)
async def test_eicar_is_quarantined_wherever_it_hides(clamd: Clamd, filt: Any, raw: Any) -> None:
    f = filt(clamd.socket, notify="it-security@example.com")
    v = await f.check(mail(raw()))
    assert v.outcome is Outcome.QUARANTINE
    assert v.detail == EICAR_NAME
    assert v.facts["virus"] == EICAR_NAME
    assert v.facts["notify"] == "it-security@example.com"
    assert v.edits == ()


@pytest.mark.parametrize("name", ["clam.exe", "clam.zip", "clam.7z", "clam.cab", "clam.pdf"])
async def test_clamav_testfiles_attached_are_quarantined(clamd: Clamd, filt: Any, name: str) -> None:
    data = (TESTFILES / name).read_bytes()
    f = filt(clamd.socket)
    v = await f.check(mail(message([(name, "application/octet-stream", data)])))
    assert v.outcome is Outcome.QUARANTINE
    # A container is found either by its own hash or by the clam.exe inside it.
    assert v.facts["virus"] in (virus_name_for_testfile(name), virus_name_for_testfile("clam.exe"))


async def test_testfile_mail_with_uuencoded_exe(clamd: Clamd, filt: Any) -> None:
    """clamav-testfiles' own mbox with a uuencoded clam.exe: clamd decodes it."""
    raw = (TESTFILES / "clam.exe.mbox.uu").read_bytes().replace(b"\r\n", b"\n")
    v = await filt(clamd.socket).check(mail(raw.replace(b"\n", b"\r\n")))
    assert v.outcome is Outcome.QUARANTINE


async def test_action_reject_gives_the_contract_reply(clamd: Clamd, filt: Any) -> None:
    f = filt(clamd.socket, action="reject")
    v = await f.check(mail(message([("eicar.com", "application/octet-stream", eicar())])))
    assert v.outcome is Outcome.REJECT
    assert v.reason is Reason.VIRUS
    reply = replies.for_reason(v.reason, v.reason_text)
    assert reply == f"554 5.7.1 message refused: virus found ({EICAR_NAME})"
    assert reply == replies.VIRUS_REJECTED.format(replies.safe_text(EICAR_NAME))


async def test_tcp_address_reaches_real_clamd(clamd: Clamd, filt: Any) -> None:
    assert clamd.tcp_address
    f = filt(clamd.tcp_address)
    v = await f.check(mail(message([("eicar.com", "application/octet-stream", eicar())])))
    assert v.outcome is Outcome.QUARANTINE and v.detail == EICAR_NAME
    ok, text = await f.health()
    assert ok, text


async def test_health_reports_version(clamd: Clamd, filt: Any) -> None:
    ok, text = await filt(clamd.socket).health()
    assert ok, text
    assert "PONG" in text and "ClamAV 1." in text
    # The suite's database is not an official CVD: clamd reports no date.
    assert "signature date unknown" in text


async def test_health_prints_signature_date_when_clamd_has_one(filt: Any) -> None:
    with FakeClamd("ok") as fake:
        ok, text = await filt(fake.address).health()
    assert ok, text
    assert "signatures 27400 of Mon Nov 23 09:00:00 2026" in text


# ------------------------------------------------------------ real clamd: failures


async def test_clamd_stopped_tempfails_or_quarantines(clamd: Clamd, filt: Any) -> None:
    tempfail = filt(clamd.socket)
    hold = filt(clamd.socket, on_error="quarantine")
    raw = message([("report.pdf", "application/pdf", b"%PDF-1.4 fine\n")])
    with clamd.stopped():
        v1 = await tempfail.check(mail(raw))
        v2 = await hold.check(mail(raw))
        ok, text = await tempfail.health()
    assert v1.outcome is Outcome.TEMPFAIL and "unreachable" in v1.detail
    assert v2.outcome is Outcome.QUARANTINE and v2.detail.startswith("unscannable: ")
    assert not ok and clamd.socket in text
    # Back up: scanning works again.
    assert (await tempfail.check(mail(raw))).outcome is Outcome.RELAY


@pytest.fixture(scope="module")
def tight_clamd() -> Iterator[Clamd]:
    """A real clamd with tiny limits: StreamMaxLength and MaxFileSize."""
    server = Clamd(options={"StreamMaxLength": "256K", "MaxFileSize": "32K",
                            "MaxScanSize": "64K", "AlertExceedsMax": "yes"})
    server.start()
    yield server
    server.close()


async def test_real_size_limit_is_unscanned(tight_clamd: Clamd, filt: Any) -> None:
    raw = message([("big.bin", "application/octet-stream", bytes(400 * 1024))])
    v = await filt(tight_clamd.socket).check(mail(raw))
    assert v.outcome is Outcome.TEMPFAIL
    assert "StreamMaxLength" in v.detail


async def test_real_limits_exceeded_is_unscanned(tight_clamd: Clamd, filt: Any) -> None:
    raw = message([("mid.bin", "application/octet-stream", bytes(range(256)) * 200)])
    v = await filt(tight_clamd.socket, on_error="quarantine").check(mail(raw))
    assert v.outcome is Outcome.QUARANTINE
    assert "Heuristics.Limits.Exceeded" in v.detail and v.detail.startswith("unscannable")


# ------------------------------------------------------------- fake clamd failures


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("garbage", "unexpected answer"),
        ("close", "without an answer"),
        ("size_limit", "StreamMaxLength"),
        ("error", "clamd error: Can't allocate memory"),
        ("limits", "Heuristics.Limits.Exceeded.MaxFileSize"),
        ("encrypted", "Heuristics.Encrypted.Zip"),
        ("binary", "non-ASCII"),
    ],
)
async def test_bad_answers_tempfail_never_relay(filt: Any, mode: str, why: str) -> None:
    raw = message([("big.bin", "application/octet-stream", bytes(300 * 1024))])
    with FakeClamd(mode) as fake:
        v = await filt(fake.address, timeout=5).check(mail(raw))
        q = await filt(fake.address, timeout=5, on_error="quarantine").check(mail(raw))
    assert v.outcome is Outcome.TEMPFAIL, v
    assert why in v.detail
    assert q.outcome is Outcome.QUARANTINE and q.detail == f"unscannable: {v.detail}"


async def test_pyclamd_scan_stream_would_fail_open() -> None:
    """Why the filter does its own INSTREAM exchange: pyclamd says "clean"."""
    with FakeClamd("close") as fake:
        cd = pyclamd.ClamdUnixSocket(fake.address, timeout=5)
        assert await asyncio.to_thread(cd.scan_stream, eicar()) is None


async def test_fake_ok_is_clean_over_tcp(filt: Any) -> None:
    with FakeClamd("ok", tcp=True) as fake:
        v = await filt(fake.address).check(mail(message()))
        assert fake.bytes_received == len(message())
    assert v.outcome is Outcome.RELAY


async def test_silent_clamd_times_out_without_blocking_the_loop(filt: Any) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    with FakeClamd("silent") as fake:
        f = filt(fake.address, timeout=0.5, timeout_per_mb=0)
        task = asyncio.create_task(ticker())
        start = time.monotonic()
        v = await f.check(mail(message()))
        elapsed = time.monotonic() - start
        task.cancel()
    assert v.outcome is Outcome.TEMPFAIL
    assert "timed out" in v.detail or "did not answer" in v.detail
    assert 0.4 < elapsed < 2.0
    assert ticks >= 10  # the event loop kept running during the scan


async def test_pool_bounds_concurrent_scans_and_deadline_covers_queueing(filt: Any) -> None:
    with FakeClamd("silent") as fake:
        f = filt(fake.address, max_threads=2, timeout=0.5, timeout_per_mb=0)
        start = time.monotonic()
        verdicts = await asyncio.gather(*(f.check(mail(message())) for _ in range(6)))
        elapsed = time.monotonic() - start
        assert fake.max_concurrent <= 2
    assert all(v.outcome is Outcome.TEMPFAIL for v in verdicts)
    assert elapsed < 2.5


async def test_unreachable_tcp_port(filt: Any) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    v = await filt(f"127.0.0.1:{port}").check(mail(message()))
    assert v.outcome is Outcome.TEMPFAIL and "unreachable" in v.detail


# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("reply", "status", "virus"),
    [
        (b"stream: OK\n", "clean", None),
        (b"stream: Win.Test.EICAR_HDB-1 FOUND\n", "infected", "Win.Test.EICAR_HDB-1"),
        (b"stream: Heuristics.Limits.Exceeded.MaxScanSize FOUND\n", "unscanned", None),
        (b"INSTREAM size limit exceeded. ERROR\n", "unscanned", None),
        (b"stream: Can't create temporary file ERROR\n", "unscanned", None),
        (b"", "unscanned", None),
        (b"stream: OK", "unscanned", None),  # no terminator: truncated
        (b"stream: OK\nstream: OK\n", "unscanned", None),
        (b"OK\n", "unscanned", None),
        (b"stream: FOUND\n", "unscanned", None),
        (b"\n\n", "unscanned", None),
        # A real finding wins over a limit hit in the same answer.
        (b"stream: Heuristics.Limits.Exceeded.MaxFiles FOUND\nstream: Evil FOUND\n",
         "infected", "Evil"),
    ],
)
def test_parse_reply(reply: bytes, status: str, virus: str | None) -> None:
    r = parse_reply(reply)
    assert r.status == status
    assert r.virus == virus
    if status == "unscanned":
        assert r.reason


async def test_unscanned_verdict_is_never_relay(filt: Any) -> None:
    for on_error in ("tempfail", "quarantine"):
        v = filt("/x/clamd.sock", on_error=on_error).verdict(ScanResult.unscanned("anything"))
        assert v.outcome in (Outcome.TEMPFAIL, Outcome.QUARANTINE)


async def test_reject_reply_is_one_safe_line(filt: Any) -> None:
    v = filt("/x/clamd.sock", action="reject").verdict(
        ScanResult("infected", virus="Bad\r\nName\x00"))
    assert replies.for_reason(v.reason, v.reason_text) == (
        "554 5.7.1 message refused: virus found (Bad??Name?)")


async def test_scan_timeout_grows_with_size_and_is_capped(filt: Any) -> None:
    f = filt("/x/s", timeout=30, timeout_per_mb=1.0)
    assert f.scan_timeout(0) == 30
    assert f.scan_timeout(10 * 1024 * 1024) == pytest.approx(40)
    assert f.scan_timeout(500 * 1024 * 1024) == MAX_SCAN_TIMEOUT == 90


def test_parse_address() -> None:
    assert parse_address("/run/clamav/clamd.ctl") == ("unix", "/run/clamav/clamd.ctl")
    assert parse_address("./clamd.sock") == ("unix", "./clamd.sock")
    assert parse_address("127.0.0.1:3310") == ("tcp", ("127.0.0.1", 3310))
    assert parse_address("clamd.internal:3310") == ("tcp", ("clamd.internal", 3310))


def test_parse_version() -> None:
    assert parse_version("ClamAV 1.4.6/27400/Mon Nov 23 09:00:00 2026") == (
        "ClamAV 1.4.6", "27400", "Mon Nov 23 09:00:00 2026")
    assert parse_version("ClamAV 1.4.6") == ("ClamAV 1.4.6", None, None)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("address", "clamd"),
        ("address", "[::1]:3310"),
        ("address", "host:99999"),
        ("address", "host:port"),
        ("address", ""),
        ("on_error", "pass"),
        ("action", "drop"),
        ("max_threads", 0),
        ("max_threads", 1000),
        ("timeout", 0),
        ("timeout", 120),
        ("timeout_per_mb", -1),
        ("notify", "it-security"),
        ("notify", "a b@example.com"),
        ("adress", "/x"),
    ],
)
def test_settings_errors_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build_settings(Settings, {key: value}, "filters.clamav")
    assert str(info.value).startswith(f"filters.clamav.{key}: ")


def test_settings_defaults_load() -> None:
    s = build_settings(Settings, {"address": "127.0.0.1:3310", "timeout": 10}, "filters.clamav")
    assert s.timeout == 10.0 and s.max_threads == 10 and s.on_error == "tempfail"
    assert s.action == "quarantine" and s.notify == "" and s.clamd_conf == "/etc/clamav/clamd.conf"


# --------------------------------------------------------------- clamd.conf check


def test_parse_size() -> None:
    assert parse_size("25M") == 25 * 1024 * 1024
    assert parse_size("100m") == 100 * 1024 * 1024
    assert parse_size("512K") == 512 * 1024
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("1G")


DEBIAN_STYLE = """\
#Automatically Generated by clamav-daemon postinst
LocalSocket /var/run/clamav/clamd.ctl
ScanMail true
ScanArchive true
MaxScanSize 100M
MaxFileSize 25M
StreamMaxLength 25M
"""


def test_clamd_conf_warnings_for_debian_defaults(tmp_path: Path) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text(DEBIAN_STYLE)
    warnings = clamd_conf_warnings(conf, 50 * 1024 * 1024)
    assert len(warnings) == 2
    assert "StreamMaxLength 25M" in warnings[0] and "gateway.max_message_size" in warnings[0]
    assert "MaxFileSize" in warnings[1] and "AlertExceedsMax" in warnings[1]
    line = check_stream_max_length(conf, 50 * 1024 * 1024)
    assert line is not None and "\n" not in line


async def test_clamd_conf_fine_and_broken(tmp_path: Path, filt: Any) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text(DEBIAN_STYLE + "StreamMaxLength 60M\nMaxFileSize 60M\nAlertExceedsMax yes\n")
    assert check_stream_max_length(conf, 50 * 1024 * 1024) is None
    assert filt("/x/s", clamd_conf=str(conf)).conf_check() is None
    assert filt("/x/s", clamd_conf="").conf_check() is None
    conf.write_text("StreamMaxLength 1M\n")
    assert "StreamMaxLength 1M" in (filt("/x/s", clamd_conf=str(conf)).conf_check() or "")
    conf.write_text("ScanMail no\nStreamMaxLength lots\n")
    warnings = clamd_conf_warnings(conf, 1024)
    assert any("ScanMail is off" in w for w in warnings)
    assert any("StreamMaxLength 'lots' is not a size" in w for w in warnings)
    missing = check_stream_max_length(tmp_path / "nope.conf", 1024)
    assert missing is not None and "cannot read" in missing


def test_suite_clamd_conf_passes_the_check(clamd: Clamd) -> None:
    assert check_stream_max_length(clamd.config_path, 50 * 1024 * 1024) is None


async def test_health_fails_on_garbage_and_silence(filt: Any) -> None:
    with FakeClamd("garbage") as fake:
        ok, text = await filt(fake.address).health()
    assert not ok and "Could not ping" in text
