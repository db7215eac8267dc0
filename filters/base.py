"""The filter protocol, verdicts and edits.

A filter is a small class with a ``name``, a frozen ``Settings`` dataclass (its
``[filters.<name>]`` config section) and one async method, ``check``, that
inspects a :class:`gateway.message.Mail` and returns a :class:`Verdict`.

Filters never mutate the message: a verdict carries *edits* as values, and
``gateway/rewrite.py`` applies them as bytes-to-bytes functions.  Filters never
speak SMTP and never touch the store.  An exception or timeout that escapes a
filter becomes that filter's TEMPFAIL verdict (see ``gateway/pipeline.py``):
it is never a pass.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from gateway.message import Mail


class Outcome(enum.IntEnum):
    """What a filter wants done with the message, in order of severity.

    The pipeline resolves a message's disposition as the most severe outcome
    of all verdicts: tempfail, then reject, then quarantine, then relay.
    """

    RELAY = 0
    QUARANTINE = 1
    REJECT = 2
    TEMPFAIL = 3


# --------------------------------------------------------------------------- edits


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Prepend ``Name: value`` to the header block (raw, folded if long)."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class RemoveHeader:
    """Remove every ``name`` header; with ``contains``, only those whose value
    (unfolded, case-insensitive) contains that text; with ``first_token``, only
    those whose value starts with that token (case-insensitive, after any
    leading comments, followed by ";", whitespace or the end) -- e.g. the
    authserv-id of an Authentication-Results field (RFC 8601 section 5)."""

    name: str
    contains: str | None = None
    first_token: str | None = None


@dataclass(frozen=True, slots=True)
class TagSubject:
    """Prefix the Subject with ``tag`` unless it already carries it."""

    tag: str


@dataclass(frozen=True, slots=True)
class AddBanner:
    """Insert a visible warning at the top of every text/plain and text/html
    body part (never inside attachments or signed/encrypted content).

    ``text`` is plain text; the HTML form is built from it (escaped, styled
    inline).  ``marker`` is an invisible token used to detect a banner that is
    already there (idempotence).
    """

    text: str
    marker: str = "mailwarden-banner"


Edit = AddHeader | RemoveHeader | TagSubject | AddBanner


# ------------------------------------------------------------------------- verdict


_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Verdict:
    """A filter's finding about one message.

    ``detail`` names what was found (a virus name, an offending file); ``reply``
    overrides the SMTP reply for a REJECT (e.g. ``554 5.7.1 ...``); ``facts``
    are header-only values for the monitoring log (never bodies).
    """

    filter: str
    outcome: Outcome = Outcome.RELAY
    detail: str = ""
    reply: str | None = None
    edits: tuple[Edit, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def relay(cls, name: str, *, edits: tuple[Edit, ...] = (), **facts: Any) -> Verdict:
        return cls(name, Outcome.RELAY, edits=edits, facts=MappingProxyType(facts))

    @classmethod
    def quarantine(cls, name: str, detail: str, **facts: Any) -> Verdict:
        return cls(name, Outcome.QUARANTINE, detail, facts=MappingProxyType(facts))

    @classmethod
    def reject(cls, name: str, detail: str, reply: str, **facts: Any) -> Verdict:
        return cls(name, Outcome.REJECT, detail, reply, facts=MappingProxyType(facts))

    @classmethod
    def tempfail(cls, name: str, detail: str, **facts: Any) -> Verdict:
        return cls(name, Outcome.TEMPFAIL, detail, facts=MappingProxyType(facts))


# ------------------------------------------------------------------------ protocol


class SettingsError(ValueError):
    """Raised by a filter's ``Settings.__post_init__`` for a bad value.

    ``key`` is the key inside the filter's section; the config loader prefixes
    it with ``filters.<name>.`` so that the one-line error names the full key.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class FilterContext:
    """What the gateway hands every filter: no globals, everything injected.

    ``executor`` is a bounded thread pool for blocking calls (libmagic, pyclamd,
    crypto); filters with their own sizing needs may create their own bounded
    pool in ``__init__`` and shut it down in ``aclose``.
    """

    hostname: str
    internal_domains: tuple[str, ...]
    executor: Executor
    clock: Callable[[], datetime]
    max_message_size: int
    # Optional DNS TXT lookup override for tests (name -> list of TXT strings);
    # None means: use the filter's configured resolver.
    dns_txt: Callable[..., Any] | None = None

    def is_internal_domain(self, domain: str) -> bool:
        """True when ``domain`` is one of ``internal_domains`` or a subdomain."""
        d = domain.lower().rstrip(".")
        return any(d == i or d.endswith("." + i) for i in self.internal_domains)


class Filter(Protocol):
    """What every filter looks like."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    #: Optional (default True): the filter reads ``Mail.attachments`` or the
    #: MIME structure, so the pipeline starts it once the message is parsed
    #: (in a worker thread); False starts it at once.  A filter that says
    #: False and reads the structure anyway is still correct, only slower.
    reads_mime: ClassVar[bool]

    def __init__(self, settings: Any, ctx: FilterContext) -> None: ...

    async def check(self, mail: Mail) -> Verdict:
        """Inspect ``mail`` (never mutate it) and return a verdict."""
        ...

    async def aclose(self) -> None:
        """Release resources (thread pools, connections)."""
        ...
