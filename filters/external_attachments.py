"""external_attachments filter: warn about attachments from outside.

Policy clause enforced: *"take extreme care with attachments from third
parties, especially unidentified ones"*; and DESIGN.md: *"a message claiming an
internal From: that came from outside gets the strongest warning"*.

Only inbound mail is looked at (``mail.direction == "inbound"``); outbound and
internal mail is relayed with no edits.

Every inbound message
    is DKIM-verified as received, before any edit (:mod:`filters.dkim_check`),
    and gets ``Authentication-Results: <hostname>; dkim=pass|fail|none|temperror
    header.d=... header.s=... header.b=...`` (RFC 8601, one ``dkim=`` per
    checked signature).  Authentication-Results fields that arrived claiming
    our hostname as authserv-id are removed first (RFC 8601 section 5: forged
    results must not pass through), and so is any ``X-Mailwarden-External``
    that arrived from outside (a sender must not be able to pose as
    pre-checked).

The sender is
    ``spoofed-internal`` when the header From domain or the envelope sender
    domain is one of ``internal_domains`` (the message is inbound, so it came
    from outside whatever its signature says);
    ``identified`` when a DKIM signature passes and its ``d=`` aligns with the
    header From domain (relaxed, simply: equal, or one is a subdomain of the
    other);
    ``unidentified`` otherwise (no signature, failing, unaligned, DNS trouble).

An inbound message with attachments
    -- at least one :attr:`Mail.attachments` entry that is a real attachment:
    ``Content-Disposition: attachment`` (``inline=False``) or carrying a file
    name; nameless inline parts such as a signature logo referenced by
    Content-ID do not count; a message whose MIME cannot be parsed counts as
    having attachments (fail closed) --
    also gets ``X-Mailwarden-External: attachments; sender=<result>``, the
    subject tag (once) and a body banner whose wording depends on the result
    (``banner_text``, ``banner_text_unidentified``, ``banner_text_spoofed``);
    see :mod:`gateway.banner` for where the banner goes and what is never
    touched.

ARC (optional: ``arc_key``, ``arc_selector``, ``arc_domain``, all or none)
    The banner invalidates the sender's DKIM body hash downstream.  With ARC
    configured, mailwarden seals the edited message (dkimpy ``arc_sign`` in
    the thread pool, or a worker process for a large message) so a
    downstream service that trusts mailwarden as an ARC sealer keeps the
    original verdict.  The filter asks for the seal with an
    :class:`~filters.base.ArcSeal` edit; the pipeline applies it last, to
    the message as relayed (every filter's edits in), and puts the ARC set
    on top of the header block.

Settings (``[filters.external_attachments]``)
    ``subject_tag``               default ``"[EXTERNAL]"``
    ``banner_text``               identified sender (CONTRACT.md wording)
    ``banner_text_unidentified``  sender could not be identified
    ``banner_text_spoofed``       internal From from outside
    ``nameservers``               ``["ip", "ip:port", "[v6]:port"]``; empty = /etc/resolv.conf
    ``dns_timeout``               seconds per key lookup, default 5
    ``arc_key``                   path to a PEM RSA private key (PKCS#1); "" = no ARC
    ``arc_selector``, ``arc_domain``  where the ARC public key is published
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from filters import dkim_check
from filters.base import (
    AddBanner,
    AddHeader,
    ArcSeal,
    BaseFilter,
    Edit,
    FilterContext,
    RemoveHeader,
    SettingsError,
    TagSubject,
    Verdict,
)
from gateway.message import Direction, Mail, ParseError

log = logging.getLogger("mailwarden.filters.external_attachments")

#: Messages larger than this are DKIM-verified and ARC-sealed in a worker
#: process: hashing a body in a thread holds the GIL (measured: ~40 ms of event
#: loop stall per MB), a process does not.  Smaller ones use dkimpy's asyncio
#: verifier with the crypto in the thread pool.
PROCESS_ABOVE = 512 * 1024

EXTERNAL_HEADER = "X-Mailwarden-External"
AUTH_RESULTS = "Authentication-Results"

IDENTIFIED = "identified"
UNIDENTIFIED = "unidentified"
SPOOFED_INTERNAL = "spoofed-internal"

DEFAULT_BANNER = (
    "CAUTION: This email came from outside the organisation and carries attachments. "
    "Do not open them unless you know the sender and expected them."
)
DEFAULT_BANNER_UNIDENTIFIED = (
    "CAUTION: This email came from outside the organisation and its sender could not "
    "be identified. Do not open its attachments unless you have confirmed with the "
    "sender, by other means, that they sent them."
)
DEFAULT_BANNER_SPOOFED = (
    "WARNING: This email claims to come from inside the organisation but arrived from "
    "outside: it is probably forged. Do not open its attachments, click its links or "
    "reply to it. Report it to IT."
)


def _one_line(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must be a single line")
    return value


def _tag(value: str) -> str:
    _one_line(value)
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _banner(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _domain(value: str) -> str:
    if value and not dkim_check._TOKEN.fullmatch(value):
        raise ValueError(f"bad domain {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """``[filters.external_attachments]``."""

    subject_tag: str = field(default="[EXTERNAL]", metadata={"check": _tag})
    banner_text: str = field(default=DEFAULT_BANNER, metadata={"check": _banner})
    banner_text_unidentified: str = field(
        default=DEFAULT_BANNER_UNIDENTIFIED, metadata={"check": _banner}
    )
    banner_text_spoofed: str = field(default=DEFAULT_BANNER_SPOOFED, metadata={"check": _banner})
    nameservers: tuple[str, ...] = field(
        default=(), metadata={"check": dkim_check.check_nameservers}
    )
    dns_timeout: float = field(default=5.0, metadata={"check": _positive})
    arc_key: str = ""
    arc_selector: str = field(default="", metadata={"check": _domain})
    arc_domain: str = field(default="", metadata={"check": _domain})

    def __post_init__(self) -> None:
        arc = {"arc_key": self.arc_key, "arc_selector": self.arc_selector,
               "arc_domain": self.arc_domain}
        if any(arc.values()):
            for key, value in arc.items():
                if not value:
                    raise SettingsError(
                        key, "arc_key, arc_selector and arc_domain must be set together"
                    )
            try:
                dkim_check.check_private_key(self.arc_key)
            except ValueError as exc:
                raise SettingsError("arc_key", str(exc)) from None
        try:
            dkim_check.check_nameservers(self.nameservers)
        except ValueError as exc:
            raise SettingsError("nameservers", str(exc)) from None

    @property
    def arc_enabled(self) -> bool:
        return bool(self.arc_key)


def _domain_of(address: str | None) -> str | None:
    if not address or "@" not in address:
        return None
    _, addr = email.utils.parseaddr(address)
    addr = addr or address
    if "@" not in addr:
        return None
    return addr.rsplit("@", 1)[1].strip().strip(">").lower().rstrip(".") or None


def has_attachments(mail: Mail) -> bool:
    """True when the message carries a real attachment (see the module docstring)."""
    try:
        attachments = mail.attachments
    except ParseError:
        return True
    except Exception:  # pragma: no cover - Mail.attachments is defensive already
        return True
    return any((not a.inline) or a.filename for a in attachments)


class ExternalAttachmentsFilter(BaseFilter):
    """Authentication-Results for inbound mail; header, subject tag and banner
    for inbound mail with attachments; wording by DKIM identification."""

    name: ClassVar[str] = "external_attachments"
    Settings: ClassVar[type] = Settings

    def __init__(self, settings: Settings, ctx: FilterContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.lookup: dkim_check.TxtLookup
        if ctx.dns_txt is not None:
            self.lookup = dkim_check.lookup_from_callable(ctx.dns_txt)
        else:
            self.lookup = dkim_check.TxtResolver(settings.nameservers, settings.dns_timeout)
        self.arc_key: bytes | None = None
        if settings.arc_enabled:
            self.arc_key = dkim_check.check_private_key(settings.arc_key)
        self.process_above = PROCESS_ABOVE
        self._processes: ProcessPoolExecutor | None = None

    def processes(self, size: int) -> Executor | None:
        """The worker-process pool for a message of ``size`` bytes (None: small
        enough for threads).  Created on first use; replaced when broken."""
        if size <= self.process_above:
            return None
        pool = self._processes
        if pool is not None and getattr(pool, "_broken", False):
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        if pool is None:
            # forkserver: never fork a process that runs threads and a loop.
            pool = ProcessPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1),
                mp_context=multiprocessing.get_context("forkserver"),
            )
            self._processes = pool
        return pool

    def banner_for(self, sender: str) -> str:
        """The banner wording for an identification result."""
        if sender == IDENTIFIED:
            return self.settings.banner_text
        if sender == SPOOFED_INTERNAL:
            return self.settings.banner_text_spoofed
        return self.settings.banner_text_unidentified

    def classify(self, mail: Mail, results: tuple[dkim_check.SignatureResult, ...]) -> str:
        """identified / unidentified / spoofed-internal (see the module docstring)."""
        from_domain = mail.from_domain
        envelope_domain = _domain_of(mail.mail_from)
        for domain in (from_domain, envelope_domain):
            if domain and self.ctx.is_internal_domain(domain):
                return SPOOFED_INTERNAL
        if any(r.result == "pass" and dkim_check.aligned(r.domain, from_domain) for r in results):
            return IDENTIFIED
        return UNIDENTIFIED

    async def check(self, mail: Mail) -> Verdict:
        """Verify DKIM, classify the sender, and return the edits."""
        now = self.check_now(mail)
        if now is not None:
            return now
        results: tuple[dkim_check.SignatureResult, ...] = ()
        if dkim_check.has_signature(mail.raw):
            results = await dkim_check.verify_dkim(
                mail.raw, self.lookup, self.ctx.executor, timeout=self.settings.dns_timeout,
                processes=self.processes(len(mail.raw)),
            )
        arc_status: str | None = None
        if self.arc_key is not None and dkim_check.has_arc_chain(mail.raw):
            arc_status = await self._arc_status(mail.raw)
        return self._verdict(mail, results, arc_status)

    def check_now(self, mail: Mail) -> Verdict | None:
        """The verdict for mail that is not inbound, or inbound with no DKIM
        signature and no ARC chain to check (most of it: answered from the
        header block, no DNS); None when there is a signature to verify."""
        if mail.direction != Direction.INBOUND:
            return Verdict.relay(self.name)
        if dkim_check.has_signature(mail.raw) or (
                self.arc_key is not None and dkim_check.has_arc_chain(mail.raw)):
            return None
        return self._verdict(mail, (), None)

    def _verdict(self, mail: Mail, results: tuple[dkim_check.SignatureResult, ...],
                 arc_status: str | None) -> Verdict:
        sender = self.classify(mail, results)
        extra: list[str] = [] if arc_status is None else [f"arc={arc_status}"]
        hostname = self.ctx.hostname
        edits: list[Edit] = [
            RemoveHeader(AUTH_RESULTS, first_token=hostname),
            RemoveHeader(EXTERNAL_HEADER),
        ]
        added: list[Edit] = [
            AddHeader(AUTH_RESULTS, dkim_check.auth_results_value(hostname, results, extra))
        ]
        attachments = has_attachments(mail)
        if attachments:
            added += [
                AddHeader(EXTERNAL_HEADER, f"attachments; sender={sender}"),
                TagSubject(self.settings.subject_tag),
                AddBanner(self.banner_for(sender)),
            ]
        edits += added
        facts: dict[str, Any] = {
            "dkim": dkim_check.summarize(results),
            "dkim_domain": ",".join(r.domain for r in results if r.result == "pass")
            or (results[0].domain if results else ""),
            "sender": sender,
            "external_attachments": attachments,
        }
        if self.arc_key is not None:
            if arc_status != "temperror":
                # The last of all edits: the pipeline seals the message as it
                # will be relayed (every filter's edits in) and sets
                # ``arc_sealed`` in the log by the result.
                edits.append(ArcSeal(self.sealer(), self.processes(len(mail.raw))))
            else:
                facts["arc_sealed"] = False
        return Verdict.relay(self.name, edits=tuple(edits), log_facts=facts)

    def sealer(self) -> partial[list[tuple[str, str]]]:
        """``content -> ARC set`` with this gateway's key and the clock's time
        (picklable, for a worker process)."""
        assert self.arc_key is not None
        return partial(
            dkim_check.arc_seal,
            selector=self.settings.arc_selector,
            domain=self.settings.arc_domain,
            key=self.arc_key,
            srv_id=self.ctx.hostname,
            timestamp=int(self.ctx.clock().timestamp()),
        )

    async def _arc_status(self, raw: bytes) -> str:
        loop = asyncio.get_running_loop()
        # The whole chain gets two lookups' worth of time; past that, temperror.
        dnsfunc = dkim_check.sync_lookup(self.lookup, loop, self.settings.dns_timeout,
                                         budget=2 * self.settings.dns_timeout)
        try:
            return await loop.run_in_executor(
                self.ctx.executor, dkim_check.arc_chain_status, raw, dnsfunc
            )
        except dkim_check.DnsTrouble:
            return "temperror"
        except Exception as exc:
            log.debug("arc: chain verification failed: %r", exc)
            return "fail"

    async def aclose(self) -> None:
        """Stop the worker processes, if any were started."""
        pool, self._processes = self._processes, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

