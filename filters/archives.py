"""Looking inside archives without extracting them to disk, within bounds.

Policy clause: "employees may not install software" — an installer does not
become acceptable by being zipped.  Used by the attachment_types filter.

:func:`open_archive` lists the members of a zip, 7z, rar, tar, gzip, bzip2 or
xz archive held in memory and yields each member's name, its first
``HEAD_BYTES`` and, where the format allows, a way to read the whole member
(needed only to look inside a nested archive).  What each format gives:

* zip, tar (plain or compressed): names and contents;
* 7z (py7zr): names and contents (decompressed in memory, one pass);
* rar (rarfile): names, plus contents of *stored* members; compressed members
  would need an external ``unrar``, so only their names are checked;
* gzip / bzip2 / xz: the single decompressed stream (or the tar inside it);
* TNEF (winmail.dat, :mod:`filters.tnef`): the attachments Outlook wrapped.

Every path is bounded by a :class:`Budget`: the member count and the total
uncompressed bytes of one attachment, counted from the sizes each archive
declares (zipfile and py7zr never produce more than a member's declared size)
and, for compressed streams, from the bytes actually decompressed.  Members
are read in bounded chunks, never with an unbounded ``read()``.  Exceeding a
bound raises :class:`LimitExceeded`; an encrypted or unreadable archive raises
:class:`Unscannable`.  Both carry a one-line reason; both mean "hold".
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import rarfile

from filters import tnef
from filters.filetypes import HEAD_BYTES, identify

#: Chunk size for streaming reads.
CHUNK = 64 * 1024


class Unscannable(Exception):
    """An archive that cannot be checked; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LimitExceeded(Unscannable):
    """An archive beyond the configured bounds (a likely archive bomb)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds for looking inside archives (per top-level attachment)."""

    max_depth: int = 3
    max_members: int = 1000
    max_total_bytes: int = 100 * 1024 * 1024


class Budget:
    """Member count and uncompressed bytes left for one attachment."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.members_left = limits.max_members
        self.bytes_left = limits.max_total_bytes

    def take_members(self, n: int, label: str) -> None:
        """Account for ``n`` more members; raise LimitExceeded past the bound."""
        self.members_left -= n
        if self.members_left < 0:
            raise LimitExceeded(
                f"archive exceeds limits ({label}: more than "
                f"{self.limits.max_members} members)"
            )

    def take_bytes(self, n: int, label: str) -> None:
        """Account for ``n`` more uncompressed bytes; raise past the bound."""
        self.bytes_left -= max(n, 0)
        if self.bytes_left < 0:
            raise LimitExceeded(
                f"archive exceeds limits ({label}: more than "
                f"{self.limits.max_total_bytes} bytes uncompressed)"
            )


@dataclass(slots=True)
class Member:
    """One file inside an archive.

    ``head`` is empty when the content cannot be read (encrypted, or a
    compressed rar member); ``read_all`` is then None.  ``read_all`` must be
    called before the next member is requested (tar streams are sequential).
    """

    name: str
    head: bytes = b""
    read_all: Callable[[], bytes] | None = None
    encrypted: bool = False


@dataclass(slots=True)
class Listing:
    """An opened archive: member names (zip/7z/rar: known up front, for
    package detection) and the member iterator."""

    members: Iterator[Member]
    names: list[str] | None = None
    encrypted: bool = False
    notes: list[str] = field(default_factory=list)


def _unreadable(label: str, exc: BaseException) -> Unscannable:
    return Unscannable(f"unreadable archive {label} ({type(exc).__name__})")


def _read_up_to(read: Callable[[int], bytes], n: int) -> bytes:
    """Read up to ``n`` bytes from ``read`` (which may return short reads)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = read(min(CHUNK, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_rest(read: Callable[[int], bytes], head: bytes) -> bytes:
    parts = [head]
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


# ------------------------------------------------------------------------- zip


def _open_zip(data: bytes, label: str, budget: Budget) -> Listing:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except Exception as exc:  # any failure of the parser on hostile input
        raise _unreadable(label, exc) from None
    budget.take_members(len(infos), label)
    budget.take_bytes(sum(i.file_size for i in infos), label)
    encrypted = any(i.flag_bits & 0x1 for i in infos)

    def members() -> Iterator[Member]:
        with zf:
            for info in infos:
                if info.flag_bits & 0x1:
                    yield Member(info.filename, encrypted=True)
                    continue
                try:
                    fh = zf.open(info)
                    head = _read_up_to(fh.read, HEAD_BYTES)
                except Exception as exc:
                    raise Unscannable(
                        f"unreadable archive {label} ({type(exc).__name__} in member)"
                    ) from None
                with fh:

                    def read_all(fh: zipfile.ZipExtFile = fh, head: bytes = head) -> bytes:
                        # zipfile never yields more than the declared size,
                        # which the budget has already counted.
                        try:
                            return _read_rest(fh.read, head)
                        except Exception as exc:
                            raise Unscannable(
                                f"unreadable archive {label} ({type(exc).__name__} in member)"
                            ) from None

                    yield Member(info.filename, head, read_all)

    return Listing(members(), [i.filename for i in infos], encrypted)


# ------------------------------------------------------------------------- tar


class _Counted(io.RawIOBase):
    """A read-only stream that charges every byte it yields to a budget."""

    def __init__(self, read: Callable[[int], bytes], budget: Budget, label: str) -> None:
        super().__init__()
        self._read = read
        self._budget = budget
        self._label = label

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0:
            return _read_rest(self.read, b"")
        data = self._read(min(size, CHUNK * 4))
        self._budget.take_bytes(len(data), self._label)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Prefixed(io.RawIOBase):
    """``prefix`` followed by the rest of another stream."""

    def __init__(self, prefix: bytes, rest: _Counted) -> None:
        super().__init__()
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if size is None or size < 0:
            return _read_rest(self.read, b"")
        if self._prefix:
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            return out
        return self._rest.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _tar_members(
    tf: tarfile.TarFile, label: str, budget: Budget, count_sizes: bool
) -> Iterator[Member]:
    try:
        while True:
            try:
                info = tf.next()
            except Unscannable:
                raise
            except Exception as exc:  # tarfile/zlib/lzma errors on hostile input
                raise _unreadable(label, exc) from None
            if info is None:
                return
            budget.take_members(1, label)
            if not info.isfile():
                continue
            if count_sizes:
                budget.take_bytes(info.size, label)
            try:
                fh = tf.extractfile(info)
                head = _read_up_to(fh.read, HEAD_BYTES) if fh else b""
            except Unscannable:
                raise
            except Exception as exc:
                raise _unreadable(label, exc) from None
            if fh is None:
                continue

            def read_all(fh: io.BufferedReader = fh, head: bytes = head) -> bytes:
                try:
                    return _read_rest(fh.read, head)
                except Unscannable:
                    raise
                except Exception as exc:
                    raise _unreadable(label, exc) from None

            yield Member(info.name, head, read_all)
    finally:
        tf.close()


def _open_tar(fileobj: io.RawIOBase | io.BytesIO, label: str, budget: Budget) -> Listing:
    # A compressed tar charges the budget as it decompresses (_Prefixed wraps
    # a _Counted stream); a plain tar in memory is charged by member sizes.
    count_sizes = not isinstance(fileobj, _Prefixed)
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|")
    except Unscannable:
        raise
    except Exception as exc:
        raise _unreadable(label, exc) from None
    return Listing(_tar_members(tf, label, budget, count_sizes))


# --------------------------------------------------------- gzip / bzip2 / xz


def _gzip_name(data: bytes) -> str | None:
    """The original file name stored in a gzip header (FNAME), if any."""
    if len(data) < 10 or not data[3] & 0x08:
        return None
    pos = 10
    if data[3] & 0x04:  # FEXTRA
        if len(data) < 12:
            return None
        pos += 2 + struct.unpack_from("<H", data, 10)[0]
    end = data.find(b"\0", pos, pos + 1024)
    if end < 0:
        return None
    return data[pos:end].decode("latin-1") or None


def _stream_name(kind: str, data: bytes, label: str) -> str:
    """The name of the file inside a single-stream compressor."""
    if kind == "gzip":
        stored = _gzip_name(data)
        if stored:
            return stored
    base = label.rsplit("/", 1)[-1]
    lower = base.lower()
    for suffix, replacement in (
        (".tgz", ".tar"), (".tbz2", ".tar"), (".tbz", ".tar"), (".txz", ".tar"),
        (".gz", ""), (".bz2", ""), (".xz", ""),
    ):
        if lower.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)] + replacement
    return base or "(compressed data)"


def _open_stream(kind: str, data: bytes, label: str, budget: Budget) -> Listing:
    opener = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}[kind]
    try:
        raw = opener(fileobj=io.BytesIO(data)) if kind == "gzip" else opener(io.BytesIO(data))
    except Exception as exc:
        raise _unreadable(label, exc) from None

    def guarded_read(n: int) -> bytes:
        try:
            return raw.read(n)
        except Exception as exc:
            raise _unreadable(label, exc) from None

    stream = _Counted(guarded_read, budget, label)
    head = _read_up_to(stream.read, HEAD_BYTES)
    budget.take_members(1, label)
    if identify(head) == "tar":
        return _open_tar(_Prefixed(head, stream), label, budget)

    def members() -> Iterator[Member]:
        yield Member(
            _stream_name(kind, data, label),
            head,
            lambda: _read_rest(stream.read, head),
        )
        # Decompress (and drop) whatever the check did not read, so that a
        # compression bomb trips the byte budget instead of passing unseen.
        while stream.read(CHUNK * 4):
            pass

    return Listing(members())


# -------------------------------------------------------------------------- 7z


def _open_7z(data: bytes, label: str, budget: Budget) -> Listing:
    # py7zr is imported only when a 7z archive shows up: it is a heavy import,
    # and every CLI command would otherwise pay for it at start-up.
    from filters.archive_7z import open_7z

    return open_7z(data, label, budget)


# ------------------------------------------------------------------------- rar


def _open_rar(data: bytes, label: str, budget: Budget) -> Listing:
    try:
        rf = rarfile.RarFile(io.BytesIO(data))
        infos = [i for i in rf.infolist() if not i.is_dir()]
        header_encrypted = rf.needs_password() and not infos
    except rarfile.PasswordRequired:
        raise Unscannable(f"encrypted archive {label}") from None
    except Exception as exc:
        raise _unreadable(label, exc) from None
    if header_encrypted:
        raise Unscannable(f"encrypted archive {label}")
    budget.take_members(len(infos), label)
    budget.take_bytes(sum(int(i.file_size or 0) for i in infos), label)
    encrypted = any(i.needs_password() for i in infos)
    notes: list[str] = []

    def members() -> Iterator[Member]:
        with rf:
            for info in infos:
                if info.needs_password():
                    yield Member(info.filename, encrypted=True)
                    continue
                if info.compress_type != rarfile.RAR_M0:
                    # Compressed: needs an external unrar; names only.
                    yield Member(info.filename)
                    continue
                try:
                    fh = rf.open(info)
                    head = _read_up_to(fh.read, HEAD_BYTES)
                except Exception as exc:
                    raise _unreadable(label, exc) from None
                with fh:
                    yield Member(
                        info.filename, head, lambda fh=fh, head=head: _read_rest(fh.read, head)
                    )

    if any(i.compress_type != rarfile.RAR_M0 for i in infos):
        notes.append(f"{label}: compressed rar members checked by name only")
    return Listing(members(), [i.filename for i in infos], encrypted, notes)


# ------------------------------------------------------------------------ tnef


def _open_tnef(data: bytes, label: str, budget: Budget) -> Listing:
    try:
        found = tnef.read_attachments(data)
    except tnef.TnefError as exc:
        raise _unreadable(label, exc) from None
    budget.take_members(len(found), label)
    budget.take_bytes(sum(len(a.data) for a in found), label)
    members = [
        Member(a.name or "(unnamed TNEF attachment)", a.data[:HEAD_BYTES],
               (lambda d=a.data: d) if a.data else None)
        for a in found
    ]
    return Listing(iter(members), [m.name for m in members])


# ------------------------------------------------------------------ dispatch


def open_archive(kind: str, data: bytes, label: str, budget: Budget) -> Listing:
    """Open an archive of ``kind`` (one of ``ARCHIVE_KINDS``) held in ``data``.

    ``label`` names the archive in reasons (e.g. ``"mail.zip/inner.7z"``).
    Raises :class:`Unscannable` (encrypted headers, unreadable) or
    :class:`LimitExceeded`; member iteration may raise them too.
    """
    if kind == "zip":
        return _open_zip(data, label, budget)
    if kind == "tar":
        return _open_tar(io.BytesIO(data), label, budget)
    if kind in ("gzip", "bzip2", "xz"):
        return _open_stream(kind, data, label, budget)
    if kind == "7z":
        return _open_7z(data, label, budget)
    if kind == "rar":
        return _open_rar(data, label, budget)
    if kind == "tnef":
        return _open_tnef(data, label, budget)
    raise ValueError(f"not an archive kind: {kind!r}")
