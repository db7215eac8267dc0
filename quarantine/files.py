"""Quarantined message files: durable writes, owner-only modes, secure deletion.

A message is written to a temporary file (created 0600 with O_EXCL), fsynced,
renamed into place, and its directory fsynced, so that once
:func:`write_durable` returns the bytes survive a crash or power loss.
Directories are 0700.  Paths are built only from quarantine ids that
:func:`check_id` accepts, never from message data, and always resolved inside
the store root.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

ID_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]{0,63}$")
DIR_MODE = 0o700
FILE_MODE = 0o600


class StorePathError(ValueError):
    """A quarantine id or path that would leave the store."""


def check_id(qid: str) -> str:
    """Validate a quarantine id (CLI input, database values)."""
    if not isinstance(qid, str) or not ID_RE.fullmatch(qid):
        raise StorePathError(f"invalid quarantine id {qid!r}")
    return qid


def ensure_dir(path: Path) -> bool:
    """Create ``path`` (and parents) with mode 0700; fix the mode if it exists.
    True when it had to be created."""
    created = False
    if not path.is_dir():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        created = True
    if (path.stat().st_mode & 0o777) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return created


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dirs(root: Path, relatives: Iterable[str]) -> None:
    """fsync the directories ``root/relative`` (each once): makes the renames
    of :func:`write_durable` with ``sync_dir=False`` into them durable."""
    for rel in dict.fromkeys(relatives):
        _fsync_dir(message_path(root, rel) if rel not in ("", ".") else root)


def message_path(root: Path, relative: str) -> Path:
    """Resolve a stored relative path, refusing anything outside ``root``."""
    full = (root / relative).resolve()
    base = root.resolve()
    if base not in full.parents:
        raise StorePathError(f"path {relative!r} escapes the store")
    return full


def write_durable(root: Path, relative: str, data: bytes, *, sync_dir: bool = True,
                  ensure: bool = True) -> Path:
    """Write ``data`` at ``root/relative`` durably (temp, fsync, rename, dir fsync).

    ``sync_dir=False`` leaves the directory's fsync to the caller
    (:func:`sync_dirs`, once for a batch of files): until then the file's
    name may not survive a crash.  ``ensure=False`` skips creating (and
    checking the modes of) the directories when the caller knows they exist;
    a missing directory is then created after all.
    """
    final = message_path(root, relative)
    parent = final.parent
    if ensure:
        _ensure_parents(root, final)
    tmp = parent / f".{final.name}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, FILE_MODE)
    except FileNotFoundError:
        if ensure:
            raise
        _ensure_parents(root, final)  # removed meanwhile (retention prunes empty days)
        fd = os.open(tmp, flags, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    replaced = False
    try:
        os.replace(tmp, final)
        replaced = True
        if sync_dir:
            _fsync_dir(parent)
    except BaseException:
        try:
            os.unlink(final if replaced else tmp)  # not kept: no file left either
        except OSError:
            pass
        raise
    return final


def _ensure_parents(root: Path, final: Path) -> None:
    """Create each level 0700 up from the root; a level created now is made
    durable in its parent (fsync of the parent directory)."""
    base = root.resolve()
    for d in reversed([p for p in final.parents if p == base or base in p.parents]):
        if ensure_dir(d) and d != base:
            _fsync_dir(d.parent)


def read_message(root: Path, relative: str) -> bytes:
    return message_path(root, relative).read_bytes()


def read_head(root: Path, relative: str, size: int = 128) -> bytes:
    """The first ``size`` bytes of a message file (a sealed file's header)."""
    with open(message_path(root, relative), "rb") as fh:
        return fh.read(size)


def secure_delete(root: Path, relative: str) -> bool:
    """Overwrite a message file with zeros, fsync, then unlink.  False if absent.

    (On copy-on-write or journalling filesystems an overwrite is best effort;
    the database side uses ``PRAGMA secure_delete``.)
    """
    path = message_path(root, relative)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        block = b"\0" * 65536
        remaining = size
        while remaining > 0:
            n = os.write(fd, block[: min(remaining, len(block))])
            remaining -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    _fsync_dir(path.parent)
    return True
