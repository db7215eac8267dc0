"""personal filter: mark personal email as such.

Policy clause enforced: *"mark personal email as such; the organisation
avoids opening mail marked personal or private"*.  This filter only
*detects* the marking; the rest of the policy follows from its verdict:

* relayed personal mail carries ``X-Mailwarden-Personal: yes`` (CONTRACT.md),
  so that downstream systems and people can see it is personal;
* the verdict's ``personal`` fact sets the personal flag on the header-only
  log record (``filters/header_log.py``) and on any quarantine item
  (``gateway/pipeline.py``), whose body is then shown only as an exceptional,
  reasoned, audited access;
* nothing else about the message changes.

A message is personal when any of these holds (all case-insensitive):

``Sensitivity: Personal`` or ``Private``
    RFC 2156 section 5.3.4, as Outlook sets it ("Mark as Private/Personal").
    Values are listed in ``sensitivity_values``.
``X-Classification:`` or ``Classification:``
    the header's value (or its first ``;``/``,``-separated token) is one of
    ``classification_values``, for labelling tools that use those headers.
a subject marker
    the Subject, RFC 2047 decoded, starts with one of ``subject_markers``
    after any number of reply/forward prefixes (``Re:``, ``Fwd:``, ``Fw:``,
    ``AW:``, ``WG:``, ``SV:``, ``VS:``, ``TR:``, ``RIF:``, ``Antw:``, also
    counted forms such as ``Re[2]:``) and whitespace.  So ``Re: Fwd:
    [Personal] dinner`` is personal; ``Personally speaking`` is not.

Forged markers: a sender must not be able to make mail look already tagged
(or, downstream, confuse a client rule that trusts our header), so every
incoming ``X-Mailwarden-Personal`` header is removed (a ``RemoveHeader``
edit, only when one is present) and ours is added only from the markings
above.  The ``X-Mailwarden-Personal`` header itself is never a marking.

Settings (``[filters.personal]``)
    ``subject_markers``        default ``["[personal]", "personal:", "private:"]``
    ``sensitivity_values``     default ``["personal", "private"]``
    ``classification_values``  default ``["personal", "private"]``
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from filters.base import AddHeader, BaseFilter, Edit, FilterContext, RemoveHeader, Verdict
from gateway.message import Mail

HEADER = "X-Mailwarden-Personal"
CLASSIFICATION_HEADERS = ("X-Classification", "Classification")

#: Reply/forward prefixes stripped before looking for a subject marker.
_PREFIX = re.compile(
    r"^\s*(?:re|fwd?|aw|wg|sv|vs|tr|rif|antw)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*",
    re.IGNORECASE,
)


def _non_empty_words(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for item in value:
        norm = " ".join(item.split()).lower()
        if not norm:
            raise ValueError("entries must not be empty")
        out.append(norm)
    return tuple(out)


@dataclass(frozen=True)
class Settings:
    """``[filters.personal]``: which markings make a message personal."""

    subject_markers: tuple[str, ...] = field(
        default=("[personal]", "personal:", "private:"),
        metadata={"check": _non_empty_words},
    )
    sensitivity_values: tuple[str, ...] = field(
        default=("personal", "private"), metadata={"check": _non_empty_words}
    )
    classification_values: tuple[str, ...] = field(
        default=("personal", "private"), metadata={"check": _non_empty_words}
    )


def strip_reply_prefixes(subject: str) -> str:
    """The subject without leading ``Re:``/``Fwd:``/... prefixes (any number)."""
    text = subject
    while True:
        m = _PREFIX.match(text)
        if not m or not m.group(0):
            return text.strip()
        text = text[m.end() :]


def _norm(value: str | None) -> str:
    return " ".join((value or "").split()).lower()


class PersonalFilter(BaseFilter):
    """Flags personal mail and tags it with ``X-Mailwarden-Personal: yes``."""

    name: ClassVar[str] = "personal"
    #: Reads headers only: starts without waiting for the MIME parse.
    reads_mime: ClassVar[bool] = False
    Settings: ClassVar[type] = Settings

    def __init__(self, settings: Settings, ctx: FilterContext) -> None:
        self.settings = settings
        self.ctx = ctx
        # Settings built directly (tests, defaults) may not be normalised yet.
        self._markers = tuple(_norm(m) for m in settings.subject_markers if _norm(m))
        self._sensitivity = frozenset(_norm(v) for v in settings.sensitivity_values)
        self._classification = frozenset(_norm(v) for v in settings.classification_values)

    def marking(self, mail: Mail) -> str | None:
        """Why ``mail`` is personal (e.g. ``"sensitivity: private"``), or None."""
        for value in mail.header_all("Sensitivity"):
            v = _norm(value)
            if v in self._sensitivity:
                return f"sensitivity: {v}"
        for name in CLASSIFICATION_HEADERS:
            for value in mail.header_all(name):
                v = _norm(value)
                first = _norm(re.split(r"[;,]", v, maxsplit=1)[0])
                if v in self._classification or first in self._classification:
                    return f"{name.lower()}: {first or v}"
        subject = mail.header("Subject")
        if subject:
            rest = _norm(strip_reply_prefixes(subject))
            for marker in self._markers:
                if rest.startswith(marker):
                    return f"subject: {marker}"
        return None

    async def check(self, mail: Mail) -> Verdict:
        """Relay always; personal mail gets the header and ``personal``."""
        return self.check_now(mail)

    def check_now(self, mail: Mail) -> Verdict:
        """:meth:`check`'s verdict: headers only, nothing to wait for."""
        edits: list[Edit] = []
        if mail.headers.get(HEADER) is not None:
            edits.append(RemoveHeader(HEADER))
        reason = self.marking(mail)
        if reason is None:
            return Verdict.relay(self.name, edits=tuple(edits), personal=False)
        edits.append(AddHeader(HEADER, "yes"))
        return Verdict.relay(self.name, edits=tuple(edits), personal=True,
                             log_facts={"marked_by": reason})
