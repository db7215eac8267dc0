"""DKIM verification and ARC sealing for the ``external_attachments`` filter.

Policy clause: "extreme care with attachments from third parties, especially
*unidentified* ones".  DKIM (RFC 6376) is how mailwarden tells an identified
sender from an unidentified one, so this module must keep three answers apart
that dkimpy folds together:

* **fail** -- a signature that does not verify, or whose key is missing
  (NXDOMAIN, no TXT record, a broken or revoked key);
* **temperror** -- DNS did not answer usefully (timeout, SERVFAIL, REFUSED,
  no reachable server).  dkimpy's own resolvers turn that into a plain
  ``False``; our DNS function raises :class:`DnsTrouble` instead, which is not
  a ``DKIMException`` and so passes through dkimpy untouched;
* **none** -- no DKIM-Signature at all.

Verification uses dkimpy's asyncio verifier (``dkim.asyncsupport.DKIM``) with
our own async DNS function (dnspython's asyncio resolver against the
configured nameservers).  The CPU work -- parsing the message, canonicalising
and hashing the body, the RSA/ed25519 check -- runs in the injected thread
pool, never on the event loop.  A thread still holds the GIL while dkimpy's
regular expressions run over a body (measured: ~40 ms of loop stall per MB),
so for large messages the caller passes a process pool: the keys are then
fetched on the loop with the same DNS function and dkimpy's (sync) verifier
runs in a worker process with those keys (:func:`verify_in_process`).  At
most :data:`MAX_SIGNATURES` signatures are checked (the topmost ones,
concurrently).

ARC (RFC 8617): :func:`arc_seal` signs an already-edited message with dkimpy's
``arc_sign``; :func:`arc_chain_status` verifies a chain that arrived with the
message, which ``arc_sign`` needs to continue it.  Both are blocking and are
run in the thread pool by the filter.
"""

from __future__ import annotations

import asyncio
import binascii
import copy
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

import dkim
import dkim.asyncsupport
import dkim.crypto
import dkim.util
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.message import header_block

log = logging.getLogger("mailwarden.dkim")


class _DebugOnly(logging.LoggerAdapter):  # type: ignore[type-arg]
    """dkimpy logs every bad signature from the internet at ERROR; those are
    findings, not faults, so they go to DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_dkimpy_log = _DebugOnly(logging.getLogger("mailwarden.dkim.dkimpy"), {})

#: Only the topmost signatures are checked (a flood of signatures must not
#: buy a flood of DNS queries and hashes); rspamd uses the same limit.
MAX_SIGNATURES = 5

#: Smallest RSA key accepted (RFC 8301: verifiers MUST NOT accept < 1024).
MIN_KEY_BITS = 1024

TxtLookup = Callable[..., Awaitable[bytes | None]]


class DnsTrouble(Exception):
    """DNS could not say whether the key exists (timeout, SERVFAIL, REFUSED,
    network error): the DKIM result is ``temperror``, never ``fail``.

    Deliberately not a ``dkim.DKIMException``: dkimpy only catches its own
    exceptions, so this one reaches us instead of becoming ``False``.
    """


# ------------------------------------------------------------------ nameservers


def parse_nameserver(item: str) -> tuple[str, int]:
    """``"ip"`` or ``"ip:port"`` (``"[v6]:port"``) -> (ip, port).  Raises ValueError."""
    text = item.strip()
    port = 53
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad nameserver {item!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad nameserver {item!r}: expected [ip]:port")
            port = _port(rest[1:], item)
    elif text.count(":") == 1:
        host, port_s = text.split(":")
        port = _port(port_s, item)
    else:
        host = text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad nameserver {item!r}: expected an IP address, not a name") from None
    return str(ip), port


def _port(text: str, item: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"bad port in nameserver {item!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in nameserver {item!r}")
    return port


def check_nameservers(value: tuple[str, ...]) -> tuple[str, ...]:
    """Config validator for ``nameservers``."""
    for item in value:
        parse_nameserver(item)
    return value


class TxtResolver:
    """Async TXT lookups for DKIM keys through dnspython's asyncio resolver.

    ``nameservers`` empty means the system resolver (``/etc/resolv.conf``),
    read once here.  Each lookup is bounded by ``timeout`` seconds in total.
    Returns the TXT record (strings joined) or None when the name has no TXT
    record (NXDOMAIN, NODATA: a missing key, which is ``fail``); raises
    :class:`DnsTrouble` for everything that is DNS not answering.
    """

    def __init__(self, nameservers: Iterable[str], timeout: float) -> None:
        self.timeout = timeout
        self.problem: str | None = None
        self.resolver: dns.asyncresolver.Resolver | None
        servers = [parse_nameserver(s) for s in nameservers]
        try:
            if servers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers
                ]
            else:
                resolver = dns.asyncresolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            self.resolver = None
            self.problem = f"no system resolver: {exc.__class__.__name__}"
            return
        resolver.timeout = min(timeout, 2.0)
        resolver.lifetime = timeout
        resolver.cache = None
        self.resolver = resolver

    async def __call__(self, name: bytes | str, timeout: float | None = None) -> bytes | None:
        if self.resolver is None:
            raise DnsTrouble(self.problem or "no resolver")
        lifetime = self.timeout if timeout is None else max(0.05, min(self.timeout, timeout))
        try:
            text = name.decode("utf-8") if isinstance(name, bytes) else name
            qname = dns.name.from_text(text)
        except (UnicodeError, dns.exception.DNSException, ValueError):
            return None  # not a valid domain name: there is no such key
        try:
            answer = await self.resolver.resolve(
                qname,
                dns.rdatatype.TXT,
                search=False,
                raise_on_no_answer=False,
                lifetime=lifetime,
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.resolver.NoNameservers:
            raise DnsTrouble("DNS SERVFAIL or REFUSED") from None
        except dns.exception.Timeout:
            raise DnsTrouble(f"DNS timeout after {lifetime:g}s") from None
        except dns.exception.DNSException as exc:
            raise DnsTrouble(f"DNS error: {exc.__class__.__name__}") from None
        except OSError as exc:
            raise DnsTrouble(f"DNS network error: {exc.__class__.__name__}") from None
        if answer.rrset is None:
            return None
        return pick_key_record(b"".join(r.strings) for r in answer.rrset)


def pick_key_record(records: Iterable[bytes | str]) -> bytes | None:
    """Of several TXT records at a key name, the one that looks like a key."""
    found = [r.encode("utf-8") if isinstance(r, str) else bytes(r) for r in records]
    for rec in found:
        if re.search(rb"(^|;)\s*p\s*=", rec):
            return rec
    return found[0] if found else None


def lookup_from_callable(fn: Callable[..., Any]) -> TxtLookup:
    """Adapt :attr:`FilterContext.dns_txt` (tests' DNS override) to a lookup.

    ``fn(name)`` gets the key name as text without the trailing dot
    (``sel._domainkey.example.org``) and returns None or ``[]`` for "no such
    record", or a TXT record (str/bytes) or a list of them; it may be async.
    Anything it raises means DNS trouble (``temperror``).
    """

    async def lookup(name: bytes | str, timeout: float | None = None) -> bytes | None:
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        try:
            result = fn(text.rstrip("."))
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
        except Exception as exc:
            raise DnsTrouble(f"DNS error: {exc.__class__.__name__}: {exc}") from None
        if not result:
            return None
        if isinstance(result, str | bytes):
            result = [result]
        return pick_key_record(result)

    return lookup


# ------------------------------------------------------------------ verification


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """The outcome of one DKIM-Signature: ``pass``, ``fail`` or ``temperror``."""

    result: str
    domain: str = ""
    selector: str = ""
    b_prefix: str = ""
    reason: str = ""


class _OffLoopDKIM(dkim.asyncsupport.DKIM):
    """dkimpy's asyncio verifier, with the CPU-bound part run in a thread pool.

    The key fetch stays async (our DNS function); ``verify_sig_process`` (body
    hash and signature check) goes to ``executor``.
    """

    executor: Executor | None = None
    key_problem: str = ""

    async def verify_sig(self, sig, include_headers, sig_header, dnsfunc):  # type: ignore[no-untyped-def]
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            self.pk, self.keysize, self.ktag, self.seqtlsrpt = (
                await dkim.asyncsupport.load_pk_from_dns_async(name, dnsfunc, timeout=self.timeout)
            )
        except (dkim.KeyFormatError, binascii.Error, ValueError) as exc:
            self.key_problem = _reason(exc)
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self.verify_sig_process, sig, include_headers, sig_header, dnsfunc
        )


def _reason(exc: BaseException) -> str:
    """A short, header-safe reason text."""
    text = str(exc) or exc.__class__.__name__
    text = re.sub(r"\(b'[^']*'\)|b'[^']*'|\([^)]{40,}\)", "", text)
    text = re.sub(r"[^A-Za-z0-9 .,:=_/-]", "", " ".join(text.split()))
    return text.strip()[:60].strip(" .,:=_/-")


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def _tag(sig: dict[bytes, bytes], key: bytes) -> str:
    value = sig.get(key, b"").decode("ascii", "replace").strip().lower()
    return value if _TOKEN.fullmatch(value) else ""


def _b_prefix(sig: dict[bytes, bytes]) -> str:
    b = re.sub(rb"\s+", b"", sig.get(b"b", b""))[:8].decode("ascii", "replace")
    return b if re.fullmatch(r"[A-Za-z0-9+/=]{1,8}", b) else ""


async def _verify_one(d: _OffLoopDKIM, idx: int, lookup: TxtLookup) -> SignatureResult:
    sig: dict[bytes, bytes] = {}
    try:
        sigheaders = [(x, y) for x, y in d.headers if x.lower() == b"dkim-signature"]
        try:
            sig = dkim.util.parse_tag_value(sigheaders[idx][1])
        except Exception:
            sig = {}
        ok = await d.verify(idx=idx, dnsfunc=lookup)
        reason = "" if ok else (d.key_problem or "signature did not verify")
        result = "pass" if ok else "fail"
    except DnsTrouble as exc:
        result, reason = "temperror", _reason(exc)
    except dkim.DKIMException as exc:
        result, reason = "fail", _reason(exc)
    except Exception as exc:  # dkimpy on hostile input: a failure, never a crash
        log.debug("dkim: unexpected %r", exc)
        result, reason = "fail", f"unverifiable signature ({exc.__class__.__name__})"
    return SignatureResult(result, _tag(sig, b"d"), _tag(sig, b"s"), _b_prefix(sig), reason)


_HAS_SIGNATURE = re.compile(rb"(?im)^dkim-signature[ \t]*:")


def has_signature(raw: bytes) -> bool:
    """True when the header block has a DKIM-Signature field."""
    return _HAS_SIGNATURE.search(header_block(raw)) is not None


async def verify_dkim(
    raw: bytes,
    lookup: TxtLookup,
    executor: Executor | None,
    *,
    timeout: float = 5.0,
    max_signatures: int = MAX_SIGNATURES,
    processes: Executor | None = None,
) -> tuple[SignatureResult, ...]:
    """Verify the topmost ``max_signatures`` DKIM signatures of ``raw``.

    An empty tuple means the message carries no DKIM-Signature (``none``).
    Never raises for anything the message or DNS does.

    With ``processes`` (a process pool), the keys are fetched here and the
    verification runs in a worker process (:func:`verify_in_process`): for
    large messages, where hashing the body in a thread would still hold the
    GIL -- and so the event loop -- for tens of milliseconds per megabyte.
    """
    # Most mail carries no signature: know it from the header block alone,
    # before dkimpy parses (and copies) the whole message.
    if not has_signature(raw):
        return ()
    if processes is not None:
        try:
            return await _verify_prefetched(raw, lookup, processes, max_signatures)
        except _WorkerFailed as exc:
            log.warning("dkim: worker process failed (%r); verifying in a thread", exc.__cause__)
    loop = asyncio.get_running_loop()
    factory = partial(
        _OffLoopDKIM, raw, logger=_dkimpy_log, minkey=MIN_KEY_BITS, timeout=timeout
    )
    try:
        base = await loop.run_in_executor(executor, factory)
    except Exception as exc:
        if b"dkim-signature" not in header_block(raw).lower():
            return ()
        return (SignatureResult("fail", reason=_reason(exc) or "unparseable header"),)
    base.executor = executor
    count = sum(1 for name, _ in base.headers if name.lower() == b"dkim-signature")
    if count == 0:
        return ()
    copies = [copy.copy(base) for _ in range(min(count, max_signatures))]
    return tuple(
        await asyncio.gather(*(_verify_one(d, i, lookup) for i, d in enumerate(copies)))
    )


class _WorkerFailed(Exception):
    """The process pool could not run the verification."""


def _signatures(raw: bytes, limit: int) -> list[dict[bytes, bytes]] | None:
    """The tags of the topmost ``limit`` DKIM-Signatures (headers only; cheap).

    None when the header block does not parse; a signature whose tags do not
    parse is an empty dict.
    """
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[: end + 2]
    try:
        headers, _ = dkim.rfc822_parse(head + b"\r\n")
    except Exception:
        return None
    out: list[dict[bytes, bytes]] = []
    for name, value in headers:
        if name.lower() != b"dkim-signature":
            continue
        try:
            out.append(dict(dkim.util.parse_tag_value(value)))
        except Exception:
            out.append({})
        if len(out) == limit:
            break
    return out


def _key_name(sig: dict[bytes, bytes]) -> bytes | None:
    if b"s" not in sig or b"d" not in sig:
        return None
    return sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."


async def _verify_prefetched(raw: bytes, lookup: TxtLookup, processes: Executor,
                             limit: int) -> tuple[SignatureResult, ...]:
    sigs = _signatures(raw, limit)
    if sigs is None:
        if b"dkim-signature" not in header_block(raw).lower():
            return ()
        return (SignatureResult("fail", reason="unparseable header"),)
    if not sigs:
        return ()
    names = {n for n in (_key_name(sig) for sig in sigs) if n is not None}

    async def fetch(name: bytes) -> tuple[bytes, bytes | None | DnsTrouble]:
        try:
            return name, await lookup(name)
        except DnsTrouble as exc:
            return name, exc

    fetched = dict(await asyncio.gather(*(fetch(n) for n in names)))
    keys = {n: v for n, v in fetched.items() if not isinstance(v, DnsTrouble)}
    todo = [i for i, sig in enumerate(sigs) if not isinstance(fetched.get(_key_name(sig) or b""),
                                                             DnsTrouble)]
    loop = asyncio.get_running_loop()
    try:
        verdicts = await loop.run_in_executor(processes, verify_in_process, raw, keys, todo)
    except Exception as exc:  # a broken worker process: the caller falls back
        raise _WorkerFailed() from exc
    results: list[SignatureResult] = []
    for i, sig in enumerate(sigs):
        trouble = fetched.get(_key_name(sig) or b"")
        if isinstance(trouble, DnsTrouble):
            word, reason = "temperror", _reason(trouble)
        else:
            word, reason = verdicts[i]
        results.append(SignatureResult(word, _tag(sig, b"d"), _tag(sig, b"s"), _b_prefix(sig),
                                       reason))
    return tuple(results)


def verify_in_process(raw: bytes, keys: dict[bytes, bytes | None],
                      indexes: list[int]) -> dict[int, tuple[str, str]]:
    """Verify signatures ``indexes`` of ``raw`` with prefetched ``keys``
    (blocking; meant for a worker process).  Returns idx -> (result, reason)."""
    out: dict[int, tuple[str, str]] = {}
    if not indexes:
        return out
    try:
        base = dkim.DKIM(raw, logger=_dkimpy_log, minkey=MIN_KEY_BITS)
    except Exception as exc:
        return {i: ("fail", _reason(exc) or "unparseable header") for i in indexes}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return keys.get(name)

    for i in indexes:
        d = copy.copy(base)
        try:
            ok = d.verify(idx=i, dnsfunc=dnsfunc)
            if ok:
                out[i] = ("pass", "")
            else:
                missing = keys.get(_key_name(d.signature_fields) or b"") is None
                out[i] = ("fail", "missing public key" if missing else "signature did not verify")
        except dkim.DKIMException as exc:
            out[i] = ("fail", _reason(exc))
        except Exception as exc:
            out[i] = ("fail", f"unverifiable signature ({exc.__class__.__name__})")
    return out


def summarize(results: tuple[SignatureResult, ...]) -> str:
    """One word for the log: pass if any passed, else temperror, else fail; none."""
    if not results:
        return "none"
    words = {r.result for r in results}
    for word in ("pass", "temperror", "fail"):
        if word in words:
            return word
    return "fail"


def aligned(signing_domain: str, from_domain: str | None) -> bool:
    """Relaxed alignment, simply: equal, or one a subdomain of the other.

    A bare top-level ``d=`` (no dot) never aligns.
    """
    if not signing_domain or not from_domain or "." not in signing_domain:
        return False
    d = signing_domain.lower().rstrip(".")
    f = from_domain.lower().rstrip(".")
    return d == f or f.endswith("." + d) or d.endswith("." + f)


def auth_results_value(hostname: str, results: tuple[SignatureResult, ...],
                       extra: Iterable[str] = ()) -> str:
    """The RFC 8601 Authentication-Results value: ``host; dkim=... ; ...``."""
    parts = [hostname]
    if not results:
        parts.append("dkim=none")
    for r in results:
        item = f"dkim={r.result}"
        if r.reason and r.result != "pass":
            item += f' reason="{r.reason}"'
        if r.domain:
            item += f" header.d={r.domain}"
        if r.selector:
            item += f" header.s={r.selector}"
        if r.b_prefix:
            item += f' header.b="{r.b_prefix}"'
        parts.append(item)
    parts.extend(extra)
    return "; ".join(parts)


# ------------------------------------------------------------------ ARC


def check_private_key(path: str) -> bytes:
    """Read and check a PEM RSA private key (PKCS#1, as dkimpy signs with)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    data = data.replace(b"\r\n", b"\n")
    try:
        dkim.crypto.parse_pem_private_key(data)
    except Exception:
        raise ValueError(
            f"{path} is not a PEM RSA private key (PKCS#1, "
            "'-----BEGIN RSA PRIVATE KEY-----'; convert with 'openssl rsa -traditional')"
        ) from None
    return data


#: An incoming ARC chain longer than this is not verified (it counts as
#: failed): each instance costs DNS lookups, and RFC 8617 allows 50.
MAX_ARC_INSTANCES = 10


def arc_instances(raw: bytes) -> int:
    """How many ARC-Seal headers the message arrived with."""
    head = header_block(raw)
    return len(re.findall(rb"(?im)^arc-seal\s*:", head))


def has_arc_chain(raw: bytes) -> bool:
    """True when the message arrived with ARC headers."""
    return arc_instances(raw) > 0


def arc_chain_status(raw: bytes, dnsfunc: Callable[..., bytes | None]) -> str:
    """Verify an incoming ARC chain (blocking): ``pass``, ``fail``, ``none``.

    Raises :class:`DnsTrouble` when a key could not be fetched.
    """
    if arc_instances(raw) > MAX_ARC_INSTANCES:
        return "fail"
    cv, _results, _reason_text = dkim.arc_verify(raw, logger=_dkimpy_log, dnsfunc=dnsfunc,
                                                 minkey=MIN_KEY_BITS)
    if cv is None:
        return "fail"
    return cv.decode("ascii").lower()


def sync_lookup(lookup: TxtLookup, loop: asyncio.AbstractEventLoop, timeout: float,
                budget: float | None = None) -> Callable[..., bytes | None]:
    """A blocking DNS function for dkimpy's sync ARC code, run in a worker
    thread, that uses the async ``lookup`` on ``loop``.

    With ``budget`` (seconds), lookups stop once it is spent: they raise
    :class:`DnsTrouble` at once, so a long chain cannot hold a worker thread.
    """
    deadline = None if budget is None else time.monotonic() + budget

    def dnsfunc(name: bytes, timeout: float = timeout) -> bytes | None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DnsTrouble("DNS budget for the ARC chain spent")
            timeout = min(timeout, left)
        fut = asyncio.run_coroutine_threadsafe(lookup(name, timeout=timeout), loop)
        try:
            return fut.result(timeout=timeout + 1)
        except TimeoutError:
            fut.cancel()
            raise DnsTrouble("DNS timeout") from None

    return dnsfunc


def arc_seal(message: bytes, *, selector: str, domain: str, key: bytes, srv_id: str,
             timestamp: int) -> list[tuple[str, str]]:
    """ARC-seal ``message`` (blocking): the new ARC set as (name, value) pairs,
    ARC-Seal first, ready to prepend; empty when dkimpy declines (a chain it
    cannot continue)."""
    lines = dkim.arc_sign(
        message,
        selector.encode("ascii"),
        domain.encode("ascii"),
        key,
        srv_id.encode("ascii"),
        timestamp=timestamp,
        logger=_dkimpy_log,
    )
    out: list[tuple[str, str]] = []
    for line in lines:
        name, _, value = line.partition(b":")
        out.append((name.decode("ascii").strip(), " ".join(value.decode("ascii").split())))
    return out
