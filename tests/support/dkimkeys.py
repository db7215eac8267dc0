"""DKIM test keys and signing for the tests: RSA keys generated at test time.

Keys are generated once per process (``cryptography``) and cached; nothing is
read from disk.  ``txt_record`` gives the DNS TXT value to publish in the
loopback DNS server (:mod:`tests.support.dns`).
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class TestKey:
    """An RSA key pair: PKCS#1 PEM private key and the DKIM TXT record."""

    __test__ = False  # not a pytest test class

    pem: bytes
    txt_record: str

    def write(self, path: Path) -> Path:
        """Write the private key (0600) and return the path."""
        path.write_bytes(self.pem)
        path.chmod(0o600)
        return path


@functools.cache
def rsa_key(bits: int = 2048, slot: int = 0) -> TestKey:
    """An RSA key of ``bits`` bits; ``slot`` picks a different key of that size."""
    del slot  # part of the cache key only
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TestKey(pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}")


def sign(raw: bytes, domain: str, selector: str = "sel", key: TestKey | None = None,
         canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed")) -> bytes:
    """``raw`` with a DKIM-Signature by ``domain``/``selector`` prepended."""
    key = key or rsa_key()
    header = dkim.sign(raw, selector.encode(), domain.encode(), key.pem,
                       canonicalize=canonicalize)
    return header + raw
