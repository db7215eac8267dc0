"""The external_attachments filter against a real loopback DNS server.

Proves: messages signed by the tests with dkimpy are identified when the
signature passes and aligns; altered, unsigned, unrelated-domain and
DNS-trouble messages are unidentified (timeout/SERVFAIL -> temperror, never a
crash); an internal From (or envelope sender) from outside is spoofed-internal;
every inbound message gets Authentication-Results and loses forged ones;
attachments bring the header, the tag (once) and the banner with the right
wording; outbound/internal mail is untouched; settings errors name the key;
ARC seals verify with dkimpy's arc_verify against the loopback DNS.
"""

from __future__ import annotations

import asyncio
import email
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim
import pytest

from filters.base import AddBanner, AddHeader, FilterContext, Outcome, RemoveHeader, TagSubject
from filters.dkim_check import TxtResolver, sync_lookup
from filters.external_attachments import (
    DEFAULT_BANNER,
    DEFAULT_BANNER_SPOOFED,
    DEFAULT_BANNER_UNIDENTIFIED,
    ExternalAttachmentsFilter,
    Settings,
)
from gateway.config import ConfigError, build_settings
from gateway.message import Direction, Mail
from gateway.pipeline import seal
from gateway.rewrite import apply_edits
from tests.support.dkimkeys import rsa_key, sign
from tests.support.dns import LoopbackDNS
from tests.support.harness import make_message

HOST = "mailwarden.test"
PDF = [("report.pdf", "application/pdf", b"%PDF-1.4\n%%EOF\n")]


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown()


def ctx(executor: ThreadPoolExecutor, dns_txt: Any = None) -> FilterContext:
    return FilterContext(
        hostname=HOST,
        internal_domains=("example.com",),
        executor=executor,
        clock=lambda: datetime.now(UTC),
        max_message_size=10_000_000,
        dns_txt=dns_txt,
    )


def make_filter(executor: ThreadPoolExecutor, dns: LoopbackDNS | None = None,
                dns_txt: Any = None, **settings: Any) -> ExternalAttachmentsFilter:
    if dns is not None:
        settings.setdefault("nameservers", (dns.address,))
    settings.setdefault("dns_timeout", 1.0)
    return ExternalAttachmentsFilter(Settings(**settings), ctx(executor, dns_txt))


def mail(raw: bytes, direction: Direction = Direction.INBOUND,
         mail_from: str = "alice@sender.test") -> Mail:
    return Mail(
        queue_id="Q1",
        mail_from=mail_from,
        rcpt_tos=("bob@example.com",),
        raw=raw,
        client_addr="192.0.2.1",
        direction=direction,
        received=datetime.now(UTC),
    )


def msg(*, attachments: bool = True, from_: str = "Alice <alice@sender.test>",
        subject: str = "quarterly report", headers: dict[str, str] | None = None,
        html: str | None = None) -> bytes:
    return make_message(subject=subject, from_=from_, headers=headers, html=html,
                        attachments=PDF if attachments else ())


@pytest.fixture
def keyed_dns(dns_server: LoopbackDNS) -> LoopbackDNS:
    dns_server.add_txt("sel._domainkey.sender.test", rsa_key().txt_record)
    dns_server.add_txt("sel._domainkey.unrelated.test", rsa_key(slot=1).txt_record)
    return dns_server


def header_values(edits: tuple[Any, ...], name: str) -> list[str]:
    return [e.value for e in edits if isinstance(e, AddHeader) and e.name == name]


def text_parts(raw: bytes) -> list[str]:
    out = []
    for part in email.message_from_bytes(raw).walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            out.append(part.get_payload(decode=True).decode(part.get_content_charset()))
    return out


# ------------------------------------------------------------ identification


async def test_pass_aligned_is_identified(executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS) -> None:
    raw = sign(msg(), "sender.test", key=rsa_key())
    f = make_filter(executor, keyed_dns)
    v = await f.check(mail(raw))
    assert v.outcome == Outcome.RELAY
    assert v.facts["sender"] == "identified"
    assert v.facts["dkim"] == "pass"
    assert v.facts["dkim_domain"] == "sender.test"
    [ar] = header_values(v.edits, "Authentication-Results")
    assert ar.startswith(f"{HOST}; dkim=pass header.d=sender.test header.s=sel header.b=")
    assert header_values(v.edits, "X-Mailwarden-External") == ["attachments; sender=identified"]
    assert TagSubject("[EXTERNAL]") in v.edits
    assert AddBanner(DEFAULT_BANNER) in v.edits
    assert ("udp", "sel._domainkey.sender.test", "TXT") in keyed_dns.queries


async def test_subdomain_signature_aligns(executor: ThreadPoolExecutor, dns_server: LoopbackDNS) -> None:
    dns_server.add_txt("sel._domainkey.sender.test", rsa_key().txt_record)
    raw = sign(msg(from_="news@mail.sender.test"), "sender.test")
    v = await make_filter(executor, dns_server).check(mail(raw, mail_from="b@mail.sender.test"))
    assert v.facts["sender"] == "identified"


async def test_altered_body_fails(executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS) -> None:
    raw = sign(msg(), "sender.test")
    tampered = raw.replace(b"JVBERi0xLjQKJSVFT0YK", b"JVBERi0xLjcKJSVFT0YK")
    assert tampered != raw
    v = await make_filter(executor, keyed_dns).check(mail(tampered))
    assert v.facts["sender"] == "unidentified"
    assert v.facts["dkim"] == "fail"
    [ar] = header_values(v.edits, "Authentication-Results")
    assert 'dkim=fail reason="body hash mismatch" header.d=sender.test' in ar
    assert AddBanner(DEFAULT_BANNER_UNIDENTIFIED) in v.edits


async def test_unsigned_is_unidentified(executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS) -> None:
    v = await make_filter(executor, keyed_dns).check(mail(msg()))
    assert v.facts["sender"] == "unidentified"
    assert v.facts["dkim"] == "none"
    assert header_values(v.edits, "Authentication-Results") == [f"{HOST}; dkim=none"]
    assert header_values(v.edits, "X-Mailwarden-External") == ["attachments; sender=unidentified"]
    assert keyed_dns.queries == []  # nothing to look up


async def test_unrelated_domain_is_unidentified(executor: ThreadPoolExecutor,
                                                keyed_dns: LoopbackDNS) -> None:
    raw = sign(msg(), "unrelated.test", key=rsa_key(slot=1))
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    assert v.facts["dkim"] == "pass"  # the signature itself is fine
    assert v.facts["sender"] == "unidentified"  # but it is not the From domain's
    [ar] = header_values(v.edits, "Authentication-Results")
    assert "dkim=pass header.d=unrelated.test" in ar


async def test_missing_key_fails(executor: ThreadPoolExecutor, dns_server: LoopbackDNS) -> None:
    raw = sign(msg(), "sender.test")  # no key published: NXDOMAIN
    v = await make_filter(executor, dns_server).check(mail(raw))
    assert v.facts["dkim"] == "fail"
    assert v.facts["sender"] == "unidentified"


async def test_dns_timeout_is_temperror(executor: ThreadPoolExecutor, dns_server: LoopbackDNS) -> None:
    dns_server.set_timeout("sel._domainkey.sender.test")
    raw = sign(msg(), "sender.test")
    f = make_filter(executor, dns_server, dns_timeout=0.5)
    t0 = time.monotonic()
    v = await f.check(mail(raw))
    assert time.monotonic() - t0 < 3
    assert v.outcome == Outcome.RELAY
    assert v.facts["dkim"] == "temperror"
    assert v.facts["sender"] == "unidentified"
    [ar] = header_values(v.edits, "Authentication-Results")
    assert "dkim=temperror" in ar and "header.d=sender.test" in ar


async def test_dns_servfail_is_temperror(executor: ThreadPoolExecutor, dns_server: LoopbackDNS) -> None:
    dns_server.set_servfail("sel._domainkey.sender.test")
    v = await make_filter(executor, dns_server).check(mail(sign(msg(), "sender.test")))
    assert v.facts["dkim"] == "temperror"
    assert v.facts["sender"] == "unidentified"


async def test_unreachable_nameserver_is_temperror(executor: ThreadPoolExecutor) -> None:
    # A port nothing listens on: ICMP refused or silence, either way temperror.
    dead = LoopbackDNS()
    address = dead.address
    dead.stop()
    f = ExternalAttachmentsFilter(Settings(nameservers=(address,), dns_timeout=0.5), ctx(executor))
    v = await f.check(mail(sign(msg(), "sender.test")))
    assert v.facts["dkim"] == "temperror"


async def test_internal_from_from_outside_is_spoofed(executor: ThreadPoolExecutor,
                                                     keyed_dns: LoopbackDNS) -> None:
    v = await make_filter(executor, keyed_dns).check(mail(msg(from_="CEO <ceo@example.com>")))
    assert v.facts["sender"] == "spoofed-internal"
    assert header_values(v.edits, "X-Mailwarden-External") == ["attachments; sender=spoofed-internal"]
    assert AddBanner(DEFAULT_BANNER_SPOOFED) in v.edits


async def test_internal_envelope_sender_is_spoofed(executor: ThreadPoolExecutor,
                                                   keyed_dns: LoopbackDNS) -> None:
    raw = sign(msg(), "sender.test")
    v = await make_filter(executor, keyed_dns).check(mail(raw, mail_from="it@sub.example.com"))
    assert v.facts["sender"] == "spoofed-internal"


async def test_several_signatures_one_aligned_pass(executor: ThreadPoolExecutor,
                                                   keyed_dns: LoopbackDNS) -> None:
    raw = sign(sign(msg(), "sender.test"), "unrelated.test", key=rsa_key(slot=0))  # wrong key
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    [ar] = header_values(v.edits, "Authentication-Results")
    assert ar.count("dkim=") == 2
    assert "dkim=fail" in ar and "dkim=pass header.d=sender.test" in ar
    assert v.facts["sender"] == "identified"


async def test_dns_txt_override(executor: ThreadPoolExecutor) -> None:
    asked: list[str] = []

    def txt(name: str) -> list[str]:
        asked.append(name)
        return [rsa_key().txt_record] if name == "sel._domainkey.sender.test" else []

    f = make_filter(executor, dns_txt=txt)
    v = await f.check(mail(sign(msg(), "sender.test")))
    assert v.facts["sender"] == "identified"
    assert asked == ["sel._domainkey.sender.test"]

    def broken(name: str) -> list[str]:
        raise TimeoutError("resolver down")

    v = await make_filter(executor, dns_txt=broken).check(mail(sign(msg(), "sender.test")))
    assert v.facts["dkim"] == "temperror"


async def test_hostile_signature_never_crashes(executor: ThreadPoolExecutor,
                                               keyed_dns: LoopbackDNS) -> None:
    bad = [
        b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=sel; b=@@@; bh=x; h=from\r\n",
        b"DKIM-Signature: garbage without tags\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=se\xffnder.test; s=sel; bh=AAAA; b=AAAA; h=from\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=legitimate.com(.attacker.com; s=sel; bh=AAAA; b=AAAA; h=from\r\n",
    ]
    for sig in bad:
        v = await make_filter(executor, keyed_dns).check(mail(sig + msg()))
        assert v.outcome == Outcome.RELAY
        assert v.facts["dkim"] == "fail"
        assert v.facts["sender"] == "unidentified"
        [ar] = header_values(v.edits, "Authentication-Results")
        assert "\r" not in ar and "\n" not in ar and "(" not in ar


# ------------------------------------------------------------ edits


async def test_forged_results_removed_and_ours_added(executor: ThreadPoolExecutor,
                                                     keyed_dns: LoopbackDNS) -> None:
    forged = {"Authentication-Results": f"{HOST}; dkim=pass header.d=bank.test",
              "X-Mailwarden-External": "attachments; sender=identified"}
    raw = msg(headers=forged)
    raw = b"Authentication-Results: mx.other.test; dkim=pass header.d=" + HOST.encode() + b"\r\n" + raw
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    assert RemoveHeader("Authentication-Results", first_token=HOST) in v.edits
    out = apply_edits(raw, v.edits)
    parsed = email.message_from_bytes(out)
    ars = parsed.get_all("Authentication-Results")
    assert ars == [f"{HOST}; dkim=none", f"mx.other.test; dkim=pass header.d={HOST}"]
    assert parsed.get_all("X-Mailwarden-External") == ["attachments; sender=unidentified"]
    assert parsed["Subject"] == "[EXTERNAL] quarterly report"
    # The banner is there, with the unidentified wording, in the body.
    assert any("could not be identified" in " ".join(t.split()) for t in text_parts(out))
    # Running the filter again on its own output changes nothing more.
    v2 = await make_filter(executor, keyed_dns).check(mail(out))
    assert apply_edits(out, v2.edits) == out


async def test_subject_tag_once(executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS) -> None:
    raw = msg(subject="Re: [EXTERNAL] quarterly report")
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    out = apply_edits(raw, v.edits)
    assert email.message_from_bytes(out)["Subject"] == "Re: [EXTERNAL] quarterly report"


async def test_inbound_without_attachments_gets_only_auth_results(
    executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS
) -> None:
    raw = msg(attachments=False)
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    added = [e for e in v.edits if not isinstance(e, RemoveHeader)]
    assert [type(e) for e in added] == [AddHeader]
    assert added[0].name == "Authentication-Results"
    out = apply_edits(raw, v.edits)
    assert out == f"Authentication-Results: {HOST}; dkim=none\r\n".encode() + raw
    assert v.facts["external_attachments"] is False


async def test_inline_logo_without_name_is_not_an_attachment(executor: ThreadPoolExecutor,
                                                             keyed_dns: LoopbackDNS) -> None:
    raw = (
        b"From: a@sender.test\r\nTo: b@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/related; boundary="r"\r\n\r\n--r\r\n'
        b"Content-Type: text/html; charset=us-ascii\r\n\r\n<p><img src=\"cid:logo\"></p>\r\n"
        b"--r\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"iVBORw0KGgo=\r\n--r--\r\n"
    )
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    assert not any(isinstance(e, AddBanner) for e in v.edits)
    named = raw.replace(b"Content-ID: <logo>", b"Content-ID: <logo>\r\nContent-Disposition: inline; filename=invoice.png")
    v = await make_filter(executor, keyed_dns).check(mail(named))
    assert any(isinstance(e, AddBanner) for e in v.edits)


@pytest.mark.parametrize("direction", [Direction.OUTBOUND, Direction.INTERNAL])
async def test_outbound_and_internal_untouched(executor: ThreadPoolExecutor, dns_server: LoopbackDNS,
                                               direction: Direction) -> None:
    raw = msg(from_="a@example.com", headers={"Authentication-Results": f"{HOST}; dkim=pass"})
    v = await make_filter(executor, dns_server).check(mail(raw, direction, "a@example.com"))
    assert v.outcome == Outcome.RELAY
    assert v.edits == ()
    assert dns_server.queries == []


async def test_custom_wording_and_tag(executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS) -> None:
    f = make_filter(executor, keyed_dns, subject_tag="[EXT]", banner_text_unidentified="Careful!")
    v = await f.check(mail(msg()))
    assert TagSubject("[EXT]") in v.edits and AddBanner("Careful!") in v.edits


# ------------------------------------------------------------ settings


def test_settings_defaults() -> None:
    s = Settings()
    assert s.subject_tag == "[EXTERNAL]"
    assert s.banner_text.startswith("CAUTION: This email came from outside the organisation and carries attachments.")
    assert s.nameservers == () and s.dns_timeout == 5.0 and not s.arc_enabled


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"nameservers": ["dns.example.net"]}, "nameservers"),
        ({"nameservers": ["127.0.0.1:99999"]}, "nameservers"),
        ({"nameservers": ["[::1]x"]}, "nameservers"),
        ({"dns_timeout": 0}, "dns_timeout"),
        ({"subject_tag": ""}, "subject_tag"),
        ({"banner_text": "  "}, "banner_text"),
        ({"arc_key": "/nonexistent"}, "arc_selector"),
        ({"arc_selector": "s", "arc_domain": "example.com"}, "arc_key"),
        ({"arc_key": "/nonexistent", "arc_selector": "s", "arc_domain": "example.com"}, "arc_key"),
    ],
)
def test_settings_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_settings(Settings, data, "filters.external_attachments")
    assert str(err.value).startswith(f"filters.external_attachments.{key}: ")


def test_settings_accepts_nameserver_forms() -> None:
    s = build_settings(Settings, {"nameservers": ["192.0.2.53", "127.0.0.1:5353", "::1",
                                                  "[::1]:5353"]}, "f")
    assert len(s.nameservers) == 4


def test_settings_rejects_a_non_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match=r"\.arc_key: .*not a PEM RSA private key"):
        build_settings(Settings, {"arc_key": str(bad), "arc_selector": "s",
                                  "arc_domain": "example.com"}, "filters.external_attachments")


# ------------------------------------------------------------ ARC


async def test_arc_seal_verifies(executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS,
                                 tmp_path: Path) -> None:
    arc_key = rsa_key(slot=2)
    keyed_dns.add_txt("arc._domainkey.example.com", arc_key.txt_record)
    f = make_filter(executor, keyed_dns, arc_key=str(arc_key.write(tmp_path / "arc.pem")),
                    arc_selector="arc", arc_domain="example.com")
    raw = sign(msg(html="<html><body><p>Hi</p></body></html>"), "sender.test")
    v = await f.check(mail(raw))
    assert v.arc_seal is not None and v.edits[-1] is v.arc_seal  # the last edit
    # The pipeline seals the message as relayed: every filter's edits in
    # (here another filter's header too), the ARC set on top.
    out, sealed = await relayed(raw, v, AddHeader("X-Mailwarden-Scan", "clean"))
    assert sealed is True and v.summary(sealed)["arc_sealed"] is True
    assert header_names(out)[:5] == ["ARC-Seal", "ARC-Message-Signature",
                                     "ARC-Authentication-Results", "X-Mailwarden-Scan",
                                     "Authentication-Results"]
    # The banner broke the sender's DKIM body hash ...
    assert await in_thread(dkim.verify, out, keyed_dns) is False
    # ... and the ARC chain carries the original verdict forward.
    cv, results, reason = await in_thread(dkim.arc_verify, out, keyed_dns)
    assert cv == b"pass", reason
    aar = " ".join(email.message_from_bytes(out)["ARC-Authentication-Results"].split())
    assert aar.startswith(f"i=1; {HOST}") and "dkim=pass header.d=sender.test" in aar

    # A second hop through mailwarden continues the chain (i=2, cv=pass).
    v2 = await f.check(mail(out))
    out2, _ = await relayed(out, v2)
    [ar] = header_values(v2.edits, "Authentication-Results")
    assert "arc=pass" in ar
    cv, results, reason = await in_thread(dkim.arc_verify, out2, keyed_dns)
    assert cv == b"pass", reason
    assert len(results) == 2


async def relayed(raw: bytes, v: Any, *other: Any) -> tuple[bytes, bool]:
    """``raw`` as the pipeline relays it with ``v``'s edits (and ``other``
    filters' edits before them): the rewriter, then the ARC seal last."""
    out = apply_edits(raw, (*other, *v.edits))
    return await seal(out, [v.arc_seal]) if v.arc_seal is not None else (out, False)


def header_names(raw: bytes) -> list[str]:
    return [k for k, _ in email.message_from_bytes(raw).items()]


async def in_thread(fn: Any, raw: bytes, server: LoopbackDNS) -> Any:
    """Run dkimpy's blocking ``fn(raw, dnsfunc=...)`` off the loop, DNS via the loop."""
    dnsfunc = sync_lookup(TxtResolver([server.address], 2.0), asyncio.get_running_loop(), 2.0)
    return await asyncio.to_thread(fn, raw, dnsfunc=dnsfunc)


async def test_arc_seal_failure_does_not_cost_the_message(executor: ThreadPoolExecutor,
                                                          keyed_dns: LoopbackDNS,
                                                          tmp_path: Path) -> None:
    arc_key = rsa_key(slot=2)
    f = make_filter(executor, keyed_dns, arc_key=str(arc_key.write(tmp_path / "arc.pem")),
                    arc_selector="arc", arc_domain="example.com")
    no_from = b"To: b@example.com\r\nSubject: x\r\n\r\nbody\r\n"  # arc_sign needs a From
    v = await f.check(mail(no_from))
    assert v.outcome == Outcome.RELAY
    out, sealed = await relayed(no_from, v)
    assert sealed is False and v.summary(sealed)["arc_sealed"] is False
    assert out == apply_edits(no_from, v.edits)  # relayed, unsealed
    assert header_values(v.edits, "Authentication-Results") == [f"{HOST}; dkim=none"]


async def test_arc_chain_dns_trouble_is_bounded_and_unsealed(executor: ThreadPoolExecutor,
                                                             keyed_dns: LoopbackDNS,
                                                             tmp_path: Path) -> None:
    arc_key = rsa_key(slot=2)
    keyed_dns.add_txt("arc._domainkey.example.com", arc_key.txt_record)
    f = make_filter(executor, keyed_dns, arc_key=str(arc_key.write(tmp_path / "arc.pem")),
                    arc_selector="arc", arc_domain="example.com", dns_timeout=0.4)
    first = await f.check(mail(sign(msg(), "sender.test")))
    sealed, _ = await relayed(sign(msg(), "sender.test"), first)
    keyed_dns.set_timeout("arc._domainkey.example.com")  # the next hop cannot fetch the seal key
    t0 = time.monotonic()
    v = await f.check(mail(sealed))
    assert time.monotonic() - t0 < 2.5  # two lookups' worth, not one per instance
    [ar] = header_values(v.edits, "Authentication-Results")
    assert "arc=temperror" in ar
    assert v.facts["arc_sealed"] is False
    assert v.arc_seal is None
    assert not [e for e in v.edits if isinstance(e, AddHeader) and e.name.startswith("ARC-")]


async def test_overlong_arc_chain_is_failed_without_lookups(executor: ThreadPoolExecutor,
                                                            dns_server: LoopbackDNS,
                                                            tmp_path: Path) -> None:
    arc_key = rsa_key(slot=2)
    f = make_filter(executor, dns_server, arc_key=str(arc_key.write(tmp_path / "arc.pem")),
                    arc_selector="arc", arc_domain="example.com")
    seals = b"".join(b"ARC-Seal: i=%d; cv=pass; a=rsa-sha256; d=x.test; s=s; b=AAAA\r\n" % i
                     for i in range(1, 13))
    v = await f.check(mail(seals + msg()))
    [ar] = header_values(v.edits, "Authentication-Results")
    assert "arc=fail" in ar
    assert dns_server.queries == []


# ------------------------------------------------------------ large messages: worker processes


async def test_large_messages_are_verified_in_a_worker_process(
    executor: ThreadPoolExecutor, keyed_dns: LoopbackDNS, tmp_path: Path
) -> None:
    """Above process_above the same verdicts come from a worker process (the
    body hash there does not hold the event loop's GIL)."""
    keyed_dns.set_timeout("to._domainkey.sender.test")
    arc_key = rsa_key(slot=2)
    keyed_dns.add_txt("arc._domainkey.example.com", arc_key.txt_record)
    arc = {"arc_key": str(arc_key.write(tmp_path / "arc.pem")), "arc_selector": "arc",
           "arc_domain": "example.com", "dns_timeout": 0.5}
    good = sign(msg(), "sender.test")
    cases = [
        good,
        good.replace(b"JVBERi0xLjQKJSVFT0YK", b"JVBERi0xLjcKJSVFT0YK"),
        msg(),
        sign(msg(), "sender.test", selector="to"),
        sign(sign(msg(), "sender.test"), "unrelated.test"),
        b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.test; s=sel; b=@@@; bh=x; h=from\r\n" + msg(),
    ]
    threads = make_filter(executor, keyed_dns, **arc)
    procs = make_filter(executor, keyed_dns, **arc)
    procs.process_above = 0
    try:
        for raw in cases:
            a = await threads.check(mail(raw))
            b = await procs.check(mail(raw))
            assert dict(a.facts) == dict(b.facts)
            assert header_values(a.edits, "Authentication-Results") == header_values(
                b.edits, "Authentication-Results")
            assert [e.name for e in a.edits if isinstance(e, AddHeader)] == [
                e.name for e in b.edits if isinstance(e, AddHeader)]
            # Both ask for the seal; the large one has it made in the process pool.
            assert a.arc_seal is not None and a.arc_seal.executor is None
            assert b.arc_seal is not None and b.arc_seal.executor is procs._processes
        assert threads._processes is None and procs._processes is not None
        sealed, done = await relayed(good, await procs.check(mail(good)))
        assert done is True
        cv, _results, reason = await in_thread(dkim.arc_verify, sealed, keyed_dns)
        assert cv == b"pass", reason
    finally:
        await procs.aclose()
        await threads.aclose()
    assert procs._processes is None


async def test_broken_worker_pool_falls_back_and_is_replaced(executor: ThreadPoolExecutor,
                                                             keyed_dns: LoopbackDNS) -> None:
    f = make_filter(executor, keyed_dns)
    f.process_above = 0
    try:
        pool = f.processes(1)
        assert pool is not None
        pool.shutdown()  # a dead pool: submit raises
        v = await f.check(mail(sign(msg(), "sender.test")))
        assert v.facts["sender"] == "identified"  # verified in a thread instead
        pool._broken = "test"  # type: ignore[union-attr]
        assert f.processes(1) is not pool
    finally:
        await f.aclose()


async def test_unparseable_structure_counts_as_attachments(executor: ThreadPoolExecutor,
                                                           keyed_dns: LoopbackDNS) -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(5005))
    raw = (b"From: a@sender.test\r\nSubject: many\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n")
    v = await make_filter(executor, keyed_dns).check(mail(raw))
    assert v.facts["external_attachments"] is True  # fail closed: warn by subject and header
    assert header_values(v.edits, "X-Mailwarden-External") == ["attachments; sender=unidentified"]
