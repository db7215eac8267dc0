"""The handler interface between the milter front end and whatever decides.

The session collects one message into a :class:`MilterMessage`, awaits the
injected handler (``async (MilterMessage) -> MilterAnswer``) and acts on the
answer in milter terms.  The handler never sees the protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

AnswerKind = Literal["accept", "discard", "quarantine", "reject", "tempfail"]


@dataclass(frozen=True)
class MilterMessage:
    """One message as the MTA received it.

    ``raw`` is the message exactly as it came over SMTP (CRLF line ends,
    header lines with their original folding, then the body).  ``macros``
    holds every macro the MTA sent for this connection and message (names
    without braces: ``i``, ``client_addr``, ``auth_authen``, ``daemon_name``,
    ``j``, ``_``); ``queue_id`` is ``{i}`` ("" if the MTA did not send it).
    """

    raw: bytes
    mail_from: str                       # reverse path without <>, "" for the null sender
    rcpts: tuple[str, ...]               # forward paths without <>
    helo: str = ""
    client_name: str = ""                # CONNECT hostname (Postfix: "unknown" or the PTR name)
    client_addr: str = ""                # {client_addr}, else the CONNECT address
    client_port: int = 0
    queue_id: str = ""
    auth_authen: str = ""                # {auth_authen}: set = SMTP-authenticated sender
    mail_args: tuple[str, ...] = ()      # ESMTP MAIL parameters (BODY=8BITMIME, SMTPUTF8, ...)
    macros: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MilterAnswer:
    """What to do with the message.  Build one with the class methods."""

    kind: AnswerKind
    #: accept: the raw bytes the handler saw and the edited raw bytes (rewriter's
    #: output); both None = no change
    original: bytes | None = None
    edited: bytes | None = None
    #: reject / tempfail: the full SMTP reply, e.g. "554 5.7.1 message refused: virus found (X)"
    reply: str = ""
    #: quarantine: the reason given to SMFIR_QUARANTINE (Postfix logs it, "hold" mode)
    reason: str = ""

    @classmethod
    def accept(cls, original: bytes | None = None, edited: bytes | None = None) -> MilterAnswer:
        if (original is None) != (edited is None):
            raise ValueError("accept: original and edited go together")
        return cls("accept", original=original, edited=edited)

    @classmethod
    def discard(cls) -> MilterAnswer:
        """Drop the message (after the handler stored mailwarden's own quarantine copy)."""
        return cls("discard")

    @classmethod
    def quarantine(cls, reason: str) -> MilterAnswer:
        """Held in mailwarden's quarantine (stored by the handler); `[milter] quarantine`
        decides: "own" -> DISCARD, "hold" -> SMFIR_QUARANTINE(reason) + ACCEPT."""
        return cls("quarantine", reason=reason)

    @classmethod
    def reject(cls, reply: str) -> MilterAnswer:
        _check_reply(reply, "5")
        return cls("reject", reply=reply)

    @classmethod
    def tempfail(cls, reply: str = "451 4.3.0 temporary failure, try again later") -> MilterAnswer:
        _check_reply(reply, "4")
        return cls("tempfail", reply=reply)


def _check_reply(reply: str, first: str) -> None:
    if len(reply) < 3 or reply[0] != first or not reply[:3].isdigit() or "\0" in reply:
        raise ValueError(f"bad SMTP reply for this answer: {reply!r}")


Handler = Callable[[MilterMessage], Awaitable[MilterAnswer]]
