"""Crypto-shredding: stored content encrypted under keys that retention destroys.

Policy clause: *"data normally securely destroyed after three months"*, and
that includes the copies in backups.  A file in a backup cannot be overwritten
by the purge; it can be made unreadable by destroying the only key that opens
it.  So every message body is sealed (AES-256-GCM) under a **data key** of its
**period** (the UTC day it was received: ``2026-12-06``), and at the end of
retention the period's key is destroyed (docs/crypto-shredding.md).

Key hierarchy::

    KEK (key-encryption key, 32 bytes)   file named by [store] key_file, 0600
     └── wraps (AES-GCM, AAD = key id) each data key, kept in a KeyStore
          ├── "2026-12-06"               one per period (day of receipt)
          └── "hold:<quarantine id>"     one per item under legal hold

The data keys live in a :class:`KeyStore` apart from the data they protect
(never in the same database or file): for the embedded store
``<store.path>/keys/datakeys.db`` (:mod:`quarantine.sqlite_keys`), for
PostgreSQL a separate database.  A backup of the store that leaves ``keys/``
out holds only ciphertext whose keys die with the period.

A sealed blob is self-describing (:func:`parse_blob`)::

    b"\\x00MWENC" | version (1) | len(key id) (1) | key id (ASCII) | nonce (12) | ciphertext+tag

The AES-GCM associated data is the whole header (magic .. key id) followed by
a NUL and the caller's ``aad`` (the quarantine id): a blob cannot be moved to
another item, nor relabelled to another key.

Fingerprints (reports, ``store keygen``) are the first 16 hex digits of a
SHA-256: of the *wrapped* data key (never the key itself) for a data key, and
of ``b"mailwarden-kek\\0" + KEK`` for the KEK (there is no wrapped form; the
domain prefix keeps the value from being a plain hash of the key).

No SQL here: the key store backends hold it.  Every AES operation on a body
runs in an executor (a 50 MB body takes a noticeable fraction of a second).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from quarantine.store import StoreError, iso, utcnow

KEY_BYTES = 32
NONCE_BYTES = 12
MAGIC = b"\x00MWENC"
VERSION = 1
KEK_HEADER = "mailwarden-kek v1"
_WRAP_VERSION = 1
_WRAP_AAD = b"mailwarden-datakey-v1\x00"
_KEK_FP_PREFIX = b"mailwarden-kek\x00"
#: A period ("2026-12-06") or a hold key ("hold:<quarantine id>").
KEY_ID_RE = re.compile(r"^(?:\d{4}-\d{2}-\d{2}|hold:[0-9A-Za-z][0-9A-Za-z-]{0,63})$")
HOLD_PREFIX = "hold:"


# ------------------------------------------------------------------ errors


class CryptoError(StoreError):
    """A sealed body cannot be opened (a kind of :class:`StoreError`)."""


class KeyDestroyed(CryptoError):
    """The data key was destroyed (retention ended): the content is gone for good."""


class KeyUnknown(CryptoError):
    """No data key with that id exists in this key store (never created, or a
    key store that is not the one the data was sealed with)."""


class BlobError(CryptoError):
    """Not a well-formed blob, or it was altered (authentication failed)."""


class KekError(StoreError):
    """The key-encryption key file is missing, unsafe or wrong."""


# -------------------------------------------------------------------- KEK


def fingerprint(data: bytes) -> str:
    """First 16 hex digits of SHA-256 over ``data`` (a *wrapped* key)."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class Kek:
    """The key-encryption key (32 bytes) and the file it came from."""

    key: bytes
    path: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(_KEK_FP_PREFIX + self.key)

    def __repr__(self) -> str:  # never print the key
        return f"Kek(path={self.path!r}, fingerprint={self.fingerprint})"


def encode_kek(key: bytes) -> bytes:
    """The key file's text: a header line, then the key in base64."""
    return f"{KEK_HEADER}\n{base64.b64encode(key).decode('ascii')}\n".encode("ascii")


def write_kek(path: str | os.PathLike[str]) -> Kek:
    """Write a new random KEK to ``path`` (mode 0600, O_EXCL: never overwrites;
    FileExistsError if something is there).  Returns it."""
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(encode_kek(key))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    parent = os.path.dirname(os.path.abspath(path))
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return Kek(key, str(path))


def load_kek(path: str | os.PathLike[str]) -> Kek:
    """Read the KEK file; :class:`KekError` naming the file if it is missing,
    not a regular file, readable or writable by group or others, or not
    exactly one 32-byte key in :func:`encode_kek`'s format."""
    name = str(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KekError(f"key file {name}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KekError(f"key file {name}: not a regular file")
        if st.st_mode & 0o077:
            raise KekError(
                f"key file {name}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others"
                " in; chmod 600 it"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    lines = data.decode("ascii", "replace").split()
    if len(lines) != 3 or " ".join(lines[:2]) != KEK_HEADER:
        raise KekError(f"key file {name}: not a mailwarden key file (expected {KEK_HEADER!r})")
    try:
        key = base64.b64decode(lines[2], validate=True)
    except ValueError:
        raise KekError(f"key file {name}: the key is not base64") from None
    if len(key) != KEY_BYTES:
        raise KekError(f"key file {name}: the key is {len(key)} bytes, expected {KEY_BYTES}")
    return Kek(key, name)


def wrap(kek: Kek, key_id: str, key: bytes) -> bytes:
    """``version | nonce | AES-GCM(KEK, key, AAD = key id)``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(kek.key).encrypt(nonce, key, _WRAP_AAD + key_id.encode("ascii"))
    return bytes([_WRAP_VERSION]) + nonce + sealed


def unwrap(kek: Kek, key_id: str, wrapped: bytes) -> bytes:
    if len(wrapped) != 1 + NONCE_BYTES + KEY_BYTES + 16 or wrapped[0] != _WRAP_VERSION:
        raise KekError(f"data key {key_id}: malformed wrapped key")
    try:
        return AESGCM(kek.key).decrypt(
            wrapped[1 : 1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES :],
            _WRAP_AAD + key_id.encode("ascii"),
        )
    except InvalidTag:
        raise KekError(
            f"data key {key_id} does not unwrap with the key file {kek.path or '(given)'}"
            f" (fingerprint {kek.fingerprint}): the wrong key-encryption key?"
        ) from None


# --------------------------------------------------------------- key store


class KeyRecord(NamedTuple):
    """One data key as a key store keeps it.  ``wrapped`` is None once destroyed."""

    key_id: str
    wrapped: bytes | None
    fingerprint: str
    created: str
    destroyed: str | None = None


class KeyStore(Protocol):
    """Where wrapped data keys live, apart from the data they protect.

    A backend keeps, per key id, the wrapped key, its fingerprint and times;
    destroying a key removes every copy of the wrapped bytes the backend
    controls (overwrite, secure delete, journal/WAL truncation) and keeps a
    tombstone (id, fingerprint, times), so that a destroyed key is told from
    an unknown one and is never created again.  Errors are :class:`StoreError`.
    """

    async def get(self, key_id: str) -> KeyRecord | None:
        """The record (live or tombstone), or None if the id was never seen."""
        ...

    async def insert_if_absent(
        self, key_id: str, wrapped: bytes, fingerprint: str, created: str
    ) -> None:
        """Store the key unless a record (live or tombstone) for the id exists.

        Two processes may race here: each inserts-if-absent, then re-reads
        with :meth:`get`; the first insert wins for both."""
        ...

    async def destroy(self, key_ids: Sequence[str], when: str) -> list[KeyRecord]:
        """Destroy the live keys among ``key_ids``; returns their tombstones."""
        ...

    async def list(self, prefix: str = "") -> list[KeyRecord]:
        """Every record (live and tombstones) whose id starts with ``prefix``."""
        ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------- blobs


class BlobHeader(NamedTuple):
    key_id: str
    header: bytes  # magic .. key id (authenticated)
    nonce: bytes
    body_offset: int


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` starts like a sealed blob (a plaintext message that
    starts with NUL + ``MWENC`` is told apart by its recorded SHA-256)."""
    return data[: len(MAGIC)] == MAGIC


def parse_blob(blob: bytes) -> BlobHeader:
    """The header of a sealed blob (:class:`BlobError` if malformed)."""
    m = len(MAGIC)
    if not is_sealed(blob) or len(blob) < m + 2:
        raise BlobError("not a sealed blob")
    if blob[m] != VERSION:
        raise BlobError(f"sealed blob version {blob[m]} is not supported")
    n = blob[m + 1]
    end = m + 2 + n
    try:
        key_id = blob[m + 2 : end].decode("ascii")
    except UnicodeDecodeError:
        raise BlobError("sealed blob: bad key id") from None
    if not KEY_ID_RE.fullmatch(key_id) or len(blob) < end + NONCE_BYTES + 16:
        raise BlobError("sealed blob: bad key id or truncated")
    return BlobHeader(key_id, blob[:end], blob[end : end + NONCE_BYTES], end + NONCE_BYTES)


def _header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return MAGIC + bytes([VERSION, len(raw)]) + raw


def _seal(key: bytes, key_id: str, aad: bytes, plaintext: bytes) -> bytes:
    header = _header(key_id)
    nonce = secrets.token_bytes(NONCE_BYTES)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header + b"\x00" + aad)


def _open(key: bytes, head: BlobHeader, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(
            head.nonce, memoryview(blob)[head.body_offset :], head.header + b"\x00" + aad
        )
    except InvalidTag:
        raise BlobError(
            f"sealed blob under key {head.key_id}: authentication failed (altered, or not"
            " this item's)"
        ) from None


def period_of(when: datetime) -> str:
    """The period (data key id) of a time: its UTC day, ``2026-12-06``."""
    return when.astimezone(UTC).strftime("%Y-%m-%d")


def hold_key_id(qid: str) -> str:
    return HOLD_PREFIX + qid


def check_key_id(key_id: str) -> str:
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError(f"invalid data key id {key_id!r}")
    return key_id


# ----------------------------------------------------------------- the ring


class KeyRing:
    """What the store backends call to seal and open content.

    ``seal(key_id, aad, plaintext)`` creates the key on first use (race-safe
    through :meth:`KeyStore.insert_if_absent`); ``open(blob, aad)`` reads the
    key id from the blob and raises :class:`KeyDestroyed` / :class:`KeyUnknown`
    / :class:`BlobError`.  No unwrapped key is cached: every seal and open
    reads the key store (one indexed SELECT) and unwraps (microseconds), so a
    key destroyed by another process (``mailwarden purge``) stops working at
    once, in every process, and nothing is sealed under a destroyed period.
    """

    def __init__(self, kek: Kek, keys: KeyStore, *, clock: Callable[[], datetime] = utcnow,
                 where: str = "") -> None:
        self.kek = kek
        self.keys = keys
        self.clock = clock
        self.where = where

    async def close(self) -> None:
        await self.keys.close()

    async def _key(self, key_id: str, *, create: bool) -> bytes:
        record = await self.keys.get(key_id)
        if record is None and create:
            candidate = secrets.token_bytes(KEY_BYTES)
            wrapped = wrap(self.kek, key_id, candidate)
            await self.keys.insert_if_absent(key_id, wrapped, fingerprint(wrapped),
                                             iso(self.clock()))
            record = await self.keys.get(key_id)  # whoever inserted first
        if record is None:
            raise KeyUnknown(f"no data key {key_id} in the key store {self.where}".rstrip())
        if record.wrapped is None:
            raise KeyDestroyed(
                f"data key {key_id} (fingerprint {record.fingerprint}) was destroyed"
                f" at {record.destroyed}"
            )
        return unwrap(self.kek, key_id, record.wrapped)

    async def seal(self, key_id: str, aad: bytes, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` under the data key ``key_id`` (created if new)."""
        check_key_id(key_id)
        key = await self._key(key_id, create=True)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _seal, key, key_id, aad, plaintext)

    async def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob sealed by :meth:`seal` with the same ``aad``."""
        head = parse_blob(blob)
        key = await self._key(head.key_id, create=False)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _open, key, head, blob, aad)

    async def destroy(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        """Destroy these data keys (those still live); returns their tombstones."""
        if not key_ids:
            return []
        return await self.keys.destroy(list(key_ids), iso(self.clock()))

    async def records(self, prefix: str = "") -> list[KeyRecord]:
        return await self.keys.list(prefix)

    async def periods_before(self, day: str) -> list[KeyRecord]:
        """Live period keys of days before ``day`` (``YYYY-MM-DD``), oldest first."""
        return sorted(
            (r for r in await self.keys.list() if r.wrapped is not None
             and not r.key_id.startswith(HOLD_PREFIX) and r.key_id < day),
            key=lambda r: r.key_id,
        )

    async def hold_keys(self) -> list[KeyRecord]:
        """Live per-item hold keys."""
        return [r for r in await self.keys.list(HOLD_PREFIX) if r.wrapped is not None]


async def open_keyring(
    key_file: str, root: Path, *, create: bool, clock: Callable[[], datetime] = utcnow,
    dsn: str = "", key_dsn: str = "",
) -> KeyRing | None:
    """The key ring: the KEK from ``key_file`` and the key store apart from the
    data.  The embedded store at ``root`` (``dsn`` ""): the SQLite key store
    ``root/keys/datakeys.db``.  The shared PostgreSQL store (``dsn`` set): the
    key database ``key_dsn`` (default: the data database's name + ``_keys``),
    which every gateway shares.  None when ``key_file`` is "" (no encryption)."""
    if not key_file:
        return None
    try:
        kek = await asyncio.to_thread(load_kek, key_file)
    except KekError as exc:
        raise KekError(f"store.key_file: {exc}") from None
    if dsn:
        from quarantine.postgres_keys import PostgresKeyStore, keys_dsn

        target = keys_dsn(dsn, key_dsn)
        pg_keys = await PostgresKeyStore.open(target, create=create, data_dsn=dsn)
        return KeyRing(kek, pg_keys, clock=clock, where=pg_keys.where)
    from quarantine.sqlite_keys import SQLiteKeyStore

    keys = await SQLiteKeyStore.open(root, create=create)
    return KeyRing(kek, keys, clock=clock, where=str(keys.path))


__all__ = [
    "HOLD_PREFIX", "KEK_HEADER", "KEY_BYTES", "MAGIC", "BlobError", "CryptoError", "Kek",
    "KekError", "KeyDestroyed", "KeyRecord", "KeyRing", "KeyStore", "KeyUnknown",
    "check_key_id", "encode_kek", "fingerprint", "hold_key_id", "is_sealed", "load_kek",
    "open_keyring", "parse_blob", "period_of", "unwrap", "wrap", "write_kek",
]
