"""attachment_types: attachment true-type policy.

Policy clause: "employees may not install software" (software comes through
IT).  Executables, installers, scripts and disk images must neither arrive nor
leave as attachments, whatever their names or Content-Types claim; Office
macros from outside are held too ("extreme care with attachments from third
parties").

For every attachment (and every inline part that is not a text body) the
filter finds the *true* type from the bytes (libmagic on the first 8 KiB, one
``magic.Magic`` handle per worker thread of the filter's own bounded pool,
plus direct signature checks in :mod:`filters.filetypes`), compares it with
the declared Content-Type and the decoded filename, looks inside archives
(:mod:`filters.archives`, bounded) and checks Office documents for macros
(:mod:`filters.macros`).  Nothing runs on the event loop.

Blocked (``blocked_categories``, all by default):

* ``executable`` — PE/MS-DOS, ELF, Mach-O, by content whatever the name, and
  by name (.exe .dll .com .scr .cpl .pif .sys .so .dylib ...);
* ``installer`` — MSI/MSP/MST, MSIX/AppX, APK, .deb, .rpm, macOS .pkg (xar)
  and .dmg, by content or name (also .appinstaller, .application, .snap);
* ``script`` — .js .jse .vbs .vbe .wsf .wsh .hta .ps1 .bat .cmd .lnk .url .jar
  .class .chm .reg .inf .sct ... by name, and LNK, batch, JAR, Java class and
  CHM by content;
* ``disk_image`` — ISO 9660/UDF, VHD/VHDX, VMDK, QCOW, WIM, raw boot-sector
  images, by content or name (.iso .img .vhd .vhdx ...);
* ``onenote`` — OneNote sections (.one, .onepkg);
* ``double_extension`` — a blocked extension after a trusted-looking one
  (``invoice.pdf.exe``);
* ``deceptive_name`` — filenames with bidirectional/invisible control
  characters (U+202E RIGHT-TO-LEFT OVERRIDE ...) or trailing dots/spaces.

``blocked_extensions`` and ``blocked_mime_types`` (true types) add to these;
``allowed_extensions`` lets through files whose extension is listed *and*
whose content is what that extension says (allowing "jar" lets real JARs
named .jar through, never a PE named .jar).

Archives (zip, 7z, rar, tar, gzip, bzip2, xz, and Outlook's TNEF
winmail.dat; nested up to ``archive_max_depth``) have the same rules applied
to member names and contents (rar: names, plus stored members).  Encrypted or unreadable archives,
archive formats that cannot be opened (cab, arj, ace, ...), and archives over
``archive_max_members`` / ``archive_max_total_bytes`` (archive bombs) are held
as *unscannable*.  All of these take ``action``.

Office macros (VBA, Excel 4/XLM, OpenDocument Basic) and encrypted Office
documents (which cannot be checked) take ``macro_action`` for mail whose
direction is in ``macro_directions`` (default: inbound only); elsewhere they
are only noted in the log facts.

Config (``[filters.attachment_types]``), with defaults::

    action = "quarantine"            # quarantine | reject (554 naming the file)
    blocked_categories = ["executable", "installer", "script", "disk_image",
                          "onenote", "double_extension", "deceptive_name"]
    blocked_extensions = []          # extra, e.g. ["sh", "py"]
    allowed_extensions = []          # e.g. ["jar"]
    blocked_mime_types = []          # extra true types, e.g. ["application/x-shockwave-flash"]
    archive_max_depth = 3
    archive_max_members = 1000
    archive_max_total_bytes = 104857600   # uncompressed, per attachment
    macro_action = "quarantine"      # quarantine | reject | relay
    macro_directions = ["inbound"]   # inbound | outbound | internal
    workers = 2                      # threads for libmagic and archive reading
"""

from __future__ import annotations

import asyncio
import email.header
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, ClassVar, Literal, NamedTuple

import magic

from filters import filetypes, macros
from filters.archives import Budget, Limits, Unscannable, open_archive
from filters.base import BaseFilter, FilterContext, Reason, SettingsError, Verdict
from filters.filetypes import (
    ARCHIVE_KINDS,
    CATEGORIES,
    CATEGORY_EXTENSIONS,
    DECOY_EXTENSIONS,
    HEAD_BYTES,
    KINDS,
    MAGIC_BYTES,
    NEEDS_CONTENT,
    TAIL_BYTES,
    UNSUPPORTED_ARCHIVE_KINDS,
    ZIP_FLAVOURS,
)
from gateway.message import Attachment, Mail, ParseError, decode_header_value

DIRECTIONS = ("inbound", "outbound", "internal")
#: Longest path or detail kept in verdicts (archive member names can be huge).
MAX_PATH = 200
MAX_DETAIL = 1000


# ------------------------------------------------------------------ settings


def _check_categories(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        if item not in CATEGORIES:
            raise ValueError(f"unknown category {item!r} (known: {', '.join(CATEGORIES)})")
    return value


def _norm_ext(item: str) -> str:
    return item.strip().lower().lstrip(".")


def _check_extensions(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for item in value:
        ext = _norm_ext(item)
        if not ext or any(c in ext for c in "/\\ ") or "." in ext:
            raise ValueError(f"bad extension {item!r} (expected e.g. \"exe\")")
        out.append(ext)
    return tuple(out)


def _check_mime_types(value: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for item in value:
        mime = item.strip().lower()
        if mime.count("/") != 1 or mime.startswith("/") or mime.endswith("/"):
            raise ValueError(f"bad MIME type {item!r} (expected e.g. \"application/x-foo\")")
        out.append(mime)
    return tuple(out)


def _check_directions(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        if item not in DIRECTIONS:
            raise ValueError(f"unknown direction {item!r} (known: {', '.join(DIRECTIONS)})")
    return value


def _positive(value: int) -> int:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _meta(fn: Any) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class Settings:
    """``[filters.attachment_types]`` (see the module docstring)."""

    action: Literal["quarantine", "reject"] = "quarantine"
    blocked_categories: tuple[str, ...] = field(
        default=CATEGORIES, metadata=_meta(_check_categories)
    )
    blocked_extensions: tuple[str, ...] = field(default=(), metadata=_meta(_check_extensions))
    allowed_extensions: tuple[str, ...] = field(default=(), metadata=_meta(_check_extensions))
    blocked_mime_types: tuple[str, ...] = field(default=(), metadata=_meta(_check_mime_types))
    archive_max_depth: int = field(default=3, metadata=_meta(_positive))
    archive_max_members: int = field(default=1000, metadata=_meta(_positive))
    archive_max_total_bytes: int = field(default=100 * 1024 * 1024, metadata=_meta(_positive))
    macro_action: Literal["quarantine", "reject", "relay"] = "quarantine"
    macro_directions: tuple[str, ...] = field(
        default=("inbound",), metadata=_meta(_check_directions)
    )
    workers: int = field(default=2, metadata=_meta(_positive))

    def __post_init__(self) -> None:
        both = {_norm_ext(e) for e in self.allowed_extensions} & {
            _norm_ext(e) for e in self.blocked_extensions
        }
        if both:
            raise SettingsError(
                "allowed_extensions",
                f"{', '.join(sorted(both))} also listed in blocked_extensions",
            )


# ---------------------------------------------------------------- classifier


@dataclass(frozen=True)
class Policy:
    """The blocking rules, resolved from :class:`Settings` once."""

    categories: frozenset[str]
    extensions: Mapping[str, str]  # extension -> category it is blocked as
    mime_types: frozenset[str]
    allowed_extensions: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """Build the policy (normalising values, whoever built ``settings``)."""
        categories = frozenset(settings.blocked_categories)
        allowed = frozenset(_norm_ext(e) for e in settings.allowed_extensions)
        extensions: dict[str, str] = {}
        for category in CATEGORIES:
            if category in categories:
                for ext in CATEGORY_EXTENSIONS.get(category, ()):
                    extensions.setdefault(ext, category)
        for ext in settings.blocked_extensions:
            extensions.setdefault(_norm_ext(ext), "blocked_extension")
        for ext in allowed:
            extensions.pop(ext, None)
        return cls(
            categories,
            extensions,
            frozenset(m.strip().lower() for m in settings.blocked_mime_types),
            allowed,
        )


DEFAULT_POLICY = Policy.from_settings(Settings())

#: Every extension that is risky in itself, whether or not its category is
#: blocked: the trigger for ``double_extension``.
_RISKY_EXTENSIONS = frozenset().union(*CATEGORY_EXTENSIONS.values())
_SEPARATORS = str.maketrans({"\\": "/"})


class Finding(NamedTuple):
    """Why a file is blocked: a category and a one-line human reason."""

    category: str
    reason: str


class NameInfo(NamedTuple):
    """The parts of a filename that the rules look at."""

    ext: str  # last extension, lower case ("" when none)
    previous: str  # the extension before it ("" when none)
    deceptive: str  # why the name is deceptive ("" when it is not)


def _is_hidden_char(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cf", "Cc")


def name_info(name: str | None) -> NameInfo:
    """Split a filename (the last path component) into what the rules need.

    Invisible characters are removed and trailing dots and spaces stripped
    before the extension is taken, as Windows does when it opens the file.
    """
    if not name:
        return NameInfo("", "", "")
    base = name.translate(_SEPARATORS).rsplit("/", 1)[-1]
    deceptive = ""
    hidden = sorted({f"U+{ord(ch):04X}" for ch in base if _is_hidden_char(ch)})
    if hidden:
        deceptive = f"filename contains invisible or bidirectional control characters ({', '.join(hidden[:4])})"
    visible = "".join(ch for ch in base if not _is_hidden_char(ch))
    stripped = visible.rstrip(". \t")
    if not deceptive and stripped and stripped != visible:
        deceptive = "filename ends in dots or spaces"
    parts = stripped.lower().split(".")
    ext = parts[-1].strip() if len(parts) > 1 else ""
    previous = parts[-2].strip() if len(parts) > 2 else ""
    return NameInfo(ext, previous, deceptive)


def _true_type_text(kind: str, magic_mime: str, magic_desc: str) -> str:
    """libmagic's description when libmagic alone agrees on the kind (it is
    more precise: "PE32+ executable (DLL) x86-64"), else our label."""
    desc = magic_desc.strip()
    if desc and len(desc) <= 120 and filetypes.identify(b"", b"", magic_mime, desc) == kind:
        return desc
    return filetypes.label(kind)


def classify(
    name: str | None,
    declared_type: str,
    magic_mime: str,
    magic_desc: str,
    head: bytes,
    *,
    tail: bytes = b"",
    kind: str | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> Finding | None:
    """Decide whether one file is blocked.  Pure: no I/O, no state.

    ``head`` is the file's leading bytes (up to ``HEAD_BYTES``), ``tail`` its
    last bytes when known; ``magic_mime``/``magic_desc`` are libmagic's verdict
    on the first ``MAGIC_BYTES``; ``kind`` overrides identification (the
    caller knows better after listing a zip, e.g. "jar").  The true type wins
    over the name: a PE is an executable whatever it is called.
    """
    if kind is None:
        kind = filetypes.identify(head, tail, magic_mime, magic_desc)
    info = name_info(name)
    known = KINDS.get(kind) if kind else None
    if known is not None and known.category in policy.categories:
        if not (info.ext in policy.allowed_extensions and info.ext in known.extensions):
            reason = f"{known.category}, {_true_type_text(kind or '', magic_mime, magic_desc)}"
            declared = (declared_type or "").lower()
            if declared and declared not in ("application/octet-stream",) and (
                magic_mime and declared != magic_mime.lower()
            ):
                reason += f" (declared {declared})"
            return Finding(known.category, reason)
    if magic_mime and magic_mime.lower() in policy.mime_types:
        return Finding("blocked_type", f"blocked type {magic_mime.lower()}")
    if info.deceptive and "deceptive_name" in policy.categories:
        return Finding("deceptive_name", info.deceptive)
    if (
        "double_extension" in policy.categories
        and info.previous in DECOY_EXTENSIONS
        and (info.ext in _RISKY_EXTENSIONS or info.ext in policy.extensions)
        and info.ext not in policy.allowed_extensions
    ):
        return Finding("double_extension", f"double extension .{info.previous}.{info.ext}")
    category = policy.extensions.get(info.ext)
    if category is not None:
        return Finding(category, f"{category} by name (.{info.ext})")
    return None


# ------------------------------------------------------------------ scanning


class Hit(NamedTuple):
    """A finding about one file (``path`` names it, inside archives too)."""

    path: str
    category: str  # a policy category, "unscannable" or "macros"
    reason: str

    def describe(self) -> str:
        """One line for the quarantine detail."""
        if self.category == "unscannable":
            return f"unscannable: {self.reason}"
        return f"{self.path}: {self.reason}"


@dataclass
class Report:
    """What checking one attachment found."""

    facts: dict[str, Any]
    hits: list[Hit] = field(default_factory=list)  # blocked or unscannable
    macro_hits: list[Hit] = field(default_factory=list)  # macros / uncheckable docs
    notes: list[str] = field(default_factory=list)


def _printable(text: str, limit: int = MAX_PATH) -> str:
    out = "".join(ch if ch.isprintable() else "?" for ch in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def ascii_text(text: str, limit: int = MAX_PATH) -> str:
    """One line of printable ASCII (for SMTP replies)."""
    out = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


class _Scan:
    """Checks one top-level attachment (runs in a worker thread)."""

    def __init__(self, owner: AttachmentTypesFilter, report: Report) -> None:
        self.owner = owner
        self.policy = owner.policy
        self.limits = owner.limits
        self.budget = Budget(owner.limits)
        self.report = report
        self.flagged: set[tuple[str, str]] = set()
        self.over_limits = False

    def hit(self, path: str, category: str, reason: str) -> None:
        key = (path, reason)
        if key in self.flagged:
            return
        self.flagged.add(key)
        target = self.report.macro_hits if category == "macros" else self.report.hits
        target.append(Hit(path, category, reason))

    def unscannable(self, path: str, reason: str) -> None:
        if reason.startswith("archive exceeds limits"):
            # One bomb trips the shared budget at every level it unwinds
            # through; report the innermost only.
            if self.over_limits:
                return
            self.over_limits = True
        self.hit(path, "unscannable", reason)

    def check_name(self, path: str, name: str) -> None:
        finding = classify(name, "", "", "", b"", kind=None, policy=self.policy)
        if finding is not None:
            self.hit(path, finding.category, finding.reason)

    def inspect(
        self,
        path: str,
        name: str | None,
        declared: str,
        head: bytes,
        tail: bytes,
        read_all: Any,
        depth: int,
        package_member: bool = False,
    ) -> tuple[str, str]:
        """Check one file (and what is inside it); return its true MIME type
        and libmagic's description, for the log facts.

        ``package_member``: a part of a document or package (OOXML, ODF,
        EPUB, JAR, APK, MSIX) — checked by content only, since its name is
        an internal part name (an EPUB may carry .js), not something a user
        opens by double-clicking."""
        if depth > 0 and head.lstrip()[:5] == b"<?xml":
            mime, desc = "text/xml", "XML document"  # package parts: skip libmagic
        else:
            mime, desc = self.owner.magic_of(head[:MAGIC_BYTES])
        kind = filetypes.identify(head, tail, mime, desc)
        data: bytes | None = None
        listing = None
        label = _printable(path)
        if kind in NEEDS_CONTENT and read_all is not None:
            try:
                data = read_all()
            except Unscannable as exc:
                self.unscannable(path, exc.reason)
        if kind in ARCHIVE_KINDS and data is None and read_all is None:
            self.unscannable(path, f"cannot read nested archive {label}")
        if kind in ARCHIVE_KINDS and data is not None:
            if depth >= self.limits.max_depth:
                self.unscannable(
                    path,
                    f"archive exceeds limits ({label}: nested deeper than "
                    f"{self.limits.max_depth})",
                )
            else:
                try:
                    listing = open_archive(kind, data, label, self.budget)
                except Unscannable as exc:
                    self.unscannable(path, exc.reason)
                if listing is not None and kind == "zip" and listing.names is not None:
                    flavour = filetypes.zip_flavour(listing.names)
                    if flavour is not None:
                        kind, desc = flavour, filetypes.label(flavour)
        elif kind in UNSUPPORTED_ARCHIVE_KINDS:
            self.unscannable(path, f"cannot look inside {filetypes.label(kind)} {label}")

        finding = classify(
            None if package_member else name,
            declared,
            mime,
            desc,
            head,
            tail=tail,
            kind=kind,
            policy=self.policy,
        )
        if finding is not None:
            self.hit(path, finding.category, finding.reason)

        if not (package_member and (name or "").lower().endswith("vbaproject.bin")):
            # (an OOXML vbaProject.bin is reported once, for its package)
            self._check_macros(path, kind, data, listing)

        if listing is not None:
            if listing.encrypted:
                self.unscannable(path, f"encrypted archive {label}")
            self.report.notes.extend(listing.notes)
            package = kind in ZIP_FLAVOURS
            try:
                for member in listing.members:
                    mpath = f"{path}/{member.name}"
                    if member.encrypted or not member.head:
                        if not package:
                            self.check_name(mpath, member.name)
                        continue
                    self.inspect(
                        mpath,
                        member.name,
                        "",
                        member.head,
                        b"",
                        member.read_all,
                        depth + 1,
                        package_member=package,
                    )
            except Unscannable as exc:
                self.unscannable(path, exc.reason)
        return filetypes.true_mime(kind, mime), desc

    def _check_macros(self, path: str, kind: str | None, data: bytes | None, listing: Any) -> None:
        found: str | None = None
        if kind == "ooxml" and listing is not None and listing.names is not None:
            found = macros.ooxml_macros(listing.names)
        elif kind == "odf" and listing is not None and listing.names is not None:
            found = macros.odf_macros(listing.names)
        elif kind == "ole" and data is not None:
            found = macros.ole_macros(data)
        elif kind == "sylk" and data is not None:
            found = macros.sylk_macros(data)
        if found is None:
            return
        if found in macros.UNCHECKABLE:
            self.hit(path, "macros", f"{found}, cannot be checked for macros")
        else:
            self.hit(path, "macros", f"Office document with {found}")


# -------------------------------------------------------------------- filter


#: Up to this many attachments are checked in one worker-thread job; more
#: are spread over the pool (libmagic and zlib release the GIL).
FEW_ATTACHMENTS = 4


def _raw_filenames(parts: Iterable[Message]) -> dict[str, str]:
    """Filenames as the sender wrote them (RFC 2047/2231 decoded, control
    characters kept), keyed by the sanitised form ``Mail`` exposes.  Only
    names that differ are listed."""
    out: dict[str, str] = {}
    for part in parts:
        try:
            name = part.get_filename()
            if name is None:
                continue
            name = str(name)
            if "=?" in name:
                raw = str(email.header.make_header(email.header.decode_header(name)))
            else:
                raw = name
        except Exception:
            continue
        clean = decode_header_value(str(name))
        if clean is not None and raw != clean:
            out.setdefault(clean, raw)
    return out


def _collect(mail: Mail) -> tuple[tuple[Attachment, ...], dict[str, str]]:
    attachments = mail.attachments
    raw = _raw_filenames(mail.part_headers) if attachments else {}
    return attachments, raw


class AttachmentTypesFilter(BaseFilter):
    """Holds or refuses mail carrying software, disk images, deceptive names,
    unscannable archives and (inbound) Office macros; see the module docstring."""

    name: ClassVar[str] = "attachment_types"
    Settings: ClassVar[type] = Settings

    def __init__(self, settings: Settings, ctx: FilterContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.policy = Policy.from_settings(settings)
        self.limits = Limits(
            settings.archive_max_depth,
            settings.archive_max_members,
            settings.archive_max_total_bytes,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="attachment-types"
        )
        self._local = threading.local()

    # -- libmagic: one pair of handles per worker thread (not thread-safe)

    def magic_of(self, buf: bytes) -> tuple[str, str]:
        """libmagic's (MIME type, description) of ``buf``; call from a worker."""
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = (magic.Magic(mime=True), magic.Magic())
            self._local.handles = handles
        try:
            return handles[0].from_buffer(buf), handles[1].from_buffer(buf)
        except magic.MagicException:
            return "application/octet-stream", "unknown (libmagic error)"

    def scan_attachment(self, attachment: Attachment, raw_name: str | None) -> Report:
        """Check one attachment (blocking: call in a worker thread)."""
        payload = attachment.payload
        display = attachment.filename or f"(unnamed part {attachment.index + 1})"
        facts: dict[str, Any] = {
            "name": attachment.filename or "",
            "type": "",
            "size": len(payload),
            "sha256": attachment.sha256,
        }
        report = Report(facts)
        scan = _Scan(self, report)
        mime, _desc = scan.inspect(
            display,
            raw_name or attachment.filename,
            attachment.declared_type,
            payload[:HEAD_BYTES],
            payload[-TAIL_BYTES:],
            lambda: payload,
            0,
        )
        facts["type"] = mime
        return report

    def check_now(self, mail: Mail) -> Verdict | None:
        """The verdict for a parsed message with no attachment (or whose
        structure cannot be parsed); None when there are attachments to look
        at (in the thread pool)."""
        if not mail.prepared:
            return None
        try:
            attachments, _raw_names = _collect(mail)
        except ParseError as exc:
            hit = Hit("(message)", "unscannable", f"MIME structure not parseable ({exc})")
            return self._held([hit], [], [])
        if not attachments:
            return Verdict.relay(self.name, attachments=(), true_types=True)
        return None

    async def check(self, mail: Mail) -> Verdict:
        """Check every attachment of ``mail`` in the filter's thread pool."""
        loop = asyncio.get_running_loop()
        try:
            if mail.prepared:  # parsed already (the pipeline does it): no hand-over
                attachments, raw_names = _collect(mail)
            else:
                attachments, raw_names = await loop.run_in_executor(self._pool, _collect, mail)
        except ParseError as exc:
            hit = Hit("(message)", "unscannable", f"MIME structure not parseable ({exc})")
            return self._held([hit], [], [])
        if not attachments:
            return Verdict.relay(self.name, attachments=(), true_types=True)
        jobs = [(att, raw_names.get(att.filename) if att.filename else None)
                for att in attachments]
        reports: list[Report]
        if len(jobs) <= FEW_ATTACHMENTS:
            # One hand-over to the pool for the usual few attachments.
            reports = await loop.run_in_executor(
                self._pool, lambda: [self.scan_attachment(a, n) for a, n in jobs])
        else:
            reports = list(await asyncio.gather(*(
                loop.run_in_executor(self._pool, self.scan_attachment, a, n) for a, n in jobs)))
        facts = [r.facts for r in reports]
        hits = [h for r in reports for h in r.hits]
        macro_hits = [h for r in reports for h in r.macro_hits]
        macros_apply = (
            self.settings.macro_action != "relay"
            and str(mail.direction) in self.settings.macro_directions
        )
        if hits or (macro_hits and macros_apply):
            return self._held(hits, macro_hits if macros_apply else [], facts, macro_hits)
        extra: dict[str, Any] = {}
        if macro_hits:
            extra["macros"] = [_printable(h.describe()) for h in macro_hits]
        return Verdict.relay(self.name, attachments=facts, true_types=True, log_facts=extra)

    def _held(
        self,
        hits: list[Hit],
        macro_hits: list[Hit],
        facts: list[dict[str, Any]],
        all_macro_hits: list[Hit] | None = None,
    ) -> Verdict:
        held = hits + macro_hits
        detail = _printable("; ".join(h.describe() for h in held), MAX_DETAIL)
        files: list[str] = []
        for h in held:
            p = _printable(h.path)
            if p not in files:
                files.append(p)
        extra: dict[str, Any] = {"files": files}
        if all_macro_hits:
            extra["macros"] = [_printable(h.describe()) for h in all_macro_hits]
        rejecting = [h for h in hits if self.settings.action == "reject"] + [
            h for h in macro_hits if self.settings.macro_action == "reject"
        ]
        if rejecting:
            return Verdict.reject(self.name, detail, Reason.ATTACHMENT,
                                  ascii_text(rejecting[0].path), attachments=facts,
                                  true_types=True, log_facts=extra)
        return Verdict.quarantine(self.name, detail, attachments=facts, true_types=True,
                                  log_facts=extra)

    async def aclose(self) -> None:
        """Stop the worker threads (work in flight finishes in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
