"""Decide what happens to a message; the front ends carry it out.

:meth:`Pipeline.decide` runs the filter chain (concurrently, each filter
under the per-message deadline) and returns a :class:`Decision`: the outcome
(relay / quarantine / reject / tempfail, the most severe of all verdicts),
every filter's typed verdict, the edits to apply, and why (a typed
``Reason``).  A filter that raises or times out yields TEMPFAIL, never a
pass; a message the MIME model cannot handle within its bounds is held as
unparseable, and so is one due a banner the model cannot place.  No SMTP, no
store, no relay inside.

A front end (``gateway/server.py``: the SMTP proxy; the milter front end)
turns the Decision into its own actions with three more steps of the
pipeline: :meth:`~Pipeline.apply` (the edits, once, the ARC seal last),
:meth:`~Pipeline.hold` (the quarantine copy, durable before the front end
answers) and :meth:`~Pipeline.done` (the observers -- metrics, the virus
notification -- and, right after the front end's reply, the header-only log
record and one log line).
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

from filters.base import (
    AddBanner,
    AddHeader,
    ArcSeal,
    Edit,
    Filter,
    FilterContext,
    Outcome,
    Reason,
    ScanState,
    Verdict,
)
from gateway import replies
from gateway.config import Config
from gateway.message import Mail, ParseError
from gateway.notify import VirusNotifier
from gateway.rewrite import crlf_clean, edit_pieces, fold_header

log = logging.getLogger("mailwarden.pipeline")
msglog = logging.getLogger("mailwarden.message")

DISPOSITIONS = ("relayed", "quarantined", "rejected", "tempfailed", "next-hop-refused")


class Store(Protocol):
    """What the pipeline needs of the store (``quarantine.store.StoreProtocol``)."""

    async def quarantine(self, **kwargs: Any) -> str: ...

    def append_log(self, record: dict[str, Any]) -> None: ...


class Observer(Protocol):
    """Sees every finished message (metrics, the virus notification)."""

    def message_done(self, mail: Mail, result: Result) -> None: ...


class HoldFailed(Exception):
    """The quarantine copy could not be made durable (no store, store error):
    the front end must answer with a temporary failure."""


#: Messages up to this size (bytes) are MIME-parsed and edited on the event
#: loop, larger ones in a worker thread (see Pipeline.run_filters and apply)
#: -- and parsed there too with more lines or delimiter-like lines than
#: below: 5,000 parts in 170 KB cost ~0.2 s, which must not stall every other
#: session.
ON_LOOP_BYTES = 256 * 1024
PARSE_ON_LOOP_LINES = 4000
PARSE_ON_LOOP_DELIMITERS = 64


def _few_parts(mail: Mail) -> bool:
    """Cheap (byte scans, the line count known already) bound on the
    parse's cost for the loop."""
    return (mail.lines <= PARSE_ON_LOOP_LINES
            and mail.raw.count(b"\n--") <= PARSE_ON_LOOP_DELIMITERS)


@dataclass
class Decision:
    """What the chain decided about one message (no protocol in it).

    ``reason``/``reason_text``: why a REJECT or TEMPFAIL (``reply()`` is the
    SMTP text every front end gives for it).  ``arc_sealed`` is set by
    :meth:`Pipeline.apply` when a verdict asked for an ARC seal."""

    outcome: Outcome
    verdicts: list[Verdict]
    filter_times: dict[str, float] = field(default_factory=dict)
    reason: Reason | None = None
    reason_text: str = ""
    started: float = 0.0
    arc_sealed: bool | None = None

    @property
    def edits(self) -> list[Edit]:
        """Every verdict's edits in chain order, the ARC seal(s) last."""
        edits = [e for v in self.verdicts for e in v.edits]
        if any(isinstance(e, ArcSeal) for e in edits):
            edits = ([e for e in edits if not isinstance(e, ArcSeal)]
                     + [e for e in edits if isinstance(e, ArcSeal)])
        return edits

    @property
    def personal(self) -> bool:
        return any(v.personal for v in self.verdicts)

    @property
    def held_by(self) -> list[Verdict]:
        """The verdicts that ask for quarantine."""
        return [v for v in self.verdicts if v.outcome is Outcome.QUARANTINE]

    def reply(self) -> str:
        """The reply for a REJECT or TEMPFAIL (``gateway.replies.for_reason``)."""
        return replies.for_reason(self.reason, self.reason_text)


@dataclass
class Result:
    """What happened to one message: the front end's disposition and reply."""

    disposition: str
    reply: str
    verdicts: list[Verdict]
    quarantine_id: str | None = None
    elapsed: float = 0.0
    filter_times: dict[str, float] = field(default_factory=dict)
    arc_sealed: bool | None = None
    #: The bookkeeping left for after the reply (see :meth:`finish`).
    pending: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def finish(self) -> None:
        """Write the header-only log record and the message's log line, once.

        The front end calls this right after its reply is on its way (the
        record is queued for the batched writer anyway, so nothing is less
        durable), or when the processing ends without a client."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending()


def resolve(verdicts: Sequence[Verdict]) -> Outcome:
    """The message's outcome: the most severe of all verdicts."""
    return max((v.outcome for v in verdicts), default=Outcome.RELAY)


def why(outcome: Outcome, verdicts: Sequence[Verdict]) -> tuple[Reason | None, str]:
    """The reason (and the text its reply quotes) for a REJECT or TEMPFAIL:
    the first verdict with that outcome."""
    if outcome is Outcome.TEMPFAIL:
        v = next(v for v in verdicts if v.outcome is Outcome.TEMPFAIL)
        return v.reason or Reason.FILTER_FAILED, v.reason_text or v.filter
    if outcome is Outcome.REJECT:
        v = next(v for v in verdicts if v.outcome is Outcome.REJECT)
        return v.reason or Reason.POLICY, v.reason_text or v.detail
    return None, ""


def build_chain(config: Config, ctx: FilterContext) -> list[Filter]:
    """Instantiate the configured chain, in order."""
    from filters import REGISTRY

    return [REGISTRY[name](config.filter_settings(name), ctx) for name in config.chain]


def verdict_summary(v: Verdict, sealed: bool | None = None) -> dict[str, Any]:
    """A verdict as header-only facts (for the log and quarantine rows)."""
    return v.summary(sealed)


class Pipeline:
    """The chain, and the steps a front end takes with its Decision."""

    def __init__(
        self,
        config: Config,
        filters: list[Filter],
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
        self.notifier = VirusNotifier(config)
        self.observers: list[Observer] = [self.notifier, *observers]
        self.log_writer = next(
            ((i, f) for i, f in enumerate(filters) if f.writes_log), None
        )

    async def aclose(self) -> None:
        for f in self.filters:
            try:
                await f.aclose()
            except Exception:
                log.exception("closing filter %s", f.name)
        await self.notifier.aclose()

    # ------------------------------------------------------------- filters

    async def _run_one(self, f: Filter, mail: Mail, deadline: float,
                       prepared: asyncio.Future[None] | None) -> tuple[Verdict, float]:
        start = time.perf_counter()

        async def check() -> Verdict:
            if prepared is not None and f.reads_mime:
                await asyncio.shield(prepared)
            return await f.check(mail)

        try:
            # asyncio.timeout, not wait_for: no extra task, so a filter's first
            # step (clamav sending the message to clamd) runs as soon as the
            # chain starts (see run_filters).
            async with asyncio.timeout(deadline):
                verdict = await check()
        except TimeoutError:
            verdict = _failed(f, f"timed out after {deadline:g}s")
        except ParseError as exc:
            verdict = Verdict.quarantine(f.name, f"unparseable: {exc}", unparseable=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("filter %s failed on %s", f.name, mail.queue_id)
            verdict = _failed(f, f"filter error: {exc.__class__.__name__}")
        if not isinstance(verdict, Verdict):
            verdict = _failed(f, "filter returned no verdict")
        return verdict, time.perf_counter() - start

    def _now(self, f: Filter, mail: Mail) -> Verdict | None:
        """``f.check_now(mail)`` with :meth:`_run_one`'s failure handling."""
        try:
            verdict = f.check_now(mail)
        except ParseError as exc:
            return Verdict.quarantine(f.name, f"unparseable: {exc}", unparseable=True)
        except Exception as exc:
            log.exception("filter %s failed on %s", f.name, mail.queue_id)
            return _failed(f, f"filter error: {exc.__class__.__name__}")
        if verdict is not None and not isinstance(verdict, Verdict):
            return _failed(f, "filter returned no verdict")
        return verdict

    async def run_filters(self, mail: Mail, parse: bool = False
                          ) -> tuple[list[Verdict], dict[str, float]]:
        """Run the chain concurrently.

        A filter that can answer at once (``check_now``) is answered on the
        spot: no task, no deadline (most filters on most mail); the others
        run as tasks under the per-message deadline.

        ``parse``: parse the MIME structure once for all filters.  A filter
        that reads it (``reads_mime``) starts once the parse is done; the
        others (clamav: the raw bytes; personal: headers) start first, so
        clamd scans while the message is parsed.  The parse runs on the loop
        for a message of up to :data:`ON_LOOP_BYTES` bytes with few lines and
        parts (well under a millisecond: cheaper than a hop to a worker
        thread and back), in a worker thread otherwise (~40 ms for 6.7 MB
        would stall every other session)."""
        filters = self.filters
        if not filters:
            return [], {}
        deadline = self.config.gateway.filter_timeout
        verdicts: list[Verdict | None] = [None] * len(filters)
        times = [0.0] * len(filters)
        tasks: dict[int, asyncio.Future[tuple[Verdict, float]]] = {}

        def start(i: int, f: Filter, prepared: asyncio.Future[None] | None) -> None:
            if prepared is None:
                began = time.perf_counter()
                verdict = self._now(f, mail)
                if verdict is not None:
                    verdicts[i] = verdict
                    times[i] = time.perf_counter() - began
                    return
            tasks[i] = asyncio.ensure_future(self._run_one(f, mail, deadline, prepared))

        for i, f in enumerate(filters):
            if not parse or not f.reads_mime:
                start(i, f, None)
        if parse:
            if mail.size <= ON_LOOP_BYTES and _few_parts(mail):
                if tasks:
                    await asyncio.sleep(0)  # the started tasks take their first step first
                mail.prepare()
                for i, f in enumerate(filters):
                    if f.reads_mime:
                        start(i, f, None)
            else:
                loop = asyncio.get_running_loop()
                prepared: asyncio.Future[None] = loop.create_future()
                for i, f in enumerate(filters):
                    if f.reads_mime:
                        start(i, f, prepared)
                work = loop.run_in_executor(self.executor, mail.prepare)
                work.add_done_callback(lambda _f: prepared.done() or prepared.set_result(None))
        if tasks:
            for i, (verdict, took) in zip(tasks, await asyncio.gather(*tasks.values()),
                                          strict=True):
                verdicts[i] = verdict
                times[i] = took
        done = [v for v in verdicts if v is not None]
        assert len(done) == len(filters)
        return done, {f.name: t for f, t in zip(filters, times, strict=True)}

    # ------------------------------------------------------------- decide

    async def decide(self, mail: Mail) -> Decision:
        """Run the chain and decide; nothing is sent, stored or answered."""
        start = time.perf_counter()
        # One MIME parse per message, shared by the filters (see run_filters).
        verdicts, times = await self.run_filters(mail, parse=mail.needs_parsing)
        outcome = resolve(verdicts)
        if outcome is Outcome.RELAY:
            unparseable = await self._banner_needs_structure(mail, verdicts)
            if unparseable is not None:
                verdicts = [*verdicts, unparseable]
                outcome = resolve(verdicts)
        reason, text = why(outcome, verdicts)
        return Decision(outcome, verdicts, times, reason, text, start)

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

    # -------------------------------------------------------------- apply

    async def apply(self, mail: Mail, decision: Decision) -> bytes:
        """The message as it is to be relayed: every edit applied once, in
        one pass over the bytes, then the ARC seal over exactly those bytes
        (its set on top).  ``mail.raw`` itself when there is nothing to do."""
        edits = decision.edits
        if not edits:
            return mail.raw
        seals = [e for e in edits if isinstance(e, ArcSeal)]
        if seals:
            edits = [e for e in edits if not isinstance(e, ArcSeal)]
        content = await self._edit(mail, edits) if edits else mail.raw
        if seals:
            content, decision.arc_sealed = await seal(content, seals, self.executor)
        return content

    async def _edit(self, mail: Mail, edits: list[Edit]) -> bytes:
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

    # --------------------------------------------------------------- hold

    async def hold(self, mail: Mail, decision: Decision) -> str:
        """Store the quarantine copy, durably; its id.  :class:`HoldFailed`
        when that cannot be done (the front end then answers 451)."""
        if self.store is None:
            raise HoldFailed("no quarantine store")
        held = decision.held_by
        headers = {
            "from": mail.header("From"),
            "to": mail.header("To"),
            "cc": mail.header("Cc"),
            "subject": mail.header("Subject"),
            "message-id": mail.header("Message-ID"),
            "date": mail.header("Date"),
        }
        try:
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
                personal=decision.personal,
                verdicts=[v.summary() for v in decision.verdicts],
            )
        except Exception as exc:
            log.error("quarantine of %s failed: %s", mail.queue_id, exc)
            raise HoldFailed(str(exc)) from exc

    # --------------------------------------------------------------- done

    def done(self, mail: Mail, decision: Decision, disposition: str, reply: str,
             quarantine_id: str | None = None) -> Result:
        """What the front end did with the message: runs the observers
        (before the front end answers); the log record and line are left to
        :meth:`Result.finish`, right after the answer."""
        result = Result(disposition, reply, decision.verdicts, quarantine_id,
                        time.perf_counter() - decision.started, decision.filter_times,
                        decision.arc_sealed)
        for obs in self.observers:
            try:
                obs.message_done(mail, result)
            except Exception:
                log.exception("observer failed")
        result.pending = partial(self._record, mail, result)
        return result

    def _record(self, mail: Mail, result: Result) -> None:
        if self.log_writer is not None and self.store is not None:
            index, writer = self.log_writer
            own = result.verdicts[index] if index < len(result.verdicts) else None
            try:
                record = writer.log_record(mail, result, own)
                if record is not None:
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


async def seal(content: bytes, seals: Sequence[ArcSeal], executor: Executor | None = None
               ) -> tuple[bytes, bool]:
    """``content`` with each ARC set on top (the blocking signer runs in the
    seal's own executor, else ``executor``), and whether one was added.  A
    seal that fails costs the seal, never the message."""
    loop = asyncio.get_running_loop()
    sealed = False
    for s in seals:
        try:
            arc_set = await loop.run_in_executor(s.executor or executor, s.seal, content)
        except Exception as exc:
            log.warning("arc: sealing failed, message relayed unsealed: %r", exc)
            continue
        if arc_set:
            content = b"".join(fold_header(n, v) for n, v in arc_set) + content
            sealed = True
    return content, sealed


def _failed(f: Filter, detail: str) -> Verdict:
    """The verdict of a filter that raised or timed out: TEMPFAIL; for a
    scanner the message is unscanned and the reply says so."""
    if f.scanner:
        return Verdict.tempfail(f.name, detail, Reason.SCANNER_UNAVAILABLE,
                                scan=ScanState.UNSCANNED)
    return Verdict.tempfail(f.name, detail)
