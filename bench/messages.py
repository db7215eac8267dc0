"""The benchmark's message sets, generated at run time.

Each set is one message written as a file for ``smtp-source -F``, which sends
the file line by line, appending CRLF to each line and dot-stuffing lines
that begin with ``.``; so the files use LF line endings.

- ``small``:  about 10 KB of plain text;
- ``attach``: about 100 KB: a short text part and a real (minimal, valid) PDF
  attachment, base64;
- ``virus``:  a short text part and the EICAR test file attached
  (``invoice.com``); every one must be held by a gateway that scans;
- ``big``:    about 6.7 MB: a text part and a 4.9 MB PDF attachment, base64.

No file in the repository contains the EICAR string itself: it is stored
reversed and turned around here (the same trick as tests/support/eicar.py).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

#: The message sets, in the order the matrix runs them.
SETS = ("small", "attach", "virus", "big")

SENDER = "alice@partner.example.net"
RECIPIENT = "bob@example.com"
INTERNAL_DOMAIN = "example.com"

_EICAR_REVERSED = r"*H+H$!ELIF-TSET-SURIVITNA-DRADNATS-RACIE$}7)CC7)^P(45XZP\4[PA@%P!O5X"

_WORDS = (
    "policy gateway message review quarterly figures attached meeting agenda "
    "budget supplier invoice shipment schedule project update minutes draft "
    "contract renewal summary report team office travel expenses approval"
).split()


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test string."""
    data = _EICAR_REVERSED[::-1].encode("ascii")
    assert len(data) == 68
    return data


def text_lines(size: int, seed: str = "mailwarden") -> list[str]:
    """Deterministic prose-like lines (at most 72 characters) totalling ``size`` bytes."""
    lines: list[str] = []
    total = 0
    n = 0
    while total < size:
        digest = hashlib.sha256(f"{seed}{n}".encode()).digest()
        words = [_WORDS[b % len(_WORDS)] for b in digest[:11]]
        line = " ".join(words).capitalize() + "."
        line = line[:72]
        lines.append(line)
        total += len(line) + 1
        n += 1
    return lines


def minimal_pdf(size: int) -> bytes:
    """A valid single-page PDF of about ``size`` bytes (uncompressed text stream)."""
    ops = [b"BT /F1 9 Tf 36 800 Td 11 TL"]
    body = 0
    for line in text_lines(max(0, size - 700), seed="pdf"):
        op = b"(" + line.encode("ascii") + b") '"
        ops.append(op)
        body += len(op) + 1
    ops.append(b"ET")
    stream = b"\n".join(ops)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode()
    out += b"0000000000 65535 f \n"
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _headers(subject: str, msgid: str, content_type: str) -> list[str]:
    return [
        "From: Alice Partner <" + SENDER + ">",
        "To: Bob Example <" + RECIPIENT + ">",
        "Subject: " + subject,
        "Date: Mon, 02 Nov 2026 09:30:00 +0000",
        "Message-ID: <" + msgid + "@partner.example.net>",
        "MIME-Version: 1.0",
        content_type,
    ]


def _b64_lines(data: bytes) -> list[str]:
    enc = base64.b64encode(data).decode("ascii")
    return [enc[i : i + 76] for i in range(0, len(enc), 76)]


def _with_attachment(subject: str, msgid: str, text_size: int, filename: str,
                     ctype: str, payload: bytes) -> str:
    boundary = "=_mailwarden_bench_" + hashlib.sha1(msgid.encode()).hexdigest()[:16]
    lines = _headers(subject, msgid, f'Content-Type: multipart/mixed; boundary="{boundary}"')
    lines += ["", "This is a multi-part message in MIME format.", "", "--" + boundary,
              "Content-Type: text/plain; charset=us-ascii",
              "Content-Transfer-Encoding: 7bit", ""]
    lines += text_lines(text_size)
    lines += ["", "--" + boundary,
              f'Content-Type: {ctype}; name="{filename}"',
              "Content-Transfer-Encoding: base64",
              f'Content-Disposition: attachment; filename="{filename}"', ""]
    lines += _b64_lines(payload)
    lines += ["--" + boundary + "--", ""]
    return "\n".join(lines)


def build(name: str) -> bytes:
    """The message of set ``name`` as LF-terminated bytes for ``smtp-source -F``."""
    if name == "small":
        lines = _headers("Quarterly figures", "small-1",
                         "Content-Type: text/plain; charset=us-ascii")
        lines += [""] + text_lines(10 * 1024 - 300) + [""]
        text = "\n".join(lines)
    elif name == "attach":
        text = _with_attachment("Contract draft", "attach-1", 2000, "contract.pdf",
                                "application/pdf", minimal_pdf(67 * 1024))
    elif name == "virus":
        text = _with_attachment("Your invoice", "virus-1", 600, "invoice.com",
                                "application/octet-stream", eicar())
    elif name == "big":
        text = _with_attachment("Scanned archive", "big-1", 4000, "archive.pdf",
                                "application/pdf", minimal_pdf(4_700_000))
    else:
        raise ValueError(f"unknown message set {name!r} (known: {', '.join(SETS)})")
    return text.encode("ascii")


def write_all(directory: Path, names: tuple[str, ...] = SETS) -> dict[str, Path]:
    """Write each set's message file into ``directory``; return name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        path = directory / f"{name}.eml"
        path.write_bytes(build(name))
        out[name] = path
    return out
