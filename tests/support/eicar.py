"""The EICAR anti-virus test string, built at run time.

No file in the repository contains the EICAR string itself (so that scanners
looking at a checkout stay quiet): it is stored reversed and turned around
when a test asks for it.
"""

from __future__ import annotations

_REVERSED = r"*H+H$!ELIF-TSET-SURIVITNA-DRADNATS-RACIE$}7)CC7)^P(45XZP\4[PA@%P!O5X"

#: Name clamd reports for EICAR with the suite's database (see tests/support/clamd.py).
EICAR_NAME = "Eicar-Test-Signature.UNOFFICIAL"


def eicar(newline: bool = False) -> bytes:
    """The 68-byte EICAR test string (with a trailing newline if asked)."""
    data = _REVERSED[::-1].encode("ascii")
    assert len(data) == 68
    return data + (b"\n" if newline else b"")
