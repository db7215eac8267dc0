"""Every SMTP reply mailwarden itself gives, as named constants (CONTRACT.md).

Replies the next hop gives are passed through unchanged (see ``relay.py``).
Templates with ``{}`` fields are filled with ``str.format``; values that come
from the message (virus names, filenames) are sanitised first by
:func:`safe_text` so that a reply is always one printable ASCII line.

:func:`for_reason` is the one place where a typed reason
(``filters.base.Reason``) becomes reply text: filters and the pipeline never
write SMTP text; each front end asks here (the SMTP proxy sends the reply,
the milter front end sends it as its REPLYCODE).
"""

from __future__ import annotations

from filters.base import Reason

# Held for review; the quarantine id is filled in.
QUARANTINED = "250 2.7.0 accepted, held for review ({})"
# Refusals (action = reject).
VIRUS_REJECTED = "554 5.7.1 message refused: virus found ({})"
ATTACHMENT_REJECTED = "554 5.7.1 message refused: attachment type not allowed ({})"
POLICY_REJECTED = "554 5.7.1 message refused: {}"
QUARANTINE_REJECTED = "550 5.7.1 message refused by policy: {}"

# Temporary failures: the sender keeps the message and tries again.
SCANNER_UNAVAILABLE = "451 4.7.1 virus scanner unavailable, try again later"
FILTER_FAILED = "451 4.3.0 content filter failed ({}), try again later"
STORE_UNAVAILABLE = "451 4.3.0 quarantine store unavailable, try again later"
NEXT_HOP_UNAVAILABLE = "451 4.4.1 next hop unavailable, try again later"
NEXT_HOP_TIMEOUT = "451 4.4.2 next hop timed out, try again later"
NEXT_HOP_LOST = "451 4.4.2 connection to next hop lost, try again later"
NEXT_HOP_BAD_REPLY = "451 4.4.0 next hop gave an invalid reply, try again later"
LOCAL_ERROR = "451 4.3.0 local error in processing, try again later"
SHUTTING_DOWN = "421 4.3.2 {} service shutting down, try again later"
TOO_MANY_SESSIONS = "421 4.7.0 {} too many sessions, try again later"
SESSION_TIMEOUT = "421 4.4.2 {} idle timeout, closing connection"

# Permanent refusals of bad input.
MESSAGE_TOO_BIG = "552 5.3.4 message size exceeds fixed limit ({} bytes)"
HEADER_TOO_BIG = "552 5.3.4 message header exceeds fixed limit ({} lines)"
BARE_NEWLINE = "550 5.5.2 message refused: bare CR or LF in message data (RFC 5321 2.3.8)"
NUL_IN_DATA = "550 5.6.0 message refused: NUL character in message data"
NO_VALID_RECIPIENTS = "554 5.5.1 no valid recipients"
XFORWARD_NOT_PERMITTED = "550 5.7.0 XFORWARD not permitted from this client"
XFORWARD_SYNTAX = "501 5.5.4 XFORWARD syntax error"
XFORWARD_OK = "250 2.0.0 Ok"
UNPARSEABLE = "550 5.6.0 message refused: {}"


def safe_text(text: object, limit: int = 200) -> str:
    """One line of printable ASCII, safe inside an SMTP reply or a log line."""
    s = str(text)
    out = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in s)
    if len(out) > limit:
        out = out[: limit - 3] + "..."
    return out


#: Typed reason -> template; ``{}`` takes the reason's text (sanitised).
_BY_REASON: dict[Reason, str] = {
    Reason.VIRUS: VIRUS_REJECTED,
    Reason.ATTACHMENT: ATTACHMENT_REJECTED,
    Reason.POLICY: POLICY_REJECTED,
    Reason.UNPARSEABLE: UNPARSEABLE,
    Reason.SCANNER_UNAVAILABLE: SCANNER_UNAVAILABLE,
    Reason.FILTER_FAILED: FILTER_FAILED,
    Reason.STORE_UNAVAILABLE: STORE_UNAVAILABLE,
    Reason.LOCAL_ERROR: LOCAL_ERROR,
}


def for_reason(reason: Reason | None, text: str = "") -> str:
    """The reply for a message refused or deferred for ``reason``, quoting
    ``text`` (a virus, a file name, a filter name) where the reply names one."""
    template = _BY_REASON.get(reason, LOCAL_ERROR) if reason is not None else LOCAL_ERROR
    return template.format(safe_text(text)) if "{}" in template else template
