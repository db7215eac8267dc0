"""Office macro detection for the attachment_types filter.

Policy clause: "extreme care with attachments from third parties" and "no
software installed by mail" — an Office macro is a program that runs when a
document is opened.  Detection is structural and cheap (no VBA decompression,
no emulation):

* OLE2 documents (olefile): a VBA project storage (Word ``Macros``, Excel
  ``_VBA_PROJECT_CUR``, any ``VBA``/``_VBA_PROJECT``); PowerPoint 97-2003's
  ``VBAInfoContainer`` record; Excel 4 (XLM) macro sheets in the BIFF
  ``BOUNDSHEET`` records; encryption (``EncryptedPackage`` for encrypted
  OOXML, the Word FIB ``fEncrypted`` flag, the Excel ``FILEPASS`` record,
  PowerPoint's ``EncryptedSummary`` stream) — an encrypted document cannot be
  checked, so it is reported as such;
* Office Open XML (zip member names): ``vbaProject.bin`` anywhere, Excel 4
  macro sheets under ``xl/macrosheets/``;
* OpenDocument: StarBasic modules under ``Basic/`` or scripts under
  ``Scripts/``;
* SYLK spreadsheets: an options record marking a macro sheet (as olevba).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable

import olefile

VBA = "VBA macros"
XLM = "Excel 4 (XLM) macros"
STARBASIC = "OpenDocument macros"
ENCRYPTED = "encrypted document"
UNREADABLE = "unreadable document"

#: Results that mean "could not be checked" rather than "macros found".
UNCHECKABLE = frozenset({ENCRYPTED, UNREADABLE})

#: Bound on records walked in a BIFF or PowerPoint stream.
_MAX_RECORDS = 200_000


def ooxml_macros(names: Iterable[str]) -> str | None:
    """Macros in an Office Open XML package, from its member names."""
    xlm = False
    for name in names:
        lower = name.lower()
        if lower.endswith("vbaproject.bin"):
            return VBA
        if lower.startswith("xl/macrosheets/"):
            xlm = True
    return XLM if xlm else None


def odf_macros(names: Iterable[str]) -> str | None:
    """Macros in an OpenDocument package, from its member names."""
    for name in names:
        if (name.startswith("Basic/") and name not in ("Basic/script-lc.xml",)) or (
            name.startswith("Scripts/") and not name.endswith("/")
        ):
            return STARBASIC
    return None


def sylk_macros(data: bytes) -> str | None:
    """An Excel 4 macro sheet in a SYLK spreadsheet: an options record
    (``O;...``) with an ``E`` field marks the sheet as a macro sheet."""
    for line in data.splitlines()[:_MAX_RECORDS]:
        if line.startswith(b"O") and any(f.startswith(b"E") for f in line.split(b";")[1:]):
            return XLM
    return None


def _biff_scan(stream: bytes) -> str | None:
    """Walk the workbook globals of a BIFF8 stream: FILEPASS means encrypted,
    a BOUNDSHEET of type 1 is an Excel 4 macro sheet."""
    pos = 0
    for _ in range(_MAX_RECORDS):
        if pos + 4 > len(stream):
            break
        rtype, length = struct.unpack_from("<HH", stream, pos)
        body = stream[pos + 4 : pos + 4 + length]
        if rtype == 0x002F:  # FILEPASS
            return ENCRYPTED
        if rtype == 0x0085 and len(body) >= 6 and body[5] == 0x01:  # BOUNDSHEET, macro sheet
            return XLM
        if rtype == 0x000A and pos > 0:  # EOF of the globals substream
            break
        pos += 4 + length
    return None


def _ppt_has_vba(stream: bytes) -> bool:
    """Find a VBAInfoContainer (record type 0x03FF) in a PowerPoint Document
    stream, descending into container records."""
    stack = [(0, len(stream), 0)]
    seen = 0
    while stack:
        pos, end, depth = stack.pop()
        while pos + 8 <= end and seen < _MAX_RECORDS:
            seen += 1
            ver_inst, rtype, length = struct.unpack_from("<HHI", stream, pos)
            if rtype == 0x03FF:
                return True
            body_end = min(end, pos + 8 + length)
            if ver_inst & 0x000F == 0x000F and depth < 6:
                stack.append((pos + 8, body_end, depth + 1))
            pos = pos + 8 + length
    return False


def ole_macros(data: bytes) -> str | None:
    """Macros (or encryption) in an OLE2 compound document."""
    try:
        with olefile.OleFileIO(io.BytesIO(data)) as ole:
            entries = [[p.lower() for p in e] for e in ole.listdir(streams=True, storages=True)]
            for entry in entries:
                leaf = entry[-1]
                if leaf in ("encryptedpackage", "encryptedsummary"):
                    return ENCRYPTED
            for entry in entries:
                if any(p in ("_vba_project_cur", "_vba_project", "vba", "macros") for p in entry):
                    return VBA
            if ole.exists("WordDocument"):
                fib = ole.openstream("WordDocument").read(12)
                if len(fib) >= 12 and struct.unpack_from("<H", fib, 0x0A)[0] & 0x0100:
                    return ENCRYPTED
            for name in ("Workbook", "Book"):
                if ole.exists(name):
                    found = _biff_scan(ole.openstream(name).read())
                    if found:
                        return found
            if ole.exists("PowerPoint Document") and _ppt_has_vba(
                ole.openstream("PowerPoint Document").read()
            ):
                return VBA
    except Exception:  # olefile on hostile or truncated input
        return UNREADABLE
    return None
