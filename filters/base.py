"""The filter protocol, verdicts and edits.

A filter is a small class with a ``name``, a frozen ``Settings`` dataclass (its
``[filters.<name>]`` config section) and one async method, ``check``, that
inspects a :class:`gateway.message.Mail` and returns a :class:`Verdict`.

Filters never mutate the message: a verdict carries *edits* as values, and
the pipeline applies them once (``gateway/rewrite.py``, bytes to bytes), an
ARC seal (:class:`ArcSeal`) last.  A verdict carries typed findings
(personal, virus, scan state, ...) and, for a refusal, a typed
:class:`Reason`, never SMTP text.  Filters never
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


@dataclass(frozen=True, slots=True)
class ArcSeal:
    """Ask the pipeline to ARC-seal the message as it will be relayed.

    Not a rewrite: the pipeline applies every other edit of every filter
    first, then calls ``seal(content)`` (blocking: in ``executor``, or the
    gateway's thread pool when None) and prepends the ARC set it returns
    (``[(name, value), ...]``, ARC-Seal first; empty: not sealed).  So the
    seal covers the exact bytes that go out, and the edits are applied once.
    ``seal`` must be picklable when ``executor`` is a process pool."""

    seal: Callable[[bytes], list[tuple[str, str]]]
    executor: Executor | None = None


Edit = AddHeader | RemoveHeader | TagSubject | AddBanner | ArcSeal


# ------------------------------------------------------------------------- verdict


_EMPTY: Mapping[str, Any] = MappingProxyType({})


class ScanState(enum.Enum):
    """What a virus scanner could say about a message."""

    CLEAN = "clean"
    INFECTED = "infected"
    UNSCANNED = "unscanned"


class Reason(enum.Enum):
    """Why a message is not relayed, as a type: ``gateway.replies.for_reason``
    turns it (and the text it quotes) into the SMTP reply, in one place.

    Filters give VIRUS, ATTACHMENT or POLICY with a REJECT and
    SCANNER_UNAVAILABLE with a TEMPFAIL; the pipeline gives the others."""

    VIRUS = "virus"
    ATTACHMENT = "attachment"
    POLICY = "policy"
    SCANNER_UNAVAILABLE = "scanner-unavailable"
    FILTER_FAILED = "filter-failed"
    UNPARSEABLE = "unparseable"
    STORE_UNAVAILABLE = "store-unavailable"
    LOCAL_ERROR = "local-error"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A filter's finding about one message.

    ``detail`` names what was found (a virus name, an offending file).  The
    typed findings are what the pipeline, its observers and the log decide
    on -- never filter names, never SMTP text:

    ``reason``, ``reason_text``  why a REJECT or TEMPFAIL, and the name its
        reply quotes (``gateway.replies.for_reason``);
    ``personal``  the message is marked personal (None: not this filter's say);
    ``scan``, ``virus``  a scanner's result (``scan`` None: not a scanner);
    ``notify``  where IT wants a notice about the virus found;
    ``unparseable``  held because the MIME structure is beyond the bounds;
    ``attachments``  header-only descriptions of the attachments looked at
        (``true_types``: they carry libmagic's true types), or
        ``attachments_error`` when they could not be described.

    ``log_facts`` is further header-only, descriptive data for the monitoring
    log (DKIM summary, how a message was marked, ...): nothing branches on it.
    """

    filter: str
    outcome: Outcome = Outcome.RELAY
    detail: str = ""
    reason: Reason | None = None
    reason_text: str = ""
    edits: tuple[Edit, ...] = ()
    personal: bool | None = None
    scan: ScanState | None = None
    virus: str | None = None
    notify: str | None = None
    unparseable: bool = False
    attachments: tuple[Mapping[str, Any], ...] | None = None
    true_types: bool = False
    attachments_error: str | None = None
    log_facts: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def relay(cls, name: str, *, edits: tuple[Edit, ...] = (), **findings: Any) -> Verdict:
        return cls(name, Outcome.RELAY, edits=edits, **_frozen(findings))

    @classmethod
    def quarantine(cls, name: str, detail: str, **findings: Any) -> Verdict:
        return cls(name, Outcome.QUARANTINE, detail, **_frozen(findings))

    @classmethod
    def reject(cls, name: str, detail: str, reason: Reason = Reason.POLICY,
               reason_text: str | None = None, **findings: Any) -> Verdict:
        """A refusal; its reply quotes ``reason_text`` (default: ``detail``)."""
        text = detail if reason_text is None else reason_text
        return cls(name, Outcome.REJECT, detail, reason, text, **_frozen(findings))

    @classmethod
    def tempfail(cls, name: str, detail: str, reason: Reason = Reason.FILTER_FAILED,
                 **findings: Any) -> Verdict:
        """A temporary failure; FILTER_FAILED's reply names the filter."""
        return cls(name, Outcome.TEMPFAIL, detail, reason, name, **_frozen(findings))

    @property
    def facts(self) -> Mapping[str, Any]:
        """The header-only findings as the log and the quarantine rows show
        them (:meth:`summary` without filter, outcome and detail)."""
        out = self.summary()
        for key in ("filter", "outcome", "detail"):
            out.pop(key, None)
        return MappingProxyType(out)

    def summary(self, sealed: bool | None = None) -> dict[str, Any]:
        """The verdict as header-only data: ``filter``, ``outcome``,
        ``detail`` (when set), the findings this filter states, its
        ``log_facts``; ``arc_sealed`` when it asked for an ARC seal
        (``sealed``: whether the seal was added)."""
        out: dict[str, Any] = {"filter": self.filter, "outcome": self.outcome.name.lower()}
        if self.detail:
            out["detail"] = self.detail
        if self.scan is not None:
            out["scan"] = self.scan.value
            out["virus"] = self.virus
        elif self.virus is not None:
            out["virus"] = self.virus
        if self.notify is not None:
            out["notify"] = self.notify
        if self.personal is not None:
            out["personal"] = self.personal
        if self.unparseable:
            out["unparseable"] = True
        if self.attachments is not None:
            out["attachments"] = list(self.attachments)
        if self.attachments_error is not None:
            out["attachments_error"] = self.attachments_error
        for k, val in self.log_facts.items():
            out.setdefault(k, val)
        if self.arc_seal is not None:
            out["arc_sealed"] = bool(sealed)
        return out

    @property
    def arc_seal(self) -> ArcSeal | None:
        """The ARC seal this verdict asks for, if any."""
        for e in self.edits:
            if isinstance(e, ArcSeal):
                return e
        return None


def _frozen(findings: dict[str, Any]) -> dict[str, Any]:
    facts = findings.get("log_facts")
    if facts is not None and not isinstance(facts, MappingProxyType):
        findings["log_facts"] = MappingProxyType(dict(facts))
    if isinstance(findings.get("attachments"), list):
        findings["attachments"] = tuple(findings["attachments"])
    return findings


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
    """What every filter looks like; the chain is a ``list[Filter]``.

    :class:`BaseFilter` gives the optional parts neutral defaults and every
    filter in ``filters/`` derives from it.  What a filter is able to do is
    declared, never found by its name or probed with ``getattr``:

    ``reads_mime``  (default True) it reads ``Mail.attachments`` or the MIME
        structure, so the pipeline starts it once the message is parsed;
        False starts it at once (one that says False and reads the structure
        anyway is still correct, only slower).
    ``scanner``  (default False) it is a virus scanner: when it raises or
        times out, the message is *unscanned* and the reply says the scanner
        is unavailable.
    ``writes_log``  (default False) it builds the header-only log record
        (:meth:`log_record`) once the message's outcome is known.
    ``health_check``  (default None) the name under which :meth:`health`
        reports its dependency (``/healthz``, ``mailwarden check``).

    :meth:`check_now` (default: None, always) is the filter's answer when it
    can give it at once, without waiting for anything (CPU work of
    microseconds, nothing blocking): the pipeline then runs no task and no
    deadline for it.  None: the pipeline awaits :meth:`check`.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    reads_mime: ClassVar[bool]
    scanner: ClassVar[bool]
    writes_log: ClassVar[bool]
    health_check: ClassVar[str | None]

    def __init__(self, settings: Any, ctx: FilterContext) -> None: ...

    async def check(self, mail: Mail) -> Verdict:
        """Inspect ``mail`` (never mutate it) and return a verdict."""
        ...

    def check_now(self, mail: Mail) -> Verdict | None:
        """The verdict when it needs no waiting (see the class docstring), else None."""
        ...

    async def aclose(self) -> None:
        """Release resources (thread pools, connections)."""
        ...

    async def health(self) -> tuple[bool, str]:
        """Check the dependency named by ``health_check``: (ok, one line)."""
        ...

    def conf_check(self) -> str | None:
        """A warning about the dependency's own configuration, or None."""
        ...

    def log_record(self, mail: Mail, outcome: Any, own: Verdict | None) -> dict[str, Any] | None:
        """The header-only log record for ``mail`` and its ``outcome``
        (``writes_log`` filters; ``own`` is this filter's verdict)."""
        ...


class BaseFilter:
    """Neutral defaults for the optional parts of :class:`Filter`."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    reads_mime: ClassVar[bool] = True
    scanner: ClassVar[bool] = False
    writes_log: ClassVar[bool] = False
    health_check: ClassVar[str | None] = None

    def check_now(self, mail: Mail) -> Verdict | None:
        """No answer without waiting: the pipeline awaits :meth:`check`."""
        return None

    async def aclose(self) -> None:
        """Nothing to release."""
        return None

    async def health(self) -> tuple[bool, str]:
        """Nothing to check."""
        return True, "nothing to check"

    def conf_check(self) -> str | None:
        """No configuration warning."""
        return None

    def log_record(self, mail: Mail, outcome: Any, own: Verdict | None) -> dict[str, Any] | None:
        """Not a log writer."""
        return None
