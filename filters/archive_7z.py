"""7z archives for :mod:`filters.archives` (imported on first use: py7zr is heavy)."""

from __future__ import annotations

import io

import py7zr
import py7zr.exceptions
import py7zr.io

from filters.archives import Budget, Listing, Member, Unscannable, _unreadable
from filters.filetypes import HEAD_BYTES, NEEDS_CONTENT, identify


class _Sink(py7zr.io.Py7zIO):
    """Keeps a member's first HEAD_BYTES, and all of it only when its kind needs
    the whole content (a nested archive, an OLE document); the rest of any
    other member is counted and dropped."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.full: bytearray | None = None
        self.total = 0

    def _decide(self) -> None:
        if self.full is None and identify(bytes(self.head)) in NEEDS_CONTENT:
            self.full = bytearray(self.head)

    def write(self, s: bytes | bytearray) -> int:
        n = len(s)
        self.total += n
        if self.full is not None:
            self.full += s
            return n
        room = HEAD_BYTES - len(self.head)
        if room > 0:
            self.head += s[:room]
            if len(self.head) >= HEAD_BYTES:
                self._decide()
                if self.full is not None:
                    self.full += s[room:]
        return n

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        return None

    def size(self) -> int:
        return self.total


class _SinkFactory(py7zr.io.WriterFactory):
    def __init__(self) -> None:
        self.sinks: dict[str, _Sink] = {}

    def create(self, filename: str) -> py7zr.io.Py7zIO:
        sink = _Sink()
        self.sinks[filename] = sink
        return sink


def open_7z(data: bytes, label: str, budget: Budget) -> Listing:
    try:
        archive = py7zr.SevenZipFile(io.BytesIO(data))
    except py7zr.exceptions.PasswordRequired:
        raise Unscannable(f"encrypted archive {label}") from None
    except Exception as exc:
        raise _unreadable(label, exc) from None
    with archive:
        try:
            infos = [f for f in archive.list() if not f.is_directory]
            encrypted = bool(archive.needs_password())
        except Exception as exc:
            raise _unreadable(label, exc) from None
        budget.take_members(len(infos), label)
        budget.take_bytes(sum(int(f.uncompressed or 0) for f in infos), label)
        names = [f.filename for f in infos]
        if encrypted:
            return Listing(iter([Member(n, encrypted=True) for n in names]), names, True)
        factory = _SinkFactory()
        try:
            archive.extractall(factory=factory)
        except Exception as exc:
            raise _unreadable(label, exc) from None
    out: list[Member] = []
    for name in names:
        sink = factory.sinks.get(name)
        if sink is None:
            out.append(Member(name))
            continue
        if sink.full is None:
            sink._decide()
        head = bytes(sink.head)
        if sink.full is None:
            # Not needed whole (see _Sink); the head is all there is to check.
            out.append(Member(name, head, None))
        else:
            full = bytes(sink.full)
            out.append(Member(name, head, lambda full=full: full))
    return Listing(iter(out), names)
