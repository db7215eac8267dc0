"""clamav filter: every message, in every direction, is scanned by clamd.

Policy clause enforced: *"don't attach files that may contain a virus;
viruses from third parties"* — the acceptable-use policy forbids sending or
receiving files that may contain a virus, so every message is scanned with
ClamAV before it is relayed.

How it scans
    The raw message is streamed to clamd **once** with ``INSTREAM``; clamd
    itself decodes MIME, archives and nested messages (``ScanMail`` and
    ``ScanArchive`` must be on, which ``mailwarden check`` verifies through
    :func:`check_stream_max_length`).  PING/VERSION (``mailwarden check``,
    ``/healthz``) use pyclamd's API (``ClamdUnixSocket`` /
    ``ClamdNetworkSocket``) in a small thread pool.  The INSTREAM exchange is
    done here, on the event loop over a non-blocking connection (a new one per
    scan), not with ``pyclamd.scan_stream``: that fails open -- it returns
    ``None`` ("clean") when clamd closes the connection without an answer or
    answers something it does not recognise, and it writes chunks with
    ``socket.send`` (not ``sendall``), so a partial write on a socket with a
    timeout silently corrupts the stream -- and, being blocking, it would need
    a thread hand-over per message (measured: 0.8 ms of CPU per message).

Fail closed (DESIGN rule 2)
    Only an exact ``stream: OK`` is clean.  clamd unreachable, a timeout, an
    ``ERROR`` answer (including ``INSTREAM size limit exceeded``), a
    ``Heuristics.Limits.Exceeded.*`` or ``Heuristics.Encrypted.*`` "finding"
    (clamd could not look inside), a connection closed without an answer and
    any unparseable answer mean *unscanned*: ``on_error = "tempfail"`` gives a
    TEMPFAIL verdict (451), ``on_error = "quarantine"`` holds the message as
    unscannable.  A real finding (``NAME FOUND``) gives the configured
    ``action``: QUARANTINE or REJECT with ``554 5.7.1 message refused: virus
    found (NAME)``.  A clean message is relayed with ``X-Mailwarden-Scan:
    clean``.

Concurrency and time
    At most ``max_threads`` scans run at once (default 10, clamd's own
    ``MaxThreads`` default: more parallel scans than clamd has threads would
    only queue inside clamd).  Each scan has a deadline of ``timeout +
    timeout_per_mb * size_MB`` seconds, capped at :data:`MAX_SCAN_TIMEOUT`
    (90 s, inside Postfix's 100 s before-queue budget); the deadline covers the
    wait for a free scan slot, the socket operations and the wait for clamd's
    answer.  Note that the gateway's
    per-message ``filter_timeout`` (default 80 s) bounds the whole chain as well;
    whichever expires first yields a temporary failure.

Settings (``[filters.clamav]``)
    ``address``        unix socket path (anything containing ``/``) or
                       ``host:port`` (IPv4 or a host name; pyclamd has no IPv6)
    ``on_error``       ``"tempfail"`` (default) | ``"quarantine"``
    ``action``         ``"quarantine"`` (default) | ``"reject"``
    ``max_threads``    parallel scans, 1..256 (default 10)
    ``timeout``        base scan deadline in seconds, 0 < t <= 90 (default 30)
    ``timeout_per_mb`` seconds added per MiB of message (default 1.0)
    ``notify``         IT address told about virus findings ("" = nobody); the
                       filter only carries it in the verdict's facts, the
                       gateway sends the notification
    ``clamd_conf``     clamd.conf that ``mailwarden check`` reads to compare
                       clamd's limits with ``gateway.max_message_size``
                       (default ``/etc/clamav/clamd.conf``, ``""`` = skip)
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyclamd

from filters.base import (
    AddHeader,
    BaseFilter,
    FilterContext,
    Reason,
    ScanState,
    SettingsError,
    Verdict,
)
from gateway.message import Mail

#: Upper bound of any scan deadline (seconds): well inside Postfix's 100 s.
MAX_SCAN_TIMEOUT = 90.0
#: Deadline for ``health()`` (PING + VERSION), seconds.
HEALTH_TIMEOUT = 5.0
#: INSTREAM chunk size (bytes).
CHUNK_SIZE = 64 * 1024
#: Longest answer read from clamd; anything longer is garbage.
MAX_REPLY = 16 * 1024
#: clamd "findings" that mean "could not look inside", never "clean" or "virus".
UNSCANNED_PREFIXES = ("Heuristics.Limits.Exceeded", "Heuristics.Encrypted")

_MIB = 1024 * 1024
_FOUND = re.compile(r"^stream: (?P<name>\S(?:.*\S)?) FOUND$")
_ERROR = re.compile(r"^(?:stream: )?(?P<reason>.*?) ?ERROR$")
_SIZE_LIMIT = "INSTREAM size limit exceeded. ERROR"


# --------------------------------------------------------------------- settings


def parse_address(value: str) -> tuple[Literal["unix"], str] | tuple[Literal["tcp"], tuple[str, int]]:
    """Split a clamd address into ``("unix", path)`` or ``("tcp", (host, port))``.

    Anything containing ``/`` is a unix socket path; otherwise ``host:port``.
    Raises ValueError for anything else (IPv6 literals included: pyclamd's
    network client is IPv4 only).
    """
    if not value or value != value.strip():
        raise ValueError("expected a unix socket path or host:port")
    if "/" in value:
        if "\0" in value:
            raise ValueError("socket path contains a NUL byte")
        return "unix", value
    if value.startswith("[") or value.count(":") > 1:
        raise ValueError(
            f"{value!r}: IPv6 addresses are not supported by pyclamd; "
            "use a unix socket path, an IPv4 address or a host name"
        )
    host, sep, port_s = value.partition(":")
    if not sep or not host or not port_s.isdigit():
        raise ValueError(f"{value!r}: expected a unix socket path (containing '/') or host:port")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    return "tcp", (host, port)


def _check_notify(value: str) -> None:
    if value and (value.count("@") != 1 or any(c.isspace() for c in value)
                  or not value.split("@")[0] or not value.split("@")[1]):
        raise ValueError(f"{value!r}: expected an email address (local@domain) or \"\"")


@dataclass(frozen=True)
class Settings:
    """``[filters.clamav]``: see the module docstring for every key."""

    address: str = "/run/clamav/clamd.ctl"
    on_error: Literal["tempfail", "quarantine"] = "tempfail"
    action: Literal["quarantine", "reject"] = "quarantine"
    max_threads: int = 10
    timeout: float = 30.0
    timeout_per_mb: float = 1.0
    notify: str = ""
    clamd_conf: str = "/etc/clamav/clamd.conf"

    def __post_init__(self) -> None:
        try:
            parse_address(self.address)
        except ValueError as exc:
            raise SettingsError("address", str(exc)) from None
        if self.on_error not in ("tempfail", "quarantine"):
            raise SettingsError("on_error", "must be one of 'tempfail', 'quarantine'")
        if self.action not in ("quarantine", "reject"):
            raise SettingsError("action", "must be one of 'quarantine', 'reject'")
        if isinstance(self.max_threads, bool) or not 1 <= self.max_threads <= 256:
            raise SettingsError("max_threads", "must be between 1 and 256")
        if not 0 < self.timeout <= MAX_SCAN_TIMEOUT:
            raise SettingsError(
                "timeout", f"must be greater than 0 and at most {MAX_SCAN_TIMEOUT:g} seconds"
            )
        if not 0 <= self.timeout_per_mb <= MAX_SCAN_TIMEOUT:
            raise SettingsError(
                "timeout_per_mb", f"must be between 0 and {MAX_SCAN_TIMEOUT:g} seconds"
            )
        try:
            _check_notify(self.notify)
        except ValueError as exc:
            raise SettingsError("notify", str(exc)) from None


# ------------------------------------------------------------------ scan result


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What one INSTREAM scan established.

    ``status`` is ``"clean"``, ``"infected"`` (``virus`` names the finding) or
    ``"unscanned"`` (``reason`` says why: the message must not pass).
    """

    status: Literal["clean", "infected", "unscanned"]
    virus: str | None = None
    reason: str = ""

    @classmethod
    def unscanned(cls, reason: str) -> ScanResult:
        return cls("unscanned", reason=reason)


def _printable(text: str, limit: int = 200) -> str:
    """One line of printable ASCII (same rule as ``gateway.replies.safe_text``)."""
    out = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def parse_reply(reply: bytes) -> ScanResult:
    """Interpret clamd's complete answer to ``nINSTREAM`` (newline-terminated).

    Only an exact ``stream: OK`` line is clean.  A real ``FOUND`` wins over
    everything else (the message is certainly infected); otherwise any error,
    limit, truncated or unknown answer means unscanned.
    """
    if not reply:
        return ScanResult.unscanned("clamd closed the connection without an answer")
    if not reply.endswith(b"\n"):
        return ScanResult.unscanned(
            f"incomplete answer from clamd: {_printable(reply.decode('latin-1'), 80)!r}"
        )
    try:
        text = reply.decode("ascii")
    except UnicodeDecodeError:
        return ScanResult.unscanned("non-ASCII answer from clamd")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return ScanResult.unscanned("empty answer from clamd")
    found: list[str] = []
    problem = ""
    clean = 0
    for line in lines:
        if line == "stream: OK":
            clean += 1
        elif line == _SIZE_LIMIT:
            problem = problem or "message exceeds clamd's StreamMaxLength (INSTREAM size limit exceeded)"
        elif m := _FOUND.match(line):
            name = m.group("name")
            if name.startswith(UNSCANNED_PREFIXES):
                problem = problem or f"clamd could not scan the whole message ({name})"
            else:
                found.append(name)
        elif m := _ERROR.match(line):
            problem = problem or f"clamd error: {_printable(m.group('reason'), 120)}"
        else:
            problem = problem or f"unexpected answer from clamd: {_printable(line, 80)!r}"
    if found:
        return ScanResult("infected", virus=", ".join(dict.fromkeys(found)))
    if problem:
        return ScanResult.unscanned(problem)
    if clean == 1:
        return ScanResult("clean")
    return ScanResult.unscanned("unexpected answer from clamd: several OK lines")


def parse_version(text: str) -> tuple[str, str | None, str | None]:
    """Split clamd's VERSION answer into (engine, database version, database date).

    ``"ClamAV 1.4.6/27400/Mon Nov 23 09:00:00 2026"`` gives
    ``("ClamAV 1.4.6", "27400", "Mon Nov 23 09:00:00 2026")``; a clamd running
    on unofficial databases only answers ``"ClamAV 1.4.6"``.
    """
    parts = text.strip().split("/", 2)
    engine = parts[0].strip()
    db = parts[1].strip() if len(parts) > 1 and parts[1].strip() else None
    date = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    return engine, db, date


# ------------------------------------------------------------------- the filter


class _ClosesOnFailure:
    """pyclamd leaves the socket open when its connect fails (a leaked fd
    until garbage collection); close it."""

    clamd_socket: Any

    def _init_socket(self) -> None:
        try:
            super()._init_socket()  # type: ignore[misc]
        except BaseException:
            sock = getattr(self, "clamd_socket", None)
            if sock is not None:
                sock.close()
            raise


class _UnixClient(_ClosesOnFailure, pyclamd.ClamdUnixSocket):
    """pyclamd's unix-socket client."""


class _NetworkClient(_ClosesOnFailure, pyclamd.ClamdNetworkSocket):
    """pyclamd's TCP client."""


class ClamAVFilter(BaseFilter):
    """Scan every message with clamd (INSTREAM through a pyclamd connection)."""

    name: ClassVar[str] = "clamav"
    #: Scans the raw bytes: starts without waiting for the MIME parse.
    reads_mime: ClassVar[bool] = False
    scanner: ClassVar[bool] = True
    health_check: ClassVar[str | None] = "clamd"
    Settings: ClassVar[type] = Settings

    def __init__(self, settings: Settings, ctx: FilterContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self._kind, self._target = parse_address(settings.address)
        # Scans run on the event loop (non-blocking sockets), at most
        # ``max_threads`` at a time; the pool serves pyclamd's blocking
        # PING/VERSION (health) only.
        self._slots = asyncio.Semaphore(settings.max_threads)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mailwarden-clamav")
        self._closed = False

    # ---------------------------------------------------------------- public

    def scan_timeout(self, size: int) -> float:
        """Scan deadline in seconds for a message of ``size`` bytes."""
        s = self.settings
        return min(MAX_SCAN_TIMEOUT, s.timeout + s.timeout_per_mb * size / _MIB)

    async def scan(self, data: bytes) -> ScanResult:
        """Scan ``data`` with clamd; never raises for clamd trouble.  The
        deadline covers the wait for a free scan slot as well."""
        budget = self.scan_timeout(len(data))
        deadline = time.monotonic() + budget
        try:
            async with asyncio.timeout(budget):
                await self._slots.acquire()
        except TimeoutError:
            return ScanResult.unscanned(f"clamd did not answer within {budget:.0f} s")
        try:
            return await self._scan(data, deadline)
        finally:
            self._slots.release()

    async def check(self, mail: Mail) -> Verdict:
        """Scan ``mail.raw`` once and turn the result into a verdict."""
        started = time.perf_counter()
        result = await self.scan(mail.raw)
        elapsed = round(time.perf_counter() - started, 6)
        return self.verdict(result, scan_seconds=elapsed)

    def verdict(self, result: ScanResult, **facts: Any) -> Verdict:
        """Map a :class:`ScanResult` to this filter's verdict (per settings);
        ``facts`` go to the log (``log_facts``)."""
        s = self.settings
        if result.status == "clean":
            return Verdict.relay(
                self.name, edits=(AddHeader("X-Mailwarden-Scan", "clean"),),
                scan=ScanState.CLEAN, log_facts=facts,
            )
        if result.status == "infected":
            virus = result.virus or "unknown"
            if s.action == "reject":
                return Verdict.reject(
                    self.name, virus, Reason.VIRUS,
                    scan=ScanState.INFECTED, virus=virus, notify=s.notify, log_facts=facts,
                )
            return Verdict.quarantine(
                self.name, virus, scan=ScanState.INFECTED, virus=virus, notify=s.notify,
                log_facts=facts,
            )
        if s.on_error == "quarantine":
            return Verdict.quarantine(
                self.name, f"unscannable: {result.reason}", scan=ScanState.UNSCANNED,
                log_facts=facts,
            )
        return Verdict.tempfail(self.name, result.reason, Reason.SCANNER_UNAVAILABLE,
                                scan=ScanState.UNSCANNED, log_facts=facts)

    async def health(self) -> tuple[bool, str]:
        """PING clamd and read its VERSION: ``(ok, one line for humans)``."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, self._health_blocking)
        try:
            return await asyncio.wait_for(work, HEALTH_TIMEOUT + 1.0)
        except TimeoutError:
            return False, f"clamd at {self.settings.address}: no answer within {HEALTH_TIMEOUT:g} s"

    def conf_check(self) -> str | None:
        """:func:`check_stream_max_length` for this filter's ``clamd_conf`` and
        the gateway's ``max_message_size``; None when fine or ``clamd_conf = ""``."""
        if not self.settings.clamd_conf:
            return None
        return check_stream_max_length(self.settings.clamd_conf, self.ctx.max_message_size)

    async def aclose(self) -> None:
        """Shut the scan pool down (running scans end by their own deadline)."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    # -------------------------------------------------------- blocking side

    def _connect(self, timeout: float) -> Any:
        """A pyclamd connection object (its constructor test-connects)."""
        if self._kind == "unix":
            return _UnixClient(filename=self._target, timeout=timeout)
        host, port = self._target
        return _NetworkClient(host=host, port=port, timeout=timeout)

    def _health_blocking(self) -> tuple[bool, str]:
        where = f"clamd at {self.settings.address}"
        cd = None
        try:
            # pyclamd retries a failed recv up to five times: keep each short.
            cd = self._connect(HEALTH_TIMEOUT / 5)
            cd.ping()
            version = str(cd.version())
        except (OSError, pyclamd.ConnectionError) as exc:
            return False, f"{where}: {_printable(str(exc) or exc.__class__.__name__)}"
        finally:
            # pyclamd does not close its socket when a send or recv fails.
            sock = getattr(cd, "clamd_socket", None)
            if sock is not None:
                sock.close()
        engine, db, date = parse_version(version)
        if not engine.startswith("ClamAV "):
            return False, f"{where}: unexpected VERSION answer {_printable(version, 80)!r}"
        if db is None:
            sigs = "signature date unknown (no official database loaded)"
        else:
            sigs = f"signatures {db} of {date or 'unknown date'}"
        return True, f"{where}: PONG, {_printable(engine)}, {_printable(sigs)}"

    async def _scan(self, data: bytes, deadline: float) -> ScanResult:
        """One INSTREAM exchange, every socket operation bounded by ``deadline``.

        On the event loop with a non-blocking socket (the loop's ``sock_*``
        calls, not a stream transport: after a failed write -- clamd closing
        early on a size limit -- its answer must still be readable): a worker
        thread per scan cost about 0.8 ms of CPU per message in thread
        hand-overs and GIL contention (``bench/run.py``, 10 KB, 20 sessions)."""

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            return remaining

        loop = asyncio.get_running_loop()
        where = self.settings.address
        family = socket.AF_UNIX if self._kind == "unix" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            try:
                async with asyncio.timeout(left()):
                    await loop.sock_connect(sock, self._target)
            except TimeoutError:
                return ScanResult.unscanned(f"timed out connecting to clamd at {where}")
            except OSError:
                return ScanResult.unscanned(f"clamd unreachable at {where}")
            try:
                async with asyncio.timeout(left()):
                    await loop.sock_sendall(sock, b"nINSTREAM\n")
                    view = memoryview(data)
                    for offset in range(0, len(view), CHUNK_SIZE):
                        chunk = view[offset : offset + CHUNK_SIZE]
                        await loop.sock_sendall(sock, struct.pack("!L", len(chunk)))
                        await loop.sock_sendall(sock, chunk)
                    await loop.sock_sendall(sock, struct.pack("!L", 0))
            except TimeoutError:
                return ScanResult.unscanned("timed out sending the message to clamd")
            except OSError as exc:
                # clamd closes the stream early on a size limit: read its answer.
                reply = await self._read_reply(sock, min(deadline, time.monotonic() + 1.0))
                if reply:
                    return parse_reply(reply)
                return ScanResult.unscanned(
                    f"connection to clamd lost while sending ({exc.__class__.__name__})"
                )
            try:
                reply = await self._read_reply(sock, deadline, strict=True)
            except TimeoutError:
                return ScanResult.unscanned("timed out waiting for clamd's answer")
            except OSError as exc:
                return ScanResult.unscanned(
                    f"connection to clamd lost while waiting for the answer "
                    f"({exc.__class__.__name__})"
                )
            return parse_reply(reply)
        finally:
            sock.close()

    @staticmethod
    async def _read_reply(sock: socket.socket, deadline: float, strict: bool = False) -> bytes:
        """Read until newline, EOF, :data:`MAX_REPLY` bytes or ``deadline``.

        With ``strict`` a timeout or socket error propagates; otherwise whatever
        arrived is returned (used after a failed send).
        """
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while b"\n" not in buf and len(buf) < MAX_REPLY:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    part = await loop.sock_recv(sock, 4096)
                if not part:
                    break
                buf += part
        except OSError:  # TimeoutError included
            if strict:
                raise
        return buf


# ------------------------------------------------------- clamd.conf sanity check


_SIZE = re.compile(r"^(\d+)([kKmM]?)$")
#: clamd 1.x defaults for the options checked below (clamd.conf(5)).
_DEFAULTS = {
    "StreamMaxLength": "100M",
    "MaxScanSize": "400M",
    "MaxFileSize": "100M",
    "AlertExceedsMax": "no",
    "ScanMail": "yes",
    "ScanArchive": "yes",
}


def parse_size(text: str) -> int:
    """clamd.conf SIZE: bytes, or with a K/k or M/m suffix.  Raises ValueError."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}")
    factor = {"": 1, "k": 1024, "m": _MIB}[m.group(2).lower()]
    return int(m.group(1)) * factor


def _yes(text: str) -> bool:
    return text.strip().lower() in ("yes", "true", "1")


def read_clamd_conf(path: str | Path) -> dict[str, str]:
    """The options of a clamd.conf (last occurrence wins, comments skipped)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def clamd_conf_warnings(clamd_conf_path: str | Path, max_message_size: int) -> list[str]:
    """Problems in clamd's configuration that would let mail through unscanned.

    - ``StreamMaxLength`` below ``max_message_size``: big messages are refused
      by clamd (the filter then applies ``on_error``);
    - ``MaxFileSize`` / ``MaxScanSize`` below ``max_message_size`` without
      ``AlertExceedsMax yes``: clamd silently stops scanning and answers OK;
    - ``ScanMail`` / ``ScanArchive`` off: attachments / archives are not
      decoded, so their content is never scanned.
    """
    where = str(clamd_conf_path)
    try:
        conf = {**_DEFAULTS, **read_clamd_conf(clamd_conf_path)}
    except OSError as exc:
        return [f"{where}: cannot read ({exc.strerror or exc.__class__.__name__}); "
                "clamd's StreamMaxLength was not checked"]
    warnings: list[str] = []
    limits: dict[str, int] = {}
    for key in ("StreamMaxLength", "MaxScanSize", "MaxFileSize"):
        try:
            limits[key] = parse_size(conf[key])
        except ValueError:
            warnings.append(f"{where}: {key} {conf[key]!r} is not a size")
    stream = limits.get("StreamMaxLength")
    if stream and stream < max_message_size:
        warnings.append(
            f"{where}: StreamMaxLength {conf['StreamMaxLength']} ({stream} bytes) is below "
            f"gateway.max_message_size ({max_message_size} bytes): larger messages cannot be "
            "scanned"
        )
    if not _yes(conf["AlertExceedsMax"]):
        for key in ("MaxFileSize", "MaxScanSize"):
            value = limits.get(key)
            if value and value < max_message_size:
                warnings.append(
                    f"{where}: {key} {conf[key]} is below gateway.max_message_size and "
                    "AlertExceedsMax is off: clamd reports content beyond it as clean "
                    "without scanning it (set AlertExceedsMax yes)"
                )
    for key in ("ScanMail", "ScanArchive"):
        if not _yes(conf[key]):
            warnings.append(f"{where}: {key} is off: attachments are not fully scanned")
    return warnings


def check_stream_max_length(clamd_conf_path: str | Path, max_message_size: int) -> str | None:
    """One warning line for ``mailwarden check`` (None when clamd.conf is fine).

    Covers StreamMaxLength and the related limits of
    :func:`clamd_conf_warnings`.  clamd does not report its limits over the
    socket, so the file is read (``[filters.clamav] clamd_conf``, default
    ``/etc/clamav/clamd.conf``; the caller skips the check when it is ``""``).
    """
    warnings = clamd_conf_warnings(clamd_conf_path, max_message_size)
    return "; ".join(warnings) if warnings else None
