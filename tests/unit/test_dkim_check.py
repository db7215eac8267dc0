"""filters.dkim_check: the DNS function, dkimpy's async verifier, and the corpus vectors.

Proves: our TXT lookup against a real (loopback) DNS server tells a missing
key (None -> fail) from DNS trouble (timeout, SERVFAIL, REFUSED -> DnsTrouble
-> temperror), follows truncation to TCP for big keys, and honours its time
bound; the CPU part of verification runs in the thread pool; only the topmost
MAX_SIGNATURES signatures are checked; Authentication-Results values parse as
RFC 8601; alignment; and the shared corpus DKIM vectors (dkimpy, MimeKit,
stalwart mail-auth, rspamd) verify as their provenance says, with their keys
served by the loopback DNS server.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import authres
import pytest

from filters.dkim_check import (
    MAX_SIGNATURES,
    DnsTrouble,
    SignatureResult,
    TxtResolver,
    aligned,
    auth_results_value,
    parse_nameserver,
    summarize,
    verify_dkim,
)
from tests.support.dkimkeys import rsa_key, sign
from tests.support.dns import LoopbackDNS

MSG = b"From: Alice <alice@sender.test>\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


class CountingPool(ThreadPoolExecutor):
    """A thread pool that records which work it was given (and in which thread)."""

    def __init__(self) -> None:
        super().__init__(2)
        self.calls: list[str] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "?")
        self.calls.append(name)
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    p = ThreadPoolExecutor(2)
    yield p
    p.shutdown()


# ------------------------------------------------------------ nameservers


@pytest.mark.parametrize(
    ("text", "expected"),
    [("192.0.2.1", ("192.0.2.1", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
     ("::1", ("::1", 53)), ("[::1]:5300", ("::1", 5300)), (" 10.0.0.1 ", ("10.0.0.1", 53))],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["ns1.example.net", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]53", ""])
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_system_resolver_never_raises_at_construction() -> None:
    r = TxtResolver([], 1.0)
    assert r.resolver is not None or r.problem


# ------------------------------------------------------------ the DNS function


async def test_lookup_found_missing_and_trouble(dns_server: LoopbackDNS) -> None:
    dns_server.add_txt("sel._domainkey.a.test", "v=DKIM1; k=rsa; p=AAAA")
    dns_server.add_txt("two._domainkey.a.test", ["some other text", "v=DKIM1; p=BBBB"])
    dns_server.set_servfail("sf._domainkey.a.test")
    dns_server.set_refused("rf._domainkey.a.test")
    dns_server.set_timeout("to._domainkey.a.test")
    r = TxtResolver([dns_server.address], 0.5)
    assert await r(b"sel._domainkey.a.test.") == b"v=DKIM1; k=rsa; p=AAAA"
    assert await r(b"two._domainkey.a.test.") == b"v=DKIM1; p=BBBB"
    assert await r(b"nx._domainkey.a.test.") is None
    assert await r(b"bad..name.") is None
    for name in (b"sf._domainkey.a.test.", b"rf._domainkey.a.test."):
        with pytest.raises(DnsTrouble):
            await r(name)
    t0 = time.monotonic()
    with pytest.raises(DnsTrouble, match="timeout"):
        await r(b"to._domainkey.a.test.")
    assert 0.4 < time.monotonic() - t0 < 2.0


async def test_big_key_over_tcp(dns_server: LoopbackDNS) -> None:
    key = rsa_key(4096)
    dns_server.add_txt("big._domainkey.sender.test", key.txt_record)
    r = TxtResolver([dns_server.address], 2.0)
    assert await r(b"big._domainkey.sender.test.") == key.txt_record.encode()
    assert [q[0] for q in dns_server.queries] == ["udp", "tcp"]  # truncated, then TCP


# ------------------------------------------------------------ verification


async def test_crypto_runs_in_the_pool_not_on_the_loop(dns_server: LoopbackDNS) -> None:
    dns_server.add_txt("sel._domainkey.sender.test", rsa_key().txt_record)
    counting = CountingPool()
    try:
        results = await verify_dkim(sign(MSG, "sender.test"), TxtResolver([dns_server.address], 1.0),
                                    counting)
        assert results[0].result == "pass"
        assert "_OffLoopDKIM" in counting.calls  # parsing the message
        assert "verify_sig_process" in counting.calls  # body hash and signature check
    finally:
        counting.shutdown()


async def test_only_the_topmost_signatures(dns_server: LoopbackDNS, pool: ThreadPoolExecutor) -> None:
    dns_server.add_txt("sel._domainkey.sender.test", rsa_key().txt_record)
    raw = MSG
    for _ in range(MAX_SIGNATURES + 2):
        raw = sign(raw, "sender.test")
    results = await verify_dkim(raw, TxtResolver([dns_server.address], 1.0), pool)
    assert len(results) == MAX_SIGNATURES
    assert {r.result for r in results} == {"pass"}
    assert len(dns_server.queries) == MAX_SIGNATURES


async def test_unsigned_and_unparseable(pool: ThreadPoolExecutor, dns_server: LoopbackDNS) -> None:
    r = TxtResolver([dns_server.address], 1.0)
    assert await verify_dkim(MSG, r, pool) == ()
    assert await verify_dkim(b"\x00garbage", r, pool) == ()
    bad = b"DKIM-Signature: v=1\r\nBroken header line\r\n\r\nbody\r\n"
    [res] = await verify_dkim(bad, r, pool)
    assert res.result == "fail"


def test_auth_results_value_is_rfc8601() -> None:
    results = (
        SignatureResult("pass", "sender.test", "sel", "Ab+/cd=="),
        SignatureResult("fail", "x.test", "s1", "", "body hash mismatch"),
        SignatureResult("temperror", "y.test", "s2", "", "DNS timeout after 5s"),
    )
    value = auth_results_value("mw.example.com", results, ["arc=pass"])
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert parsed.authserv_id == "mw.example.com"
    assert [r.method for r in parsed.results] == ["dkim", "dkim", "dkim", "arc"]
    assert [r.result for r in parsed.results] == ["pass", "fail", "temperror", "pass"]
    assert auth_results_value("mw.example.com", ()) == "mw.example.com; dkim=none"
    assert summarize(results) == "pass" and summarize(results[1:]) == "temperror"
    assert summarize(results[1:2]) == "fail" and summarize(()) == "none"


@pytest.mark.parametrize(
    ("d", "frm", "ok"),
    [("sender.test", "sender.test", True), ("sender.test", "mail.sender.test", True),
     ("mail.sender.test", "sender.test", True), ("other.test", "sender.test", False),
     ("ender.test", "sender.test", False), ("test", "sender.test", False), ("", "a.test", False),
     ("a.test", None, False)],
)
def test_alignment(d: str, frm: str | None, ok: bool) -> None:
    assert aligned(d, frm) is ok


# ------------------------------------------------------------ the shared corpus


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def words(results: tuple[SignatureResult, ...]) -> list[str]:
    return [r.result for r in results]


async def check(raw: bytes, dns: LoopbackDNS, pool: ThreadPoolExecutor, timeout: float = 1.0) -> list[str]:
    return words(await verify_dkim(raw, TxtResolver([dns.address], timeout), pool, timeout=timeout))


def published(dns: LoopbackDNS, raw: bytes, txt: str) -> None:
    """Publish ``txt`` at every s=/d= named by the message's DKIM-Signatures."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for sig in re.findall(r"(?ims)^DKIM-Signature:(.*?)(?=^\S)", head + "\r\nX: y"):
        tags = dict(re.findall(r"(\w+)\s*=\s*([^;]*)", " ".join(sig.split())))
        dns.add_txt(f"{tags['s'].strip()}._domainkey.{tags['d'].strip()}", txt)


STALWART_EXPECTED = {  # DKIMPY-1.1.8-CROSSCHECK.txt; 005 has x= in the past
    "001.txt": ["pass", "pass"], "002.txt": ["pass"], "003.txt": ["pass", "pass"],
    "004.txt": ["pass"], "005.txt": ["fail"], "006.txt": ["pass"],
}


@pytest.mark.parametrize("name", sorted(STALWART_EXPECTED))
async def test_corpus_stalwart(corpus: Path, dns_server: LoopbackDNS, pool: ThreadPoolExecutor,
                               name: str) -> None:
    text = (corpus / "dkim/stalwart-mail-auth/dkim" / name).read_bytes()
    records, _, message = text.partition(b"\n\n")
    for line in records.decode().splitlines():
        key, _, value = line.partition(" ")
        dns_server.add_txt(key, value)
    assert await check(crlf(message), dns_server, pool) == STALWART_EXPECTED[name]


# MimeKit's real Gmail-signed messages, and dkimpy's degenerate-folding one
# (Debian bug 711751), which is signed with the same 2012 Gmail key.
GMAIL = ["mimekit/gmail.msg", "mimekit/related.msg", "mimekit/multipart-no-end-boundary.msg",
         "dkimpy/test2.message"]


@pytest.mark.parametrize("name", GMAIL)
async def test_corpus_gmail_signed(corpus: Path, dns_server: LoopbackDNS, pool: ThreadPoolExecutor,
                                   name: str) -> None:
    pem = (corpus / "dkim/mimekit/gmail.pub").read_text()
    p = "".join(line for line in pem.splitlines() if "-----" not in line)
    raw = crlf((corpus / "dkim" / name).read_bytes())
    published(dns_server, raw, f"v=DKIM1; k=rsa; p={p}")
    assert await check(raw, dns_server, pool) == ["pass"]


RFC8463_KEYS = {"brisbane._domainkey.football.example.com":
                "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}


@pytest.mark.parametrize(
    ("path", "expected"),
    [("dkim/mimekit/rfc8463-example.msg", ["pass", "pass"]),
     ("dkim/dkimpy/rfc6376.signed.msg", ["pass", "pass"]),
     ("dkim/dkimpy/rfc6376.signed.no_t.msg", ["fail"]),
     ("dkim/dkimpy/test.message.baddomain", ["fail"])],
)
async def test_corpus_dkimpy_and_rfc8463(corpus: Path, dns_server: LoopbackDNS, pool: ThreadPoolExecutor,
                                        path: str, expected: list[str]) -> None:
    test_txt = (corpus / "dkim/dkimpy/test.txt").read_text().strip()
    for name, value in RFC8463_KEYS.items():
        dns_server.add_txt(name, value)
    dns_server.add_txt("test._domainkey.football.example.com", test_txt)
    dns_server.add_txt("test._domainkey.example.com", test_txt)
    raw = crlf((corpus / path).read_bytes())
    assert await check(raw, dns_server, pool) == expected


async def test_corpus_dkimpy_corrupted_key_fails_cleanly(corpus: Path, dns_server: LoopbackDNS,
                                                         pool: ThreadPoolExecutor) -> None:
    dns_server.add_txt("test._domainkey.football.example.com",
                       "v=DKIM1; k=rsa; p=MFwwDQYJKoZIhvNAQEBBQADSwAwSAJBANqPy")
    raw = crlf((corpus / "dkim/dkimpy/rfc6376.signed.rsa.msg").read_bytes())
    assert await check(raw, dns_server, pool) == ["fail"]


# rspamd's EXPECTED.tsv, in our words: ALLOW -> a pass; REJECT/PERMFAIL -> fail
# (no pass); TEMPFAIL -> temperror; NA -> none.
RSPAMD = [
    ("dmarc/bad_dkim2.eml", "fail"), ("dmarc/bad_dkim1.eml", "fail"),
    ("dmarc/bad_dkim3.eml", "temperror"), ("dmarc/dkim_unknown_tags.eml", "pass"),
    ("dkim_huge_hlist.eml", "no-pass"), ("dkim_large_hlist.eml", "fail"),
    ("dkim_many_sigs.eml", "no-pass"), ("dkim_sigs_at_limit.eml", "pass"),
    ("ed25519.eml", "pass"), ("ed25519-broken.eml", "fail"), ("dkim_broken_key.eml", "fail"),
    ("dkim_key_too_long.eml", "fail"), ("dkim_key_too_wide.eml", "fail"),
    ("dkim_key_wide_ok.eml", "fail"), ("dkim_revoked_key.eml", "fail"),
]


@pytest.mark.parametrize(("name", "expected"), RSPAMD)
async def test_corpus_rspamd(corpus: Path, dns_server: LoopbackDNS, pool: ThreadPoolExecutor,
                             name: str, expected: str) -> None:
    for line in (corpus / "dkim/rspamd/dns-txt-records.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        rname, _rtype, kind, value = line.split("\t", 3)
        if kind == "reply":
            dns_server.add_txt(rname, value)
        elif value == "timeout":
            dns_server.set_timeout(rname)
        elif value == "servfail":
            dns_server.set_servfail(rname)
    raw = crlf((corpus / "dkim/rspamd" / name).read_bytes())
    got = await check(raw, dns_server, pool, timeout=0.3)
    if expected == "pass":
        assert "pass" in got
    elif expected == "no-pass":
        assert got and "pass" not in got
    else:
        assert got and set(got) == {expected}, got


async def test_corpus_rspamd_unsigned(corpus: Path, dns_server: LoopbackDNS, pool: ThreadPoolExecutor) -> None:
    raw = crlf((corpus / "mime/rspamd-functional-messages/utf.eml").read_bytes())
    assert await check(raw, dns_server, pool) == []  # R_DKIM_NA
