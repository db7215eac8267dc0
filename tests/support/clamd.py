"""A private clamd for the test suite, with a signature database built offline.

The suite never downloads signatures.  :func:`build_database` writes, into a
temp dir:

- ``mailwarden-test.ndb``: one body signature, ``Eicar-Test-Signature``, whose
  hex is generated at run time from :func:`tests.support.eicar.eicar`; it
  matches the 68 EICAR bytes anywhere (with or without a trailing newline);
- ``mailwarden-test.hdb``: ``MD5:size:name`` of every file in Debian's
  ``clamav-testfiles`` (``/usr/share/clamav-testfiles``), named
  ``ClamAV-Test-File.<filename>``.

clamd appends ``.UNOFFICIAL`` to names from databases that are not signed
CVDs, so it reports e.g. ``Eicar-Test-Signature.UNOFFICIAL``.

:class:`Clamd` writes a clamd.conf next to it (``LocalSocket`` in the temp
dir, ``Foreground yes``, ``ScanMail``/``ScanArchive`` on,
``StreamMaxLength 60M``, ``AlertExceedsMax yes``, optional ``TCPSocket`` on
127.0.0.1) and runs ``clamd --config-file=...`` as a child process.  No
``User`` line is written: clamd only drops privileges when ``User`` is set, so
it runs as whoever runs the tests (root in CI included) and can read the temp
dir.  freshclam is never involved.

The same recipe works for trying mailwarden without internet access; real
deployments get real signatures from freshclam.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.support.eicar import eicar

#: Debian packages the suite needs.
CLAMD_PACKAGE = "clamav-daemon"
TESTFILES_PACKAGE = "clamav-testfiles"
TESTFILES = Path("/usr/share/clamav-testfiles")

#: Options every test clamd gets (``options=`` overrides or adds).
BASE_OPTIONS: dict[str, str] = {
    "Foreground": "yes",
    "ScanMail": "yes",
    "ScanArchive": "yes",
    "StreamMaxLength": "60M",
    "AlertExceedsMax": "yes",
    "LogTime": "yes",
    "LogVerbose": "no",
    "Bytecode": "no",
    "SelfCheck": "3600",
}


def find_clamd() -> str | None:
    """Path of the clamd binary (it lives in /usr/sbin, often not on PATH)."""
    found = shutil.which("clamd")
    if found:
        return found
    for candidate in ("/usr/sbin/clamd", "/usr/local/sbin/clamd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def virus_name_for_testfile(filename: str) -> str:
    """The name clamd reports for a clamav-testfiles file with our database."""
    return f"ClamAV-Test-File.{filename}.UNOFFICIAL"


def build_database(dbdir: Path, testfiles: Path = TESTFILES) -> int:
    """Write the offline signature database into ``dbdir``; return the count."""
    dbdir.mkdir(parents=True, exist_ok=True)
    (dbdir / "mailwarden-test.ndb").write_text(
        f"Eicar-Test-Signature:0:*:{eicar().hex()}\n", encoding="ascii"
    )
    lines = []
    if testfiles.is_dir():
        for path in sorted(testfiles.iterdir()):
            if path.is_file():
                data = path.read_bytes()
                md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
                lines.append(f"{md5}:{len(data)}:ClamAV-Test-File.{path.name}\n")
    if lines:
        (dbdir / "mailwarden-test.hdb").write_text("".join(lines), encoding="ascii")
    return 1 + len(lines)


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(path: str, timeout: float = 1.0) -> bool:
    """True when a clamd answers PONG on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"nPING\n")
            return s.recv(64) == b"PONG\n"
    except OSError:
        return False


class Clamd:
    """One clamd child process on a unix socket in a temp dir.

    ``start()`` and ``stop()`` may be called repeatedly (the socket path and
    TCP port stay the same), so a test can take clamd down and bring it back:
    use ``with clamd.stopped(): ...``.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        max_threads: int = 4,
        tcp: bool = False,
        options: Mapping[str, str] | None = None,
    ) -> None:
        binary = find_clamd()
        if binary is None:
            raise RuntimeError(
                f"clamd is not installed: apt-get install -y {CLAMD_PACKAGE} {TESTFILES_PACKAGE}"
            )
        self.binary = binary
        self._own_dir = workdir is None
        # A short path: unix socket paths are limited to 107 bytes.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mw-clamd-"))
        self.socket = str(self.workdir / "clamd.sock")
        self.tcp_address: str | None = f"127.0.0.1:{_free_tcp_port()}" if tcp else None
        self.max_threads = max_threads
        self.options = {**BASE_OPTIONS, **(options or {})}
        self.config_path = self.workdir / "clamd.conf"
        self.log_path = self.workdir / "clamd.log"
        self.signatures = build_database(self.workdir / "db")
        self._proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        """(Re)write clamd.conf for this instance."""
        (self.workdir / "tmp").mkdir(exist_ok=True)
        opts = {
            **self.options,
            "LocalSocket": self.socket,
            "LocalSocketMode": "600",
            "FixStaleSocket": "yes",
            "DatabaseDirectory": str(self.workdir / "db"),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "LogFile": str(self.log_path),
            "MaxThreads": str(self.max_threads),
        }
        if self.tcp_address:
            host, port = self.tcp_address.rsplit(":", 1)
            opts["TCPAddr"] = host
            opts["TCPSocket"] = port
        text = "".join(f"{k} {v}\n" for k, v in opts.items())
        self.config_path.write_text(text, encoding="ascii")
        return self.config_path

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 180.0) -> None:
        """Start clamd and wait (bounded) until it answers PING."""
        if self.running:
            return
        self.write_config()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        out = (self.workdir / "clamd.out").open("ab")
        try:
            self._proc = subprocess.Popen(
                [self.binary, f"--config-file={self.config_path}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"clamd exited with status {code}:\n{self.log_tail()}")
            if ping(self.socket):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"clamd did not answer PING within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop clamd (SIGTERM, then SIGKILL) and make sure the socket is gone."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """clamd down inside the block, running again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        """Stop clamd and remove the temp dir if this instance created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The end of clamd's log and console output, for failure messages."""
        text = ""
        for p in (self.log_path, self.workdir / "clamd.out"):
            with contextlib.suppress(OSError):
                text += p.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Clamd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
