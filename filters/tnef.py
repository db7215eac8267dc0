"""A small reader for TNEF (``winmail.dat``, application/ms-tnef) attachments.

Policy clause: "employees may not install software" — Outlook wraps a
message's attachments in a TNEF stream; an executable inside it is as much an
executable as one attached directly.  Used by :mod:`filters.archives`.

Only what the attachment check needs is decoded: for each attachment
(attribute level 2) its name (``attAttachTitle``, overridden by the MAPI
``PR_ATTACH_LONG_FILENAME`` / ``PR_DISPLAY_NAME`` in ``attAttachment``) and its
bytes (``attAttachData``, or a binary ``PR_ATTACH_DATA_OBJ``).  The parser is
bounded (sizes checked against the buffer, a cap on attributes and
properties) and raises :class:`TnefError` on anything malformed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SIGNATURE = b"\x78\x9f\x3e\x22"

_LVL_ATTACHMENT = 2
_ATT_ATTACH_RENDDATA = 0x9002
_ATT_ATTACH_TITLE = 0x8010
_ATT_ATTACH_DATA = 0x800F
_ATT_ATTACHMENT = 0x9005

_PR_ATTACH_LONG_FILENAME = 0x3707
_PR_ATTACH_FILENAME = 0x3704
_PR_DISPLAY_NAME = 0x3001
_PR_ATTACH_DATA_OBJ = 0x3701

_FIXED_SIZES = {
    0x0001: 0, 0x0002: 2, 0x0003: 4, 0x0004: 4, 0x0005: 8, 0x0006: 8, 0x0007: 8, 0x000A: 4,
    0x000B: 2, 0x0014: 8, 0x0040: 8, 0x0048: 16,
}
_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT = 0x001E, 0x001F, 0x0102, 0x000D
_MAX_ATTRIBUTES = 100_000
_MAX_PROPERTIES = 10_000


class TnefError(ValueError):
    """A malformed TNEF stream."""


@dataclass
class TnefAttachment:
    """One attachment found in a TNEF stream."""

    name: str = ""
    data: bytes = b""


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise TnefError("truncated TNEF data")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])


def _text(raw: bytes, unicode: bool) -> str:
    if unicode:
        return raw.decode("utf-16-le", "replace").split("\0", 1)[0]
    return raw.split(b"\0", 1)[0].decode("cp1252", "replace")


def _mapi_props(buf: bytes) -> dict[int, object]:
    """Decode a MAPI property list: tag id -> first value (str or bytes)."""
    r = _Reader(buf)
    out: dict[int, object] = {}
    count = r.u32()
    if count > _MAX_PROPERTIES:
        raise TnefError("too many MAPI properties")
    for _ in range(count):
        ptype = r.u16()
        pid = r.u16()
        if pid >= 0x8000:  # named property: GUID, kind, id or name
            r.take(16)
            if r.u32() == 0:
                r.u32()
            else:
                r.take(_pad4(r.u32()))
        multi = bool(ptype & 0x1000)
        base = ptype & ~0x1000
        if base in (_PT_STRING8, _PT_UNICODE, _PT_BINARY, _PT_OBJECT):
            values = []
            for _ in range(r.u32()):
                length = r.u32()
                values.append(r.take(_pad4(length))[:length])
            if values:
                first = values[0]
                if base == _PT_OBJECT:
                    first = first[16:]  # the interface id
                out.setdefault(
                    pid, _text(first, base == _PT_UNICODE) if base in (_PT_STRING8, _PT_UNICODE)
                    else first
                )
        elif base in _FIXED_SIZES:
            n = r.u32() if multi else 1
            r.take(_pad4(_FIXED_SIZES[base]) * n if base in (0x0002, 0x000B)
                   else _FIXED_SIZES[base] * n)
        else:
            raise TnefError(f"unknown MAPI property type 0x{ptype:04x}")
    return out


def read_attachments(data: bytes) -> list[TnefAttachment]:
    """The attachments of a TNEF stream (raises :class:`TnefError`)."""
    if data[:4] != SIGNATURE:
        raise TnefError("not a TNEF stream")
    r = _Reader(data)
    r.take(6)  # signature, key
    found: list[TnefAttachment] = []
    current: TnefAttachment | None = None
    for _ in range(_MAX_ATTRIBUTES):
        if r.pos >= len(data):
            break
        try:
            level = r.take(1)[0]
            attr = r.u32()
            length = r.u32()
            value = r.take(length)
            r.take(2)  # checksum
        except TnefError:
            if r.pos > 6 + 11 or found:
                break  # trailing garbage after attributes that could be read
            raise
        if level != _LVL_ATTACHMENT:
            continue
        attr_id = attr & 0xFFFF
        if attr_id == _ATT_ATTACH_RENDDATA or current is None:
            current = TnefAttachment()
            found.append(current)
        if attr_id == _ATT_ATTACH_TITLE:
            current.name = _text(value, False)
        elif attr_id == _ATT_ATTACH_DATA:
            current.data = value
        elif attr_id == _ATT_ATTACHMENT:
            try:
                props = _mapi_props(value)
            except TnefError:
                continue  # the title and data attributes still stand
            for pid in (_PR_ATTACH_LONG_FILENAME, _PR_DISPLAY_NAME, _PR_ATTACH_FILENAME):
                name = props.get(pid)
                if isinstance(name, str) and name:
                    current.name = name
                    break
            obj = props.get(_PR_ATTACH_DATA_OBJ)
            if isinstance(obj, bytes) and obj and not current.data:
                current.data = obj
    return found
