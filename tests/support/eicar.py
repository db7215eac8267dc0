"""The EICAR anti-virus test string, built at run time, and carriers for it.

No file in the repository contains the EICAR string itself (so that scanners
looking at a checkout stay quiet): it is stored reversed and turned around
when a test asks for it.  :func:`zipped` and :func:`forwarded` build the
containers tests hide it in (a zip, a message/rfc822 attachment).
"""

from __future__ import annotations

import email
import io
import zipfile
from email.message import EmailMessage
from email.policy import SMTP, default

_REVERSED = r"*H+H$!ELIF-TSET-SURIVITNA-DRADNATS-RACIE$}7)CC7)^P(45XZP\4[PA@%P!O5X"

#: Name clamd reports for EICAR with the suite's database (see tests/support/clamd.py).
EICAR_NAME = "Eicar-Test-Signature.UNOFFICIAL"


def eicar(newline: bool = False) -> bytes:
    """The 68-byte EICAR test string (with a trailing newline if asked)."""
    data = _REVERSED[::-1].encode("ascii")
    assert len(data) == 68
    return data + (b"\n" if newline else b"")


def zipped(name: str, data: bytes) -> bytes:
    """A zip archive (deflated) holding ``data`` as ``name``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def forwarded(inner: bytes, *, subject: str = "Fwd: hi") -> bytes:
    """A message (CRLF) carrying the message ``inner`` as a message/rfc822 part."""
    msg = EmailMessage()
    msg["From"] = "Carol <c@ext.test>"
    msg["To"] = "Bob <b@example.com>"
    msg["Subject"] = subject
    msg["Message-ID"] = "<fwd@ext.test>"
    msg.set_content("Forwarded message attached.\n")
    enclosed = email.message_from_bytes(inner.replace(b"\r\n", b"\n"), policy=default)
    msg.add_attachment(enclosed)
    raw = msg.as_bytes(policy=SMTP)
    assert b"message/rfc822" in raw
    # Strict CRLF: no bare CR or LF anywhere (the gateway refuses those).
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    return raw
