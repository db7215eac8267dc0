"""External-attachment warnings through the running gateway (issue 5).

Proves, over SMTP on loopback with a recording next hop and the loopback DNS
server serving DKIM keys: a DKIM-signed inbound message with an attachment is
relayed identified (Authentication-Results pass, X-Mailwarden-External, tag,
banner in both text parts, attachment bytes unchanged); a DNS timeout still
relays (250, never 4xx/5xx) as temperror/unidentified; an internal From from
outside gets the spoofed-internal wording; forged Authentication-Results are
gone; inbound mail without attachments gets only Authentication-Results;
outbound mail is untouched; with ARC configured, the delivered message
carries an ARC seal that dkimpy's arc_verify accepts via the loopback DNS,
while the sender's own DKIM signature no longer verifies (the banner).
"""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest

from filters.dkim_check import TxtResolver
from tests.support.dkimkeys import rsa_key, sign
from tests.support.dns import LoopbackDNS
from tests.support.harness import Gateway, NextHop, make_message

INBOUND = {"trusted_networks": ["10.255.255.0/24"]}  # loopback mail is then inbound
CHAIN = ["external_attachments"]
HOST = "mailwarden.test"  # the harness's gateway.hostname
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def start(make_gateway: Callable[..., Gateway], dns: LoopbackDNS, inbound: bool = True,
          **settings: Any) -> Gateway:
    filt = {"nameservers": [dns.address], "dns_timeout": 1, **settings}
    return make_gateway(chain=CHAIN, filters={"external_attachments": filt},
                        gateway=INBOUND if inbound else None)


def message(**kw: Any) -> bytes:
    kw.setdefault("from_", "Alice <alice@sender.test>")
    kw.setdefault("subject", "contract draft")
    kw.setdefault("attachments", [("draft.pdf", "application/pdf", PDF)])
    kw.setdefault("html", "<html><body><p>Please sign.</p></body></html>")
    return make_message(**kw)


def delivered(next_hop: NextHop) -> email.message.Message:
    [rec] = next_hop.wait_for(1)
    return email.message_from_bytes(rec.data, policy=email.policy.compat32)


def bodies(msg: email.message.Message) -> dict[str, str]:
    out = {}
    for part in msg.walk():
        if part.get_content_type() in ("text/plain", "text/html") and not part.get_filename():
            text = part.get_payload(decode=True).decode(part.get_content_charset() or "ascii")
            out[part.get_content_type()] = " ".join(text.split())
    return out


def test_signed_inbound_with_attachment_is_identified(make_gateway: Callable[..., Gateway],
                                                      next_hop: NextHop, dns_server: LoopbackDNS) -> None:
    dns_server.add_txt("sel._domainkey.sender.test", rsa_key().txt_record)
    gw = start(make_gateway, dns_server)
    raw = sign(message(), "sender.test")
    code, _ = gw.send(raw, mail_from="alice@sender.test", rcpt_tos=["bob@example.com"])
    assert code == 250
    msg = delivered(next_hop)
    ar = " ".join(msg["Authentication-Results"].split())
    assert ar.startswith(f"{HOST}; dkim=pass header.d=sender.test header.s=sel")
    assert msg["X-Mailwarden-External"] == "attachments; sender=identified"
    assert msg["Subject"] == "[EXTERNAL] contract draft"
    b = bodies(msg)
    assert b["text/plain"].startswith("CAUTION: This email came from outside the organisation and carries attachments.")
    assert "<!-- mailwarden-banner -->" in b["text/html"]
    pdf = [p for p in msg.walk() if p.get_filename() == "draft.pdf"][0]
    assert pdf.get_payload(decode=True) == PDF
    # The attachment part's bytes went through untouched.
    original = email.message_from_bytes(raw, policy=email.policy.compat32)
    orig_pdf = [p for p in original.walk() if p.get_filename() == "draft.pdf"][0]
    assert orig_pdf.get_payload() == pdf.get_payload()


def test_dns_timeout_relays_unidentified(make_gateway: Callable[..., Gateway], next_hop: NextHop,
                                         dns_server: LoopbackDNS) -> None:
    dns_server.set_timeout("sel._domainkey.sender.test")
    gw = start(make_gateway, dns_server)
    t0 = time.monotonic()
    code, text = gw.send(sign(message(), "sender.test"), mail_from="alice@sender.test")
    assert code == 250, text
    assert time.monotonic() - t0 < 10
    msg = delivered(next_hop)
    assert "dkim=temperror" in msg["Authentication-Results"]
    assert msg["X-Mailwarden-External"] == "attachments; sender=unidentified"
    assert "could not be identified" in bodies(msg)["text/plain"]


def test_spoofed_internal_and_forged_results(make_gateway: Callable[..., Gateway], next_hop: NextHop,
                                             dns_server: LoopbackDNS) -> None:
    gw = start(make_gateway, dns_server)
    raw = message(from_="CEO <ceo@example.com>",
                  headers={"Authentication-Results": f"{HOST}; dkim=pass header.d=example.com",
                           "X-Mailwarden-External": "attachments; sender=identified"})
    code, _ = gw.send(raw, mail_from="ceo@example.com")
    assert code == 250
    msg = delivered(next_hop)
    assert msg.get_all("Authentication-Results") == [f"{HOST}; dkim=none"]
    assert msg.get_all("X-Mailwarden-External") == ["attachments; sender=spoofed-internal"]
    assert "probably forged" in bodies(msg)["text/plain"]
    assert "probably forged" in bodies(msg)["text/html"]


def test_inbound_without_attachments_gets_only_auth_results(
    make_gateway: Callable[..., Gateway], next_hop: NextHop, dns_server: LoopbackDNS
) -> None:
    gw = start(make_gateway, dns_server)
    raw = message(attachments=[])
    assert gw.send(raw)[0] == 250
    [rec] = next_hop.wait_for(1)
    assert rec.data.endswith(raw)
    added = rec.data[: -len(raw)]
    assert f"Authentication-Results: {HOST}; dkim=none\r\n".encode() in added
    assert b"X-Mailwarden-External" not in added and b"[EXTERNAL]" not in rec.data


def test_outbound_untouched(make_gateway: Callable[..., Gateway], next_hop: NextHop,
                            dns_server: LoopbackDNS) -> None:
    gw = start(make_gateway, dns_server, inbound=False)
    raw = message(from_="bob@example.com")
    assert gw.send(raw, mail_from="bob@example.com", rcpt_tos=["x@partner.test"])[0] == 250
    [rec] = next_hop.wait_for(1)
    assert rec.data.endswith(raw)
    assert b"Authentication-Results" not in rec.data and b"X-Mailwarden-External" not in rec.data
    assert dns_server.queries == []


def test_arc_sealed_message_verifies_downstream(make_gateway: Callable[..., Gateway],
                                                next_hop: NextHop, dns_server: LoopbackDNS,
                                                tmp_path: Path) -> None:
    sender, sealer = rsa_key(), rsa_key(slot=2)
    dns_server.add_txt("sel._domainkey.sender.test", sender.txt_record)
    dns_server.add_txt("arc1._domainkey.example.com", sealer.txt_record)
    gw = start(make_gateway, dns_server, arc_key=str(sealer.write(tmp_path / "arc.pem")),
               arc_selector="arc1", arc_domain="example.com")
    assert gw.send(sign(message(), "sender.test"), mail_from="alice@sender.test")[0] == 250
    [rec] = next_hop.wait_for(1)

    resolver = TxtResolver([dns_server.address], 2.0)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        import asyncio

        return asyncio.run(resolver(name))

    assert dkim.verify(rec.data, dnsfunc=dnsfunc) is False  # the banner broke the body hash
    cv, results, reason = dkim.arc_verify(rec.data, dnsfunc=dnsfunc)
    assert cv == b"pass", reason
    msg = email.message_from_bytes(rec.data, policy=email.policy.compat32)
    assert "dkim=pass header.d=sender.test" in " ".join(msg["ARC-Authentication-Results"].split())


@pytest.mark.parametrize("missing", ["arc_selector", "arc_domain"])
def test_arc_settings_all_or_none(make_gateway: Callable[..., Gateway], dns_server: LoopbackDNS,
                                  tmp_path: Path, missing: str) -> None:
    from gateway.config import ConfigError

    settings = {"arc_key": str(rsa_key(slot=2).write(tmp_path / "k.pem")),
                "arc_selector": "s", "arc_domain": "example.com"}
    del settings[missing]
    with pytest.raises(ConfigError, match=rf"filters\.external_attachments\.{missing}: "):
        start(make_gateway, dns_server, **settings)
