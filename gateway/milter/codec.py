"""The milter protocol (version 6) wire format: pure data, no I/O.

A packet is ``uint32 length`` (network order, counting the command byte and
the data) + ``command byte`` + ``data``.  :class:`Decoder` is fed arbitrary
byte splits and yields ``(command, data)`` frames; :func:`decode_command` and
:func:`decode_response` turn a frame into one of the typed packets below, and
every packet has ``encode() -> bytes``.  A length of 0 or over the decoder's
maximum raises :class:`ProtocolError` before anything is buffered.

Strings that travel NUL-terminated (macros, envelope, hostnames) are ``str``
decoded as UTF-8 with ``surrogateescape``, so any byte sequence survives a
round trip; header names and values and body chunks stay ``bytes``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

VERSION = 6

# Actions the milter may request (SMFIF_*).
SMFIF_ADDHDRS = 0x001
SMFIF_CHGBODY = 0x002
SMFIF_ADDRCPT = 0x004
SMFIF_DELRCPT = 0x008
SMFIF_CHGHDRS = 0x010
SMFIF_QUARANTINE = 0x020
SMFIF_CHGFROM = 0x040
SMFIF_ADDRCPT_PAR = 0x080
SMFIF_SETSYMLIST = 0x100

# Protocol steps (SMFIP_*).
SMFIP_NOCONNECT = 0x000001
SMFIP_NOHELO = 0x000002
SMFIP_NOMAIL = 0x000004
SMFIP_NORCPT = 0x000008
SMFIP_NOBODY = 0x000010
SMFIP_NOHDRS = 0x000020
SMFIP_NOEOH = 0x000040
SMFIP_NR_HDR = 0x000080
SMFIP_NOUNKNOWN = 0x000100
SMFIP_NODATA = 0x000200
SMFIP_SKIP = 0x000400
SMFIP_RCPT_REJ = 0x000800
SMFIP_NR_CONN = 0x001000
SMFIP_NR_HELO = 0x002000
SMFIP_NR_MAIL = 0x004000
SMFIP_NR_RCPT = 0x008000
SMFIP_NR_DATA = 0x010000
SMFIP_NR_UNKN = 0x020000
SMFIP_NR_EOH = 0x040000
SMFIP_NR_BODY = 0x080000
SMFIP_HDR_LEADSPC = 0x100000

# Macro stages for SETSYMLIST (SMFIM_*).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

#: Largest body chunk in one BODY / REPLBODY packet.
MAX_BODY_CHUNK = 65535
#: Default maximum packet length the decoder accepts (headers can be ~100 KB).
DEFAULT_MAX_PACKET = 1 << 20

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_OPTNEG = struct.Struct("!III")


class ProtocolError(Exception):
    """The peer sent something that is not the milter protocol."""


# ------------------------------------------------------------------ framing


def frame(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    return _U32.pack(len(data) + 1) + command + data


class Decoder:
    """Incremental packet decoder: ``feed()`` any split, get whole frames."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole packet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = _U32.unpack_from(buf, pos)
            if length == 0:
                raise ProtocolError("packet length 0")
            if length > self.max_packet:
                raise ProtocolError(f"packet length {length} over the maximum {self.max_packet}")
            if end - pos - 4 < length:
                break
            start = pos + 4
            out.append((bytes(buf[start : start + 1]), bytes(buf[start + 1 : start + length])))
            pos = start + length
        if pos:
            del buf[:pos]
        return out


# ------------------------------------------------------------ field helpers


def _s(value: str) -> bytes:
    b = value.encode("utf-8", "surrogateescape")
    if b"\0" in b:
        raise ValueError("NUL in a milter string")
    return b + b"\0"


def _b(value: bytes) -> bytes:
    if b"\0" in value:
        raise ValueError("NUL in a milter string")
    return value + b"\0"


def _str(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _split_nul(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated fields; the data must end with NUL."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"{what}: missing NUL terminator")
    return data[:-1].split(b"\0")


def _one(data: bytes, what: str) -> bytes:
    parts = _split_nul(data, what)
    if len(parts) != 1:
        raise ProtocolError(f"{what}: expected one string")
    return parts[0]


def _two(data: bytes, what: str) -> tuple[bytes, bytes]:
    parts = _split_nul(data, what)
    if len(parts) != 2:
        raise ProtocolError(f"{what}: expected name and value")
    return parts[0], parts[1]


def _empty(data: bytes, what: str) -> None:
    if data:
        raise ProtocolError(f"{what}: unexpected data")


# ------------------------------------------------------------------ packets


@dataclass(frozen=True)
class OptNeg:
    """SMFIC_OPTNEG / its reply; the reply may carry SETSYMLIST entries."""

    version: int
    actions: int
    protocol: int
    symlists: tuple[tuple[int, str], ...] = ()
    code: ClassVar[bytes] = b"O"

    def encode(self) -> bytes:
        data = _OPTNEG.pack(self.version, self.actions, self.protocol)
        for stage, names in self.symlists:
            data += _U32.pack(stage) + _s(names)
        return frame(self.code, data)

    @classmethod
    def decode(cls, data: bytes) -> OptNeg:
        if len(data) < 12:
            raise ProtocolError("OPTNEG: short packet")
        version, actions, protocol = _OPTNEG.unpack_from(data)
        rest = data[12:]
        sym: list[tuple[int, str]] = []
        while rest:
            if len(rest) < 5:
                raise ProtocolError("OPTNEG: bad symbol list")
            (stage,) = _U32.unpack_from(rest)
            nul = rest.find(b"\0", 4)
            if nul < 0:
                raise ProtocolError("OPTNEG: symbol list without NUL")
            sym.append((stage, _str(rest[4:nul])))
            rest = rest[nul + 1 :]
        return cls(version, actions, protocol, tuple(sym))


@dataclass(frozen=True)
class Macro:
    """SMFIC_MACRO: the macros for the command ``stage`` that follows."""

    stage: bytes
    macros: tuple[tuple[str, str], ...] = ()
    code: ClassVar[bytes] = b"D"

    def encode(self) -> bytes:
        data = self.stage + b"".join(_s(k) + _s(v) for k, v in self.macros)
        return frame(self.code, data)

    @classmethod
    def decode(cls, data: bytes) -> Macro:
        if not data:
            raise ProtocolError("MACRO: empty packet")
        stage, rest = data[:1], data[1:]
        if not rest:
            return cls(stage, ())
        parts = _split_nul(rest, "MACRO")
        if len(parts) % 2:
            raise ProtocolError("MACRO: name without value")
        return cls(stage, tuple((_str(parts[i]), _str(parts[i + 1]))
                                for i in range(0, len(parts), 2)))


@dataclass(frozen=True)
class Connect:
    """SMFIC_CONNECT: family ``4``, ``6``, ``L`` (unix) or ``U`` (unknown)."""

    hostname: str
    family: str = "U"
    port: int = 0
    address: str = ""
    code: ClassVar[bytes] = b"C"

    def encode(self) -> bytes:
        data = _s(self.hostname) + self.family.encode("ascii")
        if self.family != "U":
            data += _U16.pack(self.port) + _s(self.address)
        return frame(self.code, data)

    @classmethod
    def decode(cls, data: bytes) -> Connect:
        nul = data.find(b"\0")
        if nul < 0 or len(data) < nul + 2:
            raise ProtocolError("CONNECT: bad packet")
        host = _str(data[:nul])
        family = data[nul + 1 : nul + 2].decode("latin-1")
        rest = data[nul + 2 :]
        if family == "U":
            _empty(rest, "CONNECT")
            return cls(host, family)
        if family not in "46L" or len(rest) < 3:
            raise ProtocolError("CONNECT: bad address family or address")
        (port,) = _U16.unpack_from(rest)
        return cls(host, family, port, _str(_one(rest[2:], "CONNECT")))


@dataclass(frozen=True)
class Helo:
    name: str
    code: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return frame(self.code, _s(self.name))

    @classmethod
    def decode(cls, data: bytes) -> Helo:
        return cls(_str(_one(data, "HELO")))


@dataclass(frozen=True)
class Mail:
    """SMFIC_MAIL: the sender (``<a@b>``) then ESMTP arguments."""

    args: tuple[str, ...]
    code: ClassVar[bytes] = b"M"

    def encode(self) -> bytes:
        return frame(self.code, b"".join(_s(a) for a in self.args))

    @classmethod
    def decode(cls, data: bytes) -> Mail:
        return cls(tuple(_str(a) for a in _split_nul(data, "MAIL")))


@dataclass(frozen=True)
class Rcpt(Mail):
    code: ClassVar[bytes] = b"R"

    @classmethod
    def decode(cls, data: bytes) -> Rcpt:
        return cls(tuple(_str(a) for a in _split_nul(data, "RCPT")))


@dataclass(frozen=True)
class Header:
    name: bytes
    value: bytes
    code: ClassVar[bytes] = b"L"

    def encode(self) -> bytes:
        return frame(self.code, _b(self.name) + _b(self.value))

    @classmethod
    def decode(cls, data: bytes) -> Header:
        return cls(*_two(data, "HEADER"))


@dataclass(frozen=True)
class Body:
    chunk: bytes
    code: ClassVar[bytes] = b"B"

    def encode(self) -> bytes:
        return frame(self.code, self.chunk)

    @classmethod
    def decode(cls, data: bytes) -> Body:
        return cls(data)


@dataclass(frozen=True)
class EndOfBody(Body):
    """SMFIC_BODYEOB; may carry a last body chunk."""

    chunk: bytes = b""
    code: ClassVar[bytes] = b"E"

    @classmethod
    def decode(cls, data: bytes) -> EndOfBody:
        return cls(data)


@dataclass(frozen=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command the MTA did not recognise."""

    command: bytes
    code: ClassVar[bytes] = b"U"

    def encode(self) -> bytes:
        return frame(self.code, _b(self.command))

    @classmethod
    def decode(cls, data: bytes) -> Unknown:
        return cls(_one(data, "UNKNOWN"))


@dataclass(frozen=True)
class _Bare:
    """A packet without data."""

    code: ClassVar[bytes] = b"?"

    def encode(self) -> bytes:
        return frame(self.code)

    @classmethod
    def decode(cls, data: bytes) -> _Bare:
        _empty(data, cls.__name__)
        return cls()


class Data(_Bare):
    code = b"T"


class EndOfHeaders(_Bare):
    code = b"N"


class Abort(_Bare):
    code = b"A"


class Quit(_Bare):
    code = b"Q"


class QuitNC(_Bare):
    code = b"K"


# responses


class Continue(_Bare):
    code = b"c"


class Accept(_Bare):
    code = b"a"


class Discard(_Bare):
    code = b"d"


class Reject(_Bare):
    code = b"r"


class Tempfail(_Bare):
    code = b"t"


class Progress(_Bare):
    code = b"p"


@dataclass(frozen=True)
class ReplyCode:
    """SMFIR_REPLYCODE: ``"554 5.7.1 text"`` (multi-line joined by CRLF)."""

    text: str
    code: ClassVar[bytes] = b"y"

    def encode(self) -> bytes:
        return frame(self.code, _s(self.text))

    @classmethod
    def decode(cls, data: bytes) -> ReplyCode:
        return cls(_str(_one(data, "REPLYCODE")))


@dataclass(frozen=True)
class Quarantine:
    reason: str
    code: ClassVar[bytes] = b"q"

    def encode(self) -> bytes:
        return frame(self.code, _s(self.reason))

    @classmethod
    def decode(cls, data: bytes) -> Quarantine:
        return cls(_str(_one(data, "QUARANTINE")))


@dataclass(frozen=True)
class AddHeader:
    name: bytes
    value: bytes
    code: ClassVar[bytes] = b"h"

    def encode(self) -> bytes:
        return frame(self.code, _b(self.name) + _b(self.value))

    @classmethod
    def decode(cls, data: bytes) -> AddHeader:
        return cls(*_two(data, "ADDHEADER"))


@dataclass(frozen=True)
class InsertHeader:
    """SMFIR_INSHEADER: insert at ``index`` (0 = before the first header)."""

    index: int
    name: bytes
    value: bytes
    code: ClassVar[bytes] = b"i"

    def encode(self) -> bytes:
        return frame(self.code, _U32.pack(self.index) + _b(self.name) + _b(self.value))

    @classmethod
    def decode(cls, data: bytes) -> InsertHeader:
        if len(data) < 4:
            raise ProtocolError(f"{cls.__name__}: short packet")
        (index,) = _U32.unpack_from(data)
        return cls(index, *_two(data[4:], cls.__name__))


@dataclass(frozen=True)
class ChangeHeader(InsertHeader):
    """SMFIR_CHGHEADER: the ``index``-th (1-based) header of that name; empty value deletes."""

    code: ClassVar[bytes] = b"m"


@dataclass(frozen=True)
class ReplaceBody:
    chunk: bytes
    code: ClassVar[bytes] = b"b"

    def encode(self) -> bytes:
        return frame(self.code, self.chunk)

    @classmethod
    def decode(cls, data: bytes) -> ReplaceBody:
        return cls(data)


Command = (
    OptNeg
    | Macro
    | Connect
    | Helo
    | Mail
    | Rcpt
    | Data
    | Header
    | EndOfHeaders
    | Body
    | EndOfBody
    | Abort
    | Quit
    | QuitNC
    | Unknown
)
Response = (
    OptNeg
    | Continue
    | Accept
    | Discard
    | Reject
    | Tempfail
    | ReplyCode
    | AddHeader
    | InsertHeader
    | ChangeHeader
    | ReplaceBody
    | Quarantine
    | Progress
)

COMMANDS: dict[bytes, type] = {c.code: c for c in (
    OptNeg, Macro, Connect, Helo, Mail, Rcpt, Data, Header, EndOfHeaders, Body, EndOfBody,
    Abort, Quit, QuitNC, Unknown)}
RESPONSES: dict[bytes, type] = {c.code: c for c in (
    OptNeg, Continue, Accept, Discard, Reject, Tempfail, ReplyCode, AddHeader, InsertHeader,
    ChangeHeader, ReplaceBody, Quarantine, Progress)}


def decode_command(code: bytes, data: bytes) -> Command:
    """A frame from the MTA as a typed packet; ProtocolError if unknown or malformed."""
    cls = COMMANDS.get(code)
    if cls is None:
        raise ProtocolError(f"unknown command {code!r}")
    return cls.decode(data)  # type: ignore[no-any-return]


def decode_response(code: bytes, data: bytes) -> Response:
    """A frame from the milter as a typed packet (the MTA side: tests)."""
    cls = RESPONSES.get(code)
    if cls is None:
        raise ProtocolError(f"unknown response {code!r}")
    return cls.decode(data)  # type: ignore[no-any-return]


def replace_body(body: bytes) -> list[ReplaceBody]:
    """The body as REPLBODY packets of at most 65,535 bytes (one empty packet for b"")."""
    if not body:
        return [ReplaceBody(b"")]
    return [ReplaceBody(body[i : i + MAX_BODY_CHUNK]) for i in range(0, len(body), MAX_BODY_CHUNK)]
