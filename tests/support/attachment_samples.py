"""Attachment samples for the attachment_types tests, generated at run time.

Minimal but real: libmagic recognises each one (a PE with a valid header at
e_lfanew, an ELF header, an ISO 9660 primary volume descriptor at 32769,
OOXML packages with [Content_Types].xml, a genuinely ZipCrypto-encrypted zip,
a 200 MB-of-zeros zip bomb streamed through ZIP_DEFLATED).
"""

from __future__ import annotations

import functools
import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable

# ------------------------------------------------------------- executables


def pe(*, dll: bool = False, pe32plus: bool = False) -> bytes:
    """A minimal Windows PE image: DOS header, "PE\\0\\0" at e_lfanew, COFF
    header and optional header (libmagic: "PE32 executable (GUI) ...")."""
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)
    chars = 0x0102 | (0x2000 if dll else 0)
    opt_size = 240 if pe32plus else 224
    machine = 0x8664 if pe32plus else 0x14C
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", machine, 1, 0, 0, 0, opt_size, chars)
    opt = bytearray(opt_size)
    struct.pack_into("<H", opt, 0, 0x20B if pe32plus else 0x10B)
    struct.pack_into("<H", opt, 68, 2)  # subsystem: Windows GUI
    section = struct.pack("<8sIIIIIIHHI", b".text\0\0\0", 0x100, 0x1000, 0x200, 0x200, 0, 0, 0, 0,
                          0x60000020)
    body = bytes(dos) + coff + bytes(opt) + section
    return body + b"\0" * (0x400 - len(body)) + b"\xc3" * 0x200


def elf() -> bytes:
    """A minimal 64-bit x86-64 ELF executable header."""
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x400000, 64, 0, 0, 64, 56, 0, 64,
                                 0, 0)
    return header + b"\0" * 256


def macho() -> bytes:
    """A minimal 64-bit Mach-O header (x86_64 executable)."""
    return struct.pack("<IiiIIII", 0xFEEDFACF, 0x01000007, 3, 2, 0, 0, 0) + b"\0" * 200


def iso() -> bytes:
    """A minimal ISO 9660 image: 16 empty system sectors, a primary volume
    descriptor ("CD001" at 32769) and the set terminator."""
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[40:72] = b"MAILWARDEN_TEST".ljust(32)
    struct.pack_into("<I", pvd, 80, 18)
    struct.pack_into(">I", pvd, 84, 18)
    term = bytearray(2048)
    term[0:7] = b"\xffCD001\x01"
    return b"\0" * 32768 + bytes(pvd) + bytes(term)


def onenote() -> bytes:
    """The OneNote section file signature (a GUID) and padding."""
    return bytes.fromhex("e4525c7b8cd8a74daeb15378d02996d3") + b"\0" * 512


def lnk() -> bytes:
    """A Windows shortcut header (ShellLinkHeader: size 0x4C + CLSID)."""
    return bytes.fromhex("4c0000000114020000000000c000000000000046") + b"\0" * 56


# --------------------------------------------------------------- documents


def pdf(size: int = 2048) -> bytes:
    """A small well-formed PDF, padded with a comment to about ``size`` bytes."""
    objs = [
        b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n",
        b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 1 >>\nendobj\n",
        b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>\nendobj\n",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for obj in objs:
        offsets.append(len(out))
        out += obj
    pad = max(0, size - len(out) - 200)
    while pad > 0:
        line = min(pad, 72)
        out += b"%" + b"x" * (line - 2) + b"\n"
        pad -= line
    xref = len(out)
    out += b"xref\n0 4\n0000000000 65535 f \n"
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size 4 /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def png() -> bytes:
    """A valid 2x2 RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    raw = b"".join(b"\0" + b"\xff\x00\x00" * 2 for _ in range(2))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


_CT = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>{extra}'
    '<Override PartName="/{main}" ContentType="{ctype}"/></Types>'
)
_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships/officeDocument" Target="{main}"/></Relationships>'
)


def _ooxml(main: str, ctype: str, parts: dict[str, bytes], extra: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", _CT.format(main=main, ctype=ctype, extra=extra))
        zf.writestr("_rels/.rels", _RELS.format(main=main))
        for name, data in parts.items():
            zf.writestr(name, data)
    return buf.getvalue()


_DOC = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
    b"<w:body><w:p><w:r><w:t>Quarterly report</w:t></w:r></w:p></w:body></w:document>"
)


def docx() -> bytes:
    """A minimal Word document (a zip; libmagic: "Microsoft Word 2007+")."""
    return _ooxml(
        "word/document.xml",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
        {"word/document.xml": _DOC},
    )


def docm() -> bytes:
    """A Word document with a VBA project (word/vbaProject.bin)."""
    return _ooxml(
        "word/document.xml",
        "application/vnd.ms-word.document.macroEnabled.main+xml",
        {"word/document.xml": _DOC, "word/vbaProject.bin": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
         + b"\0" * 504},
        extra='<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>',
    )


def xlsx() -> bytes:
    """A minimal Excel workbook."""
    return _ooxml(
        "xl/workbook.xml",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
        {
            "xl/workbook.xml": b'<?xml version="1.0" encoding="UTF-8"?>\n<workbook xmlns='
            b'"http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheets><sheet '
            b'name="S" sheetId="1"/></sheets></workbook>',
            "xl/worksheets/sheet1.xml": b'<?xml version="1.0" encoding="UTF-8"?>\n<worksheet '
            b'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData/>'
            b"</worksheet>",
        },
    )


# ---------------------------------------------------------------- archives


def zipped(members: Iterable[tuple[str, bytes]], *, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``(name, data)`` members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def tarred(members: Iterable[tuple[str, bytes]], *, compression: str = "gz") -> bytes:
    """A (compressed) tar of ``(name, data)`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}" if compression else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _ZipCrypto:
    """Traditional PKWARE encryption (APPNOTE 6.1), encrypt side."""

    def __init__(self, password: bytes) -> None:
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for b in password:
            self._update(b)

    @staticmethod
    def _crc(crc: int, b: int) -> int:
        return zlib.crc32(bytes([b]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def _update(self, b: int) -> None:
        k0, k1, k2 = self.keys
        k0 = self._crc(k0, b)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = self._crc(k2, k1 >> 24)
        self.keys = [k0, k1, k2]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            t = (self.keys[2] | 2) & 0xFFFF
            out.append(b ^ (((t * (t ^ 1)) >> 8) & 0xFF))
            self._update(b)
        return bytes(out)


def encrypted_zip(members: Iterable[tuple[str, bytes]], password: bytes = b"secret") -> bytes:
    """A zip whose members are really ZipCrypto-encrypted (stored)."""
    local = bytearray()
    central = bytearray()
    count = 0
    for name, data in members:
        nm = name.encode()
        crc = zlib.crc32(data) & 0xFFFFFFFF
        header = bytes(range(11)) + bytes([crc >> 24])
        enc = _ZipCrypto(password).encrypt(header + data)
        offset = len(local)
        local += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 1, 0, 0, 0x21, crc, len(enc),
                             len(data), len(nm), 0) + nm + enc
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 1, 0, 0, 0x21, crc,
                               len(enc), len(data), len(nm), 0, 0, 0, 0, 0, offset) + nm
        count += 1
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    return bytes(local + central + eocd)


@functools.lru_cache(maxsize=2)
def zip_bomb(size: int = 200 * 1024 * 1024) -> bytes:
    """A zip whose one member is ``size`` zero bytes, streamed through
    ZIP_DEFLATED (200 MB compress to about 200 KB)."""
    buf = io.BytesIO()
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("zeros.bin", date_time=(2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as w:
            left = size
            while left > 0:
                n = min(left, len(chunk))
                w.write(chunk[:n])
                left -= n
    return buf.getvalue()


def tnef(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A TNEF stream (winmail.dat) carrying ``(name, data)`` attachments."""

    def attr(level: int, tag: int, value: bytes) -> bytes:
        return (bytes([level]) + struct.pack("<II", tag, len(value)) + value
                + struct.pack("<H", sum(value) & 0xFFFF))

    out = bytearray(b"\x78\x9f\x3e\x22" + struct.pack("<H", 0x1234))
    out += attr(1, 0x00089006, struct.pack("<I", 0x00010000))  # attTnefVersion
    out += attr(1, 0x00078008, b"IPM.Microsoft Mail.Note\0")  # attMessageClass
    for name, data in files:
        out += attr(2, 0x00069002, b"\x01\0\0\0" + b"\xff" * 10)  # attAttachRendData
        out += attr(2, 0x00018010, name.encode("cp1252") + b"\0")  # attAttachTitle
        out += attr(2, 0x0006800F, data)  # attAttachData
    return bytes(out)
