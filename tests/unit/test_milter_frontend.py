"""gateway/milter/frontend.py: a Decision in milter terms, with fake filters.

The Postfix tests (test_milter_gateway.py) show the same against a real MTA;
these pin the mapping itself, including the failures a real MTA cannot be
made to cause on cue (the store refusing the quarantine copy).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from filters.base import AddHeader, Reason, ScanState, Verdict
from gateway import replies
from gateway.message import Direction
from gateway.milter.api import MilterMessage
from gateway.milter.frontend import ACCEPTED, milter_handler
from gateway.pipeline import Pipeline
from gateway.server import State
from tests.support.harness import make_message
from tests.support.harness import test_config as make_config
from tests.unit.test_decide import Fake, RecordingStore

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.fixture
def handler(tmp_path: Path) -> Callable[..., Any]:
    def make(*filters: Any, store: Any = None, trusted: tuple[str, ...] = ("10.0.0.0/8",)
             ) -> tuple[Any, list[Any]]:
        config = make_config(tmp_path, "127.0.0.1:1", gateway={
            "trusted_networks": list(trusted)})
        seen: list[Any] = []

        class Watch:
            def message_done(self, mail: Any, result: Any) -> None:
                seen.append((mail, result))

        state = State(config, Pipeline(config, list(filters), store=store, observers=[Watch()]))
        return milter_handler(lambda: state, lambda: T0, lambda: "LOCALID"), seen
    return make


def msg(**kw: Any) -> MilterMessage:
    args: dict[str, Any] = dict(raw=make_message(subject="hi"), mail_from="a@ext.test",
                                rcpts=("b@example.com",), client_addr="192.0.2.1",
                                queue_id="4XyZ1")
    args.update(kw)
    return MilterMessage(**args)


async def test_relay_with_edits_is_accept_with_before_and_after(handler: Any) -> None:
    h, seen = handler(Fake("tag", Verdict.relay("tag", edits=(AddHeader("X-T", "1"),))))
    m = msg()
    answer = await h(m)
    assert answer.kind == "accept" and answer.original == m.raw
    assert answer.edited == b"X-T: 1\r\n" + m.raw
    [(mail, result)] = seen
    assert (mail.queue_id, mail.direction, mail.received) == ("4XyZ1", Direction.INBOUND, T0)
    assert (result.disposition, result.reply) == ("relayed", ACCEPTED)


async def test_relay_unchanged_is_a_plain_accept(handler: Any) -> None:
    h, _ = handler(Fake("ok", Verdict.relay("ok")))
    answer = await h(msg(queue_id=""))
    assert answer.kind == "accept" and answer.original is None and answer.edited is None


async def test_refusals_carry_the_proxys_reply_text(handler: Any) -> None:
    h, _ = handler(Fake("av", Verdict.reject("av", "Eicar", Reason.VIRUS)))
    answer = await h(msg())
    assert (answer.kind, answer.reply) == ("reject", replies.VIRUS_REJECTED.format("Eicar"))
    h, _ = handler(Fake("av", Verdict.tempfail("av", "down", Reason.SCANNER_UNAVAILABLE,
                                               scan=ScanState.UNSCANNED)))
    answer = await h(msg())
    assert (answer.kind, answer.reply) == ("tempfail", replies.SCANNER_UNAVAILABLE)


async def test_quarantine_is_stored_before_the_answer(handler: Any) -> None:
    store = RecordingStore()
    h, seen = handler(Fake("q", Verdict.quarantine("q", "odd")), store=store)
    answer = await h(msg())
    assert answer.kind == "quarantine" and "QID-1" in answer.reason
    assert len(store.held) == 1 and seen[0][1].quarantine_id == "QID-1"


@pytest.mark.parametrize("store", [None, RecordingStore(fail=True)])
async def test_a_quarantine_that_cannot_be_stored_is_a_tempfail(handler: Any, store: Any) -> None:
    h, seen = handler(Fake("q", Verdict.quarantine("q", "odd")), store=store)
    answer = await h(msg())
    assert (answer.kind, answer.reply) == ("tempfail", replies.STORE_UNAVAILABLE)
    assert seen[0][1].disposition == "tempfailed"


@pytest.mark.parametrize(("client", "auth", "rcpts", "expected"), [
    ("192.0.2.1", "", ("b@example.com",), Direction.INBOUND),
    ("10.1.2.3", "", ("x@partner.test",), Direction.OUTBOUND),
    ("10.1.2.3", "", ("b@example.com",), Direction.INTERNAL),
    ("192.0.2.1", "bob", ("x@partner.test",), Direction.OUTBOUND),  # authenticated: ours
    ("192.0.2.1", "bob", ("b@example.com",), Direction.INTERNAL),
])
async def test_direction_from_the_macros(handler: Any, client: str, auth: str,
                                         rcpts: tuple[str, ...], expected: Direction) -> None:
    h, seen = handler(Fake("ok", Verdict.relay("ok")))
    await h(msg(client_addr=client, auth_authen=auth, rcpts=rcpts))
    assert seen[0][0].direction is expected
