"""Pipeline.decide and the steps a front end takes with a Decision, with fake filters.

decide runs the chain and returns a Decision (outcome, typed verdicts, edits,
reason); it never touches the store or the next hop.  apply applies every
edit once and the ARC seal last, over exactly the relayed bytes; hold stores
the quarantine copy or raises HoldFailed; done runs the observers and leaves
the log record for after the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from filters.base import (
    AddBanner,
    AddHeader,
    ArcSeal,
    BaseFilter,
    Outcome,
    Reason,
    ScanState,
    TagSubject,
    Verdict,
)
from gateway import replies
from gateway.message import Direction, Mail, ParseError
from gateway.pipeline import Decision, HoldFailed, Pipeline, Result, resolve, seal
from gateway.rewrite import apply_edits
from tests.support.harness import make_message
from tests.support.harness import test_config as make_config


def mail(raw: bytes | None = None) -> Mail:
    return Mail(
        queue_id="Q1", mail_from="a@ext.test", rcpt_tos=("b@example.com",),
        raw=raw if raw is not None else make_message(subject="hello"),
        client_addr="192.0.2.1", direction=Direction.INBOUND,
        received=datetime(2026, 12, 4, 12, 0, tzinfo=UTC),
    )


class Fake(BaseFilter):
    """A filter that answers what it is told (or raises it, or hangs)."""

    Settings: ClassVar[type] = dict

    def __init__(self, name: str, answer: Verdict | BaseException | Callable[[], Any],
                 *, scanner: bool = False, reads_mime: bool = False) -> None:
        self.name = name  # type: ignore[misc]
        self.answer = answer
        self.scanner = scanner  # type: ignore[misc]
        self.reads_mime = reads_mime  # type: ignore[misc]
        self.calls = 0

    async def check(self, mail: Mail) -> Verdict:
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        if callable(self.answer):
            return await self.answer()  # type: ignore[no-any-return]
        return self.answer


class LogWriter(BaseFilter):
    name: ClassVar[str] = "log"
    Settings: ClassVar[type] = dict
    writes_log: ClassVar[bool] = True

    def __init__(self) -> None:
        self.records: list[tuple[Result, Verdict | None]] = []

    async def check(self, mail: Mail) -> Verdict:
        return Verdict.relay(self.name, attachments=())

    def log_record(self, mail: Mail, outcome: Any, own: Verdict | None) -> dict[str, Any]:
        self.records.append((outcome, own))
        return {"disposition": outcome.disposition}


class RecordingStore:
    """Counts every call: decide must make none."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.held: list[dict[str, Any]] = []
        self.logged: list[dict[str, Any]] = []

    async def quarantine(self, **kwargs: Any) -> str:
        if self.fail:
            raise OSError("disk full")
        self.held.append(kwargs)
        return f"QID-{len(self.held)}"

    def append_log(self, record: dict[str, Any]) -> None:
        self.logged.append(record)


@pytest.fixture
def pipeline(tmp_path: Path) -> Callable[..., Pipeline]:
    def make(*filters: Any, store: Any = None, timeout: float = 5.0, **kw: Any) -> Pipeline:
        config = make_config(tmp_path, "127.0.0.1:1", gateway={"filter_timeout": timeout})
        return Pipeline(config, list(filters), store=store, **kw)
    return make


# ------------------------------------------------------------------ decide


@pytest.mark.parametrize(("outcomes", "expected"), [
    ((), Outcome.RELAY),
    ((Outcome.RELAY, Outcome.QUARANTINE), Outcome.QUARANTINE),
    ((Outcome.QUARANTINE, Outcome.REJECT), Outcome.REJECT),
    ((Outcome.REJECT, Outcome.TEMPFAIL, Outcome.RELAY), Outcome.TEMPFAIL),
])
def test_resolve_takes_the_most_severe(outcomes: tuple[Outcome, ...], expected: Outcome) -> None:
    assert resolve([Verdict(f"f{i}", o) for i, o in enumerate(outcomes)]) is expected


async def test_decide_touches_neither_store_nor_next_hop(pipeline: Callable[..., Pipeline]) -> None:
    store = RecordingStore()
    held = Fake("held", Verdict.quarantine("held", "suspicious"))
    p = pipeline(held, Fake("tag", Verdict.relay("tag", edits=(AddHeader("X-T", "1"),))),
                 store=store)
    d = await p.decide(mail())
    assert d.outcome is Outcome.QUARANTINE and d.reason is None
    assert [v.filter for v in d.verdicts] == ["held", "tag"]
    assert [v.filter for v in d.held_by] == ["held"]
    assert store.held == [] and store.logged == []  # nothing stored by deciding


async def test_reject_reason_and_reply_come_from_the_typed_reason(
        pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(Fake("av", Verdict.reject("av", "Eicar", Reason.VIRUS, scan=ScanState.INFECTED,
                                           virus="Eicar")),
                 Fake("types", Verdict.reject("types", "a.exe: executable", Reason.ATTACHMENT,
                                              "a.exe")))
    d = await p.decide(mail())
    assert d.outcome is Outcome.REJECT
    assert (d.reason, d.reason_text) == (Reason.VIRUS, "Eicar")  # the first refusal
    assert d.reply() == replies.VIRUS_REJECTED.format("Eicar")


async def test_a_filter_that_raises_is_a_tempfail_naming_it(
        pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(Fake("ok", Verdict.relay("ok")), Fake("broken", RuntimeError("boom")))
    d = await p.decide(mail())
    assert d.outcome is Outcome.TEMPFAIL
    assert d.reply() == replies.FILTER_FAILED.format("broken")
    assert d.verdicts[1].detail == "filter error: RuntimeError"


class Now(BaseFilter):
    """A filter that answers at once (``check_now``); ``check`` must not run."""

    Settings: ClassVar[type] = dict

    def __init__(self, name: str, answer: Verdict | BaseException | None,
                 *, reads_mime: bool = True) -> None:
        self.name = name  # type: ignore[misc]
        self.answer = answer
        self.reads_mime = reads_mime  # type: ignore[misc]
        self.awaited = 0

    def check_now(self, mail: Mail) -> Verdict | None:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def check(self, mail: Mail) -> Verdict:
        self.awaited += 1
        return Verdict.relay(self.name, detail="awaited")


async def test_check_now_answers_without_check_and_fails_closed_like_it(
        pipeline: Callable[..., Pipeline]) -> None:
    now = Now("now", Verdict.relay("now", edits=(AddHeader("X-N", "1"),)))
    later = Now("later", None)  # no answer at once: check() is awaited
    broken = Now("broken", RuntimeError("boom"), reads_mime=False)
    odd = Now("odd", ParseError("no structure"))
    p = pipeline(now, later, broken, odd)
    m = mail(make_message(attachments=[("a.pdf", "application/pdf", b"%PDF-1.4")]))
    assert m.needs_parsing
    d = await p.decide(m)
    assert [v.filter for v in d.verdicts] == ["now", "later", "broken", "odd"]  # chain order
    assert (now.awaited, later.awaited, broken.awaited) == (0, 1, 0)
    assert d.verdicts[1].detail == "awaited"
    assert d.verdicts[2].outcome is Outcome.TEMPFAIL
    assert d.verdicts[2].detail == "filter error: RuntimeError"
    assert d.verdicts[3].outcome is Outcome.QUARANTINE and d.verdicts[3].unparseable
    assert set(d.filter_times) == {"now", "later", "broken", "odd"}
    assert d.outcome is Outcome.TEMPFAIL


async def test_a_scanner_that_fails_leaves_the_message_unscanned(
        pipeline: Callable[..., Pipeline]) -> None:
    never = asyncio.Event()

    async def hang() -> Verdict:
        await never.wait()
        raise AssertionError("not reached")

    p = pipeline(Fake("av", hang, scanner=True), timeout=0.05)
    d = await p.decide(mail())
    [v] = d.verdicts
    assert v.outcome is Outcome.TEMPFAIL and v.scan is ScanState.UNSCANNED
    assert v.detail.startswith("timed out")
    assert d.reply() == replies.SCANNER_UNAVAILABLE


async def test_no_verdict_and_parse_errors_fail_closed(pipeline: Callable[..., Pipeline]) -> None:
    d = await pipeline(Fake("none", lambda: asyncio.sleep(0))).decide(mail())
    assert d.outcome is Outcome.TEMPFAIL and d.verdicts[0].detail == "filter returned no verdict"
    d = await pipeline(Fake("mime", ParseError("too deep"))).decide(mail())
    [v] = d.verdicts
    assert d.outcome is Outcome.QUARANTINE and v.unparseable and "too deep" in v.detail


async def test_a_due_banner_that_cannot_be_placed_holds_the_message(
        pipeline: Callable[..., Pipeline]) -> None:
    # A text body in an unknown transfer encoding: no safe place for the banner.
    raw = (b"From: a@ext.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-weird\r\n\r\nhello\r\n")
    warn = Fake("warn", Verdict.relay("warn", edits=(AddBanner("CAUTION"),)))
    d = await pipeline(warn).decide(mail(raw))
    assert d.outcome is Outcome.QUARANTINE
    assert d.verdicts[-1].unparseable and d.verdicts[-1].filter == "warn"
    # The same message without a banner due is relayed.
    d = await pipeline(Fake("tag", Verdict.relay("tag"))).decide(mail(raw))
    assert d.outcome is Outcome.RELAY


async def test_personal_is_a_typed_finding(pipeline: Callable[..., Pipeline]) -> None:
    d = await pipeline(Fake("p", Verdict.relay("p", personal=True)),
                       Fake("q", Verdict.relay("q", personal=False))).decide(mail())
    assert d.personal is True
    d = await pipeline(Fake("q", Verdict.relay("q", personal=False))).decide(mail())
    assert d.personal is False


# ------------------------------------------------------------------- apply


async def test_edits_apply_once_in_chain_order_with_the_seal_last(
        pipeline: Callable[..., Pipeline]) -> None:
    seen: list[bytes] = []

    def sealer(content: bytes) -> list[tuple[str, str]]:
        seen.append(content)
        return [("ARC-Seal", "i=1; test"), ("ARC-Message-Signature", "i=1; test")]

    a = Fake("a", Verdict.relay("a", edits=(AddHeader("X-A", "1"), ArcSeal(sealer),
                                            TagSubject("[EXT]"))))
    b = Fake("b", Verdict.relay("b", edits=(AddHeader("X-B", "2"),)))
    p = pipeline(a, b)
    m = mail()
    d = await p.decide(m)
    assert isinstance(d.edits[-1], ArcSeal)
    out = await p.apply(m, d)
    edited = apply_edits(m.raw, [e for e in d.edits if not isinstance(e, ArcSeal)])
    assert seen == [edited]  # sealed once, over every other filter's edits
    assert out == b"ARC-Seal: i=1; test\r\nARC-Message-Signature: i=1; test\r\n" + edited
    assert d.arc_sealed is True
    assert out.index(b"X-A: 1") < out.index(b"X-B: 2")  # chain order
    assert b"Subject: [EXT] hello" in out


async def test_a_failed_seal_costs_the_seal_not_the_message() -> None:
    def broken(content: bytes) -> list[tuple[str, str]]:
        raise ValueError("no key")

    out, sealed = await seal(b"Subject: x\r\n\r\nbody\r\n", [ArcSeal(broken)])
    assert out == b"Subject: x\r\n\r\nbody\r\n" and sealed is False


async def test_nothing_to_apply_is_the_message_itself(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(Fake("a", Verdict.relay("a")))
    m = mail()
    assert await p.apply(m, await p.decide(m)) is m.raw


# -------------------------------------------------------------------- hold


async def test_hold_stores_the_copy_with_typed_reasons(pipeline: Callable[..., Pipeline]) -> None:
    store = RecordingStore()
    p = pipeline(Fake("av", Verdict.quarantine("av", "Eicar", scan=ScanState.INFECTED,
                                               virus="Eicar")),
                 Fake("p", Verdict.relay("p", personal=True)), store=store)
    m = mail()
    d = await p.decide(m)
    assert await p.hold(m, d) == "QID-1"
    [row] = store.held
    assert row["raw"] is m.raw and row["reason"] == "av" and row["detail"] == "Eicar"
    assert row["personal"] is True
    assert row["verdicts"][0] == {"filter": "av", "outcome": "quarantine", "detail": "Eicar",
                                  "scan": "infected", "virus": "Eicar"}


@pytest.mark.parametrize("store", [None, RecordingStore(fail=True)])
async def test_hold_without_a_durable_store_fails(pipeline: Callable[..., Pipeline],
                                                  store: Any) -> None:
    p = pipeline(Fake("q", Verdict.quarantine("q", "x")), store=store)
    m = mail()
    with pytest.raises(HoldFailed):
        await p.hold(m, await p.decide(m))


# -------------------------------------------------------------------- done


async def test_done_runs_observers_and_leaves_the_record_for_after_the_reply(
        pipeline: Callable[..., Pipeline]) -> None:
    seen: list[Result] = []

    class Watcher:
        def message_done(self, mail: Mail, result: Result) -> None:
            seen.append(result)

    class Broken:
        def message_done(self, mail: Mail, result: Result) -> None:
            raise RuntimeError("observer bug")

    store, writer = RecordingStore(), LogWriter()
    p = pipeline(Fake("a", Verdict.relay("a")), writer, store=store,
                 observers=[Broken(), Watcher()])
    m = mail()
    d = await p.decide(m)
    result = p.done(m, d, "relayed", "250 2.0.0 Ok")
    assert [r.disposition for r in seen] == ["relayed"]  # a broken observer does not stop it
    assert store.logged == []  # not before the reply
    result.finish()
    result.finish()  # once only
    assert store.logged == [{"disposition": "relayed"}]
    [(outcome, own)] = writer.records
    assert outcome is result and own is d.verdicts[1]


async def test_virus_notification_is_an_observer_of_the_outcome(
        pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline(Fake("av", Verdict.quarantine("av", "Eicar", scan=ScanState.INFECTED,
                                               virus="Eicar", notify="it@example.com")),
                 store=RecordingStore())
    sent: list[tuple[str, bytes]] = []

    async def capture(to: str, body: bytes) -> None:
        sent.append((to, body))

    p.notifier._send = capture  # type: ignore[method-assign]
    m = mail()
    d = await p.decide(m)
    p.done(m, d, "quarantined", "250 held", await p.hold(m, d))
    await p.aclose()
    [(to, body)] = sent
    assert to == "it@example.com" and b"Virus:         Eicar" in body
    assert b"Quarantine ID: QID-1" in body
    # A virus relayed (no quarantine, no refusal) or without an address: no notice.
    p2 = pipeline(Fake("av", Verdict.relay("av", virus="Eicar", notify="")))
    p2.notifier._send = capture  # type: ignore[method-assign]
    d2 = await p2.decide(m)
    p2.done(m, d2, "relayed", "250 ok")
    await p2.aclose()
    assert len(sent) == 1


def test_decision_is_protocol_free() -> None:
    d = Decision(Outcome.TEMPFAIL, [Verdict.tempfail("x", "down")], reason=Reason.STORE_UNAVAILABLE)
    assert d.reply() == replies.STORE_UNAVAILABLE
    assert Decision(Outcome.TEMPFAIL, []).reply() == replies.LOCAL_ERROR
