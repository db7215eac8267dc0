"""Run the filter chain on a message and carry out its disposition.

Detect, then decide: every filter in the chain runs (concurrently, each under
the per-message deadline) and returns a :class:`~filters.base.Verdict`.  A
filter that raises or times out yields TEMPFAIL, never a pass; a message the
MIME parser cannot handle within its bounds is held as unparseable.  One
function, :func:`resolve`, picks the disposition by severity: tempfail, then
reject, then quarantine, then relay.

Then: tempfail -> 451; reject -> the filter's 5xx; quarantine -> the message is
made durable in the store *before* 250 (store trouble -> 451); relay -> the
edits are applied (``rewrite.py``) and the message is sent to the next hop,
whose reply is passed back.  Finally the header-only log record is queued and
one structured line is logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from filters.base import AddBanner, AddHeader, FilterContext, Outcome, Verdict
from gateway import replies
from gateway.config import Config
from gateway.message import Mail, ParseError
from gateway.relay import NextHopFailure, Relay, send_message
from gateway.rewrite import crlf_clean, edit_pieces

log = logging.getLogger("mailwarden.pipeline")
msglog = logging.getLogger("mailwarden.message")

DISPOSITIONS = ("relayed", "quarantined", "rejected", "tempfailed", "next-hop-refused")


class Store(Protocol):
    async def quarantine(self, **kwargs: Any) -> str: ...

    def append_log(self, record: dict[str, Any]) -> None: ...


class Observer(Protocol):
    """Metrics hook (see gateway/metrics.py)."""

    def message_done(self, mail: Mail, result: Result) -> None: ...


#: Messages up to this size (bytes) are MIME-parsed and edited on the event
#: loop, larger ones in a worker thread (see Pipeline.run_filters and _apply)
#: -- and parsed there too with more lines or delimiter-like lines than
#: below: 5,000 parts in 170 KB cost ~0.2 s, which must not stall every other
#: session.
ON_LOOP_BYTES = 256 * 1024
PARSE_ON_LOOP_LINES = 4000
PARSE_ON_LOOP_DELIMITERS = 64


def _few_parts(raw: bytes) -> bool:
    """Cheap (single-byte scans) bound on the parse's cost for the loop."""
    return (raw.count(b"\n") <= PARSE_ON_LOOP_LINES
            and raw.count(b"\n--") <= PARSE_ON_LOOP_DELIMITERS)


@dataclass
class Result:
    """What happened to one message."""

    disposition: str
    reply: str
    verdicts: list[Verdict]
    quarantine_id: str | None = None
    elapsed: float = 0.0
    filter_times: dict[str, float] = field(default_factory=dict)
    #: The bookkeeping left for after the reply (see :meth:`finish`).
    pending: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def finish(self) -> None:
        """Write the header-only log record and the message's log line, once.

        The SMTP layer calls this right after the client's reply is on its way
        (the record is queued for the batched writer anyway, so nothing is
        less durable), or when the processing ends without a client."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending()


def resolve(verdicts: Sequence[Verdict]) -> Outcome:
    """The message's outcome: the most severe of all verdicts."""
    return max((v.outcome for v in verdicts), default=Outcome.RELAY)


def build_chain(config: Config, ctx: FilterContext) -> list[Any]:
    """Instantiate the configured chain, in order."""
    from filters import REGISTRY

    return [REGISTRY[name](config.filter_settings(name), ctx) for name in config.chain]


def verdict_summary(v: Verdict) -> dict[str, Any]:
    """A verdict as header-only facts (for the log and quarantine rows)."""
    out: dict[str, Any] = {"filter": v.filter, "outcome": v.outcome.name.lower()}
    if v.detail:
        out["detail"] = v.detail
    for k, val in v.facts.items():
        out[k] = val
    return out


class Pipeline:
    """The chain plus everything needed to carry out a disposition."""

    def __init__(
        self,
        config: Config,
        filters: list[Any],
        *,
        store: Store | None,
        executor: Executor | None = None,
        clock: Callable[[], datetime] | None = None,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.config = config
        self.filters = filters
        self.store = store
        self.executor = executor
        self.clock = clock
        self.observers = list(observers)
        self.header_log = next((f for f in filters if f.name == "header_log"), None)
        self._background: set[asyncio.Task[Any]] = set()

    async def aclose(self) -> None:
        for f in self.filters:
            try:
                await f.aclose()
            except Exception:
                log.exception("closing filter %s", f.name)
        if self._background:
            await asyncio.wait(self._background, timeout=10)

    # ------------------------------------------------------------- filters

    async def _run_one(self, f: Any, mail: Mail, deadline: float,
                       prepared: asyncio.Future[None] | None) -> tuple[Verdict, float]:
        start = time.perf_counter()

        async def check() -> Verdict:
            if prepared is not None and getattr(f, "reads_mime", True):
                await asyncio.shield(prepared)
            return await f.check(mail)  # type: ignore[no-any-return]

        try:
            # asyncio.timeout, not wait_for: no extra task, so a filter's first
            # step (clamav sending the message to clamd) runs as soon as the
            # chain starts (see run_filters).
            async with asyncio.timeout(deadline):
                verdict = await check()
        except TimeoutError:
            verdict = Verdict.tempfail(f.name, f"timed out after {deadline:g}s")
        except ParseError as exc:
            verdict = Verdict.quarantine(f.name, f"unparseable: {exc}", unparseable=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("filter %s failed on %s", f.name, mail.queue_id)
            verdict = Verdict.tempfail(f.name, f"filter error: {exc.__class__.__name__}")
        if not isinstance(verdict, Verdict):
            verdict = Verdict.tempfail(f.name, "filter returned no verdict")
        return verdict, time.perf_counter() - start

    async def run_filters(self, mail: Mail, parse: bool = False
                          ) -> tuple[list[Verdict], dict[str, float]]:
        """Run the chain concurrently.

        ``parse``: parse the MIME structure once for all filters.  A filter
        that reads it (its ``reads_mime``, True unless it says otherwise)
        starts once the parse is done; the others (clamav: the raw bytes;
        personal: headers) start at once, so clamd scans while the message is
        parsed.  The parse runs on the loop for a message of up to
        :data:`ON_LOOP_BYTES` bytes with few lines and parts (well under a
        millisecond: cheaper than a hop to a worker thread and back), in a
        worker thread otherwise (~40 ms for 6.7 MB would stall every other
        session)."""
        deadline = self.config.gateway.filter_timeout
        if not self.filters:
            return [], {}
        loop = asyncio.get_running_loop()
        prepared: asyncio.Future[None] | None = loop.create_future() if parse else None
        tasks = [asyncio.ensure_future(self._run_one(f, mail, deadline, prepared))
                 for f in self.filters]
        if prepared is not None:
            if mail.size <= ON_LOOP_BYTES and _few_parts(mail.raw):
                await asyncio.sleep(0)  # the filters that need no parse start first
                mail.prepare()
                prepared.set_result(None)
            else:
                work = loop.run_in_executor(self.executor, mail.prepare)
                work.add_done_callback(lambda _f: prepared.done() or prepared.set_result(None))
        results = await asyncio.gather(*tasks)
        verdicts = [r[0] for r in results]
        times = {f.name: r[1] for f, r in zip(self.filters, results, strict=True)}
        return verdicts, times

    # ----------------------------------------------------------- disposition

    def _tempfail_reply(self, verdicts: Sequence[Verdict]) -> str:
        for v in verdicts:
            if v.outcome is Outcome.TEMPFAIL:
                if v.filter == "clamav":
                    return replies.SCANNER_UNAVAILABLE
                return replies.FILTER_FAILED.format(replies.safe_text(v.filter))
        return replies.LOCAL_ERROR

    async def _quarantine(self, mail: Mail, verdicts: Sequence[Verdict]) -> str:
        assert self.store is not None
        held = [v for v in verdicts if v.outcome is Outcome.QUARANTINE]
        personal = any(v.facts.get("personal") for v in verdicts)
        headers = {
            "from": mail.header("From"),
            "to": mail.header("To"),
            "cc": mail.header("Cc"),
            "subject": mail.header("Subject"),
            "message-id": mail.header("Message-ID"),
            "date": mail.header("Date"),
        }
        return await self.store.quarantine(
            raw=mail.raw,
            queue_id=mail.queue_id,
            received=mail.received,
            direction=str(mail.direction),
            client_addr=mail.client_addr,
            helo=mail.helo,
            mail_from=mail.mail_from,
            rcpt_tos=list(mail.rcpt_tos),
            headers=headers,
            reason=",".join(dict.fromkeys(v.filter for v in held)),
            detail="; ".join(v.detail for v in held if v.detail),
            personal=personal,
            verdicts=[verdict_summary(v) for v in verdicts],
        )

    async def process(self, mail: Mail, relay: Relay) -> Result:
        """Run the chain and carry out the disposition; returns the client's reply."""
        start = time.perf_counter()
        # One MIME parse per message, shared by the filters (see run_filters).
        verdicts, times = await self.run_filters(mail, parse=mail.needs_parsing)
        outcome = resolve(verdicts)
        if outcome is Outcome.RELAY:
            unparseable = await self._banner_needs_structure(mail, verdicts)
            if unparseable is not None:
                verdicts = [*verdicts, unparseable]
                outcome = resolve(verdicts)
        qid: str | None = None
        if outcome is Outcome.TEMPFAIL:
            disposition, reply = "tempfailed", self._tempfail_reply(verdicts)
        elif outcome is Outcome.REJECT:
            rej = next(v for v in verdicts if v.outcome is Outcome.REJECT)
            disposition = "rejected"
            reply = rej.reply or replies.POLICY_REJECTED.format(replies.safe_text(rej.detail))
        elif outcome is Outcome.QUARANTINE:
            if self.store is None:
                disposition, reply = "tempfailed", replies.STORE_UNAVAILABLE
            else:
                try:
                    qid = await self._quarantine(mail, verdicts)
                    disposition, reply = "quarantined", replies.QUARANTINED.format(qid)
                except Exception as exc:
                    log.error("quarantine of %s failed: %s", mail.queue_id, exc)
                    disposition, reply = "tempfailed", replies.STORE_UNAVAILABLE
        else:
            edits = [e for v in verdicts for e in v.edits]
            content = mail.raw
            if edits:
                content = await self._apply(mail, edits)
            try:
                reply = await relay.data(content)
            except NextHopFailure as exc:
                log.warning("%s: %s", mail.queue_id, exc.reason)
                reply = exc.reply
            disposition = "relayed" if reply.startswith("2") else (
                "next-hop-refused" if reply.startswith("5") else "tempfailed"
            )
        if outcome is not Outcome.RELAY:
            await relay.rset()
        result = Result(disposition, reply, verdicts, qid, time.perf_counter() - start, times)
        self._finish(mail, result)
        return result

    async def _banner_needs_structure(self, mail: Mail, verdicts: Sequence[Verdict]
                                      ) -> Verdict | None:
        """A banner goes into body parts, so a message whose MIME structure
        mailwarden cannot parse (or finds ambiguous) is held rather than
        relayed with the banner misplaced or missing: fail closed, whichever
        filters are in the chain.  (With attachment_types in the chain such a
        message is already held by it.)"""
        asking = next((v for v in verdicts if any(isinstance(e, AddBanner) for e in v.edits)),
                      None)
        if asking is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            if mail.prepared:  # the structure is known: nothing to wait for
                mail.banner_parts  # noqa: B018 - raises ParseError when not placeable
            else:
                await loop.run_in_executor(self.executor, lambda: mail.banner_parts)
        except ParseError as exc:
            return Verdict.quarantine(asking.filter, f"unparseable: {exc}", unparseable=True)
        return None

    async def _apply(self, mail: Mail, edits: list[Any]) -> bytes:
        # Header-only edits are cheap; banners re-encode body parts: off the loop
        # for large messages.
        content = mail.raw
        if len(content) > ON_LOOP_BYTES and any(not isinstance(e, AddHeader) for e in edits):
            loop = asyncio.get_running_loop()
            pieces = await loop.run_in_executor(self.executor, edit_pieces, content, edits,
                                                mail.known_structure)
        else:
            pieces = edit_pieces(content, edits, mail.known_structure)
        # Never emit a bare CR or LF, whatever an edit produced (only new
        # bytes need a full look when the message itself is known clean).
        out = pieces[0] if len(pieces) == 1 and pieces[0] is content else b"".join(pieces)
        if not crlf_clean(pieces, content if mail.crlf_checked else None):
            log.error("an edit produced bare CR/LF; normalising line ends")
            out = re.sub(rb"\r\n|\r|\n", b"\r\n", out)
        return out

    # --------------------------------------------------------------- records

    def _finish(self, mail: Mail, result: Result) -> None:
        """What happens before the client hears the reply: the virus
        notification and the observers (metrics); the log record and line
        are left to :meth:`Result.finish`."""
        self._notify(mail, result)
        for obs in self.observers:
            try:
                obs.message_done(mail, result)
            except Exception:
                log.exception("observer failed")
        result.pending = partial(self._record, mail, result)

    def _record(self, mail: Mail, result: Result) -> None:
        if self.header_log is not None and self.store is not None:
            try:
                record = self.header_log.build_record(mail, result)
                self.store.append_log(record)
            except Exception:
                log.exception("could not build the log record for %s", mail.queue_id)
        verdicts = ",".join(
            f"{v.filter}:{v.outcome.name.lower()}" + (f"({replies.safe_text(v.detail, 80)})" if v.detail else "")
            for v in result.verdicts
        )
        msglog.info(
            "%s client=%s direction=%s from=<%s> rcpts=%d size=%d disposition=%s%s"
            " reply=%r verdicts=%s time=%.3fs filter_ms=%s",
            mail.queue_id,
            mail.client_addr,
            mail.direction,
            replies.safe_text(mail.mail_from),
            len(mail.rcpt_tos),
            mail.size,
            result.disposition,
            f" quarantine_id={result.quarantine_id}" if result.quarantine_id else "",
            replies.safe_text(result.reply.replace("\r\n", " | "), 300),
            verdicts or "-",
            result.elapsed,
            ",".join(f"{name}:{sec * 1000:.1f}" for name, sec in result.filter_times.items())
            or "-",
        )

    def _notify(self, mail: Mail, result: Result) -> None:
        """Tell IT about a virus (never the infected content)."""
        for v in result.verdicts:
            to = v.facts.get("notify")
            virus = v.facts.get("virus")
            if v.filter != "clamav" or not to or not virus:
                continue
            if v.outcome not in (Outcome.QUARANTINE, Outcome.REJECT):
                continue
            body = notification_text(mail, result, str(virus), self.config.gateway.hostname)
            task = asyncio.create_task(self._send_notification(str(to), body))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_notification(self, to: str, body: bytes) -> None:
        gw = self.config.gateway
        ok, reply, _ = await send_message(
            gw.next_hop, f"postmaster@{gw.hostname}", [to], body,
            timeout=gw.next_hop_timeout, helo_name=gw.hostname,
        )
        if not ok:
            log.error("virus notification to %s not accepted: %s", to, reply)


def notification_text(mail: Mail, result: Result, virus: str, hostname: str) -> bytes:
    """A short plain-text notice naming sender, recipients, subject, virus, id."""
    import email.utils

    safe = replies.safe_text
    lines = [
        f"From: mailwarden <postmaster@{hostname}>",
        "Subject: " + safe(f"[mailwarden] virus found: {virus}"),
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Message-ID: {email.utils.make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-generated",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "mailwarden found a virus in a message and did not deliver it.",
        "",
        f"Virus:         {safe(virus)}",
        f"Disposition:   {result.disposition}",
        f"Quarantine ID: {result.quarantine_id or '-'}",
        f"Queue ID:      {mail.queue_id}",
        f"Direction:     {mail.direction}",
        f"Client:        {safe(mail.client_addr)}",
        f"Sender:        <{safe(mail.mail_from)}>",
        f"Recipients:    {safe(', '.join(mail.rcpt_tos), 1000)}",
        f"Subject:       {safe(mail.subject or '', 300)}",
        "",
        "The infected content is not included.  Review it with",
        f"  mailwarden quarantine show {result.quarantine_id or '<id>'}",
        "",
    ]
    return ("\r\n".join(lines)).encode("ascii", "replace")
