"""The milter front end's binding to the pipeline: a MilterMessage in, a
MilterAnswer out, through the same Decision as the SMTP proxy.

* direction: the client (``{client_addr}``) in ``trusted_networks`` or an
  SMTP-authenticated sender (``{auth_authen}`` set) is one of ours, so the
  message is outbound, or internal when every recipient is internal;
  anything else is inbound.
* relay: the edits applied once (ARC seal last) -> ACCEPT with the
  modifications (``actions.py`` turns the before/after bytes into header
  requests and REPLBODY); quarantine: mailwarden's own copy, durable, then
  DISCARD ("own") or Postfix's hold queue ("hold"); a store that cannot take
  it -> 451; reject -> the proxy's 5xx text; tempfail -> its 451 text.
* whatever breaks in here is the session's TEMPFAIL, never an ACCEPT.

The MTA keeps custody throughout: nothing is relayed by mailwarden, so the
header-only log records ``relayed`` for a message handed back with ACCEPT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from filters.base import Outcome
from gateway import replies
from gateway.message import Direction, Mail
from gateway.milter.api import Handler, MilterAnswer, MilterMessage
from gateway.pipeline import HoldFailed, Pipeline

#: The reply the header-only log records for a message handed back to the MTA.
ACCEPTED = "250 2.0.0 accepted (milter)"


class GatewayState(Protocol):
    """What the binding needs of the running gateway's current state
    (``gateway.server.State``: swapped as a whole by a reload)."""

    pipeline: Pipeline

    def direction(self, client_addr: str, rcpt_tos: list[str]) -> Direction: ...

    def is_internal(self, address: str) -> bool: ...


def milter_handler(current: Callable[[], GatewayState], clock: Callable[[], datetime],
                   new_queue_id: Callable[[], str]) -> Handler:
    """The :data:`~gateway.milter.api.Handler` for ``serve``: ``current()``
    gives the state in force when a message arrives (a reload swaps it)."""

    async def handle(msg: MilterMessage) -> MilterAnswer:
        state = current()
        mail = Mail(
            queue_id=msg.queue_id or new_queue_id(),
            mail_from=msg.mail_from,
            rcpt_tos=msg.rcpts,
            raw=msg.raw,
            client_addr=msg.client_addr,
            client_name=msg.client_name,
            helo=msg.helo,
            direction=direction(state, msg),
            received=clock(),
            mail_options=msg.mail_args,
        )
        return await decide(state.pipeline, mail)

    return handle


def direction(state: GatewayState, msg: MilterMessage) -> Direction:
    """inbound / outbound / internal from the milter's macros."""
    rcpts = list(msg.rcpts)
    if msg.auth_authen:
        if rcpts and all(state.is_internal(r) for r in rcpts):
            return Direction.INTERNAL
        return Direction.OUTBOUND
    return state.direction(msg.client_addr, rcpts)


async def decide(pipeline: Pipeline, mail: Mail) -> MilterAnswer:
    """Decide on ``mail`` and carry the Decision out in milter terms."""
    decision = await pipeline.decide(mail)
    outcome = decision.outcome
    qid: str | None = None
    answer: MilterAnswer
    if outcome is Outcome.TEMPFAIL:
        reply = decision.reply()
        disposition, answer = "tempfailed", MilterAnswer.tempfail(reply)
    elif outcome is Outcome.REJECT:
        reply = decision.reply()
        disposition, answer = "rejected", MilterAnswer.reject(reply)
    elif outcome is Outcome.QUARANTINE:
        try:
            qid = await pipeline.hold(mail, decision)
        except HoldFailed:
            reply = replies.STORE_UNAVAILABLE
            disposition, answer = "tempfailed", MilterAnswer.tempfail(reply)
        else:
            reply = replies.QUARANTINED.format(qid)
            disposition = "quarantined"
            answer = MilterAnswer.quarantine(f"mailwarden quarantine {qid}")
    else:
        content = await pipeline.apply(mail, decision)
        reply, disposition = ACCEPTED, "relayed"
        answer = (MilterAnswer.accept() if content is mail.raw
                  else MilterAnswer.accept(mail.raw, content))
    result = pipeline.done(mail, decision, disposition, reply, qid)
    # The log record and line once the answer is on its way (the session
    # writes it when this coroutine returns).
    asyncio.get_running_loop().call_soon(result.finish)
    return answer


__all__ = ["ACCEPTED", "decide", "direction", "milter_handler"]
